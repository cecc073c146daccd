"""The absl entry points, run as a user runs them, on the smallest real dataset."""

import json
import os
import pathlib
import subprocess
import sys

from coars_jax.data import instruments
from tests.conftest import REPO, require_files, run_module


def test_describe_data_prints_source_md_figures():
  root = require_files(instruments.RATINGS_FILE, instruments.META_FILE)
  out = run_module('experiments.describe_data', '--dataset=instruments', '--json', env_root=root)
  stats = json.loads(out)
  assert stats['users'] == 1429 and stats['items'] == 900 and stats['ratings'] == 10261
  # The user-simulation set: 143 test users, 900 judgements (BUILD_NOTES Part 1), over fewer distinct items.
  assert stats['user_sim_users'] == 143 and stats['user_sim_judgements'] == 900
  assert 0 < stats['user_sim_distinct_items'] <= min(900, stats['items'])
  assert stats['data_folder'] == str(pathlib.Path(root).absolute() / 'instruments')
  text = run_module('experiments.describe_data', '--dataset=instruments', env_root=root)
  assert text.splitlines()[0] == f'Read instruments from {pathlib.Path(root).absolute() / "instruments"}'


def test_evaluate_trains_checkpoints_and_writes_rows(tmp_path):
  root = require_files(instruments.RATINGS_FILE, instruments.META_FILE)
  output = tmp_path / 'rows.json'
  args = [
    'experiments.evaluate',
    '--config=configs/sasrec_instruments.py',
    '--config.train_seeds=(0,)',
    '--config.candidate_seeds=(0,1)',
    '--config.train.max_epochs=2',
    '--config.progress=False',
    f'--config.workdir={tmp_path / "work"}',
    f'--output={output}',
  ]
  out = run_module(*args, env_root=root)
  assert '| instruments | sasrec |' in out
  rows = json.loads(output.read_text())
  assert [r['method'] for r in rows] == ['random', 'popularity', 'sasrec']
  assert all(r['candidate_seeds'] == [0, 1] and r['seed'] == 0 for r in rows)
  meta = json.loads((tmp_path / 'work' / 'seed_0' / 'meta.json').read_text())
  assert meta['epochs_run'] == 2
  # A second run loads the checkpoint instead of training, and reports the same numbers.
  run_module(*args, env_root=root)
  assert json.loads(output.read_text()) == rows


def test_bad_config_fails_before_any_work(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run(
    [sys.executable, '-m', 'experiments.evaluate', '--config=configs/sasrec_lastfm.py', '--config.split=train'],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode != 0
  assert "Config field 'split'" in result.stderr


def test_evaluate_dry_run_names_what_it_would_train_and_trains_nothing(tmp_path):
  root = require_files(instruments.RATINGS_FILE, instruments.META_FILE)
  out = run_module(
    'experiments.evaluate',
    '--config=configs/sasrec_instruments.py',
    '--config.train_seeds=(0,)',
    f'--config.workdir={tmp_path / "work"}',
    '--dry_run',
    env_root=root,
  )
  assert out.startswith('Resolved config:') and '"train_seeds": [' in out
  assert f'SASRec seed 0: to train ({tmp_path / "work" / "seed_0"}: no checkpoint there yet)' in out
  assert not (tmp_path / 'work').exists()
