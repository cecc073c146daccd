"""Batched autoregressive generation with a KV cache: a jitted prefill of the left-padded, length-bucketed
prompts, then one jitted decode program that donates the cache and runs a `lax.while_loop` of one-token
steps until every row has emitted an end-of-sequence token or max_new_tokens are out, returning the new
tokens, their mask and lengths, and float32 log-probs of the sampled tokens under the sampling distribution.
An optional `constraints.ChoiceConstraint` restricts each row's tokens to an output grammar; its state rides in
the loop's carry, and tokens and log-probs then come from the masked, renormalised distribution.
This module owns `generate` and its `GenerationOutput`: the checks of the request, left padding into buckets,
and the dispatch to the jitted programs (`programs`), reading a reused prompt prefix through `prefix_reuse`."""

from __future__ import annotations

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
from coars_jax.parallel.sharding import Partitioning, sharded_jit
from coars_jax.sampling import buckets as buckets_lib
from coars_jax.sampling.buckets import LengthBuckets
from coars_jax.sampling.constraints import ChoiceConstraint
from coars_jax.sampling.distributions import SamplingParams
from coars_jax.sampling.model_inputs import inference_view, split_model_kwargs

# Prefix reuse and the jitted programs live in their own modules; their names stay importable from here, and
# `generate` reads `_prefill`, `_prefill_after_prefix` and `_decode` through this module's attributes, so
# replacing them here (as the benchmarks do) still takes effect.
from coars_jax.sampling.prefix_reuse import (
  PREFILL_BLOCKS,  # noqa: F401
  PromptPrefix,
  _prefill_after_prefix,
  _prefill_after_prefix_program,
  _prefill_block,
  common_prefix_length,  # noqa: F401
  prompt_slots,  # noqa: F401
)
from coars_jax.sampling.programs import _PROGRAM_STATIC, _decode, _prefill, _sharded_programs


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
