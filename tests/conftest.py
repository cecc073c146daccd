"""Shared fixtures: the real data root (skipping with a reason when absent) and the synthetic dataset."""

import os
import pathlib
import subprocess
import sys

import pytest

from coars_jax.data import synthetic

_SIBLING = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data'


def _configured_root() -> pathlib.Path:
  root = os.environ.get('COARS_DATA_DIR')
  return pathlib.Path(root) if root else _SIBLING


def real_data_root() -> pathlib.Path | None:
  root = _configured_root()
  return root if root.is_dir() else None


def require_files(*relpaths: str) -> pathlib.Path:
  """The data root holding every `relpath`, or a skip that names what is missing and where it looked."""
  root = real_data_root()
  looked = (
    f'$COARS_DATA_DIR={os.environ["COARS_DATA_DIR"]}'
    if os.environ.get('COARS_DATA_DIR')
    else f'{_SIBLING} ($COARS_DATA_DIR is unset)'
  )
  if root is None:
    pytest.skip(f'real datasets absent: no data root at {looked}; set COARS_DATA_DIR to run this test')
  missing = [r for r in relpaths if not (root / r).is_file()]
  if missing:
    pytest.skip(f'real dataset files absent under {root}: {missing}')
  return root


@pytest.fixture
def synthetic_dataset():
  return synthetic.synthetic_dataset()


REPO = pathlib.Path(__file__).resolve().parents[1]


def run_module(*args: str, env_root: pathlib.Path, timeout: int = 1200) -> str:
  """Runs `python -m <args>` from the repository root as a user would, with the data root set; returns stdout
  and fails the test with the end of stderr when the command fails."""
  env = dict(os.environ, COARS_DATA_DIR=str(env_root), JAX_PLATFORMS='cpu')
  result = subprocess.run(
    [sys.executable, '-m', *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout
