"""The reference trajectory d of self-distillation (METHOD.md section 4): a finished episode rewritten with
hindsight as text, for the recommender or the user agent, and the teacher prompt x + d built from a student
prompt x. The default d is a deterministic template filled from plain values (titles, SASRec ranks, actions,
scores, the ground-truth title); `self_written_reference` is the option where the agent writes the diagnosis
itself through a generation callback. Host-side Python only: d is training-time privileged context, never shown
at inference.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from coars_jax.agents.protocol import (
  ACTION_INTERVALS,
  ACTION_LABEL,
  ACTIONS,
  AGENTS,
  ITEM_LABEL,
  POSITIVE_ACTIONS,
  REASON_LABEL,
  SCORE_LABEL,
  check_action,
  format_score,
  single_line,
)

Message = dict[str, str]

REFERENCE_HEADER = 'Hindsight review of this dialogue (training-only context, written after it ended):'
# Separates the student's own prompt text from d inside the last user message of the teacher prompt.
REFERENCE_SEPARATOR = '\n\n'


@dataclasses.dataclass(frozen=True, kw_only=True)
class TurnHindsight:
  """What d says about one turn t.

  Attributes:
    turn: t, from 1.
    item_title: the title of i_t, or None when the recommender named no candidate (an invalid message).
    sasrec_rank: SASRec's rank of i_t among the candidates C, 1 = best; None when unknown or no item.
    hit: hit_t, i_t = i*.
    action: a_t, one of `protocol.ACTIONS`.
    acceptance_score: s_t in [0, 1].
  """

  turn: int
  item_title: str | None
  sasrec_rank: int | None
  hit: bool
  action: str
  acceptance_score: float

  def __post_init__(self):
    if isinstance(self.turn, bool) or not isinstance(self.turn, (int, np.integer)) or self.turn < 1:
      raise ValueError(f'TurnHindsight.turn must be an int >= 1, found {self.turn!r}')
    object.__setattr__(self, 'turn', int(self.turn))
    if self.item_title is not None and not isinstance(self.item_title, str):
      raise TypeError(f'TurnHindsight.item_title must be a str or None, found {type(self.item_title).__name__}')
    if self.sasrec_rank is not None:
      if (
        isinstance(self.sasrec_rank, bool)
        or not isinstance(self.sasrec_rank, (int, np.integer))
        or self.sasrec_rank < 1
      ):
        raise ValueError(f'TurnHindsight.sasrec_rank must be an int >= 1 or None, found {self.sasrec_rank!r}')
      object.__setattr__(self, 'sasrec_rank', int(self.sasrec_rank))
    check_action(self.action, 'TurnHindsight.action')
    object.__setattr__(self, 'hit', bool(self.hit))
    score = float(self.acceptance_score)
    if not 0.0 <= score <= 1.0:
      raise ValueError(f'TurnHindsight.acceptance_score must lie in [0, 1], found {self.acceptance_score!r}')
    object.__setattr__(self, 'acceptance_score', score)
    if self.hit and self.item_title is None:
      raise ValueError(f'TurnHindsight: turn {self.turn} is a hit but names no item')


def _quoted(title: str) -> str:
  return f'"{single_line(title)}"'


def _rank_note(rank: int | None, num_candidates: int | None) -> str:
  if rank is None:
    return ''
  return f' (SASRec rank {rank} of {num_candidates})' if num_candidates else f' (SASRec rank {rank})'


def _reaction(turn: TurnHindsight, subject: str) -> str:
  return f'{subject} reacted {turn.action} with score {format_score(round(turn.acceptance_score, 3))}'


def _target_line(target_title: str, target_rank: int | None, num_candidates: int | None, whose: str) -> str:
  return f'{whose} true next item was {_quoted(target_title)}{_rank_note(target_rank, num_candidates)}.'


def _check_turns(turns: Sequence[TurnHindsight]) -> None:
  if isinstance(turns, TurnHindsight) or not turns:
    raise ValueError('the reference needs a non-empty sequence of TurnHindsight, one per turn')
  for index, turn in enumerate(turns):
    if not isinstance(turn, TurnHindsight):
      raise TypeError(f'turns[{index}] must be a TurnHindsight, found {type(turn).__name__}')


def _turn_line(turn: TurnHindsight, facts: str, verdict: str, omit_samples: bool) -> str:
  """'Turn t: <facts>. <verdict>', or 'Turn t: <verdict>' when `omit_samples` drops the turn's sampled item and
  reaction (the facts), so that d holds no sampled text the teacher could raise A by copying."""
  return f'Turn {turn.turn}: {verdict}' if omit_samples else f'Turn {turn.turn}: {facts}. {verdict}'


def recommender_reference(
  turns: Sequence[TurnHindsight],
  *,
  target_title: str,
  target_rank: int | None = None,
  num_candidates: int | None = None,
  omit_samples: bool = False,
) -> str:
  """d for the recommender: the ground truth, then per turn what was recommended, the user's reaction, whether
  the pick was right and what should have been recommended, e.g.

    Turn 1: you recommended "X" (SASRec rank 4 of 20); the user reacted skip with score 0.4. That was wrong: the
    user's true next item was "Y"; you should have recommended "Y".

  With `omit_samples` each turn keeps its verdict only ("Turn 1: That was wrong: ..."): no sampled item, SASRec
  rank of it, action or score.
  """
  _check_turns(turns)
  target = _quoted(target_title)
  lines = [REFERENCE_HEADER, _target_line(target_title, target_rank, num_candidates, "The user's")]
  for turn in turns:
    reaction = _reaction(turn, 'the user')
    if turn.item_title is None:
      facts = f'your message named no candidate; {reaction}'
      verdict = (
        f'That was wrong: name exactly one candidate title; the true next item was {target}, so you should '
        f'have recommended {target}.'
      )
    else:
      facts = f'you recommended {_quoted(turn.item_title)}{_rank_note(turn.sasrec_rank, num_candidates)}; {reaction}'
      if turn.hit:
        verdict = "That was right: it is the user's true next item."
      elif turn.action in POSITIVE_ACTIONS:
        verdict = (
          f'The user may really like it, but it is not the true next item; you should have recommended {target}.'
        )
      else:
        verdict = f"That was wrong: the user's true next item was {target}; you should have recommended {target}."
    lines.append(_turn_line(turn, facts, verdict, omit_samples))
  lines.append(f'The right recommendation at every turn was {target}.')
  return '\n'.join(lines)


def user_reference(
  turns: Sequence[TurnHindsight],
  *,
  target_title: str,
  target_rank: int | None = None,
  num_candidates: int | None = None,
  omit_samples: bool = False,
) -> str:
  """d for the user agent: the ground truth, then per turn the item suggested, the reaction given, whether it was
  right and which reaction would have been: click with a high score for the true next item, a low score (skip
  or dislike) for any other; a non-target the user clicked or starred is not judged (the exclusion rule of
  METHOD.md section 3). With `omit_samples` each turn keeps its verdict only (no suggested item, action or
  score)."""
  _check_turns(turns)
  target = _quoted(target_title)
  click_low = ACTION_INTERVALS['click'][0]
  skip_high = ACTION_INTERVALS['skip'][1]
  lines = [REFERENCE_HEADER, _target_line(target_title, target_rank, num_candidates, 'Your')]
  for turn in turns:
    reaction = _reaction(turn, 'you')
    suggested = (
      'the recommender named no candidate'
      if turn.item_title is None
      else f'the recommender suggested {_quoted(turn.item_title)}{_rank_note(turn.sasrec_rank, num_candidates)}'
    )
    if turn.hit:
      verdict = (
        f'{"That was right" if turn.action == "click" else "That was wrong"}: it is your true next item, so '
        f'the right reaction was click with a high score (at least {format_score(click_low)}).'
      )
    elif turn.action in POSITIVE_ACTIONS:
      verdict = f'It is not your true next item ({target}), but you may really like it, so this reaction is not judged.'
    else:
      verdict = (
        f'That was right: it is not your true next item ({target}), so the right reaction was a low score '
        f'(skip or dislike, below {format_score(skip_high)}); the lower, the better.'
      )
    lines.append(_turn_line(turn, f'{suggested}; {reaction}', verdict, omit_samples))
  return '\n'.join(lines)


def reference_trajectory(
  agent: str,
  turns: Sequence[TurnHindsight],
  *,
  target_title: str,
  target_rank: int | None = None,
  num_candidates: int | None = None,
  omit_samples: bool = False,
) -> str:
  """The template d of `agent` ('recommender' or 'user'); `omit_samples` as in `recommender_reference`."""
  if agent == 'recommender':
    return recommender_reference(
      turns,
      target_title=target_title,
      target_rank=target_rank,
      num_candidates=num_candidates,
      omit_samples=omit_samples,
    )
  if agent == 'user':
    return user_reference(
      turns,
      target_title=target_title,
      target_rank=target_rank,
      num_candidates=num_candidates,
      omit_samples=omit_samples,
    )
  raise ValueError(f'agent must be one of {AGENTS}, found {agent!r}')


def candidate_ranks(scores: Sequence[float]) -> list[int]:
  """SASRec's 1-based rank of each candidate from its scores, in the candidates' order; ties go to the earlier
  candidate, as the scripted warm start and the peer's argmax break them."""
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 1:
    raise ValueError(f'candidate_ranks: expected one score per candidate, found shape {scores.shape}')
  order = np.argsort(-scores, kind='stable')
  ranks = np.empty(len(scores), np.int64)
  ranks[order] = np.arange(1, len(scores) + 1)
  return ranks.tolist()


def hindsight_turns(episode: Any, ranks: Sequence[int] | None = None) -> tuple[list[TurnHindsight], int | None]:
  """(the turns of d, the target's SASRec rank) of an `agents.Episode`.

  ranks: SASRec's rank of each candidate in `episode.candidates` order (`candidate_ranks`), or None to leave
  ranks out.
  """
  candidates = [int(item) for item in episode.candidates]
  if ranks is not None and len(ranks) != len(candidates):
    raise ValueError(f'hindsight_turns: {len(ranks)} ranks for {len(candidates)} candidates')

  def rank_of(item: int) -> int | None:
    return None if ranks is None or item not in candidates else int(ranks[candidates.index(item)])

  turns = []
  for turn in episode.turns:
    named = int(turn.item) in candidates
    title = episode.candidate_titles[candidates.index(int(turn.item))] if named else None
    turns.append(
      TurnHindsight(
        turn=turn.turn,
        item_title=title,
        sasrec_rank=rank_of(int(turn.item)),
        hit=turn.hit,
        action=turn.action,
        acceptance_score=turn.acceptance_score,
      )
    )
  return turns, rank_of(int(episode.target))


def episode_reference(
  episode: Any, agent: str, ranks: Sequence[int] | None = None, *, omit_samples: bool = False
) -> str:
  """The template d of `agent` for a finished `agents.Episode` (ranks as in `hindsight_turns`; `omit_samples` as
  in `recommender_reference`)."""
  turns, target_rank = hindsight_turns(episode, ranks)
  return reference_trajectory(
    agent,
    turns,
    target_title=episode.target_title,
    target_rank=target_rank,
    num_candidates=len(episode.candidates) if ranks is not None else None,
    omit_samples=omit_samples,
  )


def restated_instructions(agent: str) -> str:
  """The output format, restated after d so that the format is the last thing the teacher reads."""
  if agent == 'recommender':
    return (
      f'With this hindsight, answer the current turn exactly as instructed: a {REASON_LABEL} line, then an '
      f'{ITEM_LABEL} line with the exact title of one candidate.'
    )
  if agent == 'user':
    return (
      f'With this hindsight, react to the current recommendation exactly as instructed: a {REASON_LABEL} '
      f'line, an {ACTION_LABEL} line ({"|".join(reversed(ACTIONS))}) and a {SCORE_LABEL} line.'
    )
  raise ValueError(f'agent must be one of {AGENTS}, found {agent!r}')


def teacher_messages(student_messages: Sequence[Message], reference: str, *, agent: str) -> list[Message]:
  """The teacher prompt x + d as chat messages, from the student prompt x.

  Where d goes: at the end of the LAST user message of x, after the turn's data, followed by the output format
  restated (`restated_instructions`). The system message and every earlier message are unchanged, so x + d is
  x with a suffix inside its final user turn: the student's context up to that point tokenizes the same, and
  the sampled completion y follows the same chat-template turn header in both prompts.

  The input list is not modified; a new list of new dicts is returned.
  """
  if isinstance(student_messages, dict) or not student_messages:
    raise ValueError('teacher_messages: student_messages must be a non-empty list of {"role", "content"} dicts')
  for index, message in enumerate(student_messages):
    if not (
      isinstance(message, dict) and isinstance(message.get('role'), str) and isinstance(message.get('content'), str)
    ):
      raise ValueError(
        f'teacher_messages: student_messages[{index}] must be a dict with str "role" and "content", found {message!r}'
      )
  if not isinstance(reference, str) or not reference.strip():
    raise ValueError('teacher_messages: the reference trajectory d is empty')
  users = [index for index, message in enumerate(student_messages) if message['role'] == 'user']
  if not users:
    raise ValueError(
      f'teacher_messages: the student prompt has no user message (roles '
      f'{[m["role"] for m in student_messages]}); d is appended to the last one'
    )
  last = users[-1]
  messages = [dict(message) for message in student_messages]
  messages[last]['content'] = REFERENCE_SEPARATOR.join(
    [messages[last]['content'], reference.strip(), restated_instructions(agent)]
  )
  return messages


# --- option: the agent writes its own diagnosis -----------------------------------------------------------------


def self_diagnosis_messages(
  agent: str,
  turns: Sequence[TurnHindsight],
  *,
  target_title: str,
  target_rank: int | None = None,
  num_candidates: int | None = None,
) -> list[Message]:
  """The prompt asking `agent` to write d itself from the facts of the episode and the ground truth (section 4's
  option): the facts of each turn without any verdict, and a request for one diagnosis line per turn."""
  if agent not in AGENTS:
    raise ValueError(f'agent must be one of {AGENTS}, found {agent!r}')
  _check_turns(turns)
  role = 'recommender agent' if agent == 'recommender' else 'simulated user'
  facts = [_target_line(target_title, target_rank, num_candidates, "The user's")]
  for turn in turns:
    item = (
      'no candidate was named'
      if turn.item_title is None
      else f'{_quoted(turn.item_title)}{_rank_note(turn.sasrec_rank, num_candidates)} was recommended'
    )
    facts.append(f'Turn {turn.turn}: {item}; {_reaction(turn, "the user")}.')
  request = (
    'For each turn, write one line "Turn t: ..." saying whether the recommendation was right and what '
    'should have been recommended.'
    if agent == 'recommender'
    else 'For each turn, write one line "Turn t: ..." saying whether the reaction was right and which reaction '
    '(action and score) would have been right.'
  )
  return [
    {
      'role': 'system',
      'content': f'You are the {role} of a finished recommendation dialogue. Review it in '
      f'hindsight, knowing the ground truth.',
    },
    {'role': 'user', 'content': '\n'.join(facts) + '\n\n' + request},
  ]


def self_written_reference(
  generate: Callable[[list[Message]], str],
  agent: str,
  turns: Sequence[TurnHindsight],
  *,
  target_title: str,
  target_rank: int | None = None,
  num_candidates: int | None = None,
) -> str:
  """d written by the agent itself: `generate` (chat messages -> text, e.g. the agent's adapter sampling
  greedily) answers `self_diagnosis_messages`; d is the header, the ground truth and that text. An empty answer
  falls back to the template d, so a teacher prompt never loses its privileged context."""
  text = generate(
    self_diagnosis_messages(
      agent, turns, target_title=target_title, target_rank=target_rank, num_candidates=num_candidates
    )
  )
  if not isinstance(text, str):
    raise TypeError(f'self_written_reference: generate must return a str, found {type(text).__name__}')
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
  if not lines:
    return reference_trajectory(
      agent, turns, target_title=target_title, target_rank=target_rank, num_candidates=num_candidates
    )
  whose = "The user's" if agent == 'recommender' else 'Your'
  return '\n'.join([REFERENCE_HEADER, _target_line(target_title, target_rank, num_candidates, whose), *lines])
