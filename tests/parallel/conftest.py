"""Runs `tests.parallel.multi_device` in a fresh process with 8 fake CPU devices: the device count is fixed when
jax starts, and this process has already started it with one."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def run_on_eight_devices(*args: str, timeout: int = 600) -> dict:
  """The JSON object that `python -m tests.parallel.multi_device ARGS` prints last; fails the test with the end of
  its stderr when it fails."""
  env = dict(
    os.environ,
    XLA_FLAGS='--xla_force_host_platform_device_count=8',
    JAX_PLATFORMS='cpu',
    PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')])),
  )
  result = subprocess.run(
    [sys.executable, '-m', 'tests.parallel.multi_device', *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1])
