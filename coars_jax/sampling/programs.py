"""The jitted programs behind `sampler.generate`: this module owns the prefill of left-padded prompts into a
fresh KV cache (`_prefill_program`) and the decode program that donates the cache and runs the `lax.while_loop`
of one-token steps (`_decode_program`, `_decode_loop`: sampling, end-of-sequence bookkeeping and the optional
grammar state in the carry), their unsharded jits (`_prefill`, `_decode`), their jits with explicit shardings
on a mesh (`_sharded_programs`), and the argument layout those share (`_PROGRAM_STATIC` and the donated cache
positions). Host-side batching and checks stay in `sampler`, prefix reuse in `prefix_reuse`."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from coars_jax.models.decoder import Decoder
from coars_jax.models.kv_cache import KVCache, init_cache
from coars_jax.models.logical_axes import BATCH, VOCAB
from coars_jax.parallel.sharding import Partitioning, activation_scope, sharded_jit
from coars_jax.sampling.compilation import count_trace
from coars_jax.sampling.constraints import ChoiceConstraint, advance, initial_state, mask_logits
from coars_jax.sampling.distributions import SamplingParams, sample
from coars_jax.sampling.model_inputs import StaticKwargs, model_kwargs, positions_from_mask

# Position of the cache among `_decode`'s arguments: donated, so each generation reuses the prefill's
# buffers in place instead of holding a second cache-sized copy. The sharded decode takes the five static
# arguments first (positionally: a jit given in_shardings takes no keyword arguments), then the same ones.
_DECODE_CACHE_ARGNUM = 2
_PROGRAM_STATIC = (0, 1, 2, 3, 4)
_SHARDED_DECODE_CACHE_ARGNUM = len(_PROGRAM_STATIC) + 1


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
  count_trace('sampler.prefill')
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
  count_trace('sampler.decode')
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

  def store_step(step, tokens, log_probs, done, lengths, new_tokens, new_log_probs):
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
  tokens, log_probs, done, lengths = store_step(
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
    tokens, log_probs, done, lengths = store_step(step, tokens, log_probs, done, lengths, new_tokens, new_log_probs)
    return step + 1, cache, tokens, log_probs, done, lengths, grammar

  # Unconstrained, grammar is None: an empty pytree, so the loop carries exactly what it did before.
  num_steps, cache, tokens, log_probs, done, lengths, _ = jax.lax.while_loop(
    keep_going, decode_step, (jnp.asarray(1, jnp.int32), cache, tokens, log_probs, done, lengths, grammar)
  )
  mask = jnp.arange(completion_length)[None, :] < lengths[:, None]
  # The final cache is returned so the donated input buffers alias it and the loop updates them in place.
  return dict(tokens=tokens, log_probs=log_probs, mask=mask, lengths=lengths, finished=done, num_steps=num_steps), cache
