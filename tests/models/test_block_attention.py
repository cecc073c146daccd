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


def _dense_jax(queries, keys, values, mask):
  """The dense softmax in JAX (differentiable), 0 for a query that reads nothing, as the block-sparse one."""
  scores = jnp.einsum('blkgd,bskd->bkgls', queries, keys) * queries.shape[-1] ** -0.5
  scores = jnp.where(mask[:, None, None], scores, -1e30)
  out = jnp.einsum('bkgls,bskd->blkgd', jax.nn.softmax(scores, axis=-1), values)
  return jnp.where(mask.any(-1)[:, :, None, None, None], out, 0.0)


@pytest.mark.parametrize('block', [16, 32])
def test_the_gradient_equals_the_dense_softmax_gradient(block):
  """The custom VJP (FlashAttention's backward over the needed blocks) against autodiff of the dense softmax, for
  the queries, keys and values, under a causal mask of two packed sequences with padding (the student's rows)."""
  rng = np.random.default_rng(3 + block)
  batch, length, kv_heads, groups, dim = 2, 96, 2, 2, 8
  queries, keys, values = (
    jnp.asarray(rng.normal(size=shape), jnp.float32)
    for shape in (
      (batch, length, kv_heads, groups, dim),
      (batch, length, kv_heads, dim),
      (batch, length, kv_heads, dim),
    )
  )
  segments = np.zeros((batch, length), np.int32)
  segments[0, :40], segments[0, 40:90] = 1, 2
  segments[1, :70] = 1
  slots = np.arange(length)
  mask = jnp.asarray(
    (slots[None, None, :] <= slots[None, :, None])
    & (segments[:, :, None] == segments[:, None, :])
    & (segments[:, None, :] != 0)
  )
  weights = jnp.asarray(rng.normal(size=(batch, length, kv_heads, groups, dim)), jnp.float32)

  def loss(attention):
    return lambda q, k, v: jnp.sum(attention(q, k, v) * weights)

  sparse = jax.grad(loss(lambda q, k, v: block_attention.block_sparse_attention(q, k, v, mask, block=block)), (0, 1, 2))
  dense = jax.grad(loss(lambda q, k, v: _dense_jax(q, k, v, mask)), (0, 1, 2))
  np.testing.assert_allclose(
    np.asarray(block_attention.block_sparse_attention(queries, keys, values, mask, block=block)),
    np.asarray(_dense_jax(queries, keys, values, mask)),
    atol=2e-5,
    rtol=2e-5,
  )
  for name, got, want in zip('qkv', sparse(queries, keys, values), dense(queries, keys, values)):
    got, want = np.asarray(got), np.asarray(want)
    # Both are float32 sums of at most 90 order-1 terms per element, in different orders: judged against the
    # gradient's own scale, a few ulps of accumulated rounding.
    error = np.abs(got - want).max() / np.abs(want).max()
    assert error < 1e-5, (name, error)
  # An error of the kind a masking bug makes (each query reading one slot less) is far outside that bound.
  wrong_mask = mask & ~jnp.eye(length, dtype=bool)[None] | ~mask.any(-1, keepdims=True)
  wrong = jax.grad(loss(lambda q, k, v: _dense_jax(q, k, v, wrong_mask)), (0, 1, 2))(queries, keys, values)
  want = np.asarray(dense(queries, keys, values)[0])
  assert np.abs(np.asarray(wrong[0]) - want).max() / np.abs(want).max() > 1e-2


def test_a_block_that_does_not_divide_the_lengths_is_refused():
  grouped = jnp.zeros((1, 24, 1, 1, 4))
  keys = jnp.zeros((1, 24, 1, 4))
  with pytest.raises(ValueError, match='must divide'):
    block_attention.block_sparse_attention(grouped, keys, keys, jnp.ones((1, 24, 24), bool), block=16)
