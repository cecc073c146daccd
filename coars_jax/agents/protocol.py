"""The vocabulary both agents and the parser share: the user's four actions with their acceptance-score intervals
(METHOD.md section 2), the line labels of the output formats, and the canonical single-line form of free text.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

# The two agents, by name; the index of each is its id in per-segment arrays (`Trajectory.agent`) and adapter
# tables. The one definition: every module that names the agents imports these.
RECOMMENDER, USER = 'recommender', 'user'
AGENTS = (RECOMMENDER, USER)

# Ordered from worst to best, so an action's index is also the rank of its score interval.
ACTIONS = ('dislike', 'skip', 'star', 'click')
# Half-open [low, high) except click, whose interval [.75, 1] includes 1 (METHOD.md section 2).
ACTION_INTERVALS = {'dislike': (0.0, 0.25), 'skip': (0.25, 0.5), 'star': (0.5, 0.75), 'click': (0.75, 1.0)}
# Actions that accept the recommendation: an episode stops on click, and the F1 protocol counts click and star
# as positive.
POSITIVE_ACTIONS = frozenset({'star', 'click'})

REASON_LABEL, ITEM_LABEL, ACTION_LABEL, SCORE_LABEL = 'Reason', 'Item', 'Action', 'Score'
LABELS = (REASON_LABEL, ITEM_LABEL, ACTION_LABEL, SCORE_LABEL)


def check_action(action: str, field: str = 'action') -> None:
  if action not in ACTION_INTERVALS:
    raise ValueError(f'{field} must be one of {ACTIONS}, found {action!r}')


def check_score_for_action(action: str, score, field: str = 'score') -> float:
  """`score` as a float after checking it is a finite real number inside `action`'s interval."""
  check_action(action)
  if not (
    isinstance(score, numbers.Real)
    and not isinstance(score, bool)
    and math.isfinite(score)
    and in_interval(action, float(score))
  ):
    raise ValueError(
      f"{field} must be a finite number in {action!r}'s interval {ACTION_INTERVALS[action]}, found {score!r}"
    )
  return float(score)


def in_interval(action: str, score: float) -> bool:
  """Whether `score` lies in `action`'s interval (click's includes 1.0; the others exclude their upper end)."""
  low, high = ACTION_INTERVALS[action]
  return low <= score <= high if action == 'click' else low <= score < high


def action_for_score(score: float) -> str:
  """The action whose interval holds `score`, a finite number in [0, 1]."""
  if not (math.isfinite(score) and 0.0 <= score <= 1.0):
    raise ValueError(f'acceptance score must be a finite number in [0, 1], found {score!r}')
  return next(action for action in ACTIONS if in_interval(action, score))


def interval_midpoint(action: str) -> float:
  """The score given to a stated action without a score: the middle of its interval."""
  low, high = ACTION_INTERVALS[action]
  return (low + high) / 2


def clip_to_action(action: str, score: float) -> float:
  """`score` moved into `action`'s interval (the action wins when the two disagree, METHOD.md section 2).

  A score above a half-open interval becomes the largest float32 below the upper end, not the largest float64:
  scores end up in float32 arrays, and float64's nextafter(0.25, 0) rounds back to 0.25 there, which would put
  the score into the next action's interval. The float32 value is exact in float64, so the score is inside the
  interval in both precisions.
  """
  low, high = ACTION_INTERVALS[action]
  if score < low:
    return low
  if action == 'click':
    return min(score, high)
  if score >= high:
    return float(np.nextafter(np.float32(high), np.float32(low)))
  return score


def format_score(score: float) -> str:
  """Positional decimal digits that parse back to exactly `score` ('0.85', '1', '0.00001'); never exponents,
  which a language model rarely writes and a reader may misread."""
  return np.format_float_positional(float(score), unique=True, trim='-')


def single_line(text: str) -> str:
  """The canonical form of free text in the formats: whitespace runs (line breaks included) become one space,
  and the ends are stripped. Reasons are stored and compared in this form."""
  return ' '.join(str(text).split())


def is_single_line_title(title: str) -> bool:
  """Whether a title can stand on one output line and be read back unchanged: no line breaks of any kind
  (str.splitlines' set, which includes \\x1c-\\x1e, \\x85 and \\u2028) and no whitespace at its ends."""
  return bool(title) and title == title.strip() and len(title.splitlines()) == 1
