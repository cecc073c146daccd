"""Generation for groups of prompts that share a prefix (`generate_shared_prefix`): each group's prefix is
prefilled once into a `models.SharedPrefixKV`, every row prefills only its own suffix into a short cache of its
own, and the decode steps attend to both (`models.shared_prefix_attention`), so the prefix's keys and values are
read once per group instead of once per row. The decode program is `sampling.generate`'s; only the prefill differs
(`_prefill_shared`). Greedy outputs equal `generate` on the whole prompts to float rounding.

The user-agent F1 uses it: a user's judgements share the system message and the history, most of each prompt.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coars_jax.models.decoder import Decoder
from coars_jax.models.kv_cache import KVCache, init_cache
from coars_jax.models.shared_prefix_attention import SharedPrefixKV
from coars_jax.sampling import buckets as buckets_lib
from coars_jax.sampling.buckets import LengthBuckets
from coars_jax.sampling.compilation import count_trace
from coars_jax.sampling.constraints import ChoiceConstraint
from coars_jax.sampling.distributions import SamplingParams
from coars_jax.sampling.model_inputs import (
  StaticKwargs,
  inference_view,
  model_kwargs,
  positions_from_mask,
  split_model_kwargs,
)
from coars_jax.sampling.prefix_reuse import PREFILL_BLOCKS
from coars_jax.sampling.programs import _decode
from coars_jax.sampling.sampler import GenerationOutput, _check_constraint, _pad_token


@functools.partial(jax.jit, static_argnames=('graphdef', 'static_kwargs', 'cache_length', 'cache_dtype'))
def _prefill_shared(
  graphdef: nnx.GraphDef,
  state: nnx.State,
  prefix_tokens: jax.Array,
  prefix_mask: jax.Array,
  tokens: jax.Array,
  mask: jax.Array,
  array_kwargs: dict[str, Any],
  *,
  static_kwargs: StaticKwargs,
  cache_length: int,
  cache_dtype: str,
) -> tuple[jax.Array, KVCache, SharedPrefixKV]:
  """Prefills the G left-padded prefixes [G, P] into a `SharedPrefixKV`, then the B = G x R left-padded suffixes
  [B, S] into a fresh cache of `cache_length` slots after them: (float32 logits [B, V] after each row's last token,
  the rows' cache, the prefixes). Array model kwargs are per row; a group's prefix runs with its first row's."""
  count_trace('sampler.prefill_shared')
  model = nnx.merge(graphdef, state)
  groups, batch = prefix_tokens.shape[0], tokens.shape[0]
  per_group = batch // groups
  first_rows = jax.tree.map(lambda a: a[::per_group], array_kwargs)
  prefix_cache = init_cache(model.config, groups, prefix_tokens.shape[1], cache_dtype)
  _, prefix_cache = model.hidden_states(
    prefix_tokens,
    positions_from_mask(prefix_mask),
    prefix_mask,
    prefix_cache,
    **model_kwargs(static_kwargs, first_rows),
  )
  lengths = prefix_mask.sum(axis=1).astype(jnp.int32)
  shared = SharedPrefixKV(keys=prefix_cache.keys, values=prefix_cache.values, segment_ids=prefix_cache.segment_ids)
  positions = jnp.repeat(lengths, per_group)[:, None] + positions_from_mask(mask)
  cache = init_cache(model.config, batch, cache_length, cache_dtype)
  hidden, cache = model.hidden_states(
    tokens, positions, mask, cache, shared=shared, **model_kwargs(static_kwargs, array_kwargs)
  )
  return model.logits(hidden[:, -1]).astype(jnp.float32), cache, shared


def generate_shared_prefix(
  model: Decoder,
  prefixes: Sequence[Sequence[int]],
  suffixes: Sequence[Sequence[int]],
  *,
  max_new_tokens: int,
  params: SamplingParams = SamplingParams(),
  buckets: LengthBuckets = LengthBuckets(),
  eos_token_ids: Sequence[int] | None = None,
  pad_token_id: int | None = None,
  seed: int | jax.Array = 0,
  cache_dtype: str | None = None,
  constraint: ChoiceConstraint | None = None,
  **model_call_kwargs: Any,
) -> GenerationOutput:
  """Samples up to `max_new_tokens` after each prompt prefixes[b // R] + suffixes[b], R = len(suffixes) //
  len(prefixes) (rows are group-major; every group has R rows, so pad a short group with copies).

  As `sampling.generate` (unsharded; `constraint` as there, one row per suffix), except that each prefix is prefilled once and read once per
  decode step for its R rows. Prefixes and suffixes are left-padded to prompt buckets separately; every suffix needs
  at least one token (the last prompt token's logits start the reply); suffixes take the smallest of
  `PREFILL_BLOCKS` and the prompt buckets that holds them. The output's `prompt_tokens` and
  `prompt_mask` are the suffixes as run, and it carries no cache (it cannot serve `PromptPrefix` reuse).
  model_call_kwargs: as `generate`'s; array ones are per row and must agree within a group (a group's prefix runs
    with its first row's, e.g. its adapter index).
  """
  config = model.config
  if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
    raise ValueError(f'generate_shared_prefix: max_new_tokens must be a positive int, found {max_new_tokens!r}')
  if not prefixes or not suffixes or len(suffixes) % len(prefixes):
    raise ValueError(
      f'generate_shared_prefix: {len(suffixes)} suffixes do not split into groups of equal size over '
      f'{len(prefixes)} prefixes'
    )
  for what, lists in (('prefix', prefixes), ('suffix', suffixes)):
    empty = [index for index, ids in enumerate(lists) if len(ids) == 0]
    if empty:
      raise ValueError(f'generate_shared_prefix: {what} {empty[0]} is empty; each needs at least one token')
  per_group = len(suffixes) // len(prefixes)
  longest = max(len(prefixes[b // per_group]) + len(ids) for b, ids in enumerate(suffixes)) + max_new_tokens
  if longest > config.max_position_embeddings:
    raise ValueError(
      f"generate_shared_prefix: prompt + max_new_tokens reaches position {longest}, beyond the model's "
      f'max_position_embeddings {config.max_position_embeddings}'
    )
  eos = tuple(config.eos_token_ids if eos_token_ids is None else eos_token_ids)
  pad = _pad_token(config, pad_token_id)
  prefix_tokens, prefix_mask = buckets_lib.left_pad(prefixes, buckets.prompt_length(max(map(len, prefixes))), pad)
  # Suffixes are short (an item and its reason): they take the smallest of prefix reuse's block widths or the
  # prompt buckets that holds them, not a prompt bucket sized for whole prompts.
  widths = sorted(set(PREFILL_BLOCKS) | set(buckets.prompt))
  tokens, mask = buckets_lib.left_pad(suffixes, buckets_lib.bucket_length(max(map(len, suffixes)), widths), pad)
  completion_length = buckets.completion_length(max_new_tokens)
  if constraint is not None:
    _check_constraint(constraint, tokens.shape[0], config.vocab_size, eos, max_new_tokens)
  static_kwargs, array_kwargs = split_model_kwargs(model_call_kwargs, 'generate_shared_prefix')
  graphdef, state = nnx.split(inference_view(model))
  cache_dtype = cache_dtype or config.compute_dtype
  logits, cache, shared = _prefill_shared(
    graphdef,
    state,
    jnp.asarray(prefix_tokens),
    jnp.asarray(prefix_mask),
    jnp.asarray(tokens),
    jnp.asarray(mask),
    array_kwargs,
    static_kwargs=static_kwargs,
    cache_length=tokens.shape[1] + completion_length,
    cache_dtype=cache_dtype,
  )
  # Decode positions continue after prefix + suffix: the decode program numbers completion token j at
  # prompt_lengths[b] + j.
  prompt_lengths = np.repeat(prefix_mask.sum(axis=1), per_group) + mask.sum(axis=1)
  key = jax.random.key(int(seed)) if isinstance(seed, (int, np.integer)) else seed
  outputs, _ = _decode(
    graphdef,
    state,
    cache,
    logits,
    jnp.asarray(prompt_lengths, jnp.int32),
    jnp.asarray(max_new_tokens, jnp.int32),
    key,
    jnp.asarray(eos, jnp.int32),
    jnp.asarray(pad, jnp.int32),
    {**array_kwargs, 'shared': shared},
    static_kwargs=static_kwargs,
    params=params,
    completion_length=completion_length,
    **({} if constraint is None else {'constraint': constraint}),
  )
  return GenerationOutput(**outputs, prompt_tokens=tokens, prompt_mask=mask)
