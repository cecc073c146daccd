"""The one schema shared by all datasets: an item catalog, windows of history and target, and the dataset.

Windows are stored as padded numpy arrays so that batching for SASRec and for episode rollouts is a slice,
not a Python loop. A window's history holds up to `MAX_HISTORY` item ids, oldest first.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

MAX_HISTORY = 10
SPLITS = ('train', 'val', 'test')


@dataclasses.dataclass(frozen=True)
class ItemCatalog:
  """Item ids 0..n-1 and their cleaned titles."""

  titles: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.titles)

  @property
  def pad_id(self) -> int:
    """The id used to pad histories: one past the last item."""
    return len(self.titles)

  def title(self, item_id: int) -> str:
    return self.titles[item_id]


@dataclasses.dataclass(frozen=True)
class Window:
  """One sample: a user, their last <= 10 items h_u (oldest first) and the true next item i*."""

  user: int
  history: tuple[int, ...]
  target: int


# The training windows a trainer may draw from (`WindowSplit.pool`).
TRAIN_POOLS = ('all', 'last_per_user')


@dataclasses.dataclass(frozen=True)
class WindowSplit:
  """A split's windows as arrays.

  Attributes:
    users: int32[N], the user id of each window.
    history: int32[N, MAX_HISTORY], item ids left-aligned and padded with the catalog's pad id.
    lengths: int32[N], the number of real items in each history (0 is allowed for train windows).
    targets: int32[N], the true next item i*.
  """

  users: np.ndarray
  history: np.ndarray
  lengths: np.ndarray
  targets: np.ndarray

  def __post_init__(self):
    n = self.users.shape[0]
    for name in ('users', 'lengths', 'targets'):
      if getattr(self, name).shape != (n,):
        raise ValueError(f'WindowSplit.{name} has shape {getattr(self, name).shape}, expected ({n},)')
    if self.history.shape != (n, MAX_HISTORY):
      raise ValueError(f'WindowSplit.history has shape {self.history.shape}, expected ({n}, {MAX_HISTORY})')

  def __len__(self) -> int:
    return int(self.users.shape[0])

  def window(self, index: int) -> Window:
    length = int(self.lengths[index])
    return Window(
      user=int(self.users[index]),
      history=tuple(int(i) for i in self.history[index, :length]),
      target=int(self.targets[index]),
    )

  def pool(self, name: str) -> np.ndarray:
    """int64[P], ascending: the windows a trainer draws from (`TRAIN_POOLS`). 'all' is every window; 'last_per_user'
    is each user's last window (the highest index among its windows, which are stored in time order), the shape of
    the val and test splits: one window per held-out user, at the end of their sequence."""
    if name == 'all':
      return np.arange(len(self), dtype=np.int64)
    if name == 'last_per_user':
      last = {}
      for index, user in enumerate(self.users.tolist()):
        last[user] = index
      return np.asarray(sorted(last.values()), np.int64)
    raise ValueError(f'unknown window pool {name!r}; expected one of {TRAIN_POOLS}')

  def select(self, mask: np.ndarray) -> 'WindowSplit':
    return WindowSplit(
      users=self.users[mask], history=self.history[mask], lengths=self.lengths[mask], targets=self.targets[mask]
    )

  @classmethod
  def from_windows(cls, windows: Sequence[Window], pad_id: int) -> 'WindowSplit':
    n = len(windows)
    history = np.full((n, MAX_HISTORY), pad_id, dtype=np.int32)
    lengths = np.zeros((n,), dtype=np.int32)
    for row, window in enumerate(windows):
      items = window.history[-MAX_HISTORY:]
      history[row, : len(items)] = items
      lengths[row] = len(items)
    return cls(
      users=np.array([w.user for w in windows], dtype=np.int32).reshape(n),
      history=history,
      lengths=lengths,
      targets=np.array([w.target for w in windows], dtype=np.int32).reshape(n),
    )


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A dataset in the shared schema.

  Attributes:
    name: 'lastfm', 'movielens' or 'instruments'.
    catalog: item id -> cleaned title.
    splits: 'train' / 'val' / 'test' -> WindowSplit.
    user_items: user id -> every item id the user is known to have interacted with (any rating, any split);
      candidate lists never draw a negative from it.
    user_sequences: user id -> the user's time-ordered item sequence used to build windows, where known.
    notes: dataset-specific counts worth printing (matched users, dropped rows, ...).
  """

  name: str
  catalog: ItemCatalog
  splits: Mapping[str, WindowSplit]
  user_items: Mapping[int, frozenset]
  user_sequences: Mapping[int, np.ndarray]
  notes: Mapping[str, object] = dataclasses.field(default_factory=dict)

  @property
  def num_items(self) -> int:
    return len(self.catalog)

  def split(self, name: str) -> WindowSplit:
    if name not in self.splits:
      raise KeyError(f'Dataset {self.name!r} has no split {name!r}; it has {sorted(self.splits)}')
    return self.splits[name]

  def interacted(self, split: str, index: int) -> frozenset:
    """Items the window's user interacted with: everything known of the user plus the window itself."""
    window = self.split(split).window(index)
    known = self.user_items.get(window.user, frozenset())
    return known | frozenset(window.history) | {window.target}
