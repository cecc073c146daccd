"""The update's input from a rollout's loss-carrying segments: packed dialogue rows (`update_batch`, one forward per
dialogue) or one row per turn (`turn_rows`), chosen by the step's settings. The one place the trainer's
configuration meets the two packers."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from coars_jax.agents.trajectory import Trajectory
from coars_jax.training.rl_config import RLConfig
from coars_jax.training.turn_rows import pack_turn_rows
from coars_jax.training.update_batch import pack_update_batch
from coars_jax.training.update_step import StepSettings


def pack_loss_rows(
  trajectory: Trajectory,
  rows: np.ndarray,
  weight: np.ndarray,
  teacher_ids: list[list[int]] | None,
  grammar: Mapping[str, np.ndarray] | None,
  *,
  config: RLConfig,
  settings: StepSettings,
  adapter_of_agent: np.ndarray,
  num_microbatches: int,
  data_devices: int,
  max_positions: int,
) -> tuple[dict[str, np.ndarray], Any, np.ndarray]:
  """(batch, packing statistics or None, slots) of the segments `rows` of `trajectory` with their loss weights
  `weight` (indexed by segment), teacher prompts (x + d, per row of `rows`) and grammars when constrained. `slots`
  int64[K, J] names the trajectory segment each reply slot of the batch holds (-1: padding), so per-token outputs
  of the step (the token credit) map back to their messages.

  Packed (`settings.packed`): each agent's dialogue once, several per row of `config.packed_tokens`-bounded
  microbatches; a row holds one dialogue at least and a microbatch `data_devices` rows at least, so the number of
  microbatches never needs to exceed ceil(dialogues / data_devices). Otherwise one row per turn in
  `num_microbatches` microbatches of `config.rows_per_microbatch` rows.
  """
  if not settings.packed:
    batch = pack_turn_rows(
      trajectory,
      rows,
      weight,
      teacher_ids,
      grammar if settings.constrained else None,
      buckets=config.buckets,
      num_microbatches=num_microbatches,
      rows_per_microbatch=config.rows_per_microbatch,
      adapter_of_agent=adapter_of_agent,
      pad_token_id=settings.pad_token_id,
      max_positions=max_positions,
      behaviour=bool(settings.ppo_epsilon),
      teacher_cache=settings.teacher_cache,
    )
    slots = np.full(num_microbatches * config.rows_per_microbatch, -1, np.int64)
    slots[: len(rows)] = rows  # the real rows come first, in `rows` order
    return batch, None, slots.reshape(num_microbatches, config.rows_per_microbatch)
  segments = range(trajectory.num_segments)
  prompts = [trajectory.prompt_tokens[r][trajectory.prompt_mask[r]] for r in segments]
  completions = [trajectory.completion_tokens[r][trajectory.completion_mask[r]] for r in segments]
  behaviour = None
  if settings.ppo_epsilon:
    behaviour = [trajectory.behaviour_log_probs[r][trajectory.completion_mask[r]] for r in rows]
  longest = max(len(completions[r]) for r in rows)
  dialogues = config.episodes_per_iteration * len(config.trained_agents)
  return pack_update_batch(
    prompts=prompts,
    completions=completions,
    rows=rows,
    episode=trajectory.episode,
    agent=trajectory.agent,
    turn=trajectory.turn,
    reward=weight[rows].astype(np.float32),
    adapter_of_agent=adapter_of_agent,
    num_microbatches=-(-dialogues // data_devices),
    tokens_per_microbatch=config.packed_tokens,
    completion_length=config.buckets.completion_length(longest),
    pad_token_id=settings.pad_token_id,
    row_multiple=data_devices,
    teacher_ids=teacher_ids,
    per_segment=grammar,
    behaviour_log_probs=behaviour,
    max_positions=max_positions,
  )
