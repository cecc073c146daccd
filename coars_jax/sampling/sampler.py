"""Batched autoregressive generation with a KV cache: a jitted prefill of the left-padded, length-bucketed
prompts, then one jitted decode program that donates the cache and runs a `lax.while_loop` of one-token
steps until every row has emitted an end-of-sequence token or max_new_tokens are out, returning the new
tokens, their mask and lengths, and float32 log-probs of the sampled tokens under the sampling distribution.
An optional `constraints.ChoiceConstraint` restricts each row's tokens to an output grammar; its state rides in
the loop's carry, and tokens and log-probs then come from the masked, renormalised distribution."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh

from coars_jax.models.decoder import Decoder
from coars_jax.models.kv_cache import KVCache, init_cache
from coars_jax.models.logical_axes import BATCH, VOCAB
from coars_jax.parallel.rules import Rules
from coars_jax.parallel.sharding import Partitioning, activation_scope, sharded_jit
from coars_jax.sampling import buckets as buckets_lib
from coars_jax.sampling.buckets import LengthBuckets
from coars_jax.sampling.compilation import record_trace
from coars_jax.sampling.constraints import ChoiceConstraint, advance, initial_state, mask_logits
from coars_jax.sampling.distributions import SamplingParams, sample
from coars_jax.sampling.model_inputs import (
  StaticKwargs,
  inference_view,
  model_kwargs,
  positions_from_mask,
  split_model_kwargs,
)

# Position of the cache among `_decode`'s arguments: donated, so each generation reuses the prefill's
# buffers in place instead of holding a second cache-sized copy. The sharded decode takes the five static
# arguments first (positionally: a jit given in_shardings takes no keyword arguments), then the same ones.
_DECODE_CACHE_ARGNUM = 2
_PROGRAM_STATIC = (0, 1, 2, 3, 4)
_SHARDED_DECODE_CACHE_ARGNUM = len(_PROGRAM_STATIC) + 1


@struct.dataclass
class GenerationOutput:
  """What `generate` returns, every array padded to the buckets it ran in.

  tokens: [B, N] int32 new tokens, N = the completion bucket; a row's end-of-sequence token is included
    (it is the action that ends the turn), and slots after a row finished hold pad_token_id.
  log_probs: [B, N] float32 log pi(token) under the distribution sampled from (see `SamplingParams`);
    0 where mask is False.
  mask: [B, N] bool, True for the tokens this row generated.
  lengths: [B] int32, mask.sum(-1).
  finished: [B] bool, whether the row stopped on an end-of-sequence token (False: it ran out of tokens).
  num_steps: int32 scalar, token positions actually sampled (<= max_new_tokens; smaller when every row
    finished early); the decoder ran num_steps - 1 one-token decode steps after the prefill.
  prompt_tokens, prompt_mask: [B, P] int32, the left-padded prompts as run (P = the prompt bucket), ready
    to be scoring contexts.
  """

  tokens: jax.Array
  log_probs: jax.Array
  mask: jax.Array
  lengths: jax.Array
  finished: jax.Array
  num_steps: jax.Array
  prompt_tokens: np.ndarray
  prompt_mask: np.ndarray
  cache: KVCache | None = None


@dataclasses.dataclass(frozen=True)
class PromptPrefix:
  """Keys and values an earlier `generate` call already computed, for prompts that start with earlier prompts.

  cache: that call's `GenerationOutput.cache`.
  rows: int [B], the cache row each new prompt's prefix comes from.
  sources: B int arrays, the cache slots holding the first len(sources[b]) tokens of new prompt b, in order (the
    source row's `prompt_slots(GenerationOutput.prompt_mask)`, cut to the shared length); empty = no reuse.
  """

  cache: KVCache
  rows: np.ndarray
  sources: Sequence[np.ndarray]

  @property
  def lengths(self) -> np.ndarray:
    return np.asarray([len(slots) for slots in self.sources], np.int32)


# Widths of the block a prefix-reusing prefill recomputes at the end of the prompt (the new tokens, and any
# prefix tokens that fall inside the block); each compiles one program per prompt bucket.
PREFILL_BLOCKS = (64, 128, 256, 512, 1024)


def common_prefix_length(first: Sequence[int], second: Sequence[int]) -> int:
  """How many leading tokens two token sequences share."""
  shared = 0
  for a, b in zip(first, second):
    if a != b:
      break
    shared += 1
  return shared


def prompt_slots(mask: np.ndarray) -> list[np.ndarray]:
  """The slots of each row's real tokens in a [B, S] slot mask, in order."""
  return [np.flatnonzero(row).astype(np.int32) for row in np.asarray(mask)]


def generate(
  model: Decoder,
  prompts: Sequence[Sequence[int]] | np.ndarray | jax.Array,
  *,
  prompt_mask: np.ndarray | jax.Array | None = None,
  max_new_tokens: int,
  params: SamplingParams = SamplingParams(),
  buckets: LengthBuckets = LengthBuckets(),
  eos_token_ids: Sequence[int] | None = None,
  pad_token_id: int | None = None,
  seed: int | jax.Array = 0,
  cache_dtype: str | None = None,
  constraint: ChoiceConstraint | None = None,
  mesh: Mesh | None = None,
  rules: Rules | None = None,
  prefix: PromptPrefix | None = None,
  **model_call_kwargs: Any,
) -> GenerationOutput:
  """Samples up to `max_new_tokens` tokens after each prompt.

  prompts: ragged token lists, or a left-padded [B, L] array with `prompt_mask` [B, L] (1 = real token,
    default all real). Prompts are left-padded up to the smallest prompt bucket that holds them.
  max_new_tokens: stop after this many tokens; the decode buffer is the smallest completion bucket that
    holds it, and the count itself is a traced value, so changing it within a bucket compiles nothing.
  eos_token_ids: a row finishes once it samples one of these (default model.config.eos_token_ids; () runs
    every row to max_new_tokens).
  pad_token_id: fills padding slots (default model.config.pad_token_id, else 0).
  seed: an int or a jax PRNG key; the same seed and inputs give the same tokens.
  cache_dtype: KV cache dtype (default the model's compute dtype).
  constraint: restricts row b's message to its grammar (`constraints.ChoiceConstraint`, one row per prompt,
    vocabulary = the model's); the end token must be among eos_token_ids, and every message must fit in
    max_new_tokens. Sampling then draws from the masked, renormalised distribution (top-k / top-p over the
    allowed tokens), and log_probs are under it; `score(..., constraint=)` recomputes them. None (default)
    runs exactly the unconstrained programs.
  mesh, rules: run sharded on `mesh` (`parallel.Partitioning`: rules default to `parallel.DEFAULT_RULES`): the
    model state, the prompts, the KV cache and the outputs get explicit shardings, and the decoder's activation
    constraints follow the rules. The model's arrays are moved there first if they live elsewhere
    (`parallel.shard_model` places them once). None (default) runs the unsharded programs. On a mesh that spans
    processes every process makes the same call with the same prompts, and the outputs are global arrays
    (`parallel.distributed.fetch` brings them to each host).
  model_call_kwargs: passed to every decoder call, e.g. an adapter selector; arrays are traced, other
    values are static (each distinct value compiles its own programs).
  prefix: a `PromptPrefix`: the first `prefix.lengths[b]` tokens of ragged prompt b are read from an earlier
    call's cache instead of being prefilled again (they must be exactly that call's tokens at those slots, under
    the same parameters and adapter). The prompts keep their usual left-padded layout; only a block at the end
    (the smallest of `PREFILL_BLOCKS` that holds every row's new tokens) is prefilled, and the decode program is
    the same as without a prefix. Greedy outputs equal a full prefill's to float rounding.
  The output's `cache` (the final KV cache) and `prompt_mask` (which of its first slots hold each row's prompt)
  serve the next call's prefix.
  """
  config = model.config
  if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
    raise ValueError(f'generate: max_new_tokens must be a positive int, found {max_new_tokens!r}')
  eos = tuple(config.eos_token_ids if eos_token_ids is None else eos_token_ids)
  pad = _pad_token(config, pad_token_id)
  tokens, mask = prepare_prompts(prompts, prompt_mask, buckets, pad)
  block = None if prefix is None else _prefill_block(prefix, tokens.shape[0], mask)
  completion_length = buckets.completion_length(max_new_tokens)
  longest = int(mask.sum(axis=1).max()) + max_new_tokens
  if longest > config.max_position_embeddings:
    raise ValueError(
      f"generate: prompt + max_new_tokens reaches position {longest}, beyond the model's "
      f'max_position_embeddings {config.max_position_embeddings}'
    )
  key = jax.random.key(int(seed)) if isinstance(seed, (int, np.integer)) else seed
  if constraint is not None:
    _check_constraint(constraint, tokens.shape[0], config.vocab_size, eos, max_new_tokens)

  static_kwargs, array_kwargs = split_model_kwargs(model_call_kwargs, 'generate')
  graphdef, state = nnx.split(inference_view(model))
  cache_length = tokens.shape[1] + completion_length
  cache_dtype = cache_dtype or config.compute_dtype
  prompt_lengths = jnp.asarray(mask.sum(axis=1), jnp.int32)
  decode_args = (
    prompt_lengths,
    jnp.asarray(max_new_tokens, jnp.int32),
    key,
    jnp.asarray(eos, jnp.int32),
    jnp.asarray(pad, jnp.int32),
    array_kwargs,
  )
  if block is not None:
    width, table, table_mask = block
    start = tokens.shape[1] - width
    reuse = (
      prefix.cache,
      jnp.asarray(prefix.rows, jnp.int32),
      jnp.asarray(table),
      jnp.asarray(table_mask),
      jnp.asarray(tokens[:, start:]),
      jnp.asarray(mask[:, start:]),
      jnp.asarray(mask.sum(axis=1) - mask[:, start:].sum(axis=1), jnp.int32),
      array_kwargs,
    )
  if mesh is None:
    decode_kwargs = {} if constraint is None else {'constraint': constraint}
    if block is None:
      logits, cache = _prefill(
        graphdef,
        state,
        jnp.asarray(tokens),
        jnp.asarray(mask),
        array_kwargs,
        static_kwargs=static_kwargs,
        cache_length=cache_length,
        cache_dtype=cache_dtype,
      )
    else:
      logits, cache = _prefill_after_prefix(
        graphdef, state, *reuse, static_kwargs=static_kwargs, cache_length=cache_length, cache_dtype=cache_dtype
      )
    outputs, cache = _decode(
      graphdef,
      state,
      cache,
      logits,
      *decode_args,
      static_kwargs=static_kwargs,
      params=params,
      completion_length=completion_length,
      **decode_kwargs,
    )
  else:
    partitioning = Partitioning.create(mesh, rules)
    state_shardings = partitioning.state(state)
    state = partitioning.put(state, state_shardings)
    prefill, decode = _sharded_programs(
      partitioning, state_shardings, array_kwargs, config, tokens.shape[0], cache_length, cache_dtype, completion_length
    )
    if block is None:
      logits, cache = prefill(
        graphdef,
        static_kwargs,
        cache_length,
        cache_dtype,
        partitioning,
        state,
        jnp.asarray(tokens),
        jnp.asarray(mask),
        array_kwargs,
      )
    else:
      batch = tokens.shape[0]
      rows, prompts_sharding = partitioning.batch((batch,)), partitioning.batch((batch, 1))
      logits_sharding = partitioning.sharding((BATCH, VOCAB), (batch, config.vocab_size))
      cache_sharding = partitioning.cache(jax.eval_shape(lambda: init_cache(config, batch, cache_length, cache_dtype)))
      after_prefix = sharded_jit(
        _prefill_after_prefix_program,
        (
          state_shardings,
          partitioning.cache(prefix.cache),
          rows,
          prompts_sharding,
          prompts_sharding,
          prompts_sharding,
          prompts_sharding,
          rows,
          partitioning.rows(array_kwargs, batch),
        ),
        (logits_sharding, cache_sharding),
        static_argnums=_PROGRAM_STATIC,
      )
      logits, cache = after_prefix(graphdef, static_kwargs, cache_length, cache_dtype, partitioning, state, *reuse)
    outputs, cache = decode(
      graphdef, static_kwargs, params, completion_length, partitioning, state, cache, logits, *decode_args, constraint
    )
  return GenerationOutput(**outputs, prompt_tokens=tokens, prompt_mask=mask, cache=cache)


def _prefill_block(prefix: PromptPrefix, batch: int, mask: np.ndarray):
  """(block width, source-slot table [B, P - width], its mask) of a prefix-reusing prefill of the left-padded
  prompts `mask` [B, P], or None when no block shorter than P holds every row's new tokens. Slots before the block
  are read from the prefix cache; the block is recomputed whole (new tokens, and prefix tokens inside it)."""
  lengths = prefix.lengths
  if len(lengths) != batch or np.asarray(prefix.rows).shape != (batch,):
    raise ValueError(f'generate: the prefix has {len(lengths)} rows for {batch} prompts')
  real = mask.sum(axis=1)
  if np.any(lengths >= real):
    raise ValueError('generate: every prefix must leave at least one token of its prompt to prefill')
  width_total = mask.shape[1]
  needed = int((real - lengths).max())
  width = next((w for w in PREFILL_BLOCKS if w >= needed), None)
  if width is None or width >= width_total or not lengths.any():
    return None
  before = width_total - width
  table = np.zeros((batch, before), np.int32)
  table_mask = np.zeros((batch, before), np.int32)
  for row in range(batch):
    first = width_total - int(real[row])  # the row's first real slot
    count = max(before - first, 0)  # its tokens before the block, all inside its prefix
    table[row, first:before] = prefix.sources[row][:count]
    table_mask[row, first:before] = 1
  return width, table, table_mask


def _prefill_after_prefix_program(
  graphdef: nnx.GraphDef,
  static_kwargs: StaticKwargs,
  cache_length: int,
  cache_dtype: str,
  partitioning: Partitioning | None,
  state: nnx.State,
  source: KVCache,
  rows: jax.Array,
  table: jax.Array,
  table_mask: jax.Array,
  tokens: jax.Array,
  mask: jax.Array,
  offsets: jax.Array,
  array_kwargs: dict[str, Any],
) -> tuple[jax.Array, KVCache]:
  """Copies each row's keys and values of the slots before the block [B, P - W] from `source` (cache row
  `rows[b]`, slots `table[b]`), then prefills the block tokens [B, W] after them: (float32 logits [B, V] after the
  last prompt token, cache). `offsets[b]` counts row b's real tokens before the block (its first block position)."""
  record_trace('sampler.prefill_after_prefix')
  model = nnx.merge(graphdef, state)
  with activation_scope(partitioning, model.config, tokens.shape[0]):
    cache = init_cache(model.config, tokens.shape[0], cache_length, cache_dtype)
    before = table.shape[1]

    def gathered(new, old):
      picked = old[rows[:, None], table].astype(new.dtype)  # [B, P - W, kv_heads, head_dim]
      return jax.lax.dynamic_update_slice(new, picked, (0, 0, 0, 0))

    cache = KVCache(
      keys=tuple(gathered(n, o) for n, o in zip(cache.keys, source.keys)),
      values=tuple(gathered(n, o) for n, o in zip(cache.values, source.values)),
      segment_ids=jax.lax.dynamic_update_slice(cache.segment_ids, table_mask.astype(jnp.int32), (0, 0)),
      end_index=jnp.asarray(before, jnp.int32),
    )
    positions = offsets[:, None] + jnp.cumsum(mask != 0, axis=1, dtype=jnp.int32) - 1
    hidden, cache = model.hidden_states(tokens, positions, mask, cache, **model_kwargs(static_kwargs, array_kwargs))
    return model.logits(hidden[:, -1]).astype(jnp.float32), cache


@functools.partial(jax.jit, static_argnames=('graphdef', 'static_kwargs', 'cache_length', 'cache_dtype'))
def _prefill_after_prefix(
  graphdef: nnx.GraphDef,
  state: nnx.State,
  source: KVCache,
  rows: jax.Array,
  table: jax.Array,
  table_mask: jax.Array,
  tokens: jax.Array,
  mask: jax.Array,
  offsets: jax.Array,
  array_kwargs: dict[str, Any],
  *,
  static_kwargs: StaticKwargs,
  cache_length: int,
  cache_dtype: str,
) -> tuple[jax.Array, KVCache]:
  """The unsharded prefill after a prefix."""
  return _prefill_after_prefix_program(
    graphdef,
    static_kwargs,
    cache_length,
    cache_dtype,
    None,
    state,
    source,
    rows,
    table,
    table_mask,
    tokens,
    mask,
    offsets,
    array_kwargs,
  )


def prepare_prompts(
  prompts: Sequence[Sequence[int]] | np.ndarray | jax.Array,
  prompt_mask: np.ndarray | jax.Array | None,
  buckets: LengthBuckets,
  pad_token_id: int,
) -> tuple[np.ndarray, np.ndarray]:
  """Prompts as (tokens, mask) [B, P] int32, left-padded to the prompt bucket P; checks the padding side."""
  if isinstance(prompts, (np.ndarray, jax.Array)):
    tokens = np.asarray(prompts, np.int32)
    if tokens.ndim != 2:
      raise ValueError(f'generate: a prompt array must be [batch, length], found shape {tokens.shape}')
    mask = np.ones_like(tokens) if prompt_mask is None else np.asarray(prompt_mask, np.int32)
    if mask.shape != tokens.shape:
      raise ValueError(f'generate: prompt_mask shape {mask.shape} differs from prompts {tokens.shape}')
    buckets_lib.check_left_padded(mask, 'generate: prompt_mask')
    # Content of padding slots is irrelevant to the model; normalise it so equal prompts are equal arrays,
    # and drop all-padding columns so the bucket is chosen by the longest real prompt.
    longest = int(mask.sum(axis=1).max())
    tokens = np.where(mask != 0, tokens, pad_token_id).astype(np.int32)[:, tokens.shape[1] - longest :]
    mask = mask[:, mask.shape[1] - longest :]
    return buckets_lib.repad_left(tokens, mask, buckets.prompt_length(longest), pad_token_id)
  if prompt_mask is not None:
    raise ValueError('generate: prompt_mask goes with a padded prompt array, not with ragged token lists')
  if not len(prompts):
    raise ValueError('generate: no prompts given')
  lengths = [len(prompt) for prompt in prompts]
  if min(lengths) == 0:
    raise ValueError(f'generate: prompt {lengths.index(0)} is empty; every prompt needs at least one token')
  return buckets_lib.left_pad(prompts, buckets.prompt_length(max(lengths)), pad_token_id)


def _prefill_program(
  graphdef: nnx.GraphDef,
  static_kwargs: StaticKwargs,
  cache_length: int,
  cache_dtype: str,
  partitioning: Partitioning | None,
  state: nnx.State,
  tokens: jax.Array,
  mask: jax.Array,
  array_kwargs: dict[str, Any],
) -> tuple[jax.Array, KVCache]:
  """Runs the prompts [B, P] through a fresh cache: (float32 logits [B, V] after the last prompt token, cache)."""
  record_trace('sampler.prefill')
  model = nnx.merge(graphdef, state)
  with activation_scope(partitioning, model.config, tokens.shape[0]):
    cache = init_cache(model.config, tokens.shape[0], cache_length, cache_dtype)
    hidden, cache = model.hidden_states(
      tokens, positions_from_mask(mask), mask, cache, **model_kwargs(static_kwargs, array_kwargs)
    )
    # Left padding puts every row's last prompt token in the last slot, so only that slot is projected onto
    # the vocabulary: the other P - 1 projections would be discarded.
    return model.logits(hidden[:, -1]).astype(jnp.float32), cache


def _decode_program(
  graphdef: nnx.GraphDef,
  static_kwargs: StaticKwargs,
  params: SamplingParams,
  completion_length: int,
  partitioning: Partitioning | None,
  state: nnx.State,
  cache: KVCache,
  logits: jax.Array,
  prompt_lengths: jax.Array,
  max_new_tokens: jax.Array,
  key: jax.Array,
  eos_token_ids: jax.Array,
  pad_token_id: jax.Array,
  array_kwargs: dict[str, Any],
  constraint: ChoiceConstraint | None,
) -> tuple[dict[str, jax.Array], KVCache]:
  """Samples token 0 from the prefill logits, then decodes one token per loop iteration while any row is
  unfinished and fewer than max_new_tokens were sampled. With a constraint, each step masks the logits by the
  rows' grammar states and advances them by the sampled tokens; without one (None, an empty pytree) the
  program is the unconstrained one.

  A `while_loop` rather than a Python loop of jitted steps: the stop test runs on the device, so there is
  no host round trip per token, and the whole decode is one program per (batch, bucket) shape.
  """
  record_trace('sampler.decode')
  model = nnx.merge(graphdef, state)
  with activation_scope(partitioning, model.config, logits.shape[0]):
    return _decode_loop(
      model,
      cache,
      logits,
      prompt_lengths,
      max_new_tokens,
      key,
      eos_token_ids,
      pad_token_id,
      array_kwargs,
      static_kwargs,
      params,
      completion_length,
      constraint,
    )


@functools.partial(jax.jit, static_argnames=('graphdef', 'static_kwargs', 'cache_length', 'cache_dtype'))
def _prefill(
  graphdef: nnx.GraphDef,
  state: nnx.State,
  tokens: jax.Array,
  mask: jax.Array,
  array_kwargs: dict[str, Any],
  *,
  static_kwargs: StaticKwargs,
  cache_length: int,
  cache_dtype: str,
) -> tuple[jax.Array, KVCache]:
  """The unsharded prefill program."""
  return _prefill_program(graphdef, static_kwargs, cache_length, cache_dtype, None, state, tokens, mask, array_kwargs)


@functools.partial(
  jax.jit,
  static_argnames=('graphdef', 'static_kwargs', 'params', 'completion_length'),
  donate_argnums=(_DECODE_CACHE_ARGNUM,),
)
def _decode(
  graphdef: nnx.GraphDef,
  state: nnx.State,
  cache: KVCache,
  logits: jax.Array,
  prompt_lengths: jax.Array,
  max_new_tokens: jax.Array,
  key: jax.Array,
  eos_token_ids: jax.Array,
  pad_token_id: jax.Array,
  array_kwargs: dict[str, Any],
  *,
  static_kwargs: StaticKwargs,
  params: SamplingParams,
  completion_length: int,
  constraint: ChoiceConstraint | None = None,
) -> tuple[dict[str, jax.Array], KVCache]:
  """The unsharded decode program (the constraint left out when None, so that call is the unconstrained one)."""
  return _decode_program(
    graphdef,
    static_kwargs,
    params,
    completion_length,
    None,
    state,
    cache,
    logits,
    prompt_lengths,
    max_new_tokens,
    key,
    eos_token_ids,
    pad_token_id,
    array_kwargs,
    constraint,
  )


def _sharded_programs(
  partitioning: Partitioning,
  state_shardings: nnx.State,
  array_kwargs: dict[str, Any],
  config,
  batch: int,
  cache_length: int,
  cache_dtype: str,
  completion_length: int,
):
  """The prefill and decode programs jitted with explicit shardings: the state by the rules, prompts, per-row
  model arguments, logits and outputs by rows, the cache by its logical names (the same going in and out of
  the decode, so the donated buffers are reused)."""
  whole = partitioning.replicated()
  rows = partitioning.batch((batch,))
  logits = partitioning.sharding((BATCH, VOCAB), (batch, config.vocab_size))
  cache = partitioning.cache(jax.eval_shape(lambda: init_cache(config, batch, cache_length, cache_dtype)))
  row_kwargs = partitioning.rows(array_kwargs, batch)
  prompts = partitioning.batch((batch, 1))
  prefill = sharded_jit(
    _prefill_program, (state_shardings, prompts, prompts, row_kwargs), (logits, cache), static_argnums=_PROGRAM_STATIC
  )
  per_token = partitioning.batch((batch, completion_length))
  outputs = dict(tokens=per_token, log_probs=per_token, mask=per_token, lengths=rows, finished=rows, num_steps=whole)
  decode = sharded_jit(
    _decode_program,
    (state_shardings, cache, logits, rows, whole, whole, whole, whole, row_kwargs, whole),
    (outputs, cache),
    static_argnums=_PROGRAM_STATIC,
    donate_argnums=(_SHARDED_DECODE_CACHE_ARGNUM,),
  )
  return prefill, decode


def _decode_loop(
  model: Decoder,
  cache: KVCache,
  logits: jax.Array,
  prompt_lengths: jax.Array,
  max_new_tokens: jax.Array,
  key: jax.Array,
  eos_token_ids: jax.Array,
  pad_token_id: jax.Array,
  array_kwargs: dict[str, Any],
  static_kwargs: StaticKwargs,
  params: SamplingParams,
  completion_length: int,
  constraint: ChoiceConstraint | None,
) -> tuple[dict[str, jax.Array], KVCache]:
  call_kwargs = model_kwargs(static_kwargs, array_kwargs)
  batch = logits.shape[0]

  def is_eos(tokens):
    return (tokens[:, None] == eos_token_ids[None, :]).any(axis=-1)

  def record(step, tokens, log_probs, done, lengths, new_tokens, new_log_probs):
    active = ~done  # rows that finished earlier keep padding from here on
    new_tokens = jnp.where(active, new_tokens, pad_token_id)
    new_log_probs = jnp.where(active, new_log_probs, 0.0)
    tokens = jax.lax.dynamic_update_slice(tokens, new_tokens[:, None], (0, step))
    log_probs = jax.lax.dynamic_update_slice(log_probs, new_log_probs[:, None], (0, step))
    return tokens, log_probs, done | (active & is_eos(new_tokens)), lengths + active.astype(jnp.int32)

  def draw(step, logits, grammar):
    """(tokens, log-probs, next grammar state) for one step; grammar is None when unconstrained."""
    if constraint is None:
      return *sample(jax.random.fold_in(key, step), logits, params), grammar
    new_tokens, new_log_probs = sample(jax.random.fold_in(key, step), mask_logits(constraint, grammar, logits), params)
    return new_tokens, new_log_probs, advance(constraint, grammar, new_tokens)

  grammar = None if constraint is None else initial_state(constraint)
  first_tokens, first_log_probs, grammar = draw(0, logits, grammar)
  tokens, log_probs, done, lengths = record(
    0,
    jnp.full((batch, completion_length), pad_token_id, jnp.int32),
    jnp.zeros((batch, completion_length), jnp.float32),
    jnp.zeros((batch,), bool),
    jnp.zeros((batch,), jnp.int32),
    first_tokens,
    first_log_probs,
  )

  def keep_going(carry):
    step, _, _, _, done, _, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def decode_step(carry):
    step, cache, tokens, log_probs, done, lengths, grammar = carry
    previous = jax.lax.dynamic_slice_in_dim(tokens, step - 1, 1, axis=1)
    # Token j of the completion sits at RoPE position prompt_length + j in every row.
    positions = (prompt_lengths + step - 1)[:, None]
    hidden, cache = model.hidden_states(previous, positions, jnp.ones_like(previous), cache, **call_kwargs)
    new_tokens, new_log_probs, grammar = draw(step, model.logits(hidden[:, 0]), grammar)
    tokens, log_probs, done, lengths = record(step, tokens, log_probs, done, lengths, new_tokens, new_log_probs)
    return step + 1, cache, tokens, log_probs, done, lengths, grammar

  # Unconstrained, grammar is None: an empty pytree, so the loop carries exactly what it did before.
  num_steps, cache, tokens, log_probs, done, lengths, _ = jax.lax.while_loop(
    keep_going, decode_step, (jnp.asarray(1, jnp.int32), cache, tokens, log_probs, done, lengths, grammar)
  )
  mask = jnp.arange(completion_length)[None, :] < lengths[:, None]
  # The final cache is returned so the donated input buffers alias it and the loop updates them in place.
  return dict(tokens=tokens, log_probs=log_probs, mask=mask, lengths=lengths, finished=done, num_steps=num_steps), cache


def _check_constraint(
  constraint: ChoiceConstraint, batch: int, vocab_size: int, eos: tuple[int, ...], max_new_tokens: int
) -> None:
  if not isinstance(constraint, ChoiceConstraint):
    raise TypeError(f'generate: constraint must be a ChoiceConstraint, found {type(constraint).__name__}')
  if constraint.batch_size != batch:
    raise ValueError(f'generate: the constraint has {constraint.batch_size} rows for {batch} prompts')
  if constraint.vocab_size != vocab_size:
    raise ValueError(
      f"generate: the constraint covers {constraint.vocab_size} token ids but the model's vocab_size is {vocab_size}"
    )
  end = int(constraint.end_token_id)
  if end not in eos:
    raise ValueError(
      f'generate: the constraint ends messages with token {end}, which is not among the eos tokens '
      f'{eos}; rows would never stop'
    )
  if constraint.max_length() > max_new_tokens:
    raise ValueError(
      f'generate: the constraint allows messages of {constraint.max_length()} tokens, more than '
      f'max_new_tokens={max_new_tokens}; messages cut short would not follow the grammar'
    )


def _pad_token(config, pad_token_id: int | None) -> int:
  if pad_token_id is not None:
    if not 0 <= pad_token_id < config.vocab_size:
      raise ValueError(f'generate: pad_token_id {pad_token_id} is outside [0, {config.vocab_size})')
    return pad_token_id
  return config.pad_token_id if config.pad_token_id is not None else 0
