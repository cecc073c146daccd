"""The sampling distribution: temperature, top-k and top-p filtering of logits, log-probs in float32, and
draws that follow the distribution."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coars_jax.sampling import GREEDY, SamplingParams
from coars_jax.sampling.distributions import filtered_logits, log_probs, sample

# Probabilities 0.5, 0.25, 0.125, 0.0625, 0.0625 in a shuffled order.
PROBS = np.asarray([0.0625, 0.5, 0.125, 0.0625, 0.25])
LOGITS = jnp.asarray(np.log(PROBS)[None], jnp.float32)


def _kept(params):
  return np.isfinite(np.asarray(filtered_logits(LOGITS, params)))[0].tolist()


def test_top_k_keeps_the_k_largest():
  assert _kept(SamplingParams(top_k=2)) == [False, True, False, False, True]
  assert _kept(SamplingParams(top_k=5)) == [True] * 5


@pytest.mark.parametrize(
  'top_p, kept',
  [
    (0.5, [False, True, False, False, False]),
    (0.6, [False, True, False, False, True]),
    (0.75, [False, True, False, False, True]),
    (0.8, [False, True, True, False, True]),
    (1e-6, [False, True, False, False, False]),
  ],
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
  assert _kept(SamplingParams(top_p=top_p)) == kept


def test_top_p_applies_to_the_top_k_renormalised_distribution():
  # Within the top 3 (0.5, 0.25, 0.125 renormalised to 4/7, 2/7, 1/7), p = 0.8 needs the first two only.
  assert _kept(SamplingParams(top_k=3, top_p=0.8)) == [False, True, False, False, True]


def test_log_probs_are_those_of_the_warped_distribution():
  scores = log_probs(LOGITS.astype(jnp.bfloat16), SamplingParams(temperature=0.5, top_k=3))
  chex.assert_type(scores, jnp.float32)
  kept = PROBS[[1, 2, 4]] ** 2  # temperature 0.5 squares the probabilities, then top-3 renormalises
  expected = np.full(5, -np.inf)
  expected[[1, 2, 4]] = np.log(kept / kept.sum())
  np.testing.assert_allclose(np.asarray(scores)[0], expected, rtol=2e-2)  # bf16 inputs
  np.testing.assert_allclose(np.asarray(log_probs(LOGITS, GREEDY))[0], np.log(PROBS), atol=1e-6)


def test_sample_follows_the_distribution_and_reports_its_log_prob():
  params = SamplingParams(temperature=1.0, top_k=3)
  logits = jnp.broadcast_to(LOGITS, (4000, 5))
  tokens, token_log_probs = jax.jit(sample, static_argnums=2)(jax.random.key(0), logits, params)
  chex.assert_type(tokens, jnp.int32)
  frequencies = np.bincount(np.asarray(tokens), minlength=5) / 4000
  np.testing.assert_allclose(frequencies, [0, 4 / 7, 1 / 7, 0, 2 / 7], atol=0.03)
  expected = np.log(np.asarray([0, 4 / 7, 1 / 7, 0, 2 / 7]) + 1e-30)[np.asarray(tokens)]
  np.testing.assert_allclose(np.asarray(token_log_probs), expected, atol=1e-5)


def test_greedy_takes_the_argmax_and_reports_model_log_probs():
  tokens, token_log_probs = sample(jax.random.key(0), LOGITS, GREEDY)
  assert tokens.tolist() == [1]
  np.testing.assert_allclose(np.asarray(token_log_probs), [np.log(0.5)], atol=1e-6)


def test_invalid_params_are_reported():
  with pytest.raises(ValueError, match='temperature: expected >= 0'):
    SamplingParams(temperature=-1.0)
  with pytest.raises(ValueError, match='top_k: expected None or a positive int'):
    SamplingParams(top_k=0)
  with pytest.raises(ValueError, match='top_p: expected in \\(0, 1\\]'):
    SamplingParams(top_p=0.0)
  with pytest.raises(ValueError, match='greedy decoding'):
    SamplingParams(temperature=0.0, top_k=5)
