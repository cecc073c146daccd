"""Prompts for the two agents and the exact output formats they are asked for (METHOD.md section 2).

Each agent's prompt is one APPEND-ONLY chat: a system message with the role and the output format, a first user
message with the data that never changes within an episode (history, candidates or peer opinion), then per earlier
turn the agent's own reply as an assistant message and a new user message with what that turn brought (the user's
reaction and the moving hint for the recommender; the recommender's next message for the user). So the prompt of
turn t is the prompt of turn t-1, the agent's reply, and one new message: earlier text never changes, and a
sampler reads it from its KV cache. The memory M_{t-1} is the dialogue itself. Builders are pure functions from
titles and text to chat messages; tokenizing them is `models.tokenizer.render_chat`'s job. The user agent's
builder takes no target and no candidate list, so the target i* cannot reach its prompt except as an item the
dialogue has shown. This module also owns the formatters that write well-formed outputs, which `parsing` reads
back to exactly what they were given.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

from coars_jax.agents.protocol import (
  ACTION_INTERVALS,
  ACTION_LABEL,
  ACTIONS,
  ITEM_LABEL,
  REASON_LABEL,
  SCORE_LABEL,
  check_action,
  check_score_for_action,
  format_score,
  is_single_line_title,
  single_line,
)

Message = dict[str, str]

# The item noun each dataset's prompts use; anything else gets the generic 'item'.
DATASET_ITEM_NOUNS = {
  'lastfm': ('artist', 'artists'),
  'movielens': ('movie', 'movies'),
  'instruments': ('product', 'products'),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptConfig:
  """Wording of both agents' prompts.

  Attributes:
    item_noun: what one item is called ('artist', 'movie', 'product'); the generic 'item' by default.
    item_noun_plural: its plural.
  """

  item_noun: str = 'item'
  item_noun_plural: str = 'items'

  def __post_init__(self):
    for name in ('item_noun', 'item_noun_plural'):
      value = getattr(self, name)
      if not (isinstance(value, str) and value and value == single_line(value)):
        raise ValueError(f'PromptConfig.{name} must be a non-empty single-line word, found {value!r}')

  @classmethod
  def for_dataset(cls, name: str) -> 'PromptConfig':
    """The wording for a dataset by name ('lastfm', 'movielens', 'instruments'), else the generic one."""
    if name not in DATASET_ITEM_NOUNS:
      return cls()
    noun, plural = DATASET_ITEM_NOUNS[name]
    return cls(item_noun=noun, item_noun_plural=plural)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryTurn:
  """One finished turn t of an episode, as later prompts show it: (m_rec_t, m_user_t).

  Attributes:
    item_title: the title shown as the recommender's item i_t (the matched candidate's title, or the recommender's
      own text when it named no candidate).
    recommender_reason: the recommender's rationale r_t.
    user_action: the user's action a_t, one of `ACTIONS`.
    user_score: the user's acceptance score s_t in [0, 1], inside the action's interval.
    user_reason: the user's rationale j_t.
    recommender_message: m_rec_t exactly as the recommender wrote it: its assistant message in its own later
      prompts. None writes the canonical 'Reason: ... / Item: ...' form of the fields above (scripted turns).
    user_message: m_user_t exactly as the user agent wrote it, likewise (None: the canonical form).
    hint_title: the hint the recommender's prompt showed at this turn (`RolloutConfig.show_hint`), or None.
  """

  item_title: str
  recommender_reason: str
  user_action: str
  user_score: float
  user_reason: str
  recommender_message: str | None = None
  user_message: str | None = None
  hint_title: str | None = None

  def __post_init__(self):
    check_action(self.user_action, 'MemoryTurn.user_action')
    # Stored as a Python float so that a turn built from a numpy scalar renders and compares the same way.
    object.__setattr__(
      self, 'user_score', check_score_for_action(self.user_action, self.user_score, 'MemoryTurn.user_score')
    )
    for name in ('item_title', 'recommender_reason', 'user_reason'):
      if not isinstance(getattr(self, name), str):
        raise TypeError(f'MemoryTurn.{name} must be a str, found {type(getattr(self, name)).__name__}')
    for name in ('recommender_message', 'user_message', 'hint_title'):
      if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
        raise TypeError(f'MemoryTurn.{name} must be a str or None, found {type(getattr(self, name)).__name__}')

  @property
  def recommender_text(self) -> str:
    """m_rec_t as the recommender's later prompts hold it."""
    if self.recommender_message is not None:
      return self.recommender_message
    return f'{REASON_LABEL}: {single_line(self.recommender_reason)}\n{ITEM_LABEL}: {_title_line(self.item_title)}'

  @property
  def user_text(self) -> str:
    """m_user_t as the user agent's later prompts hold it."""
    if self.user_message is not None:
      return self.user_message
    return (
      f'{REASON_LABEL}: {single_line(self.user_reason)}\n{ACTION_LABEL}: {self.user_action}\n'
      f'{SCORE_LABEL}: {format_score(self.user_score)}'
    )


@dataclasses.dataclass(frozen=True)
class Memory:
  """The episode memory M_{t-1}: every earlier turn, oldest first; empty at the start of each episode.

  Append-only: `append` returns a new memory and leaves this one as it was, so a prompt built from a memory
  never changes afterwards.
  """

  turns: tuple[MemoryTurn, ...] = ()

  def __post_init__(self):
    for index, turn in enumerate(self.turns):
      if not isinstance(turn, MemoryTurn):
        raise TypeError(f'Memory.turns[{index}] must be a MemoryTurn, found {type(turn).__name__}')

  def append(self, turn: MemoryTurn) -> 'Memory':
    return Memory(self.turns + (turn,))

  def __len__(self) -> int:
    return len(self.turns)

  def __iter__(self) -> Iterator[MemoryTurn]:
    return iter(self.turns)


def _title_line(title: str) -> str:
  # Line breaks inside a title would break the list it sits in. Other whitespace is kept as is, so that what the
  # model copies is the exact title (Instruments titles hold double spaces).
  return ' '.join(str(title).splitlines())


def _check_titles(titles: Sequence[str], field: str) -> None:
  if isinstance(titles, str):
    raise TypeError(f'{field} must be a sequence of titles, found a single string {titles!r}')
  for index, title in enumerate(titles):
    if not isinstance(title, str):
      raise TypeError(f'{field}[{index}] must be a str, found {type(title).__name__}')


def render_history(history_titles: Sequence[str]) -> str:
  if not history_titles:
    return '(none)'
  return '\n'.join(f'- {_title_line(title)}' for title in history_titles)


def render_candidates(candidate_titles: Sequence[str]) -> str:
  return '\n'.join(f'{number}. {_title_line(title)}' for number, title in enumerate(candidate_titles, start=1))


def render_reaction(number: int, turn: MemoryTurn) -> str:
  """How turn `number` went, as the recommender's next message tells it: the item as shown and the user's
  action, score and reason (the recommender's own reason is already in its reply)."""
  return '\n'.join(
    [
      f'Turn {number}: the user reacted to {_title_line(turn.item_title)}.',
      f"User's action: {turn.user_action}",
      f"User's score: {format_score(turn.user_score)}",
      f"User's reason: {single_line(turn.user_reason)}",
    ]
  )


def render_memory(memory: Memory) -> str:
  """Every earlier turn in full, oldest first, or a line saying there is none yet (a summary for reports and the
  Reflexion baseline; the agents' prompts hold the dialogue itself)."""
  if not memory.turns:
    return '(none: this is the first turn)'
  blocks = []
  for number, turn in enumerate(memory.turns, start=1):
    blocks.append(
      '\n'.join(
        [
          f'Turn {number}:',
          f'Recommended item: {_title_line(turn.item_title)}',
          f"Recommender's reason: {single_line(turn.recommender_reason)}",
          f"User's action: {turn.user_action}",
          f"User's score: {format_score(turn.user_score)}",
          f"User's reason: {single_line(turn.user_reason)}",
        ]
      )
    )
  return '\n\n'.join(blocks)


def _score_scale() -> str:
  return ', '.join(
    f'{action} [{format_score(low)}, {format_score(high)}{"]" if action == "click" else ")"}'
    for action, (low, high) in ACTION_INTERVALS.items()
  )


def recommender_system_prompt(config: PromptConfig = PromptConfig()) -> str:
  noun, plural = config.item_noun, config.item_noun_plural
  return (
    f'You are a recommender agent talking with a user. Each turn you recommend one {noun} and the user answers '
    f'with an action (click, star, skip or dislike), an acceptance score between 0 and 1, and a reason. The '
    f'dialogue ends when the user clicks. After each of your answers you are told how the user reacted: use it '
    f'to learn what they want.\n'
    f'Recommend exactly one item from the candidates. Answer with a Reason line and an Item line, exactly:\n'
    f'{REASON_LABEL}: <one sentence on why this user will like the {noun}>\n'
    f'{ITEM_LABEL}: <the exact title of one candidate, copied from the list without its number>\n'
    f'Only the candidate {plural} count; any other title is a wasted turn.'
  )


def _hint_section(hint_title: str | None) -> list[str]:
  if hint_title is None:
    return []
  # The hint ends in the very line the answer must end in ('Item: <title>'), so that a model can answer by copying
  # what follows the last 'Item:' it has seen (an induction copy), not by learning where a quote is.
  return [
    f'Hint: a sequential recommender trained on past interactions ranks this candidate first among those not '
    f'recommended yet in this dialogue:\n{ITEM_LABEL}: {_title_line(hint_title)}'
  ]


def recommender_messages(
  *,
  history_titles: Sequence[str],
  candidate_titles: Sequence[str],
  memory: Memory = Memory(),
  hint_title: str | None = None,
  config: PromptConfig = PromptConfig(),
) -> list[Message]:
  """The recommender's input x_rec_t = (h_u, C, M_{t-1}, optional hint) as one append-only chat.

  Turn t = len(memory) + 1. The first user message holds h_u and C (and turn 1's hint); each earlier turn k adds
  the recommender's reply m_rec_k (assistant) and a user message with the user's reaction to it and turn k+1's
  hint, so the prompt of turn t starts with the prompt of turn t-1 and its reply.

  Args:
    history_titles: h_u, the user's last items, oldest first.
    candidate_titles: C, shown as a numbered list in this order.
    memory: M_{t-1}, the earlier turns of this episode (each with the hint its turn showed).
    hint_title: turn t's hint, SASRec's best candidate not recommended yet; None leaves it out. It must be in C.
    config: the wording.
  """
  _check_titles(history_titles, 'history_titles')
  _check_titles(candidate_titles, 'candidate_titles')
  if not candidate_titles:
    raise ValueError('candidate_titles must hold at least one title')
  hints = [turn.hint_title for turn in memory] + [hint_title]
  for hint in hints:
    if hint is not None and hint not in candidate_titles:
      raise ValueError(
        f"hint_title {hint!r} is not one of the candidate titles; the hint names SASRec's top "
        f'candidate, so it must be in C'
      )
  plural = config.item_noun_plural
  first = [
    f"The user's history, oldest first:\n{render_history(history_titles)}",
    f'Candidate {plural}:\n{render_candidates(candidate_titles)}',
  ] + _hint_section(hints[0])
  messages = [
    {'role': 'system', 'content': recommender_system_prompt(config)},
    {'role': 'user', 'content': '\n\n'.join(first)},
  ]
  for number, turn in enumerate(memory, start=1):
    messages.append({'role': 'assistant', 'content': turn.recommender_text})
    messages.append(
      {'role': 'user', 'content': '\n\n'.join([render_reaction(number, turn)] + _hint_section(hints[number]))}
    )
  return messages


def user_system_prompt(config: PromptConfig = PromptConfig()) -> str:
  noun = config.item_noun
  return (
    f'You are a user with the history below. A recommender suggests one {noun} per turn and says why. Decide how '
    f'you react to the recommended {noun}, as this user would.\n'
    f'Answer with a Reason line, an Action line (click, star, skip or dislike) and a Score line between 0 and 1, '
    f'exactly:\n'
    f'{REASON_LABEL}: <one sentence, in your own voice, on why you react this way>\n'
    f'{ACTION_LABEL}: <{"|".join(reversed(ACTIONS))}>\n'
    f'{SCORE_LABEL}: <your acceptance score, a number from 0 to 1>\n'
    f'The score must fit the action: {_score_scale()}. click means you accept the {noun} and end the dialogue; '
    f'star means you like it but want to see more; skip means it does not interest you; dislike means you do '
    f'not want it.'
  )


def _recommendation(title: str, reason: str) -> str:
  return (
    f"The recommender now says:\nRecommended item: {_title_line(title)}\nRecommender's reason: {single_line(reason)}"
  )


def user_messages(
  *,
  history_titles: Sequence[str],
  recommended_title: str,
  recommender_reason: str,
  memory: Memory = Memory(),
  peer_opinion: str | None = None,
  config: PromptConfig = PromptConfig(),
) -> list[Message]:
  """The user agent's input x_user_t = (h_u, m_rec_t, M_{t-1}, p_t) as one append-only chat.

  Turn t = len(memory) + 1. The first user message holds h_u, the peer opinion p_t (one sentence, the same at
  every turn of an episode) and the recommender's first message; each earlier turn k adds the user agent's own
  reply m_user_k (assistant) and a user message with the recommender's message of turn k+1. There is
  deliberately no parameter for the target i* or the candidate list: the user agent never sees them.

  Args:
    history_titles: h_u, the user's last items, oldest first.
    recommended_title: the item i_t of the recommender's message m_rec_t.
    recommender_reason: the rationale r_t of m_rec_t.
    memory: M_{t-1}, the earlier turns of this episode.
    peer_opinion: the sentence p_t (`recsys.peer.peer_opinion`); None leaves it out.
    config: the wording.
  """
  _check_titles(history_titles, 'history_titles')
  if not isinstance(recommended_title, str):
    raise TypeError(f'recommended_title must be a str, found {type(recommended_title).__name__}')
  shown = [(turn.item_title, turn.recommender_reason) for turn in memory] + [(recommended_title, recommender_reason)]
  first = [f'Your history, oldest first:\n{render_history(history_titles)}']
  if peer_opinion is not None:
    first.append(f'Peer opinion: {single_line(peer_opinion)}')
  first.append(_recommendation(*shown[0]))
  messages = [
    {'role': 'system', 'content': user_system_prompt(config)},
    {'role': 'user', 'content': '\n\n'.join(first)},
  ]
  for number, turn in enumerate(memory, start=1):
    messages.append({'role': 'assistant', 'content': turn.user_text})
    messages.append({'role': 'user', 'content': _recommendation(*shown[number])})
  return messages


def format_recommender_output(reason: str, title: str) -> str:
  """A well-formed recommender message m_rec_t: 'Reason: <reason>' then 'Item: <title>'.

  The reason is put in its canonical single-line form (`protocol.single_line`), which is what parsing returns.
  The title is written unchanged, so it must already fit on one line (`protocol.is_single_line_title`).
  """
  if not (isinstance(title, str) and is_single_line_title(title)):
    raise ValueError(
      f'title must be non-empty, without line breaks and without whitespace at its ends, found {title!r}'
    )
  return f'{REASON_LABEL}: {single_line(reason)}\n{ITEM_LABEL}: {title}'


def format_user_output(reason: str, action: str, score: float) -> str:
  """A well-formed user message m_user_t: 'Reason: <reason>', 'Action: <action>', 'Score: <score>'.

  The score must lie in the action's interval: an output whose action and score disagree is not well-formed (the
  parser would clip the score), so writing one is refused rather than silently changed.
  """
  score = check_score_for_action(action, score)
  return f'{REASON_LABEL}: {single_line(reason)}\n{ACTION_LABEL}: {action}\n{SCORE_LABEL}: {format_score(score)}'
