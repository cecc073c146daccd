"""Where an RL iteration's time goes (`experiments/bench_train.py`).

An iteration is a rollout, then the rewards and teacher prompts (host work), then one jitted update step. The
update step holds three passes over the same rows: the teacher's log-probs (no gradient), the student's forward
pass and its backward pass. To split them, the benchmark also times, on the very arrays the update consumed, a
forward-only scoring pass of the student (x) and the teacher, each jitted and compiled before timing. The teacher
is either a pass of its own over x + d (`teacher_reuses_student_cache` off), or d + y read against the student
pass's keys and values (on); then its time is the time of the joint pass minus the student's, the cost the teacher
adds. "Scoring" is the two; the issue's target is scoring <= 0.5x the rollout.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from flax import nnx

from coars_jax.sampling import score
from coars_jax.sampling.generation_speed import best_of
from coars_jax.sampling.model_inputs import inference_view
from coars_jax.sampling.scoring import shared_prefix_log_probs
from coars_jax.training.rl import RLTrainer


def _flat(batch: dict[str, np.ndarray], key: str) -> np.ndarray:
  value = np.asarray(batch[key])
  return value.reshape((-1,) + value.shape[2:])


def scoring_seconds(trainer: RLTrainer, batch: dict[str, np.ndarray], *, repeats: int = 2) -> dict[str, float]:
  """Best-of-`repeats` seconds of the student's and the teacher's forward-only scoring of `batch` (the packed
  [K, R, ...] arrays of one update), after one untimed call that compiles."""
  # The update packs its loss rows first and skips microbatches of padding only, so the passes score the rows of
  # the microbatches it actually ran: the real rows, rounded up to whole microbatches.
  per_micro = np.asarray(batch['completion_tokens']).shape[1]
  real = int(
    np.asarray(batch['completion_mask']).reshape(-1, np.asarray(batch['completion_mask']).shape[-1]).any(axis=1).sum()
  )
  keep = max(per_micro, -(-real // per_micro) * per_micro)

  def flat(key):
    return _flat(batch, key)[:keep]

  completion, completion_mask, adapter = flat('completion_tokens'), flat('completion_mask'), flat('adapter')
  passes = {'student': (flat('prompt_tokens'), flat('prompt_mask'))}
  if 'teacher_prompt_tokens' in batch:
    passes['teacher'] = (flat('teacher_prompt_tokens'), flat('teacher_prompt_mask'))
  chunk = trainer.config.score_chunk_size
  result = {}
  for name, (context, context_mask) in passes.items():

    def run():
      return jax.block_until_ready(
        score(
          trainer.model,
          context,
          context_mask,
          completion,
          completion_mask,
          adapter=adapter,
          chunk_size=chunk,
          pad_token_id=trainer.pad_id,
        )
      )

    run()  # compiles
    result[f'{name}_scoring_seconds'] = best_of(repeats, run)
    result[f'{name}_context_length'] = int(context.shape[1])
  if 'teacher_suffix_tokens' in batch:
    graphdef, state = nnx.split(inference_view(trainer.model))
    arrays = [
      jax.numpy.asarray(a)
      for a in (
        flat('prompt_tokens'),
        flat('prompt_mask'),
        completion,
        completion_mask,
        flat('teacher_suffix_tokens'),
        flat('teacher_suffix_mask'),
        flat('teacher_shared_length'),
        adapter,
      )
    ]
    joint = jax.jit(
      lambda state, *a: shared_prefix_log_probs(nnx.merge(graphdef, state), *a[:7], adapter=a[7], chunk_size=chunk)
    )

    def run_joint():
      return jax.block_until_ready(joint(state, *arrays))

    run_joint()  # compiles
    result['teacher_scoring_seconds'] = max(best_of(repeats, run_joint) - result['student_scoring_seconds'], 0.0)
    result['teacher_context_length'] = int(flat('teacher_suffix_tokens').shape[1])
  result['rows'] = int(completion.shape[0])
  result['loss_rows_scored'] = real
  result['completion_length'] = int(completion.shape[1])
  return result


def bench_iterations(trainer: RLTrainer, *, iterations: int, warmup: int = 1, repeats: int = 2) -> dict[str, Any]:
  """Runs `warmup` untimed iterations (they compile), then `iterations` timed ones; returns per-iteration rows
  and a summary of medians, with scoring / rollout as the issue's ratio."""
  for _ in range(warmup):
    trainer.iteration()
  rows = []
  for _ in range(iterations):
    metrics = trainer.iteration()
    row = {
      'iteration': metrics['iteration'],
      'rollout_seconds': metrics['time/rollout_seconds'],
      'host_rewards_and_prompts_seconds': metrics['time/scoring_seconds'],
      'update_seconds': metrics['time/update_seconds'],
      'episodes': metrics['rollout/episodes'],
      'generated_tokens': metrics['rollout/generated_tokens'],
      'loss_rows': metrics['update/loss_rows'],
    }
    if trainer.last_batch is not None:
      row.update(scoring_seconds(trainer, trainer.last_batch, repeats=repeats))
    row['scoring_seconds'] = row.get('student_scoring_seconds', 0.0) + row.get('teacher_scoring_seconds', 0.0)
    row['scoring_over_rollout'] = row['scoring_seconds'] / max(row['rollout_seconds'], 1e-9)
    rows.append(row)
  keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float)) and k != 'iteration']
  summary = {f'median_{k}': float(np.median([r.get(k, np.nan) for r in rows])) for k in keys}
  return {'iterations': rows, 'summary': summary}
