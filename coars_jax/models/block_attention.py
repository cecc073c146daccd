"""Attention that reads only the key blocks its mask needs, as an online softmax (a running max, sum and weighted
values per query), for forward passes whose mask is mostly empty.

The packed teacher rows of the update (`sampling.packed`) are the case it is for: each teacher token reads a prefix
of its own dialogue's student slots and the tokens of its own hindsight segment, a few hundred of the several
thousand slots of a row. The dense softmax builds and normalises the whole [L, S] score matrix of every head; this
one cuts the queries into blocks, lists the key blocks each query block needs (any allowed slot), and loops over
those only. It is equal to the dense softmax up to float rounding, and forward-only: the key loop has a
data-dependent trip count, so reverse-mode differentiation through it raises (use it under stop-gradient).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

# Finite rather than -inf so a query with nothing to attend to gives finite garbage, not NaN.
MASKED_SCORE = -1e30
# The default block: the largest of these dividing both the query and the key length is used.
BLOCK_SIZES = (256, 128, 64, 32, 16, 8, 4, 2, 1)
# The largest block `block_sparse_attention` picks by default.
DEFAULT_BLOCK = 128


def online_softmax_step(
  carry: tuple[jax.Array, jax.Array, jax.Array],
  grouped: jax.Array,
  keys: jax.Array,
  values: jax.Array,
  mask: jax.Array,
  scale: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One key block of an online softmax: grouped queries [..., L, K, G, D], a block's keys and values [..., S, K, D],
  its mask [..., L, S]; carry (running max [..., K, G, L, 1], running sum [..., K, G, L, 1], weighted values
  [..., K, G, L, D]), all float32."""
  running_max, running_sum, weighted = carry
  scores = jnp.einsum(
    '...lkgd,...skd->...kgls', grouped, keys.astype(grouped.dtype), preferred_element_type=jnp.float32
  )
  scores = jnp.where(mask[..., None, None, :, :], scores * scale, MASKED_SCORE)
  new_max = jnp.maximum(running_max, scores.max(axis=-1, keepdims=True))
  probs = jnp.exp(scores - new_max)
  correction = jnp.exp(running_max - new_max)
  running_sum = running_sum * correction + probs.sum(axis=-1, keepdims=True)
  weighted = weighted * correction + jnp.einsum('...kgls,...skd->...kgld', probs, values.astype(jnp.float32))
  return new_max, running_sum, weighted


def online_softmax_init(shape: tuple[int, ...], head_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The empty carry of `online_softmax_step` for queries of `shape` = (..., K, G, L)."""
  return (
    jnp.full(shape + (1,), MASKED_SCORE, jnp.float32),
    jnp.zeros(shape + (1,), jnp.float32),
    jnp.zeros(shape + (head_dim,), jnp.float32),
  )


def block_size(*lengths: int, largest: int = BLOCK_SIZES[0]) -> int:
  """The largest block of `BLOCK_SIZES` (at most `largest`) dividing every length."""
  return next(b for b in BLOCK_SIZES if b <= largest and all(n % b == 0 for n in lengths))


def block_sparse_attention(
  grouped: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array, *, block: int | None = None
) -> jax.Array:
  """softmax(q k^T / sqrt(D), where mask) v over the key blocks the mask needs, per row and query block.

  Args:
    grouped: queries [B, L, K, G, D] (K key/value heads, G query heads per key head).
    keys, values: [B, S, K, D].
    mask: bool [B, L, S], True where a query may read a slot.
    block: the query and key block (default: `block_size(L, S)`); must divide L and S.
  Returns:
    [B, L, K, G, D] in the queries' dtype. A query with no allowed slot gives finite garbage (0 when its whole
    query block reads nothing), as the dense softmax does.
  """
  batch, length, num_kv_heads, groups, head_dim = grouped.shape
  slots = keys.shape[1]
  chex.assert_shape([keys, values], (batch, slots, num_kv_heads, head_dim))
  chex.assert_shape(mask, (batch, length, slots))
  block = block or block_size(length, slots, largest=DEFAULT_BLOCK)
  if length % block or slots % block:
    raise ValueError(f'block_sparse_attention: block {block} must divide the lengths {length} and {slots}')
  query_blocks, key_blocks = length // block, slots // block
  scale = head_dim**-0.5

  def one_row(queries, row_keys, row_values, row_mask):
    needed = row_mask.reshape(query_blocks, block, key_blocks, block).any(axis=(1, 3))  # [nq, nk]

    def one_query_block(_, inputs):
      block_queries, block_mask, block_needed = inputs  # [b, K, G, D], [b, S], [nk]
      order = jnp.nonzero(block_needed, size=key_blocks, fill_value=0)[0]

      def read(index, carry):
        start = order[index] * block
        return online_softmax_step(
          carry,
          block_queries,
          jax.lax.dynamic_slice_in_dim(row_keys, start, block, axis=0),
          jax.lax.dynamic_slice_in_dim(row_values, start, block, axis=0),
          jax.lax.dynamic_slice_in_dim(block_mask, start, block, axis=1),
          scale,
        )

      init = online_softmax_init((num_kv_heads, groups, block), head_dim)
      _, running_sum, weighted = jax.lax.fori_loop(0, block_needed.sum(), read, init)
      out = weighted / jnp.where(running_sum > 0, running_sum, 1.0)  # [K, G, b, D]
      return None, jnp.transpose(out, (2, 0, 1, 3))

    _, out = jax.lax.scan(
      one_query_block,
      None,
      (
        queries.reshape(query_blocks, block, num_kv_heads, groups, head_dim),
        row_mask.reshape(query_blocks, block, slots),
        needed,
      ),
    )
    return out.reshape(length, num_kv_heads, groups, head_dim)

  return jax.vmap(one_row)(grouped, keys, values, mask).astype(grouped.dtype)
