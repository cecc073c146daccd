"""MovieLens-100K: LLaRA's val/test windows, and training windows rebuilt from u.data.

Ratings >= 3 are kept and ordered by time (ties in file order); item id = movie id - 1. LLaRA's files carry
no user ids, so each val/test window is matched to the users whose rated sequence contains its history and
target as a contiguous run. Matched users are kept out of training, so that no test item leaks into it; the
remaining users' sliding windows (history of <= 10 items, at least 3) form the training split.
"""

from __future__ import annotations

import collections
import pathlib
import re

import numpy as np

from coars_jax.data import files
from coars_jax.data.errors import MalformedDataError
from coars_jax.data.schema import MAX_HISTORY, Dataset, ItemCatalog, Window, WindowSplit

RATINGS_FILE = 'movielens/ml-100k/u.data'
ITEMS_FILE = 'movielens/ml-100k/u.item'
SPLIT_FILES = {'val': 'movielens/llara_format/Val_data.df', 'test': 'movielens/llara_format/Test_data.df'}
MIN_RATING = 3
MIN_HISTORY = 3
UNMATCHED_USER_BASE = {'val': 1_000_000, 'test': 2_000_000}

_YEAR = re.compile(r'\s*\(\d{4}\)\s*$')
_TRAILING_ARTICLE = re.compile(r'^(?P<rest>.*), (?P<article>The|A|An)$')


def clean_title(raw: str) -> str:
  """LLaRA's cleaning: drop the trailing '(year)', and move a trailing ', The' to the front."""
  title = _YEAR.sub('', raw.strip())
  match = _TRAILING_ARTICLE.match(title)
  if match and match['article'] == 'The':
    title = f'The {match["rest"]}'
  return title


def parse_items(path: pathlib.Path) -> ItemCatalog:
  titles = []
  for number, line in files.read_text_lines(path, encoding='iso-8859-1'):
    fields = line.split('|')
    if len(fields) != 24:
      raise MalformedDataError(path, number, f'expected 24 "|"-separated fields, found {len(fields)}')
    if not fields[0].isdigit() or int(fields[0]) != len(titles) + 1:
      raise MalformedDataError(path, number, f'expected movie id {len(titles) + 1}, found {fields[0]!r}')
    titles.append(clean_title(fields[1]))
  return ItemCatalog(tuple(titles))


def parse_ratings(path: pathlib.Path, num_items: int) -> dict[int, list[tuple[int, int, int]]]:
  """Returns user id -> [(timestamp, item id, rating)] in file order, for every rating."""
  ratings = collections.defaultdict(list)
  for number, line in files.read_text_lines(path):
    fields = line.split('\t')
    if len(fields) != 4 or not all(f.isdigit() for f in fields):
      raise MalformedDataError(
        path, number, f'expected 4 tab-separated integers (user item rating timestamp), found {line[:80]!r}'
      )
    user, movie, rating, timestamp = map(int, fields)
    if not 1 <= movie <= num_items:
      raise MalformedDataError(path, number, f'unknown movie id {movie}; u.item has ids 1..{num_items}')
    if not 1 <= rating <= 5:
      raise MalformedDataError(path, number, f'rating {rating} is outside 1..5')
    ratings[user].append((timestamp, movie - 1, rating))
  return ratings


def _llara_windows(frame, path: pathlib.Path, num_items: int) -> list[tuple[tuple[int, int], ...]]:
  """Each window as its (item, rating) pairs, history first and target last."""
  missing = {'seq', 'len_seq', 'next'} - set(frame.columns)
  if missing:
    raise MalformedDataError(path, None, f'missing columns {sorted(missing)}; found {list(frame.columns)}')
  windows = []
  for row, (seq, target) in enumerate(zip(frame['seq'], frame['next'])):
    pairs = [(int(item), int(rating)) for item, rating in seq if int(item) != num_items]
    pairs.append((int(target[0]), int(target[1])))
    for item, _ in pairs:
      if not 0 <= item < num_items:
        raise MalformedDataError(path, None, f'row {row}: unknown item id {item}; ids are 0..{num_items - 1}')
    windows.append(tuple(pairs))
  return windows


def _find_users(
  window: tuple[tuple[int, int], ...],
  ratings_by_item: dict[int, dict[int, tuple[int, int]]],
  kept_times: dict[int, list[tuple[int, int]]],
) -> list[int]:
  """Users whose ratings explain `window`, a sequence of (item, rating) pairs from LLaRA's files.

  A user matches when they rated every item with the same rating, the timestamps never decrease along the
  window, and no other kept rating of theirs falls strictly inside the window's time span. Same-second ties
  may be ordered differently in LLaRA's files, so order is only checked between different timestamps.
  """
  items = [item for item, _ in window]
  users = set(ratings_by_item.get(items[0], {}))
  for item in items[1:]:
    users &= set(ratings_by_item.get(item, {}))
  matched = []
  for user in sorted(users):
    stamps = []
    for item, rating in window:
      user_rating, timestamp = ratings_by_item[item][user]
      if user_rating != rating:
        break
      stamps.append(timestamp)
    else:
      if stamps != sorted(stamps):
        continue
      inside = sum(1 for t, item in kept_times[user] if stamps[0] < t < stamps[-1] and item not in items)
      if inside == 0:
        matched.append(user)
  return matched


def load(data_root=None, *, allow_download: bool = True) -> Dataset:
  locate = lambda rel: files.locate(rel, data_root, allow_download=allow_download)
  items_path, ratings_path = locate(ITEMS_FILE), locate(RATINGS_FILE)
  catalog = parse_items(items_path)
  ratings = parse_ratings(ratings_path, len(catalog))
  files.warn_if_modified(items_path, ITEMS_FILE)
  files.warn_if_modified(ratings_path, RATINGS_FILE)

  user_items, sequences = {}, {}
  for user, rows in ratings.items():
    user_items[user] = frozenset(item for _, item, _ in rows)
    # sorted() is stable, so same-second ratings stay in file order.
    sequences[user] = [item for _, item, rating in sorted(rows, key=lambda r: r[0]) if rating >= MIN_RATING]
  ratings_by_item = collections.defaultdict(dict)
  kept_times = {}
  for user, rows in ratings.items():
    for timestamp, item, rating in rows:
      ratings_by_item[item][user] = (rating, timestamp)
    kept_times[user] = [(t, item) for t, item, rating in rows if rating >= MIN_RATING]

  splits, notes, held_out = {}, {}, set()
  for split, relpath in SPLIT_FILES.items():
    path = locate(relpath)
    windows, unique, ambiguous, unmatched = [], 0, 0, 0
    frame = files.load_pinned_pickle(path, relpath)
    for row, pairs in enumerate(_llara_windows(frame, path, len(catalog))):
      history, target = tuple(item for item, _ in pairs[:-1]), pairs[-1][0]
      users = _find_users(pairs, ratings_by_item, kept_times)
      unique += len(users) == 1
      ambiguous += len(users) > 1
      unmatched += not users
      held_out.update(users)
      # A window that matches no user (or several) gets a fresh id, so its known items are only its own.
      user = users[0] if len(users) == 1 else UNMATCHED_USER_BASE[split] + row
      windows.append(Window(user=user, history=history, target=target))
    splits[split] = WindowSplit.from_windows(windows, catalog.pad_id)
    notes[f'{split}_users_matched_uniquely'] = unique
    notes[f'{split}_windows_matched_ambiguously'] = ambiguous
    notes[f'{split}_windows_unmatched'] = unmatched

  train = []
  for user in sorted(sequences):
    if user in held_out:
      continue
    seq = sequences[user]
    for position in range(MIN_HISTORY, len(seq)):
      train.append(
        Window(user=user, history=tuple(seq[max(0, position - MAX_HISTORY) : position]), target=seq[position])
      )
  splits['train'] = WindowSplit.from_windows(train, catalog.pad_id)
  notes['users'] = len(ratings)
  notes['users_held_out_of_training'] = len(held_out)
  notes['train_users'] = len(sequences) - len(held_out & set(sequences))
  return Dataset(
    name='movielens',
    catalog=catalog,
    splits={k: splits[k] for k in ('train', 'val', 'test')},
    user_items=user_items,
    user_sequences={u: np.asarray(s, dtype=np.int32) for u, s in sequences.items()},
    notes=notes,
  )
