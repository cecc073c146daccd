"""`models.block_attention`: the block-sparse attention of the packed teacher rows equals the dense softmax, reads
only the key blocks its mask needs, and refuses to be differentiated."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coars_jax.models import block_attention


def _dense(queries, keys, values, mask):
  """The dense softmax attention in float64 numpy: grouped [B, L, K, G, D], keys/values [B, S, K, D]."""
  queries, keys, values = (np.asarray(a, np.float64) for a in (queries, keys, values))
  scores = np.einsum('blkgd,bskd->bkgls', queries, keys) * queries.shape[-1] ** -0.5
  scores = np.where(mask[:, None, None], scores, -np.inf)
  with np.errstate(invalid='ignore'):  # a query with nothing to read: NaN here, compared nowhere
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
  return np.einsum('bkgls,bskd->blkgd', probs, values)


def _teacher_like_mask(rng, batch, length, student):
  """[B, L, student + L]: each query segment of the teacher part reads a prefix [0, end) of the student slots and
  its own segment causally (the packed teacher layout); the row's tail is padding that reads nothing."""
  mask = np.zeros((batch, length, student + length), bool)
  for row in range(batch):
    start = 0
    while start < length - 40:
      size = int(rng.integers(20, 90))
      end = int(rng.integers(1, student + 1))
      stop = min(start + size, length - 40)
      for query in range(start, stop):
        mask[row, query, :end] = True
        mask[row, query, student + start : student + query + 1] = True
      start = stop
  return mask


@pytest.mark.parametrize('block', [16, 32, 64])
def test_block_sparse_attention_equals_the_dense_softmax(block):
  rng = np.random.default_rng(block)
  batch, length, student, kv_heads, groups, dim = 2, 192, 128, 2, 3, 8
  slots = student + length
  queries = rng.normal(size=(batch, length, kv_heads, groups, dim)).astype(np.float32)
  keys = rng.normal(size=(batch, slots, kv_heads, dim)).astype(np.float32)
  values = rng.normal(size=(batch, slots, kv_heads, dim)).astype(np.float32)
  mask = _teacher_like_mask(rng, batch, length, student)
  out = block_attention.block_sparse_attention(
    jnp.asarray(queries), jnp.asarray(keys), jnp.asarray(values), jnp.asarray(mask), block=block
  )
  chex.assert_shape(out, (batch, length, kv_heads, groups, dim))
  real = mask.any(-1)  # queries with nothing to read give garbage in both, as documented
  expected = _dense(queries, keys, values, mask)
  real &= mask[:, np.arange(length), student + np.arange(length)]  # and, for the wrong-mask check, reads itself
  # float32 online softmax over at most 320 terms of order-1 values against a float64 reference: the sums
  # differ in order and precision only, a few float32 ulps of values of order 1.
  np.testing.assert_allclose(np.asarray(out)[real], expected[real], atol=2e-5, rtol=2e-5)
  assert np.isfinite(np.asarray(out)).all()
  # A wrong mask (every query missing its own slot) would be caught at this tolerance.
  wrong = mask.copy()
  wrong[:, np.arange(length), student + np.arange(length)] = False
  assert np.abs(_dense(queries, keys, values, wrong)[real] - expected[real]).max() > 1e-3


def test_blocks_the_mask_does_not_need_are_never_read():
  """Keys and values of key blocks no query of a block reads are NaN, and the output stays finite and equal."""
  rng = np.random.default_rng(1)
  batch, length, slots, dim = 1, 64, 128, 4
  queries = rng.normal(size=(batch, length, 1, 2, dim)).astype(np.float32)
  keys = rng.normal(size=(batch, slots, 1, dim)).astype(np.float32)
  values = rng.normal(size=(batch, slots, 1, dim)).astype(np.float32)
  mask = np.zeros((batch, length, slots), bool)
  mask[:, :, 32:48] = True  # key block 1 of 16-slot blocks (slots 16-31 and 48+ are never needed)
  mask[:, 32:, 96:112] = True  # the second half of the queries also reads key block 6
  poisoned_keys, poisoned_values = keys.copy(), values.copy()
  for lo, hi in ((0, 32), (48, 96), (112, 128)):
    poisoned_keys[:, lo:hi], poisoned_values[:, lo:hi] = np.nan, np.nan
  out = block_attention.block_sparse_attention(
    jnp.asarray(queries), jnp.asarray(poisoned_keys), jnp.asarray(poisoned_values), jnp.asarray(mask), block=16
  )
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_allclose(np.asarray(out), _dense(queries, keys, values, mask), atol=2e-5, rtol=2e-5)


def test_block_sparse_attention_is_forward_only():
  rng = np.random.default_rng(2)
  queries = jnp.asarray(rng.normal(size=(1, 32, 1, 1, 4)), jnp.float32)
  keys = values = jnp.asarray(rng.normal(size=(1, 32, 1, 4)), jnp.float32)
  mask = jnp.tril(jnp.ones((32, 32), bool))[None]

  def total(q):
    return block_attention.block_sparse_attention(q, keys, values, mask, block=8).sum()

  with pytest.raises(ValueError, match='[Rr]everse-mode'):
    jax.grad(total)(queries)
  # Under stop-gradient (the teacher's case) no tangent reaches the loop, so differentiating around it works.
  assert jax.grad(lambda q: total(jax.lax.stop_gradient(q)) + q.sum())(queries).shape == queries.shape


def test_a_block_that_does_not_divide_the_lengths_is_refused():
  grouped = jnp.zeros((1, 24, 1, 1, 4))
  keys = jnp.zeros((1, 24, 1, 4))
  with pytest.raises(ValueError, match='must divide'):
    block_attention.block_sparse_attention(grouped, keys, keys, jnp.ones((1, 24, 24), bool), block=16)
