"""Amazon 2014 Musical Instruments 5-core: 1,429 users, 900 titled items, the last window of each user.

Item ids follow the sorted ASINs and user ids the sorted reviewer ids, so both are stable across machines.
Each user's reviews are ordered by day, with same-day ties kept in file order. Users are split 8:1:1 by a
seeded permutation. Val and test hold each user's last window; train holds every window of the train users
(a history of at least one item), because one window per user leaves SASRec about a thousand examples.
"""

from __future__ import annotations

import html
import json
import pathlib

import numpy as np

from coars_jax.data import files
from coars_jax.data.errors import MalformedDataError
from coars_jax.data.schema import MAX_HISTORY, Dataset, ItemCatalog, Window, WindowSplit

FOLDER = 'instruments/amazon2014_musical_instruments_5core'
RATINGS_FILE = f'{FOLDER}/Musical_Instruments_5.csv'
META_FILE = f'{FOLDER}/Musical_Instruments_meta_5.json'
RATINGS_HEADER = ['asin', 'reviewerID', 'overall', 'unixReviewTime']
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
DEFAULT_SPLIT_SEED = 0


def parse_meta(path: pathlib.Path) -> dict[str, str]:
  """Returns asin -> title, with HTML entities unescaped."""
  titles = {}
  for number, line in files.read_text_lines(path):
    if not line.strip():
      raise MalformedDataError(path, number, 'empty line; expected one JSON object per line')
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise MalformedDataError(path, number, f'not valid JSON ({e.msg} at column {e.colno})') from e
    if not isinstance(record, dict) or not isinstance(record.get('asin'), str):
      raise MalformedDataError(path, number, 'expected an object with a string "asin"')
    title = record.get('title')
    if not isinstance(title, str) or not title.strip():
      raise MalformedDataError(path, number, f'item {record["asin"]} has no title')
    if record['asin'] in titles:
      raise MalformedDataError(path, number, f'item {record["asin"]} is listed twice')
    titles[record['asin']] = html.unescape(title).strip()
  return titles


def parse_ratings(path: pathlib.Path, known_items: set[str]) -> list[tuple[str, str, float, int]]:
  """Returns (asin, reviewer, rating, day timestamp) rows in file order."""
  rows = []
  for number, line in files.read_text_lines(path):
    fields = [f.strip() for f in line.split(',')]
    if number == 1:
      if fields != RATINGS_HEADER:
        raise MalformedDataError(path, number, f'expected the header {RATINGS_HEADER}, found {fields}')
      continue
    if len(fields) != 4:
      raise MalformedDataError(path, number, f'expected 4 comma-separated fields, found {len(fields)}')
    asin, reviewer, rating, timestamp = fields
    if asin not in known_items:
      raise MalformedDataError(path, number, f'unknown item {asin!r}: it is not in {META_FILE}')
    try:
      rows.append((asin, reviewer, float(rating), int(timestamp)))
    except ValueError as e:
      raise MalformedDataError(path, number, f'bad rating or timestamp: {e}') from e
  if not rows:
    raise MalformedDataError(path, None, 'the file holds no ratings')
  return rows


def split_users(num_users: int, seed: int = DEFAULT_SPLIT_SEED) -> dict[str, np.ndarray]:
  order = np.random.default_rng(seed).permutation(num_users)
  n_val = int(round(num_users * SPLIT_FRACTIONS[1]))
  n_test = int(round(num_users * SPLIT_FRACTIONS[2]))
  n_train = num_users - n_val - n_test
  return {
    'train': np.sort(order[:n_train]),
    'val': np.sort(order[n_train : n_train + n_val]),
    'test': np.sort(order[n_train + n_val :]),
  }


def load(data_root=None, *, allow_download: bool = True, split_seed: int = DEFAULT_SPLIT_SEED) -> Dataset:
  locate = lambda rel: files.locate(rel, data_root, allow_download=allow_download)
  meta_path, ratings_path = locate(META_FILE), locate(RATINGS_FILE)
  titles = parse_meta(meta_path)
  rows = parse_ratings(ratings_path, set(titles))
  files.warn_if_modified(meta_path, META_FILE)
  files.warn_if_modified(ratings_path, RATINGS_FILE)

  asins = sorted(titles)
  item_id = {asin: i for i, asin in enumerate(asins)}
  reviewers = sorted({reviewer for _, reviewer, _, _ in rows})
  user_id = {reviewer: u for u, reviewer in enumerate(reviewers)}
  by_user: dict[int, list[tuple[int, int]]] = {u: [] for u in range(len(reviewers))}
  for asin, reviewer, _, timestamp in rows:
    by_user[user_id[reviewer]].append((timestamp, item_id[asin]))
  # sorted() is stable: same-day reviews keep their file order.
  sequences = {u: [item for _, item in sorted(r, key=lambda x: x[0])] for u, r in by_user.items()}

  users_of = split_users(len(reviewers), split_seed)
  splits = {}
  for split, users in users_of.items():
    windows = []
    for user in users:
      seq = sequences[int(user)]
      positions = range(1, len(seq)) if split == 'train' else [len(seq) - 1]
      for position in positions:
        windows.append(
          Window(user=int(user), history=tuple(seq[max(0, position - MAX_HISTORY) : position]), target=seq[position])
        )
    splits[split] = WindowSplit.from_windows(windows, pad_id=len(asins))
  notes = {
    'users': len(reviewers),
    'ratings': len(rows),
    'split_seed': split_seed,
    **{f'{split}_users': int(len(users)) for split, users in users_of.items()},
  }
  return Dataset(
    name='instruments',
    catalog=ItemCatalog(tuple(titles[a] for a in asins)),
    splits=splits,
    user_items={u: frozenset(s) for u, s in sequences.items()},
    user_sequences={u: np.asarray(s, dtype=np.int32) for u, s in sequences.items()},
    notes=notes,
  )
