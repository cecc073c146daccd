import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from coars_jax.data import candidates, lastfm
from coars_jax.data.synthetic import synthetic_dataset
from tests.conftest import require_files

SYNTHETIC = synthetic_dataset(num_users=40, num_items=60)


def _check_invariants(dataset, split, index, seed):
  cands = candidates.candidate_list(dataset, split, index, seed)
  window = dataset.split(split).window(index)
  assert cands.shape == (candidates.NUM_CANDIDATES,) and cands.dtype == np.int32
  assert int(np.sum(cands == window.target)) == 1
  assert not set(window.history) & set(cands.tolist())
  assert not (dataset.interacted(split, index) - {window.target}) & set(cands.tolist())
  assert len(set(cands.tolist())) == len(cands)
  assert np.array_equal(cands, candidates.candidate_list(dataset, split, index, seed))
  return cands


@settings(max_examples=60, deadline=None)
@given(split=st.sampled_from(['train', 'val', 'test']), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_invariants_on_synthetic(split, data, seed):
  index = data.draw(st.integers(0, len(SYNTHETIC.split(split)) - 1))
  _check_invariants(SYNTHETIC, split, index, seed)


@pytest.fixture(scope='module')
def lastfm_dataset():
  root = require_files(lastfm.ITEM_FILE, *lastfm.SPLIT_FILES.values(), lastfm.STATS_FILE)
  return lastfm.load(root, allow_download=False)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_invariants_on_lastfm(lastfm_dataset, data, seed):
  split = data.draw(st.sampled_from(['train', 'test']))
  index = data.draw(st.integers(0, len(lastfm_dataset.split(split)) - 1))
  _check_invariants(lastfm_dataset, split, index, seed)


def test_lists_differ_across_seeds_and_windows_and_are_pinned():
  a = candidates.candidate_list(SYNTHETIC, 'test', 0, seed=0)
  assert not np.array_equal(a, candidates.candidate_list(SYNTHETIC, 'test', 0, seed=1))
  assert not np.array_equal(a, candidates.candidate_list(SYNTHETIC, 'test', 1, seed=0))
  # The stream is a pure function of its inputs: this exact list must not change across versions/machines.
  assert (
    candidates.window_rng('lastfm', 'test', 0, 0).integers(0, 4606, size=4).tolist()
    == np.random.default_rng(
      np.random.SeedSequence(
        0, spawn_key=[__import__('zlib').crc32(b'lastfm'), 2, 0, __import__('zlib').crc32(b'candidates')]
      )
    )
    .integers(0, 4606, size=4)
    .tolist()
  )


def test_candidate_matrix_points_at_targets():
  cands, target_index = candidates.candidate_matrix(SYNTHETIC, 'val', seed=3)
  targets = SYNTHETIC.split('val').targets
  assert cands.shape == (len(targets), candidates.NUM_CANDIDATES)
  np.testing.assert_array_equal(cands[np.arange(len(targets)), target_index], targets)
  # Shuffled: the target is not always in the same column.
  assert len(set(target_index.tolist())) > 1


def test_sample_negatives_refuses_impossible_requests():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match='cannot draw 5'):
    candidates.sample_negatives(rng, 6, {0, 1, 2}, 5)
