"""The update batch of a rollout as one row per loss-carrying turn (`rl.packed_update=False`, the layout the packed
update of `update_batch` is checked against): each turn's prompt x_t left-padded and its reply y_t right-padded to
their length buckets, with the hindsight teacher's prompt (or, reading the student's cache, only the part of x_t + d_t
after what it shares with x_t), as [K, R, ...] microbatches. Host-side numpy only."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from coars_jax.agents.trajectory import Trajectory
from coars_jax.sampling.buckets import LengthBuckets, left_pad, right_pad
from coars_jax.training.actor import shared_prefix_length


def pack_turn_rows(
  trajectory: Trajectory,
  rows: np.ndarray,
  weight: np.ndarray,
  teacher_ids: Sequence[Sequence[int]] | None,
  grammar: Mapping[str, np.ndarray] | None,
  *,
  buckets: LengthBuckets,
  num_microbatches: int,
  rows_per_microbatch: int,
  adapter_of_agent: np.ndarray,
  pad_token_id: int,
  max_positions: int,
  behaviour: bool = False,
  teacher_cache: bool = True,
) -> dict[str, np.ndarray]:
  """The loss-carrying segments `rows` of `trajectory` as [K, R, ...] microbatches (K = `num_microbatches`, R =
  `rows_per_microbatch`); filler rows copy the first row's prompt and have an empty completion mask and
  included=False.

  Args:
    weight: float[S], each segment's scalar reward (the rows' entries are used).
    teacher_ids: per row, the teacher prompt x + d's ids (None: no teacher).
    grammar: per row, the constrained decoding's arrays (None: unconstrained).
    behaviour: also carry the behaviour log-probs (the PPO ratio's denominator).
    teacher_cache: the teacher reads x's shared prefix from the student pass (carry only the suffix of x + d).
    max_positions: the model's position limit, which a teacher prompt plus its completion must fit.
  """
  capacity = num_microbatches * rows_per_microbatch
  if len(rows) > capacity:
    raise AssertionError(f'{len(rows)} loss rows exceed the {capacity} slots of the update step')
  prompts = [trajectory.prompt_tokens[r][trajectory.prompt_mask[r]] for r in rows]
  completions = [trajectory.completion_tokens[r][trajectory.completion_mask[r]] for r in rows]
  order = list(range(len(rows))) + [0] * (capacity - len(rows))

  def padded(sequences, length, side):
    return (left_pad if side == 'left' else right_pad)([sequences[i] for i in order], length, pad_token_id)

  prompt_tokens, prompt_mask = padded(prompts, buckets.prompt_length(max(map(len, prompts))), 'left')
  completion_tokens, completion_mask = padded(
    completions, buckets.completion_length(max(map(len, completions))), 'right'
  )
  real = np.arange(capacity) < len(rows)
  completion_mask[~real] = 0
  agent = trajectory.agent[rows][order].astype(np.int32)
  batch = {
    'prompt_tokens': prompt_tokens,
    'prompt_mask': prompt_mask,
    'completion_tokens': completion_tokens,
    'completion_mask': completion_mask,
    'agent': agent,
    'adapter': adapter_of_agent[agent],
    'reward': np.where(real, weight[rows][order], 0.0).astype(np.float32),
    'included': real,
  }
  if behaviour:
    log_probs = np.zeros(completion_tokens.shape, np.float32)
    for position, row in enumerate(rows):  # the real rows come first, in `rows` order
      values = trajectory.behaviour_log_probs[row][trajectory.completion_mask[row]]
      log_probs[position, : len(values)] = values
    batch['behaviour_log_probs'] = log_probs
  if grammar is not None:
    batch.update({key: np.asarray(value)[order] for key, value in grammar.items()})
  if teacher_ids is not None:
    # Positions count real tokens only (padding is masked), so the limit applies to real lengths, not buckets.
    longest = max(len(t) + len(c) for t, c in zip(teacher_ids, completions))
    if longest > max_positions:
      raise ValueError(
        f"a teacher prompt x + d plus its completion is {longest} tokens, beyond the model's "
        f'max_position_embeddings {max_positions}; lower rollout.max_turns or the token budgets'
      )
    if teacher_cache:
      shared = [shared_prefix_length(x, t) for x, t in zip(prompts, teacher_ids)]
      suffixes = [t[n:] for t, n in zip(teacher_ids, shared)]
      length = buckets.prompt_length(max(map(len, suffixes)))
      batch['teacher_suffix_tokens'], batch['teacher_suffix_mask'] = padded(suffixes, length, 'left')
      batch['teacher_shared_length'] = np.asarray([shared[i] for i in order], np.int32)
    else:
      length = buckets.prompt_length(max(map(len, teacher_ids)))
      batch['teacher_prompt_tokens'], batch['teacher_prompt_mask'] = padded(teacher_ids, length, 'left')
  shape = (num_microbatches, rows_per_microbatch)
  return {key: value.reshape(shape + value.shape[1:]) for key, value in batch.items()}
