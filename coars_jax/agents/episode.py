"""One episode of METHOD.md section 2 as the loop leaves it: the protocol settings (`RolloutConfig`), each turn's
two messages with what was read from them and the reward inputs (`Turn`), the window's dialogue (`Episode`), the
per-call sampling seeds and the metrics of section 6."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from coars_jax.agents.backend import Generation, check_agent
from coars_jax.agents.parsing import ParseConfig, RecommenderParse, UserParse
from coars_jax.agents.prompts import Memory, PromptConfig, MemoryTurn
from coars_jax.agents.protocol import ACTIONS
from coars_jax.data.candidates import NUM_CANDIDATES

# The item a user prompt shows when the recommender's message had no `Item:` line at all.
NO_ITEM_SHOWN = '(no item named)'
# Item id stored for a turn whose recommender message named no candidate.
NO_ITEM = -1


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutConfig:
  """The dialogue protocol of METHOD.md section 2.

  Attributes:
    max_turns: T_u, the most turns an episode runs (default 5, as in AFL); it stops earlier on a click.
    candidate_seed: the seed of the candidate lists C (`data.candidate_list`); fixed so C is the same every run.
    num_candidates: |C| (20 in the protocol).
    show_hint: whether the recommender's input x_rec_t includes SASRec's top pick as a hint (the paper's
      "optionally"); off by default, so the recommender's Hit@1 is its own. The hint at turn t is SASRec's
      highest-scored candidate that this episode has not recommended yet (at t = 1, its top candidate), when the
      peer can rank candidates (`SASRecPeer` can); otherwise SASRec's top candidate at every turn.
    show_peer_opinion: whether the user's input x_user_t includes the peer opinion p_t naming SASRec's top
      candidate (on, as the protocol has it).
    prompt: wording of both prompts; None takes `PromptConfig.for_dataset(dataset.name)`.
    parse: parser tolerance for both agents' messages.
  """

  max_turns: int = 5
  candidate_seed: int = 0
  num_candidates: int = NUM_CANDIDATES
  show_hint: bool = False
  show_peer_opinion: bool = True
  prompt: PromptConfig | None = None
  parse: ParseConfig = ParseConfig()

  def __post_init__(self):
    for name, least in (('max_turns', 1), ('candidate_seed', 0), ('num_candidates', 1)):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f'RolloutConfig.{name} must be an int >= {least}, found {value!r}')
    for name in ('show_hint', 'show_peer_opinion'):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f'RolloutConfig.{name} must be a bool, found {getattr(self, name)!r}')
    if self.prompt is not None and not isinstance(self.prompt, PromptConfig):
      raise TypeError(f'RolloutConfig.prompt must be a PromptConfig or None, found {type(self.prompt).__name__}')
    if not isinstance(self.parse, ParseConfig):
      raise TypeError(f'RolloutConfig.parse must be a ParseConfig, found {type(self.parse).__name__}')


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Turn:
  """Turn t of one episode: both messages, what was read from them, and the per-turn reward inputs.

  Attributes:
    turn: t, from 1.
    recommender: the recommender's message m_rec_t with its prompt x_rec_t.
    user: the user's message m_user_t with its prompt x_user_t.
    recommender_parse: r_t and i_t as parsed; `valid` is False when no candidate was named.
    user_parse: j_t, a_t and s_t as parsed (an invalid message reads as a skip at s = .375).
    shown_title: the item as the user prompt and the memory show it: the matched candidate's title, else what
      the recommender's `Item:` line said, else `NO_ITEM_SHOWN`.
    shown_reason: the recommender's reason as shown: r_t, else (no `Reason:` line) the whole message in one line.
    item: i_t, the item id of the named candidate; `NO_ITEM` when none was named.
    hit: hit_t = 1 iff i_t = i* (False for an invalid message: a miss, METHOD.md section 2).
    acceptance_score: s_t in [0, 1].
    peer_similarity: q_t in [-1, 1], SASRec's cosine between the user and i_t; 0 when no item was named, so that
      the peer term of R_user (Eq. 8) vanishes rather than scoring an item that does not exist.
    action: a_t, one of `ACTIONS`.
    hint_title: the hint x_rec_t showed (the peer's best candidate not yet recommended, `RolloutConfig.show_hint`),
      or None without a hint; what a trainer needs to rebuild x_rec_t.
  """

  turn: int
  recommender: Generation
  user: Generation
  recommender_parse: RecommenderParse
  user_parse: UserParse
  shown_title: str
  shown_reason: str
  item: int
  hit: bool
  acceptance_score: float
  peer_similarity: float
  action: str
  hint_title: str | None = None

  @property
  def memory_entry(self) -> MemoryTurn:
    """(m_rec_t, m_user_t) as the memory keeps it."""
    return MemoryTurn(
      item_title=self.shown_title,
      recommender_reason=self.shown_reason,
      user_action=self.action,
      user_score=self.acceptance_score,
      user_reason=self.user_parse.reason,
      recommender_message=self.recommender.text,
      user_message=self.user.text,
      hint_title=self.hint_title,
    )

  @property
  def clicked(self) -> bool:
    return self.action == 'click'


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Episode:
  """One window's dialogue.

  Attributes:
    split, window_index: where the window comes from.
    user: its user id.
    history: h_u as item ids, oldest first; `history_titles` as shown.
    target: i*; `target_title` its title (never shown to the user agent unless the dialogue named it).
    candidates: C as item ids, in prompt order; `candidate_titles` as shown.
    peer_item: SASRec's top candidate (the hint and the item p_t names); `peer_title` its title.
    turns: turns 1..T in order.
  """

  split: str
  window_index: int
  user: int
  history: tuple[int, ...]
  history_titles: tuple[str, ...]
  target: int
  target_title: str
  candidates: tuple[int, ...]
  candidate_titles: tuple[str, ...]
  peer_item: int
  peer_title: str
  turns: tuple[Turn, ...]

  @property
  def num_turns(self) -> int:
    return len(self.turns)

  @property
  def final_item(self) -> int:
    """i_T, the item of the last turn: the episode's recommendation (`NO_ITEM` if that message named none)."""
    return self.turns[-1].item

  @property
  def final_hit(self) -> bool:
    return self.final_item == self.target

  @property
  def clicked(self) -> bool:
    return self.turns[-1].clicked

  def memory(self, before_turn: int | None = None) -> Memory:
    """M_{t-1} for `before_turn` = t (the memory shown in turn t's prompts); the final memory M_T by default."""
    count = len(self.turns) if before_turn is None else before_turn - 1
    return Memory(tuple(turn.memory_entry for turn in self.turns[:count]))


def turn_seed(seed: int, turn: int, agent: str) -> int:
  """The sampling seed of one batched call: a function of the rollout seed, t and the agent alone, so a rerun
  of the same batch draws the same messages and the two agents never share a random stream."""
  state = np.random.SeedSequence([int(seed), int(turn), check_agent(agent)]).generate_state(1)[0]
  return int(state & 0x7FFFFFFF)


def episode_metrics(episodes: Sequence[Episode]) -> dict[str, float]:
  """METHOD.md section 6 over a set of episodes.

  Returns:
    hit_at_1: the share of episodes whose final item i_T is the target i*.
    valid_ratio: the share of recommender messages (every turn) that named a candidate.
    average_turns: mean turns per episode.
    click_rate: the share of episodes that ended on a click.
    user_valid_ratio: the share of user messages with a usable action.
  """
  if not episodes:
    raise ValueError('episode_metrics needs at least one episode')
  turns = [turn for episode in episodes for turn in episode.turns]
  return {
    'hit_at_1': float(np.mean([episode.final_hit for episode in episodes])),
    'valid_ratio': float(np.mean([turn.recommender_parse.valid for turn in turns])),
    'average_turns': float(np.mean([episode.num_turns for episode in episodes])),
    'click_rate': float(np.mean([episode.clicked for episode in episodes])),
    'user_valid_ratio': float(np.mean([turn.user_parse.valid for turn in turns])),
  }


def action_id(action: str) -> int:
  """The index of a_t in `protocol.ACTIONS` (dislike 0, skip 1, star 2, click 3)."""
  return ACTIONS.index(action)
