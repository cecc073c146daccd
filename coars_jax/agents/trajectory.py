"""Rollouts as padded arrays for the trainer, and as JSON lines for people: `Trajectory` holds one row per agent
message (a segment: turn t's recommender message, then its user message, episode by episode) with the prompt x
left-padded and the completion y right-padded in separate arrays, the per-segment reward inputs (hit_t, s_t, q_t,
a_t, validity) and behaviour log-probs, and per-episode summaries. Keeping x and y apart is the layout
`sampling.score` takes, so the trainer scores the student on (x, y) and the teacher on (x + d, y) with the same
completion arrays, and a completion mask that is exactly the tokens that segment's agent generated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Sequence

import chex
import numpy as np

from coars_jax.agents.episodes import AGENTS, Episode, Generation, Turn, action_id
from coars_jax.sampling import LengthBuckets
from coars_jax.sampling.buckets import check_left_padded, check_right_padded, left_pad, right_pad

RECOMMENDER_ID, USER_ID = 0, 1


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Trajectory:
  """A batch of episodes, S segments (agent messages) and E episodes, as host numpy arrays.

  Segment order: episode 0's turn 1 recommender, turn 1 user, turn 2 recommender, ..., then episode 1. Per-turn
  values (hit_t, s_t, q_t, a_t) are repeated on both segments of their turn, since both agents' rewards read them
  (Eq. 7-8).

  Attributes:
    prompt_tokens: int32[S, P], the prompt x_t of each message, left-padded.
    prompt_mask: bool[S, P], True on real prompt tokens.
    completion_tokens: int32[S, N], the generated message y_t, right-padded.
    completion_mask: bool[S, N], True on the tokens this segment's agent generated (end-of-turn token
      included): the loss mask; `loss_mask(agent)` restricts it to one agent's segments.
    behaviour_log_probs: float32[S, N], log pi_old(y_{t,n} | x_t, y_{t,<n}) at sampling time; 0 off the mask.
    episode: int32[S], the episode (row of `num_turns` etc.) each segment belongs to.
    window_index: int32[S], the window that episode plays.
    turn: int32[S], t from 1.
    agent: int32[S], 0 for the recommender, 1 for the user (`episodes.AGENTS`).
    valid: bool[S], whether this segment's own message parsed: the recommender named a candidate / the user gave
      a usable action.
    finished: bool[S], whether the message ended on an end-of-turn token rather than at the token budget.
    item: int32[S], i_t (-1 when the turn's recommender message named no candidate).
    hit: bool[S], hit_t = 1 iff i_t = i*.
    acceptance_score: float32[S], s_t in [0, 1] (0.375 for an invalid user message).
    peer_similarity: float32[S], q_t in [-1, 1] (0 when no item was named).
    action: int32[S], a_t as an index into `protocol.ACTIONS` (dislike 0, skip 1, star 2, click 3).
    num_turns: int32[E], T for each episode.
    final_item: int32[E], i_T, the episode's recommendation (-1 when the last message named no candidate).
    final_hit: bool[E], i_T = i*.
    clicked: bool[E], whether the episode ended on a click.
    target: int32[E], i*.
    episode_window_index: int32[E], each episode's window.
    prompt_texts, completion_texts: the rendered prompt and decoded message of each segment, for inspection.
    records: one JSON-ready dict per episode (`episode_record`), what `to_jsonl` writes.
    split: the split the windows come from.
  """

  prompt_tokens: np.ndarray
  prompt_mask: np.ndarray
  completion_tokens: np.ndarray
  completion_mask: np.ndarray
  behaviour_log_probs: np.ndarray
  episode: np.ndarray
  window_index: np.ndarray
  turn: np.ndarray
  agent: np.ndarray
  valid: np.ndarray
  finished: np.ndarray
  item: np.ndarray
  hit: np.ndarray
  acceptance_score: np.ndarray
  peer_similarity: np.ndarray
  action: np.ndarray
  num_turns: np.ndarray
  final_item: np.ndarray
  final_hit: np.ndarray
  clicked: np.ndarray
  target: np.ndarray
  episode_window_index: np.ndarray
  prompt_texts: tuple[str, ...]
  completion_texts: tuple[str, ...]
  records: tuple[dict, ...]
  split: str

  def __post_init__(self):
    segments, episodes = self.prompt_tokens.shape[0], self.num_turns.shape[0]
    prompt_length, completion_length = self.prompt_tokens.shape[1], self.completion_tokens.shape[1]
    chex.assert_shape([self.prompt_tokens, self.prompt_mask], (segments, prompt_length))
    chex.assert_shape(
      [self.completion_tokens, self.completion_mask, self.behaviour_log_probs], (segments, completion_length)
    )
    chex.assert_shape(
      [
        self.episode,
        self.window_index,
        self.turn,
        self.agent,
        self.valid,
        self.finished,
        self.item,
        self.hit,
        self.acceptance_score,
        self.peer_similarity,
        self.action,
      ],
      (segments,),
    )
    chex.assert_shape(
      [self.num_turns, self.final_item, self.final_hit, self.clicked, self.target, self.episode_window_index],
      (episodes,),
    )
    chex.assert_type(
      [
        self.prompt_tokens,
        self.completion_tokens,
        self.episode,
        self.window_index,
        self.turn,
        self.agent,
        self.item,
        self.action,
        self.num_turns,
        self.final_item,
        self.target,
        self.episode_window_index,
      ],
      np.int32,
    )
    chex.assert_type(
      [self.prompt_mask, self.completion_mask, self.valid, self.finished, self.hit, self.final_hit, self.clicked],
      np.bool_,
    )
    chex.assert_type([self.behaviour_log_probs, self.acceptance_score, self.peer_similarity], np.float32)
    check_left_padded(self.prompt_mask, 'Trajectory.prompt_mask')
    check_right_padded(self.completion_mask, 'Trajectory.completion_mask')
    if np.any(self.behaviour_log_probs[~self.completion_mask] != 0):
      raise ValueError('Trajectory.behaviour_log_probs must be 0 outside completion_mask')
    if not (len(self.prompt_texts) == len(self.completion_texts) == segments and len(self.records) == episodes):
      raise ValueError(
        f'Trajectory has {segments} segments and {episodes} episodes but {len(self.prompt_texts)} '
        f'prompt texts, {len(self.completion_texts)} completion texts and {len(self.records)} records'
      )
    if segments and (self.episode.min() < 0 or self.episode.max() >= episodes):
      raise ValueError(
        f'Trajectory.episode must index the {episodes} episodes, found values in '
        f'[{self.episode.min()}, {self.episode.max()}]'
      )
    if not np.isin(self.agent, (RECOMMENDER_ID, USER_ID)).all():
      raise ValueError(f'Trajectory.agent must hold 0 (recommender) or 1 (user), found {np.unique(self.agent)}')
    if segments != 2 * int(self.num_turns.sum()):
      raise ValueError(
        f'Trajectory has {segments} segments but its episodes have {int(self.num_turns.sum())} turns '
        f'of two messages each'
      )

  @property
  def num_segments(self) -> int:
    return int(self.prompt_tokens.shape[0])

  @property
  def num_episodes(self) -> int:
    return int(self.num_turns.shape[0])

  def agent_segments(self, agent: str) -> np.ndarray:
    """bool[S]: which segments are `agent`'s messages."""
    if agent not in AGENTS:
      raise ValueError(f'agent must be one of {AGENTS}, found {agent!r}')
    return self.agent == AGENTS.index(agent)

  def loss_mask(self, agent: str) -> np.ndarray:
    """bool[S, N]: exactly the tokens `agent` generated; every other agent's tokens and all prompts are off."""
    return self.completion_mask & self.agent_segments(agent)[:, None]

  def metrics(self) -> dict[str, float]:
    """The same metrics as `episodes.episode_metrics`, from the arrays."""
    recommender = self.agent == RECOMMENDER_ID
    return {
      'hit_at_1': float(self.final_hit.mean()),
      'valid_ratio': float(self.valid[recommender].mean()),
      'average_turns': float(self.num_turns.mean()),
      'click_rate': float(self.clicked.mean()),
      'user_valid_ratio': float(self.valid[~recommender].mean()),
    }

  @classmethod
  def from_episodes(
    cls, episodes: Sequence[Episode], *, pad_token_id: int = 0, buckets: LengthBuckets | None = None
  ) -> 'Trajectory':
    """Pads the episodes' messages into arrays.

    Args:
      episodes: from `episodes.run_episodes`, all from one split.
      pad_token_id: fills padding slots (masked everywhere, so any valid id works).
      buckets: if given, P and N are padded up to a prompt / completion bucket, so that the trainer's jitted
        scoring sees a bounded set of widths; otherwise they are the longest prompt and completion.
    """
    episodes = list(episodes)
    if not episodes:
      raise ValueError('Trajectory.from_episodes needs at least one episode')
    splits = {episode.split for episode in episodes}
    if len(splits) != 1:
      raise ValueError(
        f'Trajectory.from_episodes: episodes come from several splits {sorted(splits)}; build one trajectory per split'
      )
    empty = [index for index, episode in enumerate(episodes) if not episode.turns]
    if empty:
      raise ValueError(f'Trajectory.from_episodes: episodes {empty[:5]} have no turns')
    rows: list[tuple[int, Episode, Turn, int, Generation]] = []
    for index, episode in enumerate(episodes):
      for turn in episode.turns:
        rows.append((index, episode, turn, RECOMMENDER_ID, turn.recommender))
        rows.append((index, episode, turn, USER_ID, turn.user))
    prompts = [generation.prompt_ids for *_, generation in rows]
    completions = [generation.completion_ids for *_, generation in rows]
    prompt_length = max(len(p) for p in prompts)
    completion_length = max(max(len(c) for c in completions), 1)
    if buckets is not None:
      prompt_length = buckets.prompt_length(prompt_length)
      completion_length = buckets.completion_length(completion_length)
    prompt_tokens, prompt_mask = left_pad(prompts, prompt_length, pad_token_id)
    completion_tokens, completion_mask = right_pad(completions, completion_length, pad_token_id)
    log_probs = np.zeros(completion_tokens.shape, np.float32)
    for row, (*_, generation) in enumerate(rows):
      log_probs[row, : len(generation.log_probs)] = generation.log_probs

    def column(values, dtype):
      return np.asarray(values, dtype).reshape(len(values))

    def own_validity(turn: Turn, agent: int) -> bool:
      return turn.recommender_parse.valid if agent == RECOMMENDER_ID else turn.user_parse.valid

    return cls(
      prompt_tokens=prompt_tokens,
      prompt_mask=prompt_mask.astype(bool),
      completion_tokens=completion_tokens,
      completion_mask=completion_mask.astype(bool),
      behaviour_log_probs=log_probs,
      episode=column([r[0] for r in rows], np.int32),
      window_index=column([r[1].window_index for r in rows], np.int32),
      turn=column([r[2].turn for r in rows], np.int32),
      agent=column([r[3] for r in rows], np.int32),
      valid=column([own_validity(r[2], r[3]) for r in rows], bool),
      finished=column([r[4].finished for r in rows], bool),
      item=column([r[2].item for r in rows], np.int32),
      hit=column([r[2].hit for r in rows], bool),
      acceptance_score=column([r[2].acceptance_score for r in rows], np.float32),
      peer_similarity=column([r[2].peer_similarity for r in rows], np.float32),
      action=column([action_id(r[2].action) for r in rows], np.int32),
      num_turns=column([e.num_turns for e in episodes], np.int32),
      final_item=column([e.final_item for e in episodes], np.int32),
      final_hit=column([e.final_hit for e in episodes], bool),
      clicked=column([e.clicked for e in episodes], bool),
      target=column([e.target for e in episodes], np.int32),
      episode_window_index=column([e.window_index for e in episodes], np.int32),
      prompt_texts=tuple(r[4].prompt_text for r in rows),
      completion_texts=tuple(r[4].text for r in rows),
      records=tuple(episode_record(e) for e in episodes),
      split=splits.pop(),
    )


def _finite_or_none(value: float) -> float | None:
  # Strict JSON has no NaN or infinity; a log-prob of -inf (a token outside top-k) is written as null.
  return float(value) if math.isfinite(value) else None


def _message_record(generation: Generation) -> dict[str, Any]:
  return {
    'prompt': generation.prompt_text,
    'completion': generation.text,
    'num_prompt_tokens': int(generation.prompt_ids.size),
    'num_tokens': int(generation.completion_ids.size),
    'finished': generation.finished,
    'sum_log_prob': _finite_or_none(float(generation.log_probs.astype(np.float64).sum())),
  }


def episode_record(episode: Episode) -> dict[str, Any]:
  """An episode as a JSON-ready dict: the window, the target, the peer's pick, the outcome, and every turn with
  both prompts and messages, what was parsed from them and the reward inputs."""
  turns = []
  for turn in episode.turns:
    rec, user = turn.recommender_parse, turn.user_parse
    turns.append(
      {
        't': turn.turn,
        'item': turn.item,
        'hit': turn.hit,
        'acceptance_score': turn.acceptance_score,
        'peer_similarity': turn.peer_similarity,
        'action': turn.action,
        'hint_title': turn.hint_title,
        'recommender': {
          **_message_record(turn.recommender),
          'valid': rec.valid,
          'item_text': rec.item_text,
          'title': rec.title,
          'match_rule': rec.match_rule,
          'reason': rec.reason,
          'shown_title': turn.shown_title,
          'shown_reason': turn.shown_reason,
        },
        'user': {
          **_message_record(turn.user),
          'valid': user.valid,
          'action': user.action,
          'score': user.score,
          'score_rule': user.score_rule,
          'reason': user.reason,
        },
      }
    )
  return {
    'split': episode.split,
    'window_index': episode.window_index,
    'user': episode.user,
    'history': list(episode.history),
    'history_titles': list(episode.history_titles),
    'target': episode.target,
    'target_title': episode.target_title,
    'candidates': list(episode.candidates),
    'candidate_titles': list(episode.candidate_titles),
    'peer_item': episode.peer_item,
    'peer_title': episode.peer_title,
    'num_turns': episode.num_turns,
    'final_item': episode.final_item,
    'final_hit': episode.final_hit,
    'clicked': episode.clicked,
    'turns': turns,
  }


def to_jsonl(source: Trajectory | Sequence[Episode], path: str | os.PathLike) -> int:
  """Writes one JSON line per episode (`episode_record`) to `path`; returns the number of lines."""
  records = source.records if isinstance(source, Trajectory) else [episode_record(e) for e in source]
  # A message may hold a lone surrogate (an API's JSON can carry one), which UTF-8 cannot encode. json.dumps leaves
  # it raw inside a JSON string, so writing it as its `\udXXX` escape is exactly the JSON escape that reads back to
  # the same character.
  with open(path, 'w', encoding='utf-8', errors='backslashreplace') as handle:
    for record in records:
      handle.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + '\n')
  return len(records)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The episode records `to_jsonl` wrote, in order."""
  records = []
  with open(path, encoding='utf-8') as handle:
    for number, line in enumerate(handle, start=1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as error:
        raise ValueError(
          f'{path}, line {number}: not a JSON episode record ({error.msg} at column {error.colno})'
        ) from error
  return records
