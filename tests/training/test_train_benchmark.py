"""The RL iteration benchmark: it times the passes of the update it just ran, on that update's own arrays."""

import math

import numpy as np

from coars_jax.training import iteration_timing
from tests.training.test_rl import rl_config, trainer


def test_bench_iterations_splits_scoring_from_the_update():
  run = trainer(rl_config(iterations=3, packed_update=False))  # the per-turn rows this benchmark splits
  result = iteration_timing.bench_iterations(run, iterations=1, warmup=1, repeats=1)
  (row,) = result['iterations']
  assert row['iteration'] == 2  # one untimed warm-up iteration came first
  batch = run.last_batch
  assert batch is not None and batch['completion_tokens'].ndim == 3  # [K, R, C] microbatches
  # Only the microbatches the update ran are scored: the loss rows, rounded up to whole microbatches.
  per_micro = batch['completion_tokens'].shape[1]
  assert row['loss_rows_scored'] == row['loss_rows'] > 0
  assert row['rows'] == max(per_micro, -(-row['loss_rows'] // per_micro) * per_micro)
  # The teacher reads only d + y against the student's cache: its new context is shorter than x.
  assert 0 < row['teacher_context_length'] <= row['student_context_length']
  assert 0 < batch['teacher_suffix_mask'].sum() < batch['prompt_mask'].sum()
  for key in ('rollout_seconds', 'update_seconds', 'student_scoring_seconds', 'teacher_scoring_seconds'):
    assert row[key] > 0, key
  assert math.isclose(row['scoring_seconds'], row['student_scoring_seconds'] + row['teacher_scoring_seconds'])
  assert math.isclose(row['scoring_over_rollout'], row['scoring_seconds'] / row['rollout_seconds'])
  assert np.isclose(result['summary']['median_update_seconds'], row['update_seconds'])


def test_no_teacher_pass_without_self_distillation():
  run = trainer(rl_config(iterations=2, lambda_sd=0.0, packed_update=False))
  (row,) = iteration_timing.bench_iterations(run, iterations=1, warmup=1, repeats=1)['iterations']
  assert 'teacher_scoring_seconds' not in row and row['student_scoring_seconds'] > 0
