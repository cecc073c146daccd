"""The code follows the data (project issue 21 section 4): `coars_jax.training` trains adapters on whatever peer it is
given, so none of its modules imports SASRec (`coars_jax.recsys`) or the run's orchestration (`coars_jax.pipeline`),
not even lazily inside a function; `pipeline` composes them. Checked on the source (`ast`), so an import that only
runs on some code path is caught as well."""

import ast
import pathlib
import shutil

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# Package -> the packages its modules must not import.
FORBIDDEN = {'coars_jax.training': ('coars_jax.recsys', 'coars_jax.pipeline')}
IMPORT_FUNCTIONS = {'import_module', '__import__'}  # importlib.import_module('...'), __import__('...')


def imported_modules(source: str, module: str, *, is_package: bool = False) -> list[tuple[int, str]]:
  """(line, module name) of every import in `source`, at any depth (function bodies included): `import a.b`,
  `from a import b` (as `a` and `a.b`: b may be a module), relative imports resolved against `module`, and
  `importlib.import_module` / `__import__` calls with a literal name."""
  package = module if is_package else module.rpartition('.')[0]
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found += [(node.lineno, alias.name) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        anchor = package.split('.')
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = '.'.join(anchor + ([base] if base else []))
      found.append((node.lineno, base))
      found += [(node.lineno, f'{base}.{alias.name}') for alias in node.names if alias.name != '*']
    elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
      function = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, 'id', '')
      if function in IMPORT_FUNCTIONS and isinstance(node.args[0].value, str):
        found.append((node.lineno, node.args[0].value))
  return found


def forbidden_imports(source: str, module: str, forbidden, *, is_package: bool = False) -> list[str]:
  """'line: name' of each import in `source` of a package in `forbidden` (or of one of its modules)."""
  hits = []
  for line, name in imported_modules(source, module, is_package=is_package):
    if any(name == banned or name.startswith(banned + '.') for banned in forbidden):
      hits.append(f'{line}: {name}')
  return sorted(set(hits), key=lambda hit: int(hit.split(':')[0]))


def package_violations(folder: pathlib.Path, package: str, forbidden) -> dict[str, list[str]]:
  """{module file: its forbidden imports} over the modules of `package`, whose sources are under `folder`."""
  paths = sorted(folder.rglob('*.py'))
  assert paths, f'no modules under {folder}'
  out = {}
  for path in paths:
    parts = path.relative_to(folder).with_suffix('').parts
    is_package = parts[-1] == '__init__'
    module = '.'.join([package, *(parts[:-1] if is_package else parts)])
    hits = forbidden_imports(path.read_text(encoding='utf-8'), module, forbidden, is_package=is_package)
    if hits:
      out[path.relative_to(folder).as_posix()] = hits
  return out


def _folder(package: str) -> pathlib.Path:
  return REPO.joinpath(*package.split('.'))


@pytest.mark.parametrize('package', sorted(FORBIDDEN))
def test_lower_layers_do_not_import_the_layers_that_compose_them(package):
  assert package_violations(_folder(package), package, FORBIDDEN[package]) == {}


@pytest.mark.parametrize(
  'source',
  [
    'from coars_jax.recsys import experiment as sasrec_experiment\n',
    'import coars_jax.recsys.sasrec\n',
    'from coars_jax import recsys\n',
    'from coars_jax.pipeline.run_config import default_config\n',
    'def peer():\n  from coars_jax.recsys.sasrec import SASRec  # lazily\n  return SASRec\n',
    'from ..recsys import sasrec\n',
    'from .. import pipeline\n',
    'import importlib\nexperiment = importlib.import_module("coars_jax.pipeline.experiment")\n',
  ],
)
def test_the_checker_catches_a_forbidden_import(source):
  assert forbidden_imports(source, 'coars_jax.training.rl', FORBIDDEN['coars_jax.training'])


@pytest.mark.parametrize(
  'source',
  [
    '"""Docstrings may name coars_jax.recsys and coars_jax.pipeline."""\n',
    'from coars_jax.training.rl import RLTrainer\nfrom coars_jax import data\n',
    'from coars_jax.recsys_notes import x\n',  # a name that only starts like a forbidden package
    'from . import warm_start\n',
  ],
)
def test_the_checker_passes_allowed_imports(source):
  assert forbidden_imports(source, 'coars_jax.training.rl', FORBIDDEN['coars_jax.training']) == []


def test_a_forbidden_import_added_to_a_copy_of_the_package_is_caught(tmp_path):
  """A copy of `coars_jax/training/` with one lazy SASRec import added to one module, and one relative import of
  `pipeline` to another: both are reported, and nothing else."""
  copy = tmp_path / 'training'
  shutil.copytree(_folder('coars_jax.training'), copy, ignore=shutil.ignore_patterns('__pycache__'))
  with (copy / 'warm_start.py').open('a') as file:
    file.write('\n\ndef _peer():\n  from coars_jax.recsys import experiment\n\n  return experiment\n')
  with (copy / 'rl.py').open('a') as file:
    file.write('\nfrom ..pipeline import run_config  # noqa: E402\n')
  found = package_violations(copy, 'coars_jax.training', FORBIDDEN['coars_jax.training'])
  assert sorted(found) == ['rl.py', 'warm_start.py']
  assert all(hit.endswith(' coars_jax.recsys') or ' coars_jax.recsys.' in hit for hit in found['warm_start.py'])
  assert all(' coars_jax.pipeline' in hit for hit in found['rl.py'])
