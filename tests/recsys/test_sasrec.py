import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coars_jax.recsys.sasrec import SASRec, SASRecConfig, right_align

PAD = 30


@pytest.fixture
def model():
  return SASRec(SASRecConfig(num_items=PAD, hidden=16, num_heads=2, dropout=0.5), rngs=nnx.Rngs(0))


def _batch():
  history = np.full((3, 10), PAD, np.int32)
  history[0, :3] = [1, 2, 3]
  history[1, :] = np.arange(10)
  history[2, :1] = [7]
  return history, np.array([3, 10, 1], np.int32)


def test_right_align():
  history, lengths = _batch()
  tokens, valid = right_align(jnp.asarray(history), jnp.asarray(lengths), PAD)
  np.testing.assert_array_equal(tokens[0], [PAD] * 7 + [1, 2, 3])
  np.testing.assert_array_equal(tokens[1], np.arange(10))
  np.testing.assert_array_equal(valid.sum(axis=1), lengths)


def test_shapes_and_dtypes(model):
  history, lengths = _batch()
  logits = model(history, lengths)
  chex.assert_shape(logits, (3, PAD))
  chex.assert_type(logits, jnp.float32)
  chex.assert_tree_all_finite(logits)
  chex.assert_shape(model.encode(history, lengths), (3, 16))


def test_padding_content_does_not_matter(model):
  history, lengths = _batch()
  other = history.copy()
  other[0, 3:] = 5  # garbage beyond the real length
  np.testing.assert_allclose(model(history, lengths), model(other, lengths), atol=1e-6)


def test_older_items_matter_and_dropout_is_train_only(model):
  history, lengths = _batch()
  changed = history.copy()
  changed[0, 0] = 9
  assert not np.allclose(model(history, lengths)[0], model(changed, lengths)[0])
  np.testing.assert_array_equal(model(history, lengths), model(history, lengths))
  assert not np.allclose(model(history, lengths, jax.random.key(0)), model(history, lengths))


def test_config_validation():
  with pytest.raises(ValueError, match='num_heads'):
    SASRecConfig(num_items=10, hidden=10, num_heads=3)
  with pytest.raises(ValueError, match='dropout'):
    SASRecConfig(num_items=10, dropout=1.0)
