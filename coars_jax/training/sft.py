"""Supervised fine-tuning on agent messages: one row per message (`SFTExamples`), fixed-shape length-bucketed
batches, the token-level cross-entropy of each agent's own completion under its own adapter, and a jitted,
donating update step (`train_sft`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx

from coars_jax.agents.episodes import (
  AGENTS,
  RECOMMENDER,
)
from coars_jax.agents.protocol import ITEM_LABEL
from coars_jax.agents.trajectory import Trajectory
from coars_jax.models.decoder import Decoder
from coars_jax.models.lora import adapter_index
from coars_jax.sampling import LengthBuckets, completion_log_probs
from coars_jax.sampling.buckets import left_pad, right_pad
from coars_jax.sampling.compilation import count_trace, trace_counts
from coars_jax.training.optim import clipped_adamw, warmup_cosine_schedule
from coars_jax.training.warm_start_config import WarmStartConfig


# The name `count_trace` counts the update step under (`sampling.trace_counts()`).
STEP_TRACE_NAME = 'training.warm_start.step'


# --- SFT examples and fixed-shape batches ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class SFTExamples:
  """One row per agent message: the unpadded prompt x and completion y token ids, and the agent (0 recommender,
  1 user, as `Trajectory.agent`)."""

  prompts: tuple[np.ndarray, ...]
  completions: tuple[np.ndarray, ...]
  agent: np.ndarray
  # int[S]: where each row's Item-line title starts in its completion (-1: none, e.g. user rows); None = unknown.
  item_start: np.ndarray | None = None

  def __post_init__(self):
    if not len(self.prompts) == len(self.completions) == len(self.agent):
      raise ValueError(
        f'SFTExamples: {len(self.prompts)} prompts, {len(self.completions)} completions and '
        f'{len(self.agent)} agent ids; expected one of each per row'
      )
    if not len(self.prompts):
      raise ValueError('SFTExamples needs at least one row')
    if self.item_start is not None and len(self.item_start) != len(self.prompts):
      raise ValueError(f'SFTExamples: {len(self.item_start)} item starts for {len(self.prompts)} rows')

  def with_item_starts(self, tokenizer) -> 'SFTExamples':
    """These rows with `item_start` found by decoding each recommender completion (`item_title_start`)."""
    starts = np.asarray(
      [
        item_title_start(tokenizer, completion) if agent == AGENTS.index(RECOMMENDER) else -1
        for completion, agent in zip(self.completions, self.agent)
      ],
      np.int64,
    )
    return dataclasses.replace(self, item_start=starts)

  def __len__(self) -> int:
    return len(self.prompts)

  @classmethod
  def from_trajectory(cls, trajectory: Trajectory) -> 'SFTExamples':
    prompts = tuple(trajectory.prompt_tokens[row][trajectory.prompt_mask[row]] for row in range(len(trajectory.agent)))
    completions = tuple(
      trajectory.completion_tokens[row][trajectory.completion_mask[row]] for row in range(len(trajectory.agent))
    )
    return cls(prompts=prompts, completions=completions, agent=trajectory.agent.astype(np.int32))

  def max_completion_tokens(self, agent: str) -> int:
    """The longest completion of `agent`, end-of-turn token included (0 if it has no rows)."""
    rows = np.flatnonzero(self.agent == AGENTS.index(agent))
    return max((len(self.completions[row]) for row in rows), default=0)


def item_title_start(tokenizer, completion: np.ndarray) -> int:
  """The index of the first token after `Item:` in a recommender completion's ids (the title's first token), or
  -1 when its text has no Item line."""
  marker = f'\n{ITEM_LABEL}:'
  for end in range(1, len(completion) + 1):
    if marker in tokenizer.decode(completion[:end], skip_special_tokens=False):
      return end if end < len(completion) else -1
  return -1


def batch_shapes(examples: SFTExamples, buckets: LengthBuckets) -> np.ndarray:
  """int[S, 2]: the (prompt, completion) bucket of every row."""
  return np.asarray(
    [
      (buckets.prompt_length(len(p)), buckets.completion_length(len(c)))
      for p, c in zip(examples.prompts, examples.completions)
    ],
    np.int64,
  )


def batch_indices(examples: SFTExamples, batch_size: int, buckets: LengthBuckets, *, seed: int) -> Iterator[np.ndarray]:
  """Endless rows of `batch_size` row indices (-1 = filler), one epoch after another.

  Rows are grouped by their (prompt, completion) bucket, shuffled within groups, cut into batches, and the
  batches of an epoch are shuffled; a group's last partial batch is filled with -1. Grouping keeps each batch
  as short as its own rows (turn-1 prompts are far shorter than turn-5 ones) and the shapes to one per group.
  """
  shapes = batch_shapes(examples, buckets)
  groups = collections.defaultdict(list)
  for row, shape in enumerate(map(tuple, shapes)):
    groups[shape].append(row)
  keys = sorted(groups)
  rng = np.random.default_rng([seed, 0xBA7C])
  while True:
    batches = []
    for key in keys:
      rows = rng.permutation(groups[key])
      for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batches.append(np.concatenate([chunk, np.full(batch_size - len(chunk), -1, np.int64)]))
    for position in rng.permutation(len(batches)):
      yield batches[position]


def make_batch(
  examples: SFTExamples,
  rows: np.ndarray,
  buckets: LengthBuckets,
  adapter_of_agent: Sequence[int],
  *,
  pad_token_id: int = 0,
  item_loss_weight: float = 1.0,
) -> dict[str, np.ndarray]:
  """Host arrays of one batch: left-padded prompts and right-padded completions at their buckets, the adapter
  of each row (its agent's), the agent id, an empty completion mask on filler rows (index -1), which copy
  the first real row's tokens so every context has a real token, and each completion token's loss weight
  (`item_loss_weight` from a row's `item_start` on, 1 before; it needs `examples.item_start` unless it is 1)."""
  real = [int(row) for row in rows if row >= 0]
  if not real:
    raise ValueError('make_batch: the batch has no real rows')
  filled = [int(row) if row >= 0 else real[0] for row in rows]
  prompt_length = buckets.prompt_length(max(len(examples.prompts[row]) for row in real))
  completion_length = buckets.completion_length(max(len(examples.completions[row]) for row in real))
  prompt_tokens, prompt_mask = left_pad([examples.prompts[row] for row in filled], prompt_length, pad_token_id)
  completion_tokens, completion_mask = right_pad(
    [examples.completions[row] for row in filled], completion_length, pad_token_id
  )
  completion_mask[np.asarray(rows) < 0] = 0
  weight = np.ones(completion_mask.shape, np.float32)
  if item_loss_weight != 1.0:
    if examples.item_start is None:
      raise ValueError('make_batch: item_loss_weight != 1 needs SFTExamples.item_start (with_item_starts)')
    for position, row in enumerate(filled):
      start = int(examples.item_start[row])
      if start >= 0:
        weight[position, start:] = item_loss_weight
  agent = examples.agent[filled].astype(np.int32)
  return {
    'prompt_tokens': prompt_tokens,
    'prompt_mask': prompt_mask,
    'completion_tokens': completion_tokens,
    'completion_mask': completion_mask,
    'completion_weight': weight * completion_mask,
    'agent': agent,
    'adapter': np.asarray(adapter_of_agent, np.int32)[agent],
  }


# --- loss and update step ----------------------------------------------------------------------------------------


def sft_loss(model: Decoder, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Token-level cross-entropy of each row's own completion under its own adapter.

  A row's loss is the mean of -log pi(y_n | x, y_<n) over its masked completion tokens (the tokens its agent
  generated), weighted by `completion_weight` where the batch has it (`make_batch`); the batch loss is the mean
  over rows with any masked token. Returns (loss, metrics) where metrics hold each agent's mean row loss and row
  count.
  """
  log_probs = completion_log_probs(
    model,
    batch['prompt_tokens'],
    batch['prompt_mask'],
    batch['completion_tokens'],
    batch['completion_mask'],
    adapter=batch['adapter'],
  )
  mask = batch['completion_mask'].astype(jnp.float32)
  weight = batch.get('completion_weight', mask).astype(jnp.float32) * mask
  tokens = mask.sum(axis=1)
  row_loss = -(log_probs * weight).sum(axis=1) / jnp.maximum(weight.sum(axis=1), 1e-6)
  real = tokens > 0

  def mean_over(rows):
    count = rows.sum()
    return jnp.where(rows, row_loss, 0.0).sum() / jnp.maximum(count, 1), count

  loss, _ = mean_over(real)
  metrics = {'loss': loss}
  for index, agent in enumerate(AGENTS):
    metrics[f'loss_{agent}'], metrics[f'rows_{agent}'] = mean_over(real & (batch['agent'] == index))
  return loss, metrics


def trainable_filter(train_base: bool):
  """What the optimizer updates: the adapters (`nnx.LoRAParam`) alone, or every parameter."""
  return nnx.Param if train_base else nnx.LoRAParam


@functools.partial(jax.jit, static_argnames=('graphdef', 'train_base'), donate_argnames=('state',))
def _train_step(
  graphdef: nnx.GraphDef, state: nnx.State, batch: dict[str, jax.Array], *, train_base: bool
) -> tuple[nnx.State, dict[str, jax.Array]]:
  count_trace(STEP_TRACE_NAME)
  model, optimizer = nnx.merge(graphdef, state)
  grad_fn = nnx.value_and_grad(sft_loss, argnums=nnx.DiffState(0, trainable_filter(train_base)), has_aux=True)
  (_, metrics), grads = grad_fn(model, batch)
  metrics['grad_norm'] = optax.tree.norm(grads)
  optimizer.update(model, grads)
  return nnx.state((model, optimizer)), metrics


def learning_rate_schedule(config: WarmStartConfig) -> optax.Schedule:
  """The SFT step size per update: `optim.warmup_cosine_schedule` over `steps`."""
  return warmup_cosine_schedule(
    config.learning_rate,
    warmup_steps=config.warmup_steps,
    total_steps=config.steps,
    final_fraction=config.final_learning_rate_fraction,
  )


def make_optimizer(model: Decoder, config: WarmStartConfig) -> nnx.Optimizer:
  tx = clipped_adamw(
    max_grad_norm=config.max_grad_norm, weight_decay=config.weight_decay, learning_rate=learning_rate_schedule(config)
  )
  return nnx.Optimizer(model, tx, wrt=trainable_filter(config.train_base))


def agent_adapters(model: Decoder) -> tuple[int, ...]:
  """The adapter index of each agent in `AGENTS` order; both must exist on the model."""
  missing = [agent for agent in AGENTS if agent not in model.adapter_names]
  if missing:
    raise ValueError(
      f'the model has adapters {model.adapter_names}; the warm start needs one per agent '
      f'{list(AGENTS)} (missing {missing}); attach them with models.add_lora or prepare_model'
    )
  return tuple(adapter_index(model, agent) for agent in AGENTS)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainResult:
  """What `train_sft` reports: per-step metrics (host floats) and the number of update-step traces."""

  history: tuple[dict[str, float], ...]
  traces: int
  seconds: float


def train_sft(
  model: Decoder, examples: SFTExamples, config: WarmStartConfig, *, pad_token_id: int = 0, steps: int | None = None
) -> TrainResult:
  """Runs `config.steps` (or `steps`) updates on `model`, in place.

  The model and optimizer state are split once and donated to each jitted step, so parameters are updated in
  place on the device; the trained values are written back into `model` at the end (an exception mid-run leaves
  `model` holding donated buffers: rebuild it).
  """
  adapters = agent_adapters(model)
  optimizer = make_optimizer(model, config)
  graphdef, state = nnx.split((model, optimizer))
  order = batch_indices(examples, config.batch_size, config.buckets, seed=config.seed)
  total = config.steps if steps is None else steps
  history, traces_before = [], _step_traces()
  start = time.perf_counter()
  bar = tqdm.tqdm(range(total), desc='warm start', disable=not config.progress, dynamic_ncols=True)
  for _ in bar:
    batch = make_batch(
      examples,
      next(order),
      config.buckets,
      adapters,
      pad_token_id=pad_token_id,
      item_loss_weight=config.item_loss_weight,
    )
    state, metrics = _train_step(
      graphdef, state, {k: jnp.asarray(v) for k, v in batch.items()}, train_base=config.train_base
    )
    history.append({name: float(value) for name, value in jax.device_get(metrics).items()})
    bar.set_postfix(
      loss=f'{history[-1]["loss"]:.3f}',
      rec=f'{history[-1]["loss_recommender"]:.3f}',
      user=f'{history[-1]["loss_user"]:.3f}',
    )
  trained_model, _ = nnx.merge(graphdef, state)
  nnx.update(model, nnx.state(trained_model))
  return TrainResult(history=tuple(history), traces=_step_traces() - traces_before, seconds=time.perf_counter() - start)


def _step_traces() -> int:
  return trace_counts().get(STEP_TRACE_NAME, 0)
