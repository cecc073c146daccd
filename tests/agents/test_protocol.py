import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from coars_jax.agents import protocol


@pytest.mark.parametrize(
  'score, action',
  [
    (0.0, 'dislike'),
    (0.2499, 'dislike'),
    (0.25, 'skip'),
    (0.4999, 'skip'),
    (0.5, 'star'),
    (0.7499, 'star'),
    (0.75, 'click'),
    (1.0, 'click'),
  ],
)
def test_action_for_score_follows_the_intervals(score, action):
  assert protocol.action_for_score(score) == action


@pytest.mark.parametrize('score', [-0.01, 1.01, math.nan, math.inf])
def test_action_for_score_refuses_scores_outside_the_unit_interval(score):
  with pytest.raises(ValueError, match='acceptance score must be a finite number in'):
    protocol.action_for_score(score)


def test_midpoints():
  assert [protocol.interval_midpoint(a) for a in protocol.ACTIONS] == [0.125, 0.375, 0.625, 0.875]


@settings(max_examples=200, deadline=None)
@given(action=st.sampled_from(protocol.ACTIONS), score=st.floats(0.0, 1.0))
def test_clipping_lands_inside_the_interval_in_float64_and_float32(action, score):
  clipped = protocol.clip_to_action(action, score)
  assert protocol.in_interval(action, clipped)
  assert protocol.in_interval(action, float(np.float32(clipped)))
  if protocol.in_interval(action, score):
    assert clipped == score


def test_clipping_to_a_half_open_interval_stops_below_its_end():
  clipped = protocol.clip_to_action('skip', 0.9)
  assert clipped < 0.5 and np.float32(clipped) < np.float32(0.5)
  # The next float32 up is the interval's end, so nothing closer to it is representable in float32.
  assert np.nextafter(np.float32(clipped), np.float32(1)) == np.float32(0.5)
  assert protocol.clip_to_action('click', 0.1) == 0.75 and protocol.clip_to_action('click', 1.0) == 1.0


@settings(max_examples=300, deadline=None)
@given(score=st.floats(0.0, 1.0))
def test_format_score_is_positional_and_exact(score):
  text = protocol.format_score(score)
  assert 'e' not in text.lower() and float(text) == score


def test_single_line_and_titles():
  assert protocol.single_line('  a\n\tb\u2028c  ') == 'a b c'
  assert protocol.is_single_line_title('Royce da 5\'9"')
  assert protocol.is_single_line_title('Cable -  Straight')  # inner double spaces are part of a title
  for bad in ('', ' Muse', 'Muse ', 'a\nb', 'a\x85b', 'a\u2028b'):
    assert not protocol.is_single_line_title(bad)


def test_check_score_for_action_names_the_field():
  with pytest.raises(ValueError, match=r"my_field must be a finite number in 'star'"):
    protocol.check_score_for_action('star', 0.9, 'my_field')
  with pytest.raises(ValueError, match='action must be one of'):
    protocol.check_score_for_action('love', 0.9)
  assert protocol.check_score_for_action('star', np.float32(0.5)) == 0.5
