"""Prompt-prefix reuse for `sampler.generate`: this module owns the `PromptPrefix` that names keys and values an
earlier call already computed, the host-side helpers that find shared prefixes (`common_prefix_length`,
`prompt_slots`), the choice of the block at the end of the prompt that is prefilled again (`PREFILL_BLOCKS`,
`_prefill_block`, which also builds the table of source cache slots for the slots before it), and the jitted
program that copies those slots from the earlier cache and prefills the block after them
(`_prefill_after_prefix_program`, unsharded as `_prefill_after_prefix`; `generate` jits it with shardings on a
mesh). The decode that follows is the same program as without a prefix (`programs`)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coars_jax.models.kv_cache import KVCache, init_cache
from coars_jax.parallel.sharding import Partitioning, activation_scope
from coars_jax.sampling.compilation import count_trace
from coars_jax.sampling.model_inputs import StaticKwargs, model_kwargs


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
  count_trace('sampler.prefill_after_prefix')
  model = nnx.merge(graphdef, state)
  with activation_scope(partitioning, model.config, tokens.shape[0]):
    cache = init_cache(model.config, tokens.shape[0], cache_length, cache_dtype)
    before = table.shape[1]

    def gathered(new, old):  # head-major caches [B, kv_heads, slots, head_dim]
      picked = jax.vmap(lambda row, slots: old[row][:, slots])(rows, table).astype(new.dtype)  # [B, K, P - W, D]
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
