"""Ranking metrics over candidate lists (pure functions of score arrays), and the paired bootstrap interval of a
Hit@1 difference between two rows over the same windows.

Ties are broken by candidate position. Candidate lists are shuffled, so this is a random tie-break that is
still deterministic, and a method that gives every candidate the same score gets Hit@1 = 1/20 on average,
not 1.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np


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
  return {
    'hit@1': float(jnp.mean(hit_at_k(rank, 1))),
    'hit@5': float(jnp.mean(hit_at_k(rank, 5))),
    'ndcg@5': float(jnp.mean(ndcg_at_k(rank, 5))),
  }


def paired_bootstrap(
  hits: np.ndarray, reference_hits: np.ndarray, *, resamples: int = 10_000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
  """The Hit@1 difference of a row from a reference row over the same windows, with its paired bootstrap interval.

  Windows are resampled with replacement (the same draw for both rows, so the pairing is kept) `resamples` times;
  the interval is the percentile interval of the resampled mean differences.

  Args:
    hits: bool or {0, 1} [N], this row's hit per window.
    reference_hits: [N], the reference's hit on the same windows, in the same order.
  Returns:
    {'diff': mean(hits - reference_hits), 'low': lower bound, 'high': upper bound, 'windows': N}.
  """
  hits, reference_hits = np.asarray(hits, np.float64), np.asarray(reference_hits, np.float64)
  if hits.shape != reference_hits.shape or hits.ndim != 1 or not len(hits):
    raise ValueError(
      f'paired_bootstrap needs two equal-length non-empty hit vectors over the same windows, found '
      f'shapes {hits.shape} and {reference_hits.shape}'
    )
  difference = hits - reference_hits
  rng = np.random.default_rng(seed)
  draws = rng.integers(0, len(difference), size=(resamples, len(difference)))
  means = difference[draws].mean(axis=1)
  tail = (1.0 - level) / 2.0
  low, high = np.quantile(means, [tail, 1.0 - tail])
  return {'diff': float(difference.mean()), 'low': float(low), 'high': float(high), 'windows': int(len(hits))}


def micro_f1(counts: np.ndarray) -> np.ndarray:
  """F1 from summed [true positives, false positives, false negatives] on the last axis (0 where undefined)."""
  counts = np.asarray(counts, np.float64)
  tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
  denominator = 2 * tp + fp + fn
  return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1e-12), 0.0)


def paired_bootstrap_f1(
  cases: np.ndarray, reference_cases: np.ndarray, *, resamples: int = 10_000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
  """The micro-F1 difference of a user agent from a reference over the same users, with its paired bootstrap
  interval: users (cases) are resampled with replacement, the same draw for both, and F1 is recomputed from the
  resampled counts.

  Args:
    cases: [U, 3] per user [true positives, false positives, false negatives] (may be averaged over seeds).
    reference_cases: [U, 3], the same users in the same order.
  Returns:
    {'diff', 'low', 'high', 'users'}.
  """
  cases, reference_cases = np.asarray(cases, np.float64), np.asarray(reference_cases, np.float64)
  if cases.shape != reference_cases.shape or cases.ndim != 2 or cases.shape[1] != 3 or not len(cases):
    raise ValueError(
      f'paired_bootstrap_f1 needs two [users, 3] count arrays over the same users, found shapes '
      f'{cases.shape} and {reference_cases.shape}'
    )
  rng = np.random.default_rng(seed)
  draws = rng.integers(0, len(cases), size=(resamples, len(cases)))
  differences = micro_f1(cases[draws].sum(axis=1)) - micro_f1(reference_cases[draws].sum(axis=1))
  tail = (1.0 - level) / 2.0
  low, high = np.quantile(differences, [tail, 1.0 - tail])
  diff = float(micro_f1(cases.sum(axis=0)) - micro_f1(reference_cases.sum(axis=0)))
  return {'diff': diff, 'low': float(low), 'high': float(high), 'users': int(len(cases))}
