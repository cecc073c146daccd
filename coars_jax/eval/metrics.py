"""Ranking metrics over candidate lists: pure functions of score arrays.

Ties are broken by candidate position. Candidate lists are shuffled, so this is a random tie-break that is
still deterministic, and a method that gives every candidate the same score gets Hit@1 = 1/20 on average,
not 1.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


@jax.jit
def target_rank(scores: jax.Array, target_index: jax.Array) -> jax.Array:
  """0-based rank of the target among its candidates.

  Args:
    scores: float[N, C], higher is better.
    target_index: int[N], the column of the target.
  Returns:
    int32[N].
  """
  chex.assert_rank([scores, target_index], [2, 1])
  chex.assert_equal_shape_prefix([scores, target_index], 1)
  target_score = jnp.take_along_axis(scores, target_index[:, None], axis=1)
  column = jnp.arange(scores.shape[1])[None, :]
  ahead = (scores > target_score) | ((scores == target_score) & (column < target_index[:, None]))
  return jnp.sum(ahead, axis=1).astype(jnp.int32)


def hit_at_k(rank: jax.Array, k: int) -> jax.Array:
  """float32[N]: 1 where the target is in the top k."""
  return (rank < k).astype(jnp.float32)


def ndcg_at_k(rank: jax.Array, k: int) -> jax.Array:
  """float32[N]: 1 / log2(rank + 2) where the target is in the top k (one relevant item), else 0."""
  return jnp.where(rank < k, 1.0 / jnp.log2(rank.astype(jnp.float32) + 2.0), 0.0)


def ranking_metrics(scores: jax.Array, target_index: jax.Array) -> dict[str, float]:
  """Mean Hit@1, Hit@5 and NDCG@5 over the rows."""
  rank = target_rank(scores, target_index)
  return {'hit@1': float(jnp.mean(hit_at_k(rank, 1))), 'hit@5': float(jnp.mean(hit_at_k(rank, 5))),
          'ndcg@5': float(jnp.mean(ndcg_at_k(rank, 5)))}
