"""An RL iteration's metrics line (`metrics.jsonl`, TensorBoard): the rollout's, each agent's mean reward, the
time of each phase, the packing, and what the update step returned (loss, gradient norm, the token credit's mean,
spread and mean |A| per agent, the KL), plus the names of the non-finite values of a skipped update."""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from coars_jax.agents.episodes import AGENTS
from coars_jax.agents.trajectory import Trajectory
from coars_jax.training.update_batch import PackingStats


def iteration_metrics(
  *,
  number: int,
  seed: int,
  windows: np.ndarray,
  trajectory: Trajectory,
  seconds: Mapping[str, float],
  loss_rows: int,
  learning_rate: float,
  reward: np.ndarray,
  carries_loss: np.ndarray,
  included: np.ndarray,
  interaction: bool,
  judge: np.ndarray | None,
  packing: PackingStats | None,
) -> dict[str, Any]:
  """The line of iteration `number` before its update's own values (`add_update_metrics`).

  Args:
    seconds: 'rollout', 'scoring' and 'update' wall seconds.
    reward: float[S], each segment's scalar reward; `carries_loss` bool[S] the segments the update trains on,
      `included` bool[S] those the interaction reward keeps (`interaction`: it is the configured reward).
    judge: the judge's probabilities (judge reward only), or None.
    packing: the packed batch's token counts (packed update only), or None.
  """
  generated = int(trajectory.completion_mask.sum())
  metrics: dict[str, Any] = {'iteration': number, 'seed': seed, 'windows': np.asarray(windows).tolist()}
  metrics.update({f'rollout/{k}': v for k, v in trajectory.metrics().items()})
  metrics.update(
    {
      'rollout/episodes': trajectory.num_episodes,
      'rollout/generated_tokens': generated,
      'time/rollout_seconds': seconds['rollout'],
      'time/scoring_seconds': seconds['scoring'],
      'time/update_seconds': seconds['update'],
      'time/rollout_tokens_per_second': generated / max(seconds['rollout'], 1e-9),
      'update/loss_rows': int(loss_rows),
      'update/learning_rate': learning_rate,
    }
  )
  for index, agent in enumerate(AGENTS):
    mine = carries_loss & (trajectory.agent == index)
    metrics[f'reward/{agent}'] = float(reward[mine].mean()) if mine.any() else 0.0
    metrics[f'reward/{agent}_segments'] = int(mine.sum())
  real = trajectory.completion_mask.any(axis=1)
  metrics['reward/excluded_share'] = float((~included[real]).mean()) if interaction else 0.0
  if judge is not None:
    metrics['reward/judge_probability'] = float(judge.mean())
  if packing is not None:
    metrics.update(
      {
        'update/padding': packing.padding,
        'update/packed_rows': packing.rows,
        'update/packed_microbatches': packing.microbatches,
        'update/packed_dialogues': packing.dialogues,
        'update/student_tokens': packing.student_real,
        'update/teacher_tokens': packing.teacher_real,
      }
    )
  return metrics


def add_update_metrics(
  metrics: dict, update: Mapping[str, float], batch, seconds: float, *, kl_coef: float = 0.0
) -> None:
  """Adds what the update step returned (`update`: host floats; empty when no segment carried loss)."""
  if not update:
    metrics['update/skipped'] = True
    metrics['update/reason'] = 'no segment carries loss'
    return
  tokens = max(update['tokens'], 1.0)
  mean = update['advantage_sum'] / tokens
  metrics.update(
    {
      'update/skipped': not update['finite'],
      'loss/total': update['loss'],
      'update/grad_norm': update['grad_norm'],
      'update/microbatches': int(update['microbatches']),
      'advantage/mean': mean,
      'advantage/std': math.sqrt(max(update['advantage_square_sum'] / tokens - mean * mean, 0.0))
      if math.isfinite(mean)
      else math.nan,
      'time/update_tokens_per_second': float(np.asarray(batch['completion_mask']).sum()) / max(seconds, 1e-9),
    }
  )
  for agent in AGENTS:
    metrics[f'loss/{agent}'] = update[f'loss_{agent}']
    metrics[f'advantage/abs_mean_{agent}'] = update[f'advantage_abs_{agent}'] / max(update[f'tokens_{agent}'], 1.0)
  if kl_coef > 0:
    metrics['update/kl'] = update['kl_sum'] / max(update['segments_recommender'] + update['segments_user'], 1.0)


def nonfinite_names(update: Mapping[str, float]) -> list[str]:
  """The update's non-finite values, loss and gradient norm first."""
  bad = [name for name in ('loss', 'grad_norm') if not math.isfinite(update[name])]
  return bad + [
    name for name, value in update.items() if name not in bad and name != 'finite' and not math.isfinite(value)
  ]
