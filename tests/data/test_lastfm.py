import shutil

import numpy as np
import pandas as pd
import pytest

from coars_jax.data import files, lastfm
from coars_jax.data.errors import ChecksumError, MalformedDataError
from tests.conftest import require_files


@pytest.fixture(scope='module')
def dataset():
  root = require_files(lastfm.ITEM_FILE, *lastfm.SPLIT_FILES.values(), lastfm.STATS_FILE)
  return lastfm.load(root, allow_download=False)


def test_statistics_match_source_md(dataset):
  assert dataset.num_items == 4606
  assert [len(dataset.split(s)) for s in ('train', 'val', 'test')] == [50800, 122, 122]
  assert int(np.sum(dataset.split('train').lengths >= 3)) == 47872
  assert dataset.catalog.title(0) == 'Morcheeba' and dataset.catalog.title(4605) == 'Abney Park'


def test_users_are_recovered_by_chaining(dataset):
  train = dataset.split('train')
  # Every recovered user starts with one empty-history window, and its windows are consecutive prefixes.
  assert dataset.notes['train_users_recovered'] == int(np.sum(train.lengths == 0)) == 976
  w0, w1 = train.window(9), train.window(10)
  assert w0.user == w1.user and w1.history == w0.history + (w0.target,)
  assert set(np.unique(dataset.split('test').users)).isdisjoint(np.unique(train.users))


def _copy_root(tmp_path, root):
  for relpath in [lastfm.ITEM_FILE, lastfm.STATS_FILE, *lastfm.SPLIT_FILES.values()]:
    (tmp_path / relpath).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(root / relpath, tmp_path / relpath)
  return tmp_path


@pytest.mark.parametrize(
  'mutate, message',
  [
    (lambda lines: lines[:2] + ['2 Morcheeba'] + lines[3:], r'id2name\.txt:3: expected "<id>::<artist name>"'),
    (lambda lines: lines[:4] + lines[5:], r'id2name\.txt:5: expected item id 4'),
  ],
)
def test_malformed_catalog_names_file_and_line(tmp_path, mutate, message):
  root = _copy_root(tmp_path, require_files(lastfm.ITEM_FILE, *lastfm.SPLIT_FILES.values(), lastfm.STATS_FILE))
  path = root / lastfm.ITEM_FILE
  lines = path.read_text(encoding='utf-8').splitlines()
  path.write_text('\n'.join(mutate(lines)) + '\n', encoding='utf-8')
  with pytest.raises(MalformedDataError, match=message):
    lastfm.load(root, allow_download=False)


def test_catalog_in_wrong_encoding_names_the_line(tmp_path):
  root = _copy_root(tmp_path, require_files(lastfm.ITEM_FILE, *lastfm.SPLIT_FILES.values(), lastfm.STATS_FILE))
  path = root / lastfm.ITEM_FILE
  text = path.read_text(encoding='utf-8')
  path.write_bytes(text.encode('cp1252', errors='replace'))
  with pytest.raises(MalformedDataError, match=r'id2name\.txt:3: not valid utf-8'):  # line 3 is "Café Del Mar"
    lastfm.load(root, allow_download=False)


def test_truncated_window_file_is_refused_by_checksum(tmp_path):
  root = _copy_root(tmp_path, require_files(lastfm.ITEM_FILE, *lastfm.SPLIT_FILES.values(), lastfm.STATS_FILE))
  path = root / lastfm.SPLIT_FILES['test']
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(ChecksumError, match='Test_data.df'):
    lastfm.load(root, allow_download=False)


def test_unknown_item_id_names_the_row(tmp_path, monkeypatch):
  root = _copy_root(tmp_path, require_files(lastfm.ITEM_FILE, *lastfm.SPLIT_FILES.values(), lastfm.STATS_FILE))
  path = root / lastfm.SPLIT_FILES['val']
  frame = pd.read_pickle(path)
  frame.at[3, 'next'] = 9999
  frame.to_pickle(path)
  # Pin the modified file so that the parser, not the checksum, is what sees it.
  monkeypatch.setitem(
    files.MANIFEST,
    lastfm.SPLIT_FILES['val'],
    files.FileSpec(relpath=lastfm.SPLIT_FILES['val'], sha256=files.sha256_of(path), size=path.stat().st_size, url=''),
  )
  with pytest.raises(MalformedDataError, match=r'Val_data\.df: row 3: unknown item id 9999'):
    lastfm.load(root, allow_download=False)
