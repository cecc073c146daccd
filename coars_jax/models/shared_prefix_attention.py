"""Attention over a prompt prefix that several rows share (cascade attention): `SharedPrefixKV` holds the keys and
values of G prefixes once, and rows b of a batch of B = G x R rows (group-major: row b continues prefix b // R)
attend to their group's prefix and to their own cache.

The user-agent F1 is the case it is for: each user's 2k judgements share a prompt of system message and history
(about a thousand tokens) and differ in the last few dozen. With a cache per row, every decode step reads that
history once per row; here it is read once per group, so a step's keys and values shrink by about R times. The
prefix part is a matrix product of all of a group's queries against its keys, the own part the cache's usual
attention; the two partial softmaxes (running max, sum and weighted values) merge exactly, so the result equals
attention over the concatenated prompt up to float rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from coars_jax.models.block_attention import MASKED_SCORE


@struct.dataclass
class SharedPrefixKV:
  """keys[layer], values[layer]: [G, kv_heads, P, head_dim] (head-major, as `KVCache`); segment_ids [G, P] int32
  (0 = padding). Row b's own tokens start at RoPE position (segment_ids[b // R] != 0).sum(), which the caller
  passes as positions."""

  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]
  segment_ids: jax.Array


def partial_own(grouped: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array):
  """The unnormalised softmax of queries grouped [B, L, K, Q, D] over their own head-major keys and values
  [B, K, S, D] under mask [B, L, S]: (max, sum) [B, K, Q, L] and weighted values [B, K, Q, L, D], float32."""
  scores = jnp.einsum('blkqd,bksd->bkqls', grouped, keys, preferred_element_type=jnp.float32)
  scores = jnp.where(mask[:, None, None], scores * grouped.shape[-1] ** -0.5, MASKED_SCORE)
  top = scores.max(axis=-1)
  probs = jnp.exp(scores - top[..., None])
  weighted = jnp.einsum('bkqls,bksd->bkqld', probs, values.astype(jnp.float32))
  return top, probs.sum(axis=-1), weighted


def partial_shared(grouped: jax.Array, shared_keys: jax.Array, shared_values: jax.Array, segment_ids: jax.Array):
  """The same over each row's group prefix: grouped [B, L, K, Q, D] with B = G x R, prefix keys and values
  [G, K, P, D], segment_ids [G, P]. Every query sees every real prefix slot (the prefix precedes the row's own
  tokens). One product per group and key head reads the prefix once for all R x L x Q queries."""
  batch, length, num_kv, per_kv, head_dim = grouped.shape
  groups = shared_keys.shape[0]
  if batch % groups:
    raise ValueError(f'shared prefix: {batch} rows do not split into {groups} groups of equal size')
  queries = grouped.reshape(groups, batch // groups, length, num_kv, per_kv, head_dim)
  scores = jnp.einsum('grlkqd,gkpd->gkrqlp', queries, shared_keys, preferred_element_type=jnp.float32)
  scores = jnp.where((segment_ids != 0)[:, None, None, None, None], scores * head_dim**-0.5, MASKED_SCORE)
  top = scores.max(axis=-1)
  probs = jnp.exp(scores - top[..., None])
  weighted = jnp.einsum('gkrqlp,gkpd->gkrqld', probs, shared_values.astype(jnp.float32))

  def rows(array):  # [G, K, R, ...] -> [B, K, ...]
    array = jnp.moveaxis(array, 2, 1)
    return array.reshape((batch,) + array.shape[2:])

  return rows(top), rows(probs.sum(axis=-1)), rows(weighted)


def merge(first, second, dtype) -> jax.Array:
  """Two partial softmaxes over disjoint keys -> the attention output [B, L, K, Q, D] in `dtype`."""
  (top1, sum1, weighted1), (top2, sum2, weighted2) = first, second
  top = jnp.maximum(top1, top2)
  scale1, scale2 = jnp.exp(top1 - top), jnp.exp(top2 - top)
  out = (weighted1 * scale1[..., None] + weighted2 * scale2[..., None]) / (sum1 * scale1 + sum2 * scale2)[..., None]
  return jnp.transpose(out, (0, 3, 1, 2, 4)).astype(dtype)  # [B, K, Q, L, D] -> [B, L, K, Q, D]
