import hashlib
import io
import os
import pickle

import pandas as pd
import pytest

from coars_jax.data import files
from coars_jax.data.errors import ChecksumError, DataError, MalformedDataError, MissingDataError


@pytest.fixture
def isolated_roots(tmp_path, monkeypatch):
  """A config root, an env root and a cache root, all empty, with downloads going to the cache."""
  roots = {name: tmp_path / name for name in ('config', 'env', 'cache')}
  for root in roots.values():
    root.mkdir()
  monkeypatch.setenv(files.DATA_DIR_ENV, str(roots['env']))
  monkeypatch.setattr(files, 'default_cache_root', lambda: roots['cache'])
  return roots


def _pin(monkeypatch, relpath, payload):
  spec = files.FileSpec(
    relpath=relpath,
    sha256=hashlib.sha256(payload).hexdigest(),
    size=len(payload),
    url=f'https://example.invalid/{relpath}',
  )
  monkeypatch.setitem(files.MANIFEST, relpath, spec)
  return spec


def test_roots_are_searched_in_order(isolated_roots):
  roots = files.candidate_roots(isolated_roots['config'])
  assert roots == [isolated_roots['config'], isolated_roots['env'], isolated_roots['cache']]
  (isolated_roots['env'] / 'x').mkdir()
  (isolated_roots['env'] / 'x' / 'f.txt').write_text('env\n')
  assert files.locate('x/f.txt', isolated_roots['config'], allow_download=False) == isolated_roots['env'] / 'x/f.txt'
  (isolated_roots['config'] / 'x').mkdir()
  (isolated_roots['config'] / 'x' / 'f.txt').write_text('config\n')
  assert files.locate('x/f.txt', isolated_roots['config']) == isolated_roots['config'] / 'x/f.txt'


def test_a_named_root_that_is_not_a_folder_is_an_error(isolated_roots, monkeypatch):
  with pytest.raises(MissingDataError, match=r'the config field data_root names .*/nowhere, which is not a folder'):
    files.candidate_roots(isolated_roots['config'] / 'nowhere')
  monkeypatch.setenv(files.DATA_DIR_ENV, str(isolated_roots['env'] / 'typo'))
  with pytest.raises(MissingDataError, match=r'COARS_DATA_DIR names .*/typo, which is not a folder'):
    files.candidate_roots(None)
  monkeypatch.setenv(files.DATA_DIR_ENV, '')
  assert files.candidate_roots(None) == [isolated_roots['cache']]  # an empty variable is unset


def test_missing_file_names_every_place_looked(isolated_roots):
  with pytest.raises(MissingDataError) as e:
    files.locate('lastfm/afl_llara_format/lastfm/Test_data.df', isolated_roots['config'], allow_download=False)
  message = str(e.value)
  for root in isolated_roots.values():
    assert str(root / 'lastfm/afl_llara_format/lastfm/Test_data.df') in message
  assert 'downloads are disabled' in message


def test_failed_download_is_reported(isolated_roots):
  def offline(url):
    import urllib.error

    raise urllib.error.URLError('network unreachable')

  with pytest.raises(MissingDataError, match='network unreachable'):
    files.locate('movielens/ml-100k/u.data', None, opener=offline)


def test_download_verifies_checksum_before_use(isolated_roots, monkeypatch):
  payload = b'1\t2\t3\t4\n'
  spec = _pin(monkeypatch, 'demo/good.txt', payload)
  path = files.locate('demo/good.txt', None, opener=lambda url: io.BytesIO(payload))
  assert path == isolated_roots['cache'] / 'demo/good.txt'
  assert path.read_bytes() == payload
  _pin(monkeypatch, 'demo/bad.txt', payload)
  with pytest.raises(ChecksumError, match='discarded'):
    files.download(
      files.MANIFEST['demo/bad.txt'], isolated_roots['cache'], opener=lambda url: io.BytesIO(payload + b'tampered')
    )
  assert not (isolated_roots['cache'] / 'demo/bad.txt').exists()
  del spec


def test_unpinned_pickle_is_refused(tmp_path):
  path = tmp_path / 'frame.df'
  pd.DataFrame({'a': [1]}).to_pickle(path)
  with pytest.raises(DataError, match='not pinned'):
    files.load_pinned_pickle(path, 'somewhere/frame.df')


def test_pinned_pickle_with_other_bytes_is_refused(tmp_path, monkeypatch):
  path = tmp_path / 'frame.df'
  pd.DataFrame({'a': [1]}).to_pickle(path)
  _pin(monkeypatch, 'x/frame.df', path.read_bytes())
  assert files.load_pinned_pickle(path, 'x/frame.df')['a'].tolist() == [1]
  pd.DataFrame({'a': [2]}).to_pickle(path)
  with pytest.raises(ChecksumError, match='sha256'):
    files.load_pinned_pickle(path, 'x/frame.df')


class _RunsCode:
  def __reduce__(self):
    return (os.system, ('echo pwned',))


def test_pinned_pickle_that_calls_code_is_refused(tmp_path, monkeypatch):
  payload = pickle.dumps(_RunsCode())
  path = tmp_path / 'evil.pkl'
  path.write_bytes(payload)
  _pin(monkeypatch, 'x/evil.pkl', payload)
  with pytest.raises(DataError, match='not allowed'):
    files.load_pinned_pickle(path, 'x/evil.pkl')


def test_text_reader_reports_encoding_and_truncation(tmp_path):
  path = tmp_path / 'f.txt'
  path.write_bytes('ok\n'.encode() + 'Caf\xe9\n'.encode('latin-1'))
  with pytest.raises(MalformedDataError, match=r'f\.txt:2: not valid utf-8'):
    list(files.read_text_lines(path))
  path.write_bytes(b'one\ntwo')
  with pytest.raises(MalformedDataError, match=r'f\.txt:2: .*truncated'):
    list(files.read_text_lines(path))
  path.write_bytes(b'one\ntwo\n')
  assert list(files.read_text_lines(path)) == [(1, 'one'), (2, 'two')]
