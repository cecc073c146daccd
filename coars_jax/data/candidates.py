"""Candidate lists C: the target i* plus 19 items the user never interacted with, shuffled.

Each list is a pure function of (dataset, split, window index, seed): the generator is seeded from those four
values alone, so the list is the same in every run, process and machine (numpy's PCG64 stream is stable).
"""

from __future__ import annotations

import zlib

import numpy as np

from coars_jax.data.schema import Dataset

NUM_CANDIDATES = 20
_SPLIT_CODES = {'train': 0, 'val': 1, 'test': 2}


def window_rng(dataset: str, split: str, index: int, seed: int, purpose: str = 'candidates') -> np.random.Generator:
  """A generator that depends only on its arguments; `purpose` separates independent streams."""
  key = [zlib.crc32(dataset.encode()), _SPLIT_CODES[split], int(index), zlib.crc32(purpose.encode())]
  return np.random.default_rng(np.random.SeedSequence(entropy=int(seed), spawn_key=key))


def sample_negatives(rng: np.random.Generator, num_items: int, excluded: frozenset | set, count: int) -> list[int]:
  """`count` distinct item ids in [0, num_items) outside `excluded`, drawn uniformly."""
  available = num_items - len({i for i in excluded if 0 <= i < num_items})
  if available < count:
    raise ValueError(f'only {available} items are outside the excluded set; cannot draw {count} negatives')
  chosen: list[int] = []
  seen = set(excluded)
  while len(chosen) < count:
    for item in rng.integers(0, num_items, size=2 * (count - len(chosen))):
      item = int(item)
      if item not in seen:
        seen.add(item)
        chosen.append(item)
        if len(chosen) == count:
          break
  return chosen


def candidate_list(
  dataset: Dataset, split: str, index: int, seed: int, num_candidates: int = NUM_CANDIDATES
) -> np.ndarray:
  """int32[num_candidates]: the window's target and num_candidates-1 negatives, in shuffled order."""
  rng = window_rng(dataset.name, split, index, seed)
  target = int(dataset.split(split).targets[index])
  negatives = sample_negatives(rng, dataset.num_items, dataset.interacted(split, index), num_candidates - 1)
  return rng.permutation(np.asarray([target] + negatives, dtype=np.int32))


def candidate_matrix(
  dataset: Dataset, split: str, seed: int, num_candidates: int = NUM_CANDIDATES
) -> tuple[np.ndarray, np.ndarray]:
  """Candidate lists for every window of a split.

  Returns:
    candidates: int32[N, num_candidates].
    target_index: int32[N], the column where each window's target sits.
  """
  windows = dataset.split(split)
  candidates = np.stack([candidate_list(dataset, split, i, seed, num_candidates) for i in range(len(windows))])
  target_index = np.argmax(candidates == windows.targets[:, None], axis=1).astype(np.int32)
  return candidates.astype(np.int32), target_index


def candidate_stack(dataset: Dataset, split: str, seeds) -> tuple[np.ndarray, np.ndarray]:
  """Candidate lists of every window for each seed: int32[S, N, C] and target columns int32[S, N]."""
  pairs = [candidate_matrix(dataset, split, seed) for seed in seeds]
  return np.stack([c for c, _ in pairs]), np.stack([t for _, t in pairs])
