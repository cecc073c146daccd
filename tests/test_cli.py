"""`experiments.cli`: expected errors print one or two lines on stderr and exit with status 2, with no traceback
unless --verbose; a misspelt override names its full path and the closest field. Each case is a real command."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def command(*args, env=None):
  environment = {**os.environ, 'JAX_PLATFORMS': 'cpu', **(env or {})}
  return subprocess.run(
    [sys.executable, '-m', *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=environment
  )


@pytest.mark.parametrize(
  'args, message',
  [
    (('experiments.train',), 'error: flag --config=None: Flag --config must have a value other than None.'),
    (
      ('experiments.train', '--config=configs/nope.py'),
      'error: --config=configs/nope.py: the config file could not be loaded: [Errno 2] No such file or directory',
    ),
    (
      ('experiments.train', '--config=configs/demo_cpu.py', '--config.rl.lamda_sd=0.1'),
      "error: unknown config field 'rl.lamda_sd' (from --config.rl.lamda_sd); did you mean 'rl.lambda_sd'?",
    ),
    # A ConfigError raised by validation, inside main.
    (
      ('experiments.train', '--config=configs/demo_cpu.py', '--config.rollout.max_turns=0'),
      "error: ConfigError: Config field 'rollout.max_turns': expected an int >= 1, found 0",
    ),
    # A data root that is not a folder (MissingDataError from the data loader).
    (
      ('experiments.describe_data', '--dataset=lastfm', '--data_root=/nonexistent/data'),
      'error: MissingDataError: the config field data_root names /nonexistent/data, which is not a folder',
    ),
  ],
)
def test_expected_errors_are_one_line_and_status_2(args, message):
  result = command(*args)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [
    line for line in result.stderr.splitlines() if line.strip() and not line.startswith(('I', 'W')) or 'error:' in line
  ]
  assert 'Traceback' not in result.stderr
  assert any(message in line for line in lines), result.stderr[-2000:]
  assert len([line for line in lines if 'error' in line or 'Pass --' in line]) <= 2


def test_verbose_shows_the_traceback():
  result = command('experiments.train', '--config=configs/demo_cpu.py', '--config.rollout.max_turns=0', '--verbose')
  assert result.returncode != 2 and 'Traceback' in result.stderr and 'ConfigError' in result.stderr
