"""User-simulation sets for the user-agent F1 protocol (METHOD.md section 6).

Each case is one user: a history, and a shuffled list of true future items and as many random items the user
never interacted with, with a label per item. LastFM uses AFL's 60-user file, whose `artist_list` is split into
the first 10 items as history (AFL's `init_num`) and the rest as positives. MovieLens and Instruments use their
test users: the last k = min(10, floor(len / 2)) items are the positives and the rest the history.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from coars_jax.data import candidates, files, lastfm
from coars_jax.data.errors import MalformedDataError
from coars_jax.data.schema import MAX_HISTORY, Dataset

LASTFM_HISTORY_ITEMS = 10
MAX_FUTURE_ITEMS = 10


@dataclasses.dataclass(frozen=True)
class UserSimCase:
  """One user's judgement task: `items[j]` is a true future item exactly when `labels[j]`."""

  user: int
  history: tuple[int, ...]
  items: tuple[int, ...]
  labels: tuple[bool, ...]


@dataclasses.dataclass(frozen=True)
class UserSimSet:
  dataset: str
  cases: tuple[UserSimCase, ...]
  users_left_out: int

  def __len__(self) -> int:
    return len(self.cases)


def _case(dataset: Dataset, user: int, index: int, history, positives, excluded, seed: int) -> UserSimCase:
  rng = candidates.window_rng(dataset.name, 'test', index, seed, purpose='user_sim')
  negatives = candidates.sample_negatives(rng, dataset.num_items, excluded, len(positives))
  items = np.asarray(list(positives) + negatives, dtype=np.int32)
  labels = np.asarray([True] * len(positives) + [False] * len(negatives))
  order = rng.permutation(len(items))
  return UserSimCase(
    user=user,
    history=tuple(int(i) for i in history[-MAX_HISTORY:]),
    items=tuple(int(i) for i in items[order]),
    labels=tuple(bool(b) for b in labels[order]),
  )


def lastfm_user_sim(dataset: Dataset, data_root=None, *, seed: int = 0, allow_download: bool = True) -> UserSimSet:
  path = files.locate(lastfm.USER_SIM_FILE, data_root, allow_download=allow_download)
  records = files.load_pinned_pickle(path, lastfm.USER_SIM_FILE)
  cases, left_out = [], 0
  for row, record in enumerate(records):
    try:
      artists = [int(i) for i in record['artist_list']]
      full = {int(i) for i in record['full_list']}
      user = int(record['user_id'])
    except (KeyError, TypeError, ValueError) as e:
      raise MalformedDataError(path, None, f'record {row}: expected user_id, artist_list and full_list ({e})')
    for item in artists + sorted(full):
      if not 0 <= item < dataset.num_items:
        raise MalformedDataError(path, None, f'record {row}: unknown item id {item}')
    history, positives = artists[:LASTFM_HISTORY_ITEMS], list(dict.fromkeys(artists[LASTFM_HISTORY_ITEMS:]))
    if not positives:
      left_out += 1
      continue
    cases.append(_case(dataset, user, row, history, positives, full | set(artists), seed))
  return UserSimSet(dataset=dataset.name, cases=tuple(cases), users_left_out=left_out)


def split_user_sim(dataset: Dataset, *, split: str = 'test', seed: int = 0) -> UserSimSet:
  """The protocol for datasets whose test users' full sequences are known (MovieLens, Instruments)."""
  cases, left_out = [], 0
  users = dict.fromkeys(int(u) for u in dataset.split(split).users)
  for index, user in enumerate(users):
    sequence = dataset.user_sequences.get(user)
    k = 0 if sequence is None else min(MAX_FUTURE_ITEMS, len(sequence) // 2)
    if k < 1:
      left_out += 1
      continue
    history, future = sequence[:-k], list(dict.fromkeys(int(i) for i in sequence[-k:]))
    cases.append(_case(dataset, user, index, list(history), future, dataset.user_items[user], seed))
  return UserSimSet(dataset=dataset.name, cases=tuple(cases), users_left_out=left_out)


def user_sim_set(dataset: Dataset, data_root=None, *, seed: int = 0, allow_download: bool = True) -> UserSimSet:
  if dataset.name == 'lastfm':
    return lastfm_user_sim(dataset, data_root, seed=seed, allow_download=allow_download)
  return split_user_sim(dataset, seed=seed)
