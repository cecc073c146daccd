import chex
import jax.numpy as jnp
import numpy as np

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
