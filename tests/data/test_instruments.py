import shutil

import pytest

from coars_jax.data import instruments
from coars_jax.data.errors import MalformedDataError
from tests.conftest import require_files

FILES = [instruments.RATINGS_FILE, instruments.META_FILE]


@pytest.fixture(scope='module')
def dataset():
  return instruments.load(require_files(*FILES), allow_download=False)


def test_statistics_match_source_md(dataset):
  assert dataset.notes['users'] == 1429
  assert dataset.num_items == 900
  assert dataset.notes['ratings'] == 10261
  assert all(title and '&quot;' not in title and '&amp;' not in title for title in dataset.catalog.titles)


def test_users_split_8_1_1_with_last_windows(dataset):
  users = {s: set(dataset.split(s).users.tolist()) for s in ('train', 'val', 'test')}
  assert [len(users[s]) for s in ('train', 'val', 'test')] == [1143, 143, 143]
  assert not (users['train'] & users['val'] or users['train'] & users['test'] or users['val'] & users['test'])
  test = dataset.split('test')
  assert len(test) == 143
  for i in range(len(test)):
    w = test.window(i)
    sequence = dataset.user_sequences[w.user]
    assert w.target == sequence[-1] and list(w.history) == list(sequence[-1 - len(w.history) : -1])


def test_same_day_ties_keep_file_order(tmp_path):
  root = require_files(*FILES)
  rows = instruments.parse_ratings(
    root / instruments.RATINGS_FILE, set(instruments.parse_meta(root / instruments.META_FILE))
  )
  dataset = instruments.load(root, allow_download=False)
  asins = sorted(instruments.parse_meta(root / instruments.META_FILE))
  reviewer = 'A2IBPI20UZIR0U'
  user = sorted({r for _, r, _, _ in rows}).index(reviewer)
  mine = [(t, asins.index(a)) for a, r, _, t in rows if r == reviewer]
  expected = [item for _, item in sorted(mine, key=lambda x: x[0])]  # stable: file order within a day
  assert dataset.user_sequences[user].tolist() == expected


def _copy(tmp_path):
  root = require_files(*FILES)
  for relpath in FILES:
    (tmp_path / relpath).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(root / relpath, tmp_path / relpath)
  return tmp_path


def test_unknown_item_names_file_and_line(tmp_path):
  root = _copy(tmp_path)
  path = root / instruments.RATINGS_FILE
  lines = path.read_bytes().split(b'\n')
  lines[5] = b'NOTANASIN,' + lines[5].split(b',', 1)[1]
  path.write_bytes(b'\n'.join(lines))
  with pytest.raises(MalformedDataError, match=r"Musical_Instruments_5\.csv:6: unknown item 'NOTANASIN'"):
    instruments.load(root, allow_download=False)


def test_truncated_metadata_names_file_and_line(tmp_path):
  root = _copy(tmp_path)
  path = root / instruments.META_FILE
  path.write_bytes(path.read_bytes()[:-50] + b'\n')
  with pytest.raises(MalformedDataError, match=r'Musical_Instruments_meta_5\.json:900: not valid JSON'):
    instruments.load(root, allow_download=False)


def test_wrong_encoding_names_file_and_line(tmp_path):
  root = _copy(tmp_path)
  path = root / instruments.RATINGS_FILE
  lines = path.read_bytes().split(b'\n')
  lines[2] = lines[2].replace(b'A14VAT5EAX3D9S', 'A14VAT5EAX3D9\xd8'.encode('latin-1'))
  path.write_bytes(b'\n'.join(lines))
  with pytest.raises(MalformedDataError, match=r'Musical_Instruments_5\.csv:3: not valid utf-8'):
    instruments.load(root, allow_download=False)
