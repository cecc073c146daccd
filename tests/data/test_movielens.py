import shutil

import pytest

from coars_jax.data import movielens
from coars_jax.data.errors import MalformedDataError
from tests.conftest import require_files

FILES = [movielens.RATINGS_FILE, movielens.ITEMS_FILE, *movielens.SPLIT_FILES.values()]


@pytest.fixture(scope='module')
def dataset():
  return movielens.load(require_files(*FILES), allow_download=False)


def test_statistics_match_source_md(dataset):
  assert dataset.num_items == 1682
  assert len(dataset.split('val')) == 94 and len(dataset.split('test')) == 95
  assert dataset.notes['users'] == 943


def test_every_llara_window_matches_one_user_kept_out_of_training(dataset):
  assert dataset.notes['val_users_matched_uniquely'] == 94
  assert dataset.notes['test_users_matched_uniquely'] == 95
  held_out = set(dataset.split('val').users) | set(dataset.split('test').users)
  assert len(held_out) == dataset.notes['users_held_out_of_training']
  assert held_out.isdisjoint(set(dataset.split('train').users))
  # A matched user's rated sequence really holds the window's items.
  window = dataset.split('test').window(0)
  assert set(window.history) | {window.target} <= dataset.user_items[window.user]


def test_training_windows_follow_the_protocol(dataset):
  train = dataset.split('train')
  assert train.lengths.min() >= movielens.MIN_HISTORY and train.lengths.max() == 10
  w = train.window(0)
  sequence = list(dataset.user_sequences[w.user])
  assert sequence[: len(w.history) + 1] == list(w.history) + [w.target]


@pytest.mark.parametrize(
  'raw, clean',
  [
    ('Toy Story (1995)', 'Toy Story'),
    ('Usual Suspects, The (1995)', 'The Usual Suspects'),
    ('City of Lost Children, The (1995)', 'The City of Lost Children'),
    ('Shawshank Redemption, The (1994)', 'The Shawshank Redemption'),
    ('Pulp Fiction (1994)', 'Pulp Fiction'),
  ],
)
def test_titles_are_cleaned_as_llara_does(raw, clean):
  assert movielens.clean_title(raw) == clean


def _copy(tmp_path):
  root = require_files(*FILES)
  for relpath in FILES:
    (tmp_path / relpath).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(root / relpath, tmp_path / relpath)
  return tmp_path / movielens.RATINGS_FILE


@pytest.mark.parametrize(
  'edit, message',
  [
    (lambda b: b.replace(b'196\t242\t3\t881250949', b'196\t242\t3'), r'u\.data:1: expected 4 tab-separated'),
    (lambda b: b.replace(b'186\t302\t3\t891717742', b'186\t9999\t3\t891717742'), r'u\.data:2: unknown movie id 9999'),
    (lambda b: b[:-7], r'u\.data:100000: the file ends in the middle'),
  ],
)
def test_malformed_ratings_name_file_and_line(tmp_path, edit, message):
  path = _copy(tmp_path)
  path.write_bytes(edit(path.read_bytes()))
  with pytest.raises(MalformedDataError, match=message):
    movielens.load(tmp_path, allow_download=False)
