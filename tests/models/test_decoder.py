"""The decoder's forward pass: shapes and dtypes, cached prefill + decode equal to a full forward on a
padded batch, segment packing, and logical axis names on every parameter."""

import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coars_jax.models import AXIS_NAMES, Decoder, DecoderConfig, init_cache
from coars_jax.models.logical_axes import constrain

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = DecoderConfig(
  architecture='qwen3',
  vocab_size=80,
  embed_dim=48,
  mlp_dim=64,
  num_layers=2,
  num_heads=6,
  num_kv_heads=2,
  head_dim=8,
  qkv_bias=True,
  qk_norm=True,
  tie_word_embeddings=False,
)


# Jitted so each shape compiles once; eager mode would compile every primitive separately.
forward = nnx.jit(lambda model, *args: model(*args))


@pytest.fixture(scope='module')
def model():
  return Decoder(CONFIG, rngs=nnx.Rngs(0))


def _left_padded_batch(lengths, width, seed=0):
  rng = np.random.default_rng(seed)
  tokens = np.zeros((len(lengths), width), np.int32)
  segment_ids = np.zeros((len(lengths), width), np.int32)
  for row, length in enumerate(lengths):
    tokens[row, width - length :] = rng.integers(1, CONFIG.vocab_size, size=length)
    segment_ids[row, width - length :] = 1
  positions = np.maximum(np.cumsum(segment_ids, axis=1) - 1, 0).astype(np.int32)
  return tokens, positions, segment_ids


def test_forward_shapes_and_dtypes(model):
  tokens = jnp.zeros((3, 5), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (3, 5))
  logits, cache = forward(model, tokens, positions)
  chex.assert_shape(logits, (3, 5, CONFIG.vocab_size))
  chex.assert_type(logits, jnp.float32)
  assert cache is None
  hidden, _ = model.hidden_states(tokens, positions)
  chex.assert_shape(hidden, (3, 5, CONFIG.embed_dim))


def test_bfloat16_compute_dtype_gives_bfloat16_activations():
  config = CONFIG.replace(param_dtype='bfloat16', compute_dtype='bfloat16')
  model = Decoder(config, rngs=nnx.Rngs(0))
  chex.assert_type(model.layers[0].attention.q_proj.kernel[...], jnp.bfloat16)
  logits, _ = forward(model, jnp.ones((1, 4), jnp.int32), jnp.arange(4, dtype=jnp.int32)[None])
  chex.assert_type(logits, jnp.bfloat16)
  assert np.isfinite(np.asarray(logits, np.float32)).all()


def test_cached_prefill_and_decode_equal_full_forward_on_padded_batch(model):
  """Rows with prompts of 3, 7 and 5 tokens (left padded), then 4 decode steps one token at a time."""
  lengths, width, steps = [3, 7, 5], 7, 4
  prompt, positions, segment_ids = _left_padded_batch(lengths, width)
  continuation = np.random.default_rng(1).integers(1, CONFIG.vocab_size, size=(3, steps)).astype(np.int32)
  continuation_positions = positions[:, -1:] + 1 + np.arange(steps, dtype=np.int32)

  full_tokens = np.concatenate([prompt, continuation], axis=1)
  full_positions = np.concatenate([positions, continuation_positions], axis=1)
  full_segments = np.concatenate([segment_ids, np.ones((3, steps), np.int32)], axis=1)
  full_logits, _ = forward(model, jnp.asarray(full_tokens), jnp.asarray(full_positions), jnp.asarray(full_segments))

  cache = init_cache(CONFIG, batch=3, max_len=width + steps + 2)  # spare slots stay empty
  step_logits = []
  logits, cache = forward(model, jnp.asarray(prompt), jnp.asarray(positions), jnp.asarray(segment_ids), cache)
  step_logits.append(logits)
  for step in range(steps):
    logits, cache = forward(
      model,
      jnp.asarray(continuation[:, step : step + 1]),
      jnp.asarray(continuation_positions[:, step : step + 1]),
      jnp.ones((3, 1), jnp.int32),
      cache,
    )
    step_logits.append(logits)
  cached_logits = np.concatenate([np.asarray(x) for x in step_logits], axis=1)

  real = full_segments.astype(bool)  # logits at padding positions are meaningless in both
  np.testing.assert_allclose(cached_logits[real], np.asarray(full_logits)[real], atol=1e-5, rtol=0)
  assert int(cache.end_index) == width + steps
  np.testing.assert_array_equal(np.asarray(cache.segment_ids)[:, : width + steps], full_segments)
  assert not np.asarray(cache.segment_ids)[:, width + steps :].any()


@pytest.mark.parametrize('block_sparse_prefill', [True, False])
def test_a_prefill_in_blocks_then_a_reused_prefix_equal_the_full_forward(model, monkeypatch, block_sparse_prefill):
  """Prefill of left-padded prompts (40, 128 and 90 tokens in a 128 bucket, a 256-slot cache: key blocks of 128
  and query blocks of 64), then a second 64-token block through the same cache, as prefix reuse does: the logits
  of real tokens equal a full forward without a cache (the dense softmax), with the block-sparse prefill
  (`decoder.BLOCK_SPARSE_PREFILL`, the default) and without it. Float32 sums over at most 192 slots in another
  order: a few ulps of logits of order 1."""
  from coars_jax.models import decoder as decoder_lib

  monkeypatch.setattr(decoder_lib, 'BLOCK_SPARSE_PREFILL', block_sparse_prefill)
  monkeypatch.setattr(decoder_lib, 'BLOCK_SPARSE_PREFILL_LENGTH', 64)  # both passes here, at this small scale
  prompt, positions, segment_ids = _left_padded_batch([40, 128, 90], 128, seed=3)
  more = np.random.default_rng(4).integers(1, CONFIG.vocab_size, size=(3, 64)).astype(np.int32)
  more_positions = positions[:, -1:] + 1 + np.arange(64, dtype=np.int32)
  full_tokens = np.concatenate([prompt, more], axis=1)
  full_positions = np.concatenate([positions, more_positions], axis=1)
  full_segments = np.concatenate([segment_ids, np.ones((3, 64), np.int32)], axis=1)
  step = nnx.jit(lambda model, *args: model(*args))  # traced here, so under this test's flag
  full_logits, _ = step(model, jnp.asarray(full_tokens), jnp.asarray(full_positions), jnp.asarray(full_segments))
  cache = init_cache(CONFIG, batch=3, max_len=256)
  first, cache = step(model, jnp.asarray(prompt), jnp.asarray(positions), jnp.asarray(segment_ids), cache)
  second, cache = step(model, jnp.asarray(more), jnp.asarray(more_positions), jnp.ones((3, 64), jnp.int32), cache)
  cached = np.concatenate([np.asarray(first), np.asarray(second)], axis=1)
  real = full_segments.astype(bool)
  np.testing.assert_allclose(cached[real], np.asarray(full_logits)[real], atol=1e-5, rtol=1e-5)
  # The comparison is not vacuous: the logits are of order 1, far above the tolerance.
  assert np.abs(cached[real]).max() > 0.1


def test_padding_does_not_change_real_tokens(model):
  """A left-padded row scores its tokens exactly as the same row without padding."""
  prompt, positions, segment_ids = _left_padded_batch([4], 9)
  padded, _ = forward(model, jnp.asarray(prompt), jnp.asarray(positions), jnp.asarray(segment_ids))
  unpadded, _ = forward(model, jnp.asarray(prompt[:, -4:]), jnp.asarray(positions[:, -4:]))
  np.testing.assert_allclose(np.asarray(padded)[:, -4:], np.asarray(unpadded), atol=1e-5, rtol=0)
  assert np.isfinite(np.asarray(padded)).all()  # padding queries attend to nothing but stay finite


def test_segments_pack_independent_sequences(model):
  rng = np.random.default_rng(5)
  first, second = rng.integers(1, 80, size=(1, 4)), rng.integers(1, 80, size=(1, 3))
  packed_tokens = jnp.asarray(np.concatenate([first, second], axis=1), jnp.int32)
  packed_positions = jnp.asarray([[0, 1, 2, 3, 0, 1, 2]], jnp.int32)
  packed_segments = jnp.asarray([[1, 1, 1, 1, 2, 2, 2]], jnp.int32)
  packed, _ = forward(model, packed_tokens, packed_positions, packed_segments)
  alone, _ = forward(model, jnp.asarray(second, jnp.int32), jnp.arange(3, dtype=jnp.int32)[None])
  np.testing.assert_allclose(np.asarray(packed)[:, 4:], np.asarray(alone), atol=1e-5, rtol=0)


def test_forward_jits_with_donated_cache(model):
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, tokens, positions, cache):
    logits, cache = nnx.merge(graphdef, state)(tokens, positions, None, cache)
    return logits, cache

  cache = init_cache(CONFIG, batch=2, max_len=6)
  tokens = jnp.ones((2, 3), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(3, dtype=jnp.int32), (2, 3))
  logits, cache = step(state, tokens, positions, cache)
  eager, _ = model(tokens, positions, None, init_cache(CONFIG, batch=2, max_len=6))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(eager), atol=1e-5, rtol=0)
  assert int(cache.end_index) == 3


def test_cache_overflow_is_reported(model):
  cache = init_cache(CONFIG, batch=1, max_len=4)
  # Eager on purpose: the check needs a concrete end_index.
  _, cache = model(jnp.ones((1, 3), jnp.int32), jnp.arange(3, dtype=jnp.int32)[None], None, cache)
  with pytest.raises(ValueError, match='end_index 3 \\+ 2 new tokens exceeds max_len 4'):
    model(jnp.ones((1, 2), jnp.int32), jnp.arange(3, 5, dtype=jnp.int32)[None], None, cache)


def test_every_parameter_has_logical_axis_names(model):
  params = nnx.to_flat_state(nnx.state(model, nnx.Param))
  for path, variable in params:
    names = variable.get_metadata().get('out_sharding')
    assert names is not None and len(names) == variable.get_value().ndim, path
    assert set(names) <= set(AXIS_NAMES), (path, names)
  q_kernel = model.layers[0].attention.q_proj.kernel
  assert q_kernel.get_metadata()['out_sharding'] == ('embed', 'heads', 'head_dim')
  assert model.lm_head.kernel.get_metadata()['out_sharding'] == ('embed', 'vocab')


def test_constrain_is_identity_without_rules():
  x = jnp.arange(12.0).reshape(2, 6)
  assert constrain(x, ('batch', 'embed')) is x


_TWO_DEVICE_SCRIPT = """
import jax, jax.numpy as jnp
from flax import nnx
from coars_jax.models import Decoder, DecoderConfig
config = DecoderConfig(vocab_size=16, embed_dim=8, mlp_dim=12, num_layers=1, num_heads=2, num_kv_heads=2,
                       head_dim=4)
mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
with jax.set_mesh(mesh), nnx.logical_axis_rules([("vocab", "data"), ("mlp", "data")]):
    model = Decoder(config, rngs=nnx.Rngs(0))
    logits, _ = nnx.jit(lambda m, t, p: m(t, p))(model, jnp.ones((1, 3), jnp.int32),
                                                 jnp.arange(3, dtype=jnp.int32)[None])
print(model.token_embedding.embedding[...].sharding.spec)
print(model.layers[0].mlp.down_proj.kernel[...].sharding.spec)
print(model.layers[0].attention.q_proj.kernel[...].sharding.spec)
print(logits.shape)
"""


def test_parameters_are_placed_by_rules_on_two_fake_devices():
  """Rules name only vocab and mlp; every other axis stays replicated instead of failing."""
  environment = {
    **os.environ,
    'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
    'JAX_PLATFORMS': 'cpu',
    'PYTHONPATH': os.pathsep.join([REPO_ROOT, os.environ.get('PYTHONPATH', '')]),
  }
  result = subprocess.run(
    [sys.executable, '-c', _TWO_DEVICE_SCRIPT], env=environment, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert lines == ["P('data',)", "P('data',)", 'P()', '(1, 3, 16)'], lines


def test_a_decode_step_reads_live_slots_only_and_equals_full_attention():
  """The one-token decode attention over live blocks (`decoder._live_slot_attention`) equals the softmax over
  every slot for ragged left-padded rows, and a step whose dead blocks hold huge values is not affected by them
  (those blocks are never read)."""
  from coars_jax.models import decoder as decoder_lib

  rng = np.random.default_rng(0)
  batch, slots, kv_heads, groups, dim = 3, 640, 2, 3, 8  # blocks of DECODE_BLOCK = 64 slots
  queries = jnp.asarray(rng.normal(size=(batch, 1, kv_heads, groups, dim)), jnp.float32)
  keys = np.asarray(rng.normal(size=(batch, slots, kv_heads, dim)), np.float32)
  values = np.asarray(rng.normal(size=(batch, slots, kv_heads, dim)), np.float32)
  mask = np.zeros((batch, 1, slots), bool)
  for row, first in enumerate((140, 200, 300)):
    mask[row, 0, first:380] = True
  # The current token is at slot 379: blocks 2-5 (slots 128-383) are read (row 2 has nothing in blocks 2-3, so its
  # running sums start from fully masked blocks), blocks 0-1 lie before every row's first live slot and blocks 6-9
  # after the current token. Those are never read, so NaN there must not reach the output.
  keys[:, :128], values[:, :128] = np.nan, np.nan
  keys[:, 384:], values[:, 384:] = np.nan, np.nan
  assert decoder_lib.DECODE_BLOCK == 64
  keys_hm, values_hm = (jnp.asarray(array.transpose(0, 2, 1, 3)) for array in (keys, values))  # the cache's layout
  out = decoder_lib._live_slot_attention(queries, keys_hm, values_hm, jnp.asarray(mask), jnp.asarray(379))
  safe_keys, safe_values = np.nan_to_num(keys), np.nan_to_num(values)
  scores = np.einsum('blkgd,bskd->bkgls', queries, safe_keys) * dim**-0.5
  scores = np.where(mask[:, None, None], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  expected = np.einsum('bkgls,bskd->blkgd', probs, safe_values)
  chex.assert_shape(out, (batch, 1, kv_heads, groups, dim))
  # float32 softmax over at most 240 terms, summed in two blocks instead of at once: a few ulps of values of order 1.
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=1e-5)
