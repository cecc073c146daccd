"""The one optimizer and learning-rate schedule of the LLM trainers (the RL trainer and the SFT warm start): a
global-norm clip then AdamW, and a linear warm-up whose FIRST update already has a positive step size, then cosine
decay."""

from __future__ import annotations

import optax


def warmup_cosine_schedule(
  peak: float, *, warmup_steps: int, total_steps: int, final_fraction: float
) -> optax.Schedule:
  """The step size of update k (from 0): peak (k + 1) / (warmup_steps + 1) while k < warmup_steps, the peak at
  k = warmup_steps, then a cosine decay to `final_fraction` x peak at k = total_steps (flat after).

  Why not start at 0: optax's warm-up from init_value = 0 applies the first update with step size 0 while Adam's
  moments still advance on its gradient, so the first rollout (or batch) is spent for nothing and the moments
  run one step ahead of the parameters. With warmup_steps = 0 the first update uses the peak.

  Args:
    peak: the peak step size.
    warmup_steps: linear warm-up updates (0 = none).
    total_steps: the update at which the decay ends (the run's length); at least warmup_steps.
    final_fraction: where the cosine decay ends, as a fraction of the peak.
  """
  if warmup_steps < 0 or total_steps < warmup_steps:
    raise ValueError(
      f'warmup_cosine_schedule: need 0 <= warmup_steps <= total_steps, found {warmup_steps} and {total_steps}'
    )
  return optax.warmup_cosine_decay_schedule(
    init_value=peak / (warmup_steps + 1),
    peak_value=peak,
    warmup_steps=warmup_steps,
    decay_steps=total_steps,
    end_value=peak * final_fraction,
  )


def clipped_adamw(
  *, max_grad_norm: float, weight_decay: float, learning_rate: optax.ScalarOrSchedule | None = None
) -> optax.GradientTransformation:
  """Global-norm clip, then AdamW (Adam moments, decoupled weight decay, then the step size). With learning_rate
  None the chain stops before the step size: the caller scales the update by -learning_rate itself (the RL step
  takes the step size as an argument, so one compiled step serves every schedule)."""
  parts = [optax.clip_by_global_norm(max_grad_norm), optax.scale_by_adam(), optax.add_decayed_weights(weight_decay)]
  if learning_rate is not None:
    parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)
