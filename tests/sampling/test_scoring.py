"""`score` / `completion_log_probs`: equal to log-softmax of a plain forward pass, unchanged by chunking and
bucket padding, equal to the sampler's own log-probs on the tokens it sampled, and passing model keywords."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coars_jax.sampling import (
  GREEDY,
  LengthBuckets,
  SamplingParams,
  completion_log_probs,
  generate,
  left_pad,
  right_pad,
  score,
)
from tests.sampling.conftest import PAD
from tests.sampling.test_sampler import _ShiftedLogits

BUCKETS = LengthBuckets(prompt=(4, 8), completion=(4, 8))
CONTEXTS = [[5, 9, 14], [7, 1, 22, 40, 11, 8]]
COMPLETIONS = [[20, 21, 22, 23, 24], [30, 31]]


def _padded():
  context_tokens, context_mask = left_pad(CONTEXTS, 6, PAD)
  completion_tokens, completion_mask = right_pad(COMPLETIONS, 5, PAD)
  return context_tokens, context_mask, completion_tokens, completion_mask


def _reference(model, context, completion):
  """log_softmax of one unpadded forward pass over context + completion, read at the completion."""
  sequence = jnp.asarray([context + completion], jnp.int32)
  logits, _ = nnx.jit(lambda model, *args: model(*args))(
    model, sequence, jnp.arange(sequence.shape[1], dtype=jnp.int32)[None]
  )
  scores = jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)
  return np.asarray([scores[len(context) - 1 + j, token] for j, token in enumerate(completion)])


def test_score_equals_log_softmax_of_a_plain_forward_pass(model):
  scores = score(model, *_padded())
  chex.assert_shape(scores, (2, 5))
  chex.assert_type(scores, jnp.float32)
  for row in range(2):
    np.testing.assert_allclose(
      np.asarray(scores)[row, : len(COMPLETIONS[row])], _reference(model, CONTEXTS[row], COMPLETIONS[row]), atol=1e-5
    )
  np.testing.assert_array_equal(np.asarray(scores)[1, 2:], 0.0)


def test_chunking_and_buckets_do_not_change_scores(model):
  whole = np.asarray(score(model, *_padded(), chunk_size=None))
  chunked = np.asarray(score(model, *_padded(), chunk_size=2))  # 5 positions in chunks of 2, one padded
  np.testing.assert_allclose(chunked, whole, atol=1e-6)
  bucketed = np.asarray(score(model, *_padded(), buckets=BUCKETS))
  assert bucketed.shape == (2, 8)
  np.testing.assert_allclose(bucketed[:, :5], whole, atol=1e-5)
  np.testing.assert_array_equal(bucketed[:, 5:], 0.0)


def test_completion_log_probs_is_differentiable(model):
  context_tokens, context_mask, completion_tokens, completion_mask = map(jnp.asarray, _padded())

  def total(model):
    return completion_log_probs(
      model, context_tokens, context_mask, completion_tokens, completion_mask, chunk_size=2
    ).sum()

  grads = nnx.jit(nnx.grad(total))(model)
  kernel_grad = grads.layers[0].attention.q_proj.kernel[...]
  assert np.isfinite(np.asarray(kernel_grad)).all() and np.abs(np.asarray(kernel_grad)).max() > 0


@pytest.mark.parametrize(
  'params',
  [GREEDY, SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=20, top_p=0.9)],
  ids=['greedy', 'temperature_1', 'temperature_0.7_top_k_top_p'],
)
def test_sampler_log_probs_equal_scorer_log_probs(model, params):
  prompts = [[5, 9, 14], [7, 1, 22, 40, 11, 8, 30], [12, 13, 44, 2, 9]]
  out = generate(model, prompts, max_new_tokens=8, params=params, buckets=BUCKETS, eos_token_ids=(), seed=4)
  scored = score(model, out.prompt_tokens, out.prompt_mask, out.tokens, out.mask, params=params)
  np.testing.assert_allclose(np.asarray(scored), np.asarray(out.log_probs), atol=1e-4)
  if params.temperature == 0.7:
    # The reported log-probs are not the model's own: the warping must show in them.
    plain = np.asarray(score(model, out.prompt_tokens, out.prompt_mask, out.tokens, out.mask))
    assert np.abs(plain - np.asarray(out.log_probs)).max() > 0.1


def test_model_keywords_reach_the_scoring_pass(model):
  wrapped = _ShiftedLogits(model, token=17)
  context_tokens, context_mask, _, _ = _padded()
  completion = np.full((2, 3), 17, np.int32)
  plain = np.asarray(score(wrapped, context_tokens, context_mask, completion, np.ones_like(completion)))
  boosted = np.asarray(
    score(
      wrapped, context_tokens, context_mask, completion, np.ones_like(completion), boost='on', amount=jnp.asarray(100.0)
    )
  )
  assert (plain < -1.0).all()
  np.testing.assert_allclose(boosted, 0.0, atol=1e-3)


def test_bad_padding_is_reported(model):
  context_tokens, context_mask, completion_tokens, completion_mask = _padded()
  with pytest.raises(ValueError, match='score: context_mask: row 0 is not left-padded'):
    score(model, context_tokens, context_mask[:, ::-1], completion_tokens, completion_mask)
  with pytest.raises(ValueError, match='score: completion_mask: row 1 is not right-padded'):
    score(model, context_tokens, context_mask, completion_tokens, completion_mask[:, ::-1])
  with pytest.raises(ValueError, match='completion_mask has shape'):
    score(model, context_tokens, context_mask, completion_tokens, completion_mask[:, :2])
