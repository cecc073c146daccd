"""`KVCache`: the decoder's key/value cache as a plain pytree of arrays, so a jitted sampler can donate it.

Slots are shared by the whole batch: a forward call writes its L new tokens into slots
[end_index, end_index + L) of every row. Which slots hold real tokens is recorded per row in `segment_ids`
(0 = empty or padding), and each token's RoPE position comes from the caller, so rows with prompts of
different lengths coexist. The recommended layout is left padding: prompts end at the same slot and every
decode step writes one slot for all rows. Keys are stored already rotated, so positions are not kept.

The layout is head-major, [B, kv_heads, max_len, head_dim]: a decode step's attention is then, per row and key
head, a plain matrix product over contiguous slots, with no transposed copy of the cache's blocks (the length-major
layout cost a 16-row decode step with 900 live slots about 140 ms of attention against about 80 ms; BUILD_NOTES
Part 14).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from coars_jax.models.config import DecoderConfig
from coars_jax.models.logical_axes import BATCH, HEAD_DIM, KV_HEADS, LENGTH


@struct.dataclass
class KVCache:
  """keys[layer], values[layer]: [B, kv_heads, max_len, head_dim]; segment_ids: [B, max_len] int32;
  end_index: int32 scalar, the first free slot."""

  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]
  segment_ids: jax.Array
  end_index: jax.Array

  @property
  def max_len(self) -> int:
    return self.segment_ids.shape[1]

  @property
  def batch_size(self) -> int:
    return self.segment_ids.shape[0]

  @staticmethod
  def logical_axes(num_layers: int) -> KVCache:
    """The same pytree with a tuple of logical axis names in place of each array."""
    per_layer = tuple((BATCH, KV_HEADS, LENGTH, HEAD_DIM) for _ in range(num_layers))
    return KVCache(keys=per_layer, values=per_layer, segment_ids=(BATCH, LENGTH), end_index=())


def init_cache(config: DecoderConfig, batch: int, max_len: int, dtype: jnp.dtype | str | None = None) -> KVCache:
  """An empty cache for `batch` rows of up to `max_len` tokens; dtype defaults to config.compute_dtype."""
  if batch <= 0 or max_len <= 0:
    raise ValueError(f'init_cache: batch and max_len must be positive, found batch={batch}, max_len={max_len}')
  dtype = jnp.dtype(dtype or config.compute_dtype)
  shape = (batch, config.num_kv_heads, max_len, config.head_dim)
  return KVCache(
    keys=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
    values=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
    segment_ids=jnp.zeros((batch, max_len), jnp.int32),
    end_index=jnp.zeros((), jnp.int32),
  )
