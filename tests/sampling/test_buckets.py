"""Length buckets and the padding helpers."""

import numpy as np
import pytest

from coars_jax.sampling import LengthBuckets, bucket_length, left_pad, right_pad
from coars_jax.sampling.buckets import check_left_padded, check_right_padded, repad_left, repad_right


def test_bucket_length_picks_the_smallest_that_fits():
  assert [bucket_length(n, (4, 8, 16)) for n in (1, 4, 5, 8, 16)] == [4, 4, 8, 8, 16]
  with pytest.raises(ValueError, match='17 tokens exceed the largest bucket 16'):
    bucket_length(17, (4, 8, 16), 'LengthBuckets.prompt')
  buckets = LengthBuckets(prompt=(8, 32), completion=(4,))
  assert buckets.prompt_length(9) == 32 and buckets.completion_length(3) == 4


@pytest.mark.parametrize('sizes', [(), (8, 8), (16, 8), (0, 4), [4, 8]])
def test_invalid_buckets_are_reported(sizes):
  with pytest.raises(ValueError, match='LengthBuckets.prompt'):
    LengthBuckets(prompt=sizes)


def test_left_and_right_padding():
  tokens, mask = left_pad([[1, 2], [3, 4, 5]], 4, pad_token_id=9)
  np.testing.assert_array_equal(tokens, [[9, 9, 1, 2], [9, 3, 4, 5]])
  np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 1, 1, 1]])
  tokens, mask = right_pad([[1, 2], []], 3, pad_token_id=9)
  np.testing.assert_array_equal(tokens, [[1, 2, 9], [9, 9, 9]])
  np.testing.assert_array_equal(mask, [[1, 1, 0], [0, 0, 0]])
  with pytest.raises(ValueError, match='3 tokens does not fit length 2'):
    left_pad([[1, 2, 3]], 2, pad_token_id=0)


def test_repadding_widens_on_the_padding_side():
  tokens, mask = repad_left(np.asarray([[0, 7]]), np.asarray([[0, 1]]), 4, pad_token_id=0)
  np.testing.assert_array_equal(tokens, [[0, 0, 0, 7]])
  np.testing.assert_array_equal(mask, [[0, 0, 0, 1]])
  tokens, mask = repad_right(np.asarray([[7, 0]]), np.asarray([[1, 0]]), 3, pad_token_id=5)
  np.testing.assert_array_equal(tokens, [[7, 0, 5]])
  np.testing.assert_array_equal(mask, [[1, 0, 0]])


def test_padding_side_checks():
  check_left_padded(np.asarray([[0, 1, 1], [1, 1, 1]]), 'x')
  with pytest.raises(ValueError, match='x: row 1 is not left-padded'):
    check_left_padded(np.asarray([[0, 1, 1], [1, 0, 1]]), 'x')
  with pytest.raises(ValueError, match='x: row 0 has no real tokens'):
    check_left_padded(np.asarray([[0, 0]]), 'x')
  check_right_padded(np.asarray([[1, 1, 0], [0, 0, 0]]), 'y')
  with pytest.raises(ValueError, match='y: row 0 is not right-padded'):
    check_right_padded(np.asarray([[0, 1, 0]]), 'y')
