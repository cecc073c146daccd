"""LastFM in the AFL/LLaRA split: 4,606 artists, 50,800 train windows, 122 val and 122 test windows.

The window files carry no user ids. Train windows are consecutive prefixes of each user's sequence, so users
are recovered by chaining: a window starts a new user unless its history is the previous window's history
plus the previous target. Val and test windows belong to held-out users, one window each.
"""

from __future__ import annotations

import pathlib

import numpy as np

from coars_jax.data import files
from coars_jax.data.errors import MalformedDataError
from coars_jax.data.schema import MAX_HISTORY, Dataset, ItemCatalog, Window, WindowSplit

ROOT = 'lastfm/afl_llara_format'
ITEM_FILE = f'{ROOT}/lastfm/id2name.txt'
STATS_FILE = f'{ROOT}/lastfm/data_statis.df'
SPLIT_FILES = {
  'train': f'{ROOT}/lastfm/train_data.df',
  'val': f'{ROOT}/lastfm/Val_data.df',
  'test': f'{ROOT}/lastfm/Test_data.df',
}
USER_SIM_FILE = f'{ROOT}/lastfm_ab/test_llara.pkl'
PRIOR_SASREC_FILE = f'{ROOT}/prior_lastfm/SASRec.csv'


def parse_id2name(path: pathlib.Path) -> ItemCatalog:
  titles = []
  for number, line in files.read_text_lines(path):
    item, sep, name = line.partition('::')
    if not sep or not item.strip().isdigit():
      raise MalformedDataError(path, number, f'expected "<id>::<artist name>", found {line[:80]!r}')
    if int(item) != len(titles):
      raise MalformedDataError(
        path, number, f'expected item id {len(titles)} (ids are 0..n-1 in order), found {int(item)}'
      )
    if not name.strip():
      raise MalformedDataError(path, number, 'the artist name is empty')
    titles.append(name.strip())
  if not titles:
    raise MalformedDataError(path, None, 'the file holds no items')
  return ItemCatalog(tuple(titles))


def _windows_from_frame(frame, path: pathlib.Path, num_items: int) -> tuple[list[tuple[int, ...]], list[int]]:
  missing = {'seq', 'len_seq', 'next'} - set(frame.columns)
  if missing:
    raise MalformedDataError(path, None, f'missing columns {sorted(missing)}; found {list(frame.columns)}')
  histories, targets = [], []
  for row, (seq, target) in enumerate(zip(frame['seq'], frame['next'])):
    seq = [int(i) for i in seq]
    if len(seq) != MAX_HISTORY:
      raise MalformedDataError(path, None, f'row {row}: seq has {len(seq)} ids, expected {MAX_HISTORY}')
    real = [i for i in seq if i != num_items]
    if seq[: len(real)] != real:
      raise MalformedDataError(path, None, f'row {row}: padding id {num_items} occurs before a real item')
    for item in real + [int(target)]:
      if not 0 <= item < num_items:
        raise MalformedDataError(path, None, f'row {row}: unknown item id {item}; ids are 0..{num_items - 1}')
    histories.append(tuple(real))
    targets.append(int(target))
  return histories, targets


def load(data_root=None, *, allow_download: bool = True) -> Dataset:
  locate = lambda rel: files.locate(rel, data_root, allow_download=allow_download)
  item_path = locate(ITEM_FILE)
  catalog = parse_id2name(item_path)
  files.warn_if_modified(item_path, ITEM_FILE)
  stats = files.load_pinned_pickle(locate(STATS_FILE), STATS_FILE)
  if int(stats['item_num'].iloc[0]) != len(catalog):
    raise MalformedDataError(
      item_path, None, f'holds {len(catalog)} items but {STATS_FILE} says {int(stats["item_num"].iloc[0])}'
    )

  splits, user_items, user_sequences = {}, {}, {}
  next_user = 0
  for split, relpath in SPLIT_FILES.items():
    path = locate(relpath)
    histories, targets = _windows_from_frame(files.load_pinned_pickle(path, relpath), path, len(catalog))
    windows = []
    previous = None
    for history, target in zip(histories, targets):
      continues = (
        split == 'train'
        and previous is not None
        and history == (previous.history + (previous.target,))[-MAX_HISTORY:]
        and history
      )
      if not continues:
        next_user += 1
        user_sequences[next_user - 1] = list(history)
      user = next_user - 1
      user_sequences[user].append(target)
      window = Window(user=user, history=history, target=target)
      windows.append(window)
      previous = window
    splits[split] = WindowSplit.from_windows(windows, catalog.pad_id)
  for user, sequence in user_sequences.items():
    user_sequences[user] = np.asarray(sequence, dtype=np.int32)
    user_items[user] = frozenset(sequence)
  train = splits['train']
  notes = {
    'train_users_recovered': int(len(np.unique(train.users))),
    'train_windows_len_seq_ge_3': int(np.sum(train.lengths >= 3)),
  }
  return Dataset(
    name='lastfm', catalog=catalog, splits=splits, user_items=user_items, user_sequences=user_sequences, notes=notes
  )
