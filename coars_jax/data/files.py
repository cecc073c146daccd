"""Where dataset files live: the pinned manifest, data-root resolution, checksums, downloads, safe unpickling.

Every file a loader reads is listed in `MANIFEST` with its sha256 and the public address it can be fetched
from. Pickles are unpickled only after their sha256 matches the pinned value, and then only through an
unpickler that admits pandas and numpy classes; any other pickle is refused, because unpickling can run code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import pathlib
import pickle
import tempfile
import urllib.error
import urllib.request
import warnings
from typing import Callable, Iterable, Sequence

import platformdirs

from coars_jax.data.errors import ChecksumError, DataError, MissingDataError

DATA_DIR_ENV = 'COARS_DATA_DIR'
DOWNLOAD_TIMEOUT_S = 60


@dataclasses.dataclass(frozen=True, kw_only=True)
class FileSpec:
  """One pinned file: its path under the data root, its size and sha256, and the public original's address."""

  relpath: str
  sha256: str
  size: int
  url: str


def _github(repo: str, commit: str, path: str) -> str:
  return f'https://raw.githubusercontent.com/{repo}/{commit}/{urllib.request.quote(path)}'


_AFL = ('Lanyu0303/AFL', '4622a1e163df5db669a56ade4d7db334bc109d06')
_ML = ('1MT3J45/rec-engine', '88fb2b019e0d3cf56a5c90a5656413de5039d514')
_ML_ITEM = ('guibitten03/dataset_py', '482483fa5d66d2e3363b25af2a14a47243e07400')
_LLARA = ('zhangt766/LLaRA-similar_seq_as_demo-', '2806deac8531922a37f8b5aa3023554cb5a173c4')
_AMZ = ('calvincodes/cs765-dc2-visualizer', '54a7aeadf25988ad3d0cc55d93b37f71d4b2b7ba')


def _spec(relpath, sha256, size, source, upstream_path):
  return FileSpec(relpath=relpath, sha256=sha256, size=size, url=_github(*source, upstream_path))


# Checksums and sizes are the ones recorded in each dataset's SOURCE.md.
MANIFEST: dict[str, FileSpec] = {
  s.relpath: s
  for s in [
    _spec(
      'lastfm/afl_llara_format/lastfm/train_data.df',
      '7db71a60d3da4c449091fbc254efc9602f81eec6eb9a60534811ccd61974dbc1',
      2462846,
      _AFL,
      'data/lastfm/train_data.df',
    ),
    _spec(
      'lastfm/afl_llara_format/lastfm/Val_data.df',
      '92a1ddb65ebdeff999f910b65660eb3d8c7cd85e6a19308d80c429481839f8b3',
      6690,
      _AFL,
      'data/lastfm/Val_data.df',
    ),
    _spec(
      'lastfm/afl_llara_format/lastfm/Test_data.df',
      'cac058a2842b2a3ed4d39ed1fa0a742f5034a23c9851a2ffc157b4845d703570',
      6673,
      _AFL,
      'data/lastfm/Test_data.df',
    ),
    _spec(
      'lastfm/afl_llara_format/lastfm/id2name.txt',
      'b608bcf14300b1608ccd88f4fe240e6345125201ecdb55157395c19787fe4eaf',
      85003,
      _AFL,
      'data/lastfm/id2name.txt',
    ),
    _spec(
      'lastfm/afl_llara_format/lastfm/data_statis.df',
      '21c63c2025003e3df2c09402253f9281684f98cf88b2bf780e2754d495ed1d63',
      720,
      _AFL,
      'data/lastfm/data_statis.df',
    ),
    _spec(
      'lastfm/afl_llara_format/lastfm_ab/test_llara.pkl',
      '4c2ce207eb6ae2c46f9368b9eae842915ca2cd00f06cea4316048528ea756101',
      11133,
      _AFL,
      'data/lastfm_ab/test_llara.pkl',
    ),
    _spec(
      'lastfm/afl_llara_format/prior_lastfm/SASRec.csv',
      'befaee6d1f42b0084c44fe80ecadcdb35ba239ee015bcc4203f8c9604b2ba22f',
      3712,
      _AFL,
      'data/prior_lastfm/SASRec.csv',
    ),
    _spec(
      'movielens/ml-100k/u.data',
      '06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490',
      1979173,
      _ML,
      'ml-100k/u.data',
    ),
    _spec(
      'movielens/ml-100k/u.item',
      '553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701',
      236344,
      _ML_ITEM,
      'ml-100k/u.item',
    ),
    _spec(
      'movielens/llara_format/Test_data.df',
      'd38308a0078d4518dc9eeb619c8d1afb53d830712cc7d36ac51cc47eaafc97d6',
      43718,
      _LLARA,
      'data/ref/movielens/Test_data.df',
    ),
    _spec(
      'movielens/llara_format/Val_data.df',
      '9a950900d0055649e2983ef403d189d5fdc5bd4f84d229a377806d371b32e460',
      43200,
      _LLARA,
      'data/ref/movielens/Val_data.df',
    ),
    _spec(
      'instruments/amazon2014_musical_instruments_5core/Musical_Instruments_5.csv',
      'b03a99787fe4952c44951b5878b258b804061d7521b00c8435984a7865129d90',
      428314,
      _AMZ,
      'myapp/dataset/Musical_Instruments_5.csv',
    ),
    _spec(
      'instruments/amazon2014_musical_instruments_5core/Musical_Instruments_meta_5.json',
      '17f4b34b824112956fa42ec95bbd60a0155a8b78c0213c1bd04dd81637a9a25e',
      2125051,
      _AMZ,
      'myapp/dataset/Musical Instruments Meta 5/Musical_Instruments_meta_5.json',
    ),
  ]
}


def default_cache_root() -> pathlib.Path:
  return pathlib.Path(platformdirs.user_cache_dir('coars_jax')) / 'data'


def candidate_roots(data_root: str | os.PathLike | None = None) -> list[pathlib.Path]:
  """The data roots searched, in order: the config field, then `COARS_DATA_DIR`, then the per-user cache. A named
  root (the field or the variable) that is not a folder is an error rather than silently skipped: a typo there would
  otherwise read, or download, other data."""
  roots = []
  for given, where in ((data_root, 'the config field data_root'), (os.environ.get(DATA_DIR_ENV), DATA_DIR_ENV)):
    if not given:
      continue
    root = pathlib.Path(given).expanduser().absolute()
    if not root.is_dir():
      raise MissingDataError(
        f'{where} names {root}, which is not a folder; point it at the folder that holds the '
        f'datasets (e.g. ../shared/data) or unset it'
      )
    roots.append(root)
  roots.append(default_cache_root())
  unique = []
  for root in roots:
    if root not in unique:
      unique.append(root)
  return unique


def sha256_of(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def verify_checksum(path: pathlib.Path, spec: FileSpec) -> None:
  found = sha256_of(path)
  if found != spec.sha256:
    raise ChecksumError(
      f'{path}: sha256 is {found}, expected the pinned {spec.sha256} for {spec.relpath}. '
      'The file differs from the public original (corrupted, truncated or another version); '
      'replace it with the original or delete it so that it is downloaded again.'
    )


def _urlopen(url: str):
  return urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S)


def download(spec: FileSpec, root: pathlib.Path, opener: Callable = _urlopen) -> pathlib.Path:
  """Fetches `spec` into `root`, verifying its sha256 before the file is moved into place."""
  target = root / spec.relpath
  target.parent.mkdir(parents=True, exist_ok=True)
  with opener(spec.url) as response:
    payload = response.read()
  found = hashlib.sha256(payload).hexdigest()
  if found != spec.sha256:
    raise ChecksumError(
      f'{spec.url}: downloaded {len(payload)} bytes with sha256 {found}, expected the pinned '
      f'{spec.sha256}; the download was discarded.'
    )
  # Write to a temp file and rename so that an interrupted download never leaves a partial file in place.
  with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
    tmp.write(payload)
  os.replace(tmp.name, target)
  return target


def locate(
  relpath: str, data_root: str | os.PathLike | None = None, *, allow_download: bool = True, opener: Callable = _urlopen
) -> pathlib.Path:
  """Returns the path of `relpath` under the first data root that has it, downloading it if none has.

  Raises:
    MissingDataError: naming the file and every place looked, when it is nowhere and cannot be downloaded.
  """
  roots = candidate_roots(data_root)
  for root in roots:
    path = root / relpath
    if path.is_file():
      return path
  looked = '\n  '.join(str(root / relpath) for root in roots)
  spec = MANIFEST.get(relpath)
  reason = 'downloads are disabled (allow_download=False)'
  if spec is not None and allow_download:
    try:
      return download(spec, default_cache_root(), opener=opener)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
      reason = f'downloading {spec.url} failed: {e}'
  elif spec is None:
    reason = 'no public address is pinned for it'
  raise MissingDataError(
    f'Missing data file {relpath!r}. Looked in:\n  {looked}\nand {reason}. Set the config field '
    f'data_root or the environment variable {DATA_DIR_ENV} to the folder that holds it.'
  )


# Pickled DataFrames of the pinned files reference only these modules. A checksum already pins the bytes;
# this allow-list is a second wall, so that a pinned file that somehow named another callable still fails.
_ALLOWED_PICKLE_MODULES = ('pandas', 'numpy', 'collections', 'copyreg', 'datetime')
_ALLOWED_BUILTINS = {
  'list',
  'dict',
  'tuple',
  'set',
  'frozenset',
  'int',
  'float',
  'str',
  'bytes',
  'bytearray',
  'slice',
  'complex',
  'bool',
  'object',
  'range',
}


class _AllowListUnpickler(pickle.Unpickler):
  def __init__(self, file, path):
    super().__init__(file)
    self._path = path

  def find_class(self, module, name):
    if module == 'builtins' and name in _ALLOWED_BUILTINS:
      return super().find_class(module, name)
    if module.split('.')[0] in _ALLOWED_PICKLE_MODULES:
      with warnings.catch_warnings():  # Old pickles name numpy.core, which numpy 2 still maps, with a warning.
        warnings.simplefilter('ignore', DeprecationWarning)
        return super().find_class(module, name)
    raise DataError(
      f'{self._path}: the pickle references {module}.{name}, which is not allowed; '
      'only pandas and numpy objects are unpickled.'
    )


def load_pinned_pickle(path: pathlib.Path, relpath: str):
  """Unpickles `path` only if `relpath` is pinned in the manifest and the file's sha256 matches."""
  spec = MANIFEST.get(relpath)
  if spec is None:
    raise DataError(
      f'{path}: refusing to unpickle a file whose sha256 is not pinned in coars_jax.data.files.MANIFEST. '
      'Unpickling can run arbitrary code, so only the pinned public originals are loaded.'
    )
  verify_checksum(path, spec)
  with open(path, 'rb') as f:
    payload = f.read()
  return _AllowListUnpickler(io.BytesIO(payload), path).load()


def read_text_lines(path: pathlib.Path, encoding: str = 'utf-8') -> Iterable[tuple[int, str]]:
  """Yields (1-based line number, line without its newline), failing on a line that is not `encoding`."""
  from coars_jax.data.errors import MalformedDataError

  with open(path, 'rb') as f:
    for number, raw in enumerate(f, start=1):
      try:
        line = raw.decode(encoding)
      except UnicodeDecodeError as e:
        raise MalformedDataError(path, number, f'not valid {encoding} ({e.reason} at byte {e.start})') from e
      if not raw.endswith(b'\n'):
        raise MalformedDataError(path, number, 'the file ends in the middle of this line; it looks truncated')
      yield number, line.rstrip('\r\n')


def warn_if_modified(path: pathlib.Path, relpath: str) -> None:
  """Logs a warning when a parsed text file differs from its pinned original; its numbers may not compare."""
  spec = MANIFEST.get(relpath)
  if spec is not None and sha256_of(path) != spec.sha256:
    logging.warning(
      '%s parsed, but its sha256 differs from the pinned original %s; results from it are not '
      'comparable with the published protocol.',
      path,
      spec.sha256,
    )


def required_files(dataset: str) -> Sequence[str]:
  return [relpath for relpath in MANIFEST if relpath.startswith(dataset + '/')]
