"""Cross-fitted peers (METHOD.md section 2): every SASRec signal used on a training window comes from a SASRec that
never trained on that window's user.

A SASRec trained on all training windows ranks their own targets first among the 20 candidates most of the time
(an oracle that never transfers to val or test). So the training users are split into K folds by a seeded
permutation; fold k's windows are served by a SASRec trained on the other K - 1 folds, and val and test by the
SASRec trained on every training window. `CrossFittedPeer.for_windows(split, users)` hands `agents.run_episodes`
(and the warm start's script and the trainer's ranks in d) the right model per row.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from coars_jax.data.schema import Dataset
from coars_jax.recsys import peer as peer_lib
from coars_jax.recsys.sasrec import SASRec

TRAIN_SPLIT = 'train'


@dataclasses.dataclass(frozen=True, kw_only=True)
class FoldSpec:
  """Fold `fold` of `num_folds` user folds drawn with `seed`: its SASRec trains on every other fold's windows."""

  num_folds: int
  fold: int
  seed: int = 0

  def __post_init__(self):
    if isinstance(self.num_folds, bool) or not isinstance(self.num_folds, int) or self.num_folds < 2:
      raise ValueError(f'FoldSpec.num_folds must be an int >= 2, found {self.num_folds!r}')
    if not 0 <= self.fold < self.num_folds:
      raise ValueError(f'FoldSpec.fold must be in [0, {self.num_folds}), found {self.fold!r}')

  @property
  def tag(self) -> str:
    """The checkpoint folder suffix: the fold, the fold count and the user permutation's seed."""
    return f'fold_{self.fold}_of_{self.num_folds}_split_{self.seed}'


def user_folds(users: np.ndarray, num_folds: int, seed: int = 0) -> dict[int, int]:
  """user id -> fold in [0, num_folds): the distinct users, in a `seed`-ed random order, dealt round robin, so fold
  sizes differ by at most one user and a user's windows all fall in one fold."""
  if num_folds < 2:
    raise ValueError(f'num_folds must be >= 2 for cross-fitting, found {num_folds}')
  unique = np.unique(np.asarray(users, np.int64))
  if len(unique) < num_folds:
    raise ValueError(f'{len(unique)} training users cannot fill {num_folds} folds; lower the fold count')
  order = np.random.default_rng([seed, 0xF01D]).permutation(len(unique))
  return {int(unique[position]): rank % num_folds for rank, position in enumerate(order)}


def held_out_dataset(dataset: Dataset, spec: FoldSpec) -> Dataset:
  """`dataset` whose training split lacks fold `spec.fold`'s users: what that fold's SASRec trains on."""
  train = dataset.split(TRAIN_SPLIT)
  folds = user_folds(train.users, spec.num_folds, spec.seed)
  keep = np.asarray([folds[int(u)] != spec.fold for u in train.users])
  return dataclasses.replace(dataset, splits={**dataset.splits, TRAIN_SPLIT: train.select(keep)})


class RoutedPeer:
  """An `agents.Peer` over a batch whose row r is served by `models[model_of_row[r]]`."""

  def __init__(self, models: Sequence[SASRec], model_of_row: np.ndarray):
    self.models, self.model_of_row = tuple(models), np.asarray(model_of_row, np.int64)

  def _routed(self, fn, history, lengths, candidates, dtype) -> np.ndarray:
    candidates = np.asarray(candidates, np.int32)
    if len(self.model_of_row) != len(candidates):
      raise ValueError(f'this peer was bound to {len(self.model_of_row)} windows but asked about {len(candidates)}')
    out = np.zeros(candidates.shape, dtype)
    history, lengths = np.asarray(history, np.int32), np.asarray(lengths, np.int32)
    for index in np.unique(self.model_of_row):
      rows = np.flatnonzero(self.model_of_row == index)
      out[rows] = fn(self.models[index], history[rows], lengths[rows], candidates[rows])
    return out

  def candidate_scores(self, history, lengths, candidates) -> np.ndarray:
    """float32[B, C]: each row's SASRec score of each of its candidates."""
    return self._routed(
      lambda m, h, l, c: np.asarray(peer_lib.candidate_scores(m, h, l, c)), history, lengths, candidates, np.float32
    )

  def candidate_ranking(self, history, lengths, candidates) -> np.ndarray:
    return self._routed(peer_lib.candidate_ranking, history, lengths, candidates, np.int64)

  def top_candidates(self, history, lengths, candidates) -> np.ndarray:
    return self.candidate_ranking(history, lengths, candidates)[:, 0]

  def candidate_similarities(self, history, lengths, candidates) -> np.ndarray:
    return self._routed(peer_lib.candidate_similarities, history, lengths, candidates, np.float32)


class CrossFittedPeer:
  """The peer of every split: training windows are served by their user's out-of-fold SASRec, val and test (and
  any user outside the training split) by `full`, the SASRec trained on all training windows."""

  def __init__(self, full: SASRec, fold_models: Sequence[SASRec], fold_of_user: dict[int, int]):
    if len(fold_models) < 2:
      raise ValueError(f'cross-fitting needs at least 2 fold models, found {len(fold_models)}')
    if set(fold_of_user.values()) - set(range(len(fold_models))):
      raise ValueError(f'fold_of_user names folds outside 0..{len(fold_models) - 1}')
    self.full, self.fold_models, self.fold_of_user = full, tuple(fold_models), dict(fold_of_user)

  @property
  def num_folds(self) -> int:
    return len(self.fold_models)

  def for_windows(self, split: str, users: np.ndarray) -> RoutedPeer:
    """The peer of these windows: out-of-fold models on the training split, the full model elsewhere."""
    users = np.asarray(users, np.int64)
    if split != TRAIN_SPLIT:
      return RoutedPeer([self.full], np.zeros(len(users), np.int64))
    full_index = self.num_folds  # a training user the folds never saw (none in practice) gets the full model
    rows = np.asarray([self.fold_of_user.get(int(u), full_index) for u in users], np.int64)
    return RoutedPeer(self.fold_models + (self.full,), rows)


def top1_hit_rate(
  peer,
  dataset: Dataset,
  split: str,
  candidates: np.ndarray,
  targets: np.ndarray,
  window_indices: np.ndarray | None = None,
) -> float:
  """The share of windows whose target is the peer's top candidate.

  Args:
    peer: a `CrossFittedPeer`, or a `SASRec` that serves every row.
    dataset: the windows.
    split: which split `candidates` belong to.
    candidates: int[N, C], the candidate list of each window in `window_indices`.
    targets: int[N], each window's target item id.
    window_indices: the windows (default: all of the split, in order).
  """
  windows = dataset.split(split)
  indices = np.arange(len(windows)) if window_indices is None else np.asarray(window_indices, np.int64)
  bound = (
    peer.for_windows(split, windows.users[indices])
    if isinstance(peer, CrossFittedPeer)
    else RoutedPeer([peer], np.zeros(len(indices), np.int64))
  )
  top = bound.top_candidates(windows.history[indices], windows.lengths[indices], candidates)
  return float(np.mean(np.asarray(top) == np.asarray(targets)))
