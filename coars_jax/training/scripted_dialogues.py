"""Scripted recommender-user dialogues on training windows, the warm start's data: the peer's ranking of each
window's candidates (`dialogue_script`), agents that follow it with templated reasons (`ScriptedAgents`), and
their episodes played through the real episode loop (`scripted_dialogues`), so every prompt is exactly what
inference shows.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from coars_jax.agents.episodes import (
  AGENTS,
  RECOMMENDER,
  USER,
  Episode,
  RolloutConfig,
  ScriptedBackend,
  bind_peer,
  run_episodes,
)
from coars_jax.agents.prompts import format_recommender_output, format_user_output
from coars_jax.agents.protocol import ACTION_INTERVALS, is_single_line_title, single_line
from coars_jax.data import Dataset, candidate_list


# The scripted user's score for a non-target lies in [0, .75) (dislike, skip or star, by q); for the target in
# [.75, 1] (click). Scores are written with two decimals, the shape the tokenizer's protocol corpus was built on.
SCORE_DECIMALS = 2


# --- scripted dialogues ------------------------------------------------------------------------------------------

# Rationales are templates over the history (recommender) or the recommended item (user), picked per (episode,
# turn) by a seeded generator; a few phrasings keep the adapters from learning one fixed sentence per agent.
RECOMMENDER_REASONS = (
  'The history ends with {last}, and this candidate fits right after it.',
  'After {last} and {earlier}, this is the closest candidate to the history.',
  'Listeners of {last} tend to pick this candidate next.',
  'It matches the items in the history, most of all {last}.',
)
USER_REASONS = {
  'click': ('{item} is exactly what I wanted after {last}.', 'I like {item}; it fits my history well.'),
  'star': ('{item} looks good, but I want to see more.', '{item} is close to my taste; show me more.'),
  'skip': ('{item} does not interest me right now.', 'I am not sure about {item}; it is not what I want.'),
  'dislike': ('{item} is not my taste at all.', 'I do not want {item}; it is far from my history.'),
}


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class DialogueScript:
  """What the scripted agents know about each episode row.

  Attributes:
    split: the split the windows come from.
    window_indices: int[E], the window each row plays.
    ranked: int32[E, C], each row's candidate list C in SASRec's order, best first; turn t recommends
      ranked[e, t - 1].
    similarity: float32[E, C], q in [-1, 1] of each ranked item (same order as `ranked`).
    target: int32[E], i*.
  """

  split: str
  window_indices: np.ndarray
  ranked: np.ndarray
  similarity: np.ndarray
  target: np.ndarray

  def recommended(self, episode: int, turn: int) -> int:
    """The item the scripted recommender names at turn t of row `episode`."""
    if not 1 <= turn <= self.ranked.shape[1]:
      raise ValueError(
        f'turn {turn} is outside 1..{self.ranked.shape[1]} (the candidate list has {self.ranked.shape[1]} items)'
      )
    return int(self.ranked[episode, turn - 1])


def dialogue_script(
  dataset: Dataset,
  peer,
  split: str,
  window_indices: Sequence[int],
  *,
  rollout: RolloutConfig = RolloutConfig(),
  shuffle_seed: int | None = None,
) -> DialogueScript:
  """The peer's ranking of each window's candidate list and the similarity q of every candidate.

  `peer` is a `recsys.CrossFittedPeer` (training windows get their user's out-of-fold SASRec, METHOD.md section 2),
  a `recsys.SASRec`, or any `agents.Peer` with `candidate_scores`. The candidate lists are `data.candidate_list`
  with the rollout's seed and size, the very lists `run_episodes` shows, and ties are broken towards the earlier
  candidate as `recsys.peer.top_candidate`'s argmax does, so the script's first pick is the peer's top candidate.
  With `shuffle_seed`, each row's order is instead a random permutation of its candidates (seeded by
  `shuffle_seed` and the window), and q still comes from the peer.
  """
  indices = np.asarray([int(i) for i in window_indices], np.int64)
  windows = dataset.split(split)
  candidates = np.stack(
    [candidate_list(dataset, split, int(i), rollout.candidate_seed, rollout.num_candidates) for i in indices]
  ).astype(np.int32)
  history = np.asarray(windows.history[indices], np.int32)
  lengths = np.asarray(windows.lengths[indices], np.int32)
  bound = bind_peer(peer, split, windows.users[indices])
  scores = np.asarray(bound.candidate_scores(history, lengths, candidates))
  if shuffle_seed is None:
    order = np.argsort(-scores, axis=1, kind='stable')
  else:
    order = np.stack(
      [np.random.default_rng([shuffle_seed, int(i), 0x5AF]).permutation(candidates.shape[1]) for i in indices]
    )
  similarity = np.asarray(bound.candidate_similarities(history, lengths, candidates), np.float32)
  return DialogueScript(
    split=split,
    window_indices=indices,
    ranked=np.take_along_axis(candidates, order, axis=1),
    similarity=np.take_along_axis(similarity, order, axis=1),
    target=np.asarray(windows.targets[indices], np.int32),
  )


class ScriptPeer:
  """The `agents.Peer` of a shuffled script: its ranking (so the hint and p_t) is the script's order, and q is the
  script's own (the peer's). It serves `run_episodes` on exactly the script's windows, in the script's order."""

  def __init__(self, script: DialogueScript):
    self.script = script

  def _check(self, candidates) -> None:
    candidates = np.asarray(candidates)
    if (
      candidates.shape != self.script.ranked.shape
      or not (np.sort(candidates, axis=1) == np.sort(self.script.ranked, axis=1)).all()
    ):
      raise ValueError('ScriptPeer serves only the candidate lists of its own script, in its order')

  def candidate_ranking(self, history, lengths, candidates):
    self._check(candidates)
    return self.script.ranked

  def top_candidates(self, history, lengths, candidates):
    return self.candidate_ranking(history, lengths, candidates)[:, 0]

  def candidate_similarities(self, history, lengths, candidates):
    self._check(candidates)
    # q in the caller's candidate order; the script holds it in its own ranked order.
    lookups = [
      dict(zip(ranked.tolist(), similarity.tolist()))
      for ranked, similarity in zip(self.script.ranked, self.script.similarity)
    ]
    return np.asarray(
      [[lookup[int(item)] for item in row] for lookup, row in zip(lookups, np.asarray(candidates))], np.float32
    )


def scripted_user_reaction(is_target: bool, similarity: float) -> tuple[str, float]:
  """(a_t, s_t) of the scripted user: the target is clicked, anything else is not.

  q in [-1, 1] is mapped linearly onto the action's range: [.75, 1] for the target, [0, .75) for the rest, so a
  non-target's action follows from q (dislike below q = -1/3, skip below 1/3, star above). Scores are rounded
  down to `SCORE_DECIMALS` and kept inside the interval.
  """
  unit = (min(max(float(similarity), -1.0), 1.0) + 1.0) / 2.0
  scale = 10**SCORE_DECIMALS
  if is_target:
    low, high = ACTION_INTERVALS['click']
    return 'click', math.floor((low + unit * (high - low)) * scale) / scale
  high = ACTION_INTERVALS['star'][1]
  score = min(math.floor(unit * high * scale), high * scale - 1) / scale
  action = next(name for name, (lo, hi) in ACTION_INTERVALS.items() if lo <= score < hi)
  return action, score


def _title_for_output(title: str) -> str:
  # The script writes the candidate's title verbatim; a title with stray whitespace or line breaks is written in
  # its one-line form, which the parser's normalized rule still matches to the candidate.
  return title if is_single_line_title(title) else single_line(title)


class ScriptedAgents:
  """The `ScriptedBackend` responder of the warm start: the recommender follows SASRec's ranking, the user clicks
  exactly on the target. Deterministic in (seed, episode row, turn)."""

  def __init__(self, dataset: Dataset, script: DialogueScript, *, seed: int = 0):
    self.script, self.seed = script, int(seed)
    titles = dataset.catalog.titles
    self.titles = titles
    windows = dataset.split(script.split)
    self.history_titles = [[titles[item] for item in windows.window(int(i)).history] for i in script.window_indices]

  def _choice(self, options: Sequence[str], episode: int, turn: int, agent: int) -> str:
    rng = np.random.default_rng([self.seed, int(self.script.window_indices[episode]), turn, agent])
    return options[int(rng.integers(len(options)))]

  def _history_names(self, episode: int) -> tuple[str, str]:
    history = self.history_titles[episode] or ['nothing yet']
    last = single_line(history[-1])
    earlier = single_line(history[-2]) if len(history) > 1 else last
    return last, earlier

  def __call__(self, agent: str, episode: int, turn: int, messages) -> str:
    del messages  # The script knows the episode; the prompt it was given is what the model will learn from.
    item = self.script.recommended(episode, turn)
    last, earlier = self._history_names(episode)
    if agent == RECOMMENDER:
      reason = self._choice(RECOMMENDER_REASONS, episode, turn, 0).format(last=last, earlier=earlier)
      return format_recommender_output(reason, _title_for_output(self.titles[item]))
    if agent != USER:
      raise ValueError(f'agent must be one of {AGENTS}, found {agent!r}')
    column = int(np.flatnonzero(self.script.ranked[episode] == item)[0])
    action, score = scripted_user_reaction(
      item == int(self.script.target[episode]), float(self.script.similarity[episode, column])
    )
    reason = self._choice(USER_REASONS[action], episode, turn, 1).format(item=single_line(self.titles[item]), last=last)
    return format_user_output(reason, action, score)


def draw_windows(dataset: Dataset, count: int, *, seed: int, split: str = 'train', pool: str = 'all') -> np.ndarray:
  """`count` distinct window indices of `split`'s `pool` (`WindowSplit.pool`), drawn with `seed`, ascending."""
  candidates = dataset.split(split).pool(pool)
  if count > len(candidates):
    raise ValueError(
      f'num_dialogues={count} exceeds the {len(candidates)} {split} windows of {dataset.name!r} in '
      f'pool {pool!r}; lower num_dialogues to at most {len(candidates)}'
    )
  rng = np.random.default_rng([seed, 0x5F7])
  return np.sort(candidates[rng.choice(len(candidates), size=count, replace=False)])


def scripted_dialogues(
  dataset: Dataset,
  peer,
  tokenizer,
  window_indices: Sequence[int],
  *,
  rollout: RolloutConfig = RolloutConfig(),
  split: str = 'train',
  seed: int = 0,
  shuffled: bool = False,
) -> list[Episode]:
  """Plays the scripted agents through `agents.run_episodes` (so prompts, memory and stopping are the real
  loop's) on `window_indices` of `split`; one episode per window, in order. `shuffled` scripts follow a random
  order of the candidates (seeded by `seed`), which the hint and the peer opinion follow too (`ScriptPeer`)."""
  script = dialogue_script(
    dataset, peer, split, window_indices, rollout=rollout, shuffle_seed=seed if shuffled else None
  )
  backend = ScriptedBackend(tokenizer, ScriptedAgents(dataset, script, seed=seed))
  return run_episodes(
    dataset,
    split,
    list(script.window_indices),
    backend,
    peer=ScriptPeer(script) if shuffled else peer,
    config=rollout,
    seed=seed,
  )
