import chex
import jax.numpy as jnp
import numpy as np
import pytest

from coars_jax.eval import metrics


def test_rank_breaks_ties_by_position():
  scores = jnp.array([[0.1, 0.9, 0.5], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.2, 0.2, 0.1]])
  target_index = jnp.array([2, 0, 2, 1])
  rank = metrics.target_rank(scores, target_index)
  chex.assert_type(rank, jnp.int32)
  np.testing.assert_array_equal(rank, [1, 0, 2, 1])


def test_hit_and_ndcg_values():
  rank = jnp.array([0, 1, 4, 5])
  np.testing.assert_array_equal(metrics.hit_at_k(rank, 1), [1, 0, 0, 0])
  np.testing.assert_array_equal(metrics.hit_at_k(rank, 5), [1, 1, 1, 0])
  np.testing.assert_allclose(metrics.ndcg_at_k(rank, 5), [1.0, 1 / np.log2(3), 1 / np.log2(6), 0.0], rtol=1e-6)
  out = metrics.ranking_metrics(jnp.array([[3.0, 1.0], [1.0, 3.0]]), jnp.array([0, 0]))
  assert out['hit@1'] == 0.5 and out['hit@5'] == 1.0
  np.testing.assert_allclose(out['ndcg@5'], (1.0 + 1 / np.log2(3)) / 2, rtol=1e-6)


def test_paired_bootstrap_difference_and_interval():
  from coars_jax.eval.metrics import paired_bootstrap

  a = np.array([1, 1, 0, 1, 0, 1, 1, 0] * 10)
  b = np.array([0, 1, 0, 0, 0, 1, 0, 0] * 10)
  out = paired_bootstrap(a, b, resamples=2000, seed=0)
  assert out['windows'] == 80 and out['diff'] == pytest.approx(3 / 8)  # 5 of 8 hits against 2 of 8
  assert out['low'] < 3 / 8 < out['high'] and out['low'] > 0  # a real gain: the interval excludes 0
  # Identical rows: every resample differs by exactly 0.
  same = paired_bootstrap(a, a, resamples=500)
  assert same['diff'] == same['low'] == same['high'] == 0.0
  # The pairing matters: two rows that differ on every window in opposite directions have a wide interval around 0.
  swap = paired_bootstrap(np.array([1, 0] * 20), np.array([0, 1] * 20), resamples=2000)
  assert swap['diff'] == 0.0 and swap['low'] < -0.2 and swap['high'] > 0.2
  assert paired_bootstrap(a, b, resamples=2000, seed=0) == out  # seeded
  with pytest.raises(ValueError, match='same windows'):
    paired_bootstrap(a, b[:-1])
