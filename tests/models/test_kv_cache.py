"""KVCache: shapes, dtypes and logical axes of an empty cache."""

import chex
import jax
import jax.numpy as jnp
import pytest

from coars_jax.models import DecoderConfig, KVCache, init_cache

CONFIG = DecoderConfig(vocab_size=8, embed_dim=16, mlp_dim=8, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=4)


def test_init_cache_shapes_and_dtype():
  cache = init_cache(CONFIG, batch=2, max_len=10, dtype='bfloat16')
  assert len(cache.keys) == len(cache.values) == 3
  chex.assert_shape(cache.keys + cache.values, (2, 2, 10, 4))  # head-major: [B, kv_heads, slots, head_dim]
  chex.assert_type(cache.keys[0], jnp.bfloat16)
  chex.assert_shape(cache.segment_ids, (2, 10))
  assert int(cache.end_index) == 0 and not cache.segment_ids.any()
  assert (cache.batch_size, cache.max_len) == (2, 10)


def test_cache_is_a_pytree_with_matching_logical_axes():
  cache = init_cache(CONFIG, batch=1, max_len=4)
  axes = KVCache.logical_axes(CONFIG.num_layers)
  leaves = jax.tree.leaves(cache)
  assert len(leaves) == 2 * 3 + 2
  names = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(n, str) for n in x))
  assert [len(n) for n in names] == [leaf.ndim for leaf in leaves]


def test_init_cache_rejects_empty_sizes():
  with pytest.raises(ValueError, match='max_len=0'):
    init_cache(CONFIG, batch=1, max_len=0)
