"""Attention that reads only the key blocks its mask needs, as an online softmax (a running max, sum and weighted
values per query), for forward passes whose mask is mostly empty.

The packed teacher rows of the update (`sampling.packed`) are the case it is for: each teacher token reads a prefix
of its own dialogue's student slots and the tokens of its own hindsight segment, a few hundred of the several
thousand slots of a row. The dense softmax builds and normalises the whole [L, S] score matrix of every head; this
one cuts the queries into blocks, lists the key blocks each query block needs (any allowed slot), and loops over
those only. It is equal to the dense softmax up to float rounding. Its gradient is a custom VJP over the same
blocks (the key loops have data-dependent trip counts, which JAX cannot differentiate by itself), so the student's
differentiated pass can use it too.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

# Finite rather than -inf so a query with nothing to attend to gives finite garbage, not NaN.
MASKED_SCORE = -1e30
# The default block: the largest of these dividing both the query and the key length is used.
BLOCK_SIZES = (256, 128, 64, 32, 16, 8, 4, 2, 1)
# The largest block `block_sparse_attention` picks by default.
DEFAULT_BLOCK = 128


def online_softmax_init(shape: tuple[int, ...], head_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The empty carry (running max, running sum, weighted values) of an online softmax for queries of `shape`."""
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
    [B, L, K, G, D] in the queries' dtype; 0 for a query with no allowed slot. Differentiable in the queries, keys
    and values through a custom VJP that walks the same blocks (the FlashAttention backward: each needed block's
    probabilities are recomputed from the saved log-sum-exp).
  """
  batch, length, num_kv_heads, groups, head_dim = grouped.shape
  slots = keys.shape[1]
  chex.assert_shape([keys, values], (batch, slots, num_kv_heads, head_dim))
  chex.assert_shape(mask, (batch, length, slots))
  block = block or block_size(length, slots, largest=DEFAULT_BLOCK)
  if length % block or slots % block:
    raise ValueError(f'block_sparse_attention: block {block} must divide the lengths {length} and {slots}')
  out = _attention(grouped, keys, values, mask.astype(bool), block)
  return out.astype(grouped.dtype)


def _blocks(array: jax.Array, block: int) -> jax.Array:
  """[L, ...] -> [L / block, block, ...]."""
  return array.reshape((array.shape[0] // block, block) + array.shape[1:])


def _needed(mask: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  """Per query block of one row's mask [L, S]: how many key blocks it needs, and their indices first ([nq], [nq, nk])."""
  length, slots = mask.shape
  key_blocks = slots // block
  needed = mask.reshape(length // block, block, key_blocks, block).any(axis=(1, 3))
  order = jax.vmap(lambda row: jnp.nonzero(row, size=key_blocks, fill_value=0)[0])(needed)
  return needed.sum(axis=1), order


def _block_scores(queries, keys, mask, scale):
  """Scores [K, G, b, bk] of a query block [b, K, G, D] against a key block [bk, K, D], -inf-free: masked -> MASKED."""
  scores = jnp.einsum('lkgd,skd->kgls', queries, keys.astype(queries.dtype), preferred_element_type=jnp.float32)
  return jnp.where(mask[None, None], scores * scale, MASKED_SCORE)


def _forward_row(queries, keys, values, mask, block):
  """One row: (out [L, K, G, D] float32, log-sum-exp [L, K, G], MASKED_SCORE where a query reads nothing)."""
  length, num_kv_heads, groups, head_dim = queries.shape
  scale = head_dim**-0.5
  counts, orders = _needed(mask, block)

  def one_query_block(_, inputs):
    block_queries, block_mask, count, order = inputs  # [b, K, G, D], [b, S], [], [nk]

    def read(index, carry):
      running_max, running_sum, weighted = carry
      start = order[index] * block
      key_mask = jax.lax.dynamic_slice_in_dim(block_mask, start, block, axis=1)
      scores = _block_scores(block_queries, jax.lax.dynamic_slice_in_dim(keys, start, block, axis=0), key_mask, scale)
      new_max = jnp.maximum(running_max, scores.max(axis=-1, keepdims=True))
      probs = jnp.where(key_mask[None, None], jnp.exp(scores - new_max), 0.0)
      correction = jnp.exp(running_max - new_max)
      block_values = jax.lax.dynamic_slice_in_dim(values, start, block, axis=0).astype(jnp.float32)
      weighted = weighted * correction + jnp.einsum('kgls,skd->kgld', probs, block_values)
      return new_max, running_sum * correction + probs.sum(axis=-1, keepdims=True), weighted

    init = online_softmax_init((num_kv_heads, groups, block), head_dim)
    running_max, running_sum, weighted = jax.lax.fori_loop(0, count, read, init)
    reads = running_sum > 0
    out = jnp.where(reads, weighted / jnp.where(reads, running_sum, 1.0), 0.0)  # [K, G, b, D]
    lse = jnp.where(reads, running_max + jnp.log(jnp.where(reads, running_sum, 1.0)), MASKED_SCORE)[..., 0]
    return None, (jnp.transpose(out, (2, 0, 1, 3)), jnp.transpose(lse, (2, 0, 1)))

  _, (out, lse) = jax.lax.scan(one_query_block, None, (_blocks(queries, block), _blocks(mask, block), counts, orders))
  return out.reshape(length, num_kv_heads, groups, head_dim), lse.reshape(length, num_kv_heads, groups)


def _backward_row(queries, keys, values, mask, out, lse, d_out, block):
  """One row's (dq, dk, dv) from the saved out and log-sum-exp, over the same needed blocks as the forward."""
  head_dim = queries.shape[-1]
  scale = head_dim**-0.5
  counts, orders = _needed(mask, block)
  delta = jnp.sum(d_out.astype(jnp.float32) * out, axis=-1)  # [L, K, G]
  d_keys = jnp.zeros(keys.shape, jnp.float32)
  d_values = jnp.zeros(values.shape, jnp.float32)

  def one_query_block(carry, inputs):
    block_queries, block_mask, block_lse, block_d_out, block_delta, count, order = inputs

    def read(index, carry):
      d_queries, d_keys, d_values = carry
      start = order[index] * block
      key_mask = jax.lax.dynamic_slice_in_dim(block_mask, start, block, axis=1)
      block_keys = jax.lax.dynamic_slice_in_dim(keys, start, block, axis=0).astype(jnp.float32)
      block_values = jax.lax.dynamic_slice_in_dim(values, start, block, axis=0).astype(jnp.float32)
      scores = _block_scores(block_queries, block_keys, key_mask, scale)
      probs = jnp.where(key_mask[None, None], jnp.exp(scores - jnp.transpose(block_lse, (1, 2, 0))[..., None]), 0.0)
      d_probs = jnp.einsum('lkgd,skd->kgls', block_d_out, block_values)
      d_scores = probs * (d_probs - jnp.transpose(block_delta, (1, 2, 0))[..., None]) * scale
      d_queries = d_queries + jnp.einsum('kgls,skd->lkgd', d_scores, block_keys)
      key_grad = jnp.einsum('kgls,lkgd->skd', d_scores, block_queries.astype(jnp.float32))
      value_grad = jnp.einsum('kgls,lkgd->skd', probs, block_d_out)
      d_keys = jax.lax.dynamic_update_slice_in_dim(
        d_keys, jax.lax.dynamic_slice_in_dim(d_keys, start, block, axis=0) + key_grad, start, axis=0
      )
      d_values = jax.lax.dynamic_update_slice_in_dim(
        d_values, jax.lax.dynamic_slice_in_dim(d_values, start, block, axis=0) + value_grad, start, axis=0
      )
      return d_queries, d_keys, d_values

    d_keys, d_values = carry
    init = (jnp.zeros(block_queries.shape, jnp.float32), d_keys, d_values)
    d_queries, d_keys, d_values = jax.lax.fori_loop(0, count, read, init)
    return (d_keys, d_values), d_queries

  (d_keys, d_values), d_queries = jax.lax.scan(
    one_query_block,
    (d_keys, d_values),
    (
      _blocks(queries, block),
      _blocks(mask, block),
      _blocks(lse, block),
      _blocks(d_out.astype(jnp.float32), block),
      _blocks(delta, block),
      counts,
      orders,
    ),
  )
  return d_queries.reshape(queries.shape), d_keys, d_values


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(grouped, keys, values, mask, block):
  return jax.vmap(functools.partial(_forward_row, block=block))(grouped, keys, values, mask)[0]


def _attention_forward(grouped, keys, values, mask, block):
  out, lse = jax.vmap(functools.partial(_forward_row, block=block))(grouped, keys, values, mask)
  return out, (grouped, keys, values, mask, out, lse)


def _attention_backward(block, residuals, d_out):
  grouped, keys, values, mask, out, lse = residuals
  d_queries, d_keys, d_values = jax.vmap(functools.partial(_backward_row, block=block))(
    grouped, keys, values, mask, out, lse, d_out
  )
  return d_queries.astype(grouped.dtype), d_keys.astype(keys.dtype), d_values.astype(values.dtype), None


_attention.defvjp(_attention_forward, _attention_backward)
