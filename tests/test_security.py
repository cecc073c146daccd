"""Nothing from a data or model folder runs as code: a scan of the package for the calls that would run it
(unpickling, remote code, eval), and loaders tried on folders that carry code. Downloads and pickles are checked
against pinned sha256s in `tests/data/test_files.py` (test_download_verifies_checksum_before_use,
test_unpinned_pickle_is_refused, test_pinned_pickle_with_other_bytes_is_refused,
test_pinned_pickle_that_calls_code_is_refused)."""

import ast
import json
import pathlib


from coars_jax.data import synthetic
from coars_jax.models import tokenizer as tokenizer_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
SCANNED = ('coars_jax', 'experiments', 'configs')
# Calls that execute code or build objects named by the bytes they read.
UNSAFE_CALLS = {
  'pickle.load',
  'pickle.loads',
  'pickle.Unpickler',
  'pd.read_pickle',
  'pandas.read_pickle',
  'torch.load',
  'joblib.load',
  'dill.load',
  'dill.loads',
  'cloudpickle.load',
  'cloudpickle.loads',
  'marshal.load',
  'marshal.loads',
  'shelve.open',
  'yaml.load',
  'yaml.unsafe_load',
  'runpy.run_path',
}
UNSAFE_BUILTINS = {'eval', 'exec', '__import__'}  # by their bare names only (`model.eval()` is a torch mode switch)
# The one place that unpickles: after the file's sha256 matches a pinned value, through an allow-list.
ALLOWED = {('coars_jax/data/files.py', 'pickle.Unpickler')}


def _name(node: ast.AST) -> str:
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, ast.Attribute):
    return f'{_name(node.value)}.{node.attr}'
  return ''


def _sources():
  for top in SCANNED:
    for path in sorted((REPO / top).rglob('*.py')):
      yield path.relative_to(REPO).as_posix(), ast.parse(path.read_text(encoding='utf-8'), filename=str(path))


def _unsafe(name: str) -> str | None:
  """The entry of UNSAFE_CALLS / UNSAFE_BUILTINS that the called or subclassed `name` is, if any."""
  if name in UNSAFE_BUILTINS:
    return name
  return next((unsafe for unsafe in UNSAFE_CALLS if name == unsafe or name.endswith('.' + unsafe)), None)


def test_the_package_has_no_call_that_runs_code_from_files():
  found = []
  for relpath, tree in _sources():
    for node in ast.walk(tree):
      names = []
      if isinstance(node, ast.Call):
        names.append(_name(node.func))
        for keyword in node.keywords:
          if keyword.arg == 'trust_remote_code' and not (
            isinstance(keyword.value, ast.Constant) and keyword.value.value is False
          ):
            found.append(f'{relpath}:{node.lineno}: trust_remote_code={ast.unparse(keyword.value)}')
          if keyword.arg == 'allow_pickle' and not (
            isinstance(keyword.value, ast.Constant) and keyword.value.value is False
          ):
            found.append(f'{relpath}:{node.lineno}: allow_pickle={ast.unparse(keyword.value)}')
      if isinstance(node, ast.ClassDef):
        names += [_name(base) for base in node.bases]
      for name in names:
        unsafe = _unsafe(name)
        if unsafe and (relpath, unsafe) not in ALLOWED:
          found.append(f'{relpath}:{node.lineno}: {name}')
  assert found == []


def test_the_scan_would_catch_what_it_looks_for():
  tree = ast.parse(
    'import pickle, transformers\npickle.loads(b"")\n'
    'transformers.AutoModel.from_pretrained("x", trust_remote_code=True)\n'
  )
  calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
  assert _unsafe(_name(calls[0].func)) == 'pickle.loads' and _unsafe('hf_model.eval') is None
  assert _unsafe('eval') == 'eval' and _unsafe('pandas.read_pickle') == 'pandas.read_pickle'
  assert calls[1].keywords[0].arg == 'trust_remote_code' and calls[1].keywords[0].value.value is True


def test_a_tokenizer_folder_with_custom_code_does_not_run_it(tmp_path):
  """A folder whose tokenizer_config.json maps the tokenizer to a Python file of its own: loading it either
  ignores the file or refuses, and the file never runs."""
  lines = tokenizer_lib.tokenizer_corpus([synthetic.synthetic_dataset().catalog.titles], repeats=2)
  folder = tokenizer_lib.build_tokenizer(lines, tmp_path / 'tok', vocab_size=400)
  folder = pathlib.Path(folder)
  marker = tmp_path / 'code_ran'
  (folder / 'evil_tokenizer.py').write_text(
    f'open({str(marker)!r}, "w").write("ran")\nfrom transformers import PreTrainedTokenizerFast as EvilTokenizer\n'
  )
  config_path = folder / 'tokenizer_config.json'
  config = json.loads(config_path.read_text())
  config['auto_map'] = {'AutoTokenizer': ['evil_tokenizer.EvilTokenizer', 'evil_tokenizer.EvilTokenizer']}
  config['tokenizer_class'] = 'EvilTokenizer'
  config_path.write_text(json.dumps(config))
  try:
    tokenizer_lib.load_tokenizer(folder)
  except ValueError as error:
    assert 'could not load a tokenizer' in str(error)
  assert not marker.exists()


def test_tokenizer_loaders_ask_for_local_files_and_no_remote_code(monkeypatch, tmp_path):
  calls = []
  monkeypatch.setattr(
    tokenizer_lib.transformers.AutoTokenizer, 'from_pretrained', lambda *args, **kwargs: calls.append(kwargs)
  )
  (tmp_path / 'tokenizer.json').write_text('{}')
  (tmp_path / 'model.gguf').write_bytes(b'GGUF')
  tokenizer_lib.load_tokenizer(tmp_path)
  tokenizer_lib.load_gguf_tokenizer(tmp_path / 'model.gguf')
  assert len(calls) == 2
  for kwargs in calls:
    assert kwargs['trust_remote_code'] is False and kwargs['local_files_only'] is True


def test_downloads_and_pickles_stay_tested_against_pinned_checksums():
  # The behaviour is tested in tests/data/test_files.py; this keeps that test from disappearing unnoticed.
  source = (REPO / 'tests' / 'data' / 'test_files.py').read_text()
  for test in (
    'test_download_verifies_checksum_before_use',
    'test_unpinned_pickle_is_refused',
    'test_pinned_pickle_that_calls_code_is_refused',
  ):
    assert f'def {test}(' in source, test
