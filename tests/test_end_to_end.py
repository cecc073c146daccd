"""The whole agentic path on real data, CPU-sized: SASRec, then the tiny preset's warm start, then rollouts and
the evaluation table from the saved checkpoint, each as a user runs it (`python -m experiments...`)."""

import json
import os
import subprocess
import sys

from coars_jax.data import instruments
from coars_jax.eval.agentic import ROW_KEYS
from tests.conftest import REPO, require_files, run_module


def test_warm_start_then_rollout_then_evaluation(tmp_path):
  root = require_files(instruments.RATINGS_FILE, instruments.META_FILE)
  sasrec = tmp_path / 'sasrec'
  run_module(
    'experiments.evaluate',
    '--config=configs/sasrec_instruments.py',
    '--config.train_seeds=(0,)',
    '--config.candidate_seeds=(0,)',
    '--config.train.max_epochs=1',
    '--config.progress=False',
    f'--config.workdir={sasrec}',
    env_root=root,
  )

  warm = tmp_path / 'warm_start'
  out = run_module(
    'experiments.warm_start',
    '--config=configs/warm_start_tiny.py:instruments',
    f'--config.workdir={warm}',
    f'--config.sasrec_workdir={sasrec}',
    '--config.sasrec_max_epochs=1',
    '--config.sasrec_folds=2',
    '--config.warm_start.steps=3',
    '--config.warm_start.warmup_steps=1',
    '--config.warm_start.num_dialogues=4',
    '--config.warm_start.max_turns=2',
    '--config.eval.num_windows=0',
    '--config.warm_start.progress=False',
    env_root=root,
  )
  summary = json.loads(out[out.index('{') :])
  assert summary['steps'] == 3 and summary['dialogues'] == 4
  assert (warm / 'warm_start.json').is_file()

  rows_file, episodes_file = tmp_path / 'rows.json', tmp_path / 'episodes.jsonl'
  out = run_module(
    'experiments.evaluate',
    '--config=configs/eval_tiny.py:instruments',
    f'--checkpoint={warm}',
    f'--config.sasrec_workdir={sasrec}',
    '--config.sasrec_max_epochs=1',
    '--config.num_windows=3',
    '--config.rollout.max_turns=2',
    '--config.recommender_max_new_tokens=16',
    '--config.user_max_new_tokens=16',
    '--config.user_f1.num_users=2',
    '--config.progress=False',
    f'--config.trajectories={episodes_file}',
    f'--output={rows_file}',
    env_root=root,
  )
  assert '| instruments | warm_start | tiny |' in out
  rows = json.loads(rows_file.read_text())
  assert len(rows) == 1
  row = rows[0]
  assert list(row)[: len(ROW_KEYS)] == list(ROW_KEYS)
  assert row['num_windows'] == 3 and row['split'] == 'test' and row['checkpoint'] == str(warm)
  assert 0.0 <= row['hit@1'] <= 1.0 and 0.0 <= row['valid_ratio'] <= 1.0
  assert 1.0 <= row['avg_turns'] <= 2.0
  assert row['user_f1_users'] == 2 and 0.0 <= row['user_f1'] <= 1.0
  episodes = [json.loads(line) for line in episodes_file.read_text().splitlines()]
  assert len(episodes) == 3
  assert sum(len(e['turns']) for e in episodes) == round(row['avg_turns'] * 3)


def test_agentic_config_errors_name_the_field(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  for flag, field in (
    ('--config.split=train', "'split'"),
    ('--config.num_windos=3', "did you mean 'num_windows'"),
    ('--config.model=nowhere', "'model'"),
    (f'--checkpoint={tmp_path / "absent"}', "'checkpoint'"),
  ):
    result = subprocess.run(
      [sys.executable, '-m', 'experiments.evaluate', '--config=configs/eval_smollm2.py:lastfm', flag],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert result.returncode == 2 and 'Traceback' not in result.stderr  # one line, exit status 2 (experiments.cli)
    assert field in result.stderr, result.stderr[-2000:]
