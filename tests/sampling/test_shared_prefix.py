"""`generate_shared_prefix` and the cascade attention under it: prompts that share a prefix per group, the prefix
prefilled once and read once per group, against `generate` on the whole prompts."""

import jax.numpy as jnp
import numpy as np
import pytest

from coars_jax.models import init_cache
from coars_jax.models.shared_prefix_attention import SharedPrefixKV
from coars_jax.sampling import GREEDY, LengthBuckets, SamplingParams, generate
from coars_jax.sampling.shared_prefix import generate_shared_prefix
from tests.sampling.conftest import VOCAB

BUCKETS = LengthBuckets(prompt=(8, 16, 64, 128), completion=(8,))


def _groups(rng, prefix_lengths, per_group, suffix_lengths):
  prefixes = [rng.integers(4, VOCAB, size=n).tolist() for n in prefix_lengths]
  suffixes = [rng.integers(4, VOCAB, size=int(n)).tolist() for n in suffix_lengths]
  assert len(suffixes) == per_group * len(prefixes)
  return prefixes, suffixes


def test_hidden_states_with_a_shared_prefix_equal_the_whole_prompts(model):
  """The decoder's states of each row's suffix, attending to its group's prefix (held once) and its own cache,
  equal those of the whole prompt prefilled into one cache, to float rounding; a row attending to the other
  group's prefix does not."""
  rng = np.random.default_rng(0)
  prefixes, suffixes = _groups(rng, (50, 37), 2, (5, 9, 3, 7))
  whole = [prefixes[b // 2] + s for b, s in enumerate(suffixes)]
  width = 64
  tokens = np.zeros((4, width), np.int32)
  mask = np.zeros((4, width), np.int32)
  for b, ids in enumerate(whole):
    tokens[b, width - len(ids) :], mask[b, width - len(ids) :] = ids, 1
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  expected, _ = model.hidden_states(
    jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask), init_cache(model.config, 4, width)
  )
  expected = np.asarray(expected)

  def run(order):
    p_tokens = np.zeros((2, 64), np.int32)
    p_mask = np.zeros((2, 64), np.int32)
    for g, ids in enumerate(prefixes[i] for i in order):
      p_tokens[g, 64 - len(ids) :], p_mask[g, 64 - len(ids) :] = ids, 1
    _, cache = model.hidden_states(
      jnp.asarray(p_tokens),
      jnp.asarray(np.maximum(np.cumsum(p_mask, 1) - 1, 0)),
      jnp.asarray(p_mask),
      init_cache(model.config, 2, 64),
    )
    shared = SharedPrefixKV(cache.keys, cache.values, cache.segment_ids)
    s_tokens = np.zeros((4, 16), np.int32)
    s_mask = np.zeros((4, 16), np.int32)
    for b, ids in enumerate(suffixes):
      s_tokens[b, 16 - len(ids) :], s_mask[b, 16 - len(ids) :] = ids, 1
    s_positions = np.repeat(np.asarray([len(p) for p in prefixes]), 2)[:, None] + np.maximum(
      np.cumsum(s_mask, 1) - 1, 0
    )
    hidden, _ = model.hidden_states(
      jnp.asarray(s_tokens),
      jnp.asarray(s_positions),
      jnp.asarray(s_mask),
      init_cache(model.config, 4, 24),
      shared=shared,
    )
    return np.asarray(hidden)

  got = run((0, 1))
  for b, suffix in enumerate(suffixes):
    n = len(suffix)
    scale = np.abs(expected[b, -n:]).max()
    np.testing.assert_allclose(got[b, -n:], expected[b, -n:], atol=1e-5 * scale, rtol=0)
  swapped = run((1, 0))  # each row reads the other group's prefix (positions unchanged): must differ
  assert np.abs(swapped[0, -5:] - expected[0, -5:]).max() > 1e-2 * np.abs(expected[0, -5:]).max()


@pytest.mark.parametrize('params', [GREEDY, SamplingParams(temperature=1.0)], ids=['greedy', 'sampled'])
def test_generation_with_a_shared_prefix_equals_generate_on_the_whole_prompts(model, params):
  """Three groups of two rows with prefixes of different lengths: the same tokens as `generate` on prefix +
  suffix (greedy, and sampled with the same seed, since both draw from the same logits), log-probs within float
  rounding, and a row that ends early stops as it does there."""
  rng = np.random.default_rng(1)
  prefixes, suffixes = _groups(rng, (100, 61, 90), 2, (3, 12, 1, 6, 8, 2))
  whole = [prefixes[b // 2] + s for b, s in enumerate(suffixes)]
  run = dict(max_new_tokens=7, params=params, buckets=BUCKETS, seed=3)
  expected = generate(model, whole, **run)
  got = generate_shared_prefix(model, prefixes, suffixes, **run)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(expected.tokens))
  np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(expected.lengths))
  np.testing.assert_allclose(np.asarray(got.log_probs), np.asarray(expected.log_probs), atol=1e-4)
  assert got.cache is None and got.prompt_mask.shape == (6, 16)


def test_generate_shared_prefix_refuses_ragged_groups_and_empty_suffixes(model):
  run = dict(max_new_tokens=4, params=GREEDY, buckets=BUCKETS)
  with pytest.raises(ValueError, match='groups of equal size'):
    generate_shared_prefix(model, [[5, 6], [7, 8]], [[9], [10], [11]], **run)
  with pytest.raises(ValueError, match='suffix 1 is empty'):
    generate_shared_prefix(model, [[5, 6]], [[9], []], **run)
