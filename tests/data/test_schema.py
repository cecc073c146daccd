import numpy as np
import pytest

from coars_jax.data import describe, format_description
from coars_jax.data.schema import MAX_HISTORY, ItemCatalog, Window, WindowSplit
from coars_jax.data.synthetic import synthetic_dataset


def test_from_windows_pads_and_keeps_the_last_ten():
  windows = [Window(user=0, history=tuple(range(12)), target=12), Window(user=1, history=(), target=3)]
  split = WindowSplit.from_windows(windows, pad_id=99)
  assert split.history.shape == (2, MAX_HISTORY) and split.history.dtype == np.int32
  np.testing.assert_array_equal(split.history[0], np.arange(2, 12))
  np.testing.assert_array_equal(split.history[1], [99] * MAX_HISTORY)
  np.testing.assert_array_equal(split.lengths, [10, 0])
  assert split.window(0) == Window(user=0, history=tuple(range(2, 12)), target=12)
  assert split.window(1).history == ()


def test_shapes_are_checked():
  with pytest.raises(ValueError, match='history has shape'):
    WindowSplit(
      users=np.zeros(2, np.int32),
      history=np.zeros((2, 5), np.int32),
      lengths=np.zeros(2, np.int32),
      targets=np.zeros(2, np.int32),
    )


def test_catalog_and_interactions():
  catalog = ItemCatalog(('a', 'b'))
  assert len(catalog) == 2 and catalog.pad_id == 2 and catalog.title(1) == 'b'
  dataset = synthetic_dataset()
  window = dataset.split('test').window(0)
  known = dataset.interacted('test', 0)
  assert window.target in known and set(window.history) <= known
  with pytest.raises(KeyError, match="no split 'dev'"):
    dataset.split('dev')


def test_describe_counts():
  dataset = synthetic_dataset(num_users=10, num_items=30, sequence_length=5)
  stats = describe(dataset)
  assert stats['items'] == 30 and stats['train_windows'] == 8 * 4 and stats['test_windows'] == 1
  assert stats['users_with_windows'] == 10 and stats['interactions_known'] == 50
  assert 'train_windows' in format_description(stats)
