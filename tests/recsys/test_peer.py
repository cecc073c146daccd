"""SASRec's peer signals: ranking of candidate lists agrees with the top candidate and with the scores."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from coars_jax.recsys import SASRec, SASRecConfig
from coars_jax.recsys.peer import candidate_ranking, candidate_scores, top_candidate


def test_candidate_ranking_sorts_by_score_and_starts_with_the_top_candidate():
  model = SASRec(SASRecConfig(num_items=50, hidden=16, num_heads=2, num_blocks=1, dropout=0.0), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  history = rng.integers(0, 50, size=(6, 10)).astype(np.int32)
  lengths = np.full((6,), 10, np.int32)
  candidates = np.stack([rng.permutation(50)[:20] for _ in range(6)]).astype(np.int32)
  ranking = candidate_ranking(model, history, lengths, candidates)
  assert ranking.shape == candidates.shape
  assert all(sorted(ranking[b]) == sorted(candidates[b]) for b in range(6))
  top = np.asarray(top_candidate(model, jnp.asarray(history), jnp.asarray(lengths), jnp.asarray(candidates)))
  np.testing.assert_array_equal(ranking[:, 0], top)
  scores = np.asarray(candidate_scores(model, jnp.asarray(history), jnp.asarray(lengths), jnp.asarray(candidates)))
  by_item = [dict(zip(candidates[b], scores[b])) for b in range(6)]
  for b in range(6):
    ranked_scores = [by_item[b][item] for item in ranking[b]]
    assert all(x >= y for x, y in zip(ranked_scores, ranked_scores[1:]))
