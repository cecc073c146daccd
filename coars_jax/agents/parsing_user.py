"""Parsing a user message m_user_t: `UserParse` (the result), `INVALID_ACTION` and `INVALID_SCORE` (what an invalid
message counts as: a skip at the skip interval's midpoint), `_parse_action` (the one action word on an `Action:`
line), `parse_score` (a decimal, percentage or fraction from a `Score:` line, clipped to [0, 1]) and
`parse_user_output`, which reconciles the action with the score (the action wins) and refuses a message whose later
`Action:` lines state another action. `agents.parsing` re-exports its public names.
"""

from __future__ import annotations

import dataclasses
import math
import re

from coars_jax.agents.parsing_common import ParseConfig, _first_value, _labeled_lines, _later_values, _reason
from coars_jax.agents.protocol import (
  ACTION_LABEL,
  ACTIONS,
  SCORE_LABEL,
  action_for_score,
  clip_to_action,
  in_interval,
  interval_midpoint,
)

# The user's output when it is invalid: a skip at the skip interval's midpoint (METHOD.md section 2).
INVALID_ACTION = 'skip'
INVALID_SCORE = interval_midpoint(INVALID_ACTION)


@dataclasses.dataclass(frozen=True, kw_only=True)
class UserParse:
  """A parsed user message m_user_t.

  Attributes:
    valid: whether the message gave a usable action (and a reason, if the config requires one).
    action: the action a_t; 'skip' when invalid.
    score: the acceptance score s_t in [0, 1], inside the action's interval; 0.375 when invalid.
    reason: the rationale j_t, single-line; '' when absent.
    score_rule: 'stated' (as written), 'clipped' (moved into the action's interval, or into [0, 1]) or 'midpoint'
      (no usable score); None when invalid.
    action_inferred: whether the action was taken from the score (`ParseConfig.infer_action_from_score`).
  """

  valid: bool
  action: str
  score: float
  reason: str
  score_rule: str | None
  action_inferred: bool = False


_NUMBER = re.compile(r'(?<![\w.])[-+]?(?:\d+(?:[.,]\d*)?|[.,]\d+)(?:[eE][-+]?\d+)?')
_FRACTION_DENOMINATOR = re.compile(r'[ \t]*/[ \t]*(\d+(?:\.\d*)?|\.\d+)')
_ACTION_WORDS = re.compile(r'(?<![^\W\d_])(' + '|'.join(ACTIONS) + r')(?![^\W\d_])', re.IGNORECASE)


def _parse_action(value: str | None) -> str | None:
  if value is None:
    return None
  found = {word.casefold() for word in _ACTION_WORDS.findall(value)}
  return found.pop() if len(found) == 1 else None


def parse_score(value: str | None) -> tuple[float | None, bool]:
  """(score clipped to [0, 1], whether clipping changed it) from a `Score:` value; (None, False) when unusable.

  The score is the first number on the line: a decimal ("0.85", with a decimal comma "0,85" read as a point), a
  percentage ("85%"), or a fraction ("17/20"). A number that is not finite, or a zero denominator, is unusable.
  """
  if value is None:
    return None, False
  number = _NUMBER.search(value)
  if number is None:
    return None, False
  try:
    score = float(number.group().replace(',', '.'))
    rest = value[number.end() :]
    if rest.lstrip().startswith('%'):
      score /= 100.0
    else:
      denominator = _FRACTION_DENOMINATOR.match(rest)
      if denominator is not None:
        divisor = float(denominator.group(1))
        score = score / divisor if divisor > 0 else math.nan
  except (ValueError, OverflowError):
    return None, False
  if not math.isfinite(score):
    return None, False
  clipped = min(max(score, 0.0), 1.0)
  return clipped, clipped != score


def parse_user_output(text: str, config: ParseConfig = ParseConfig()) -> UserParse:
  """Reads a user message m_user_t; never raises on `text` (anything that is not a str reads as empty).

  The action is the one action word (click, star, skip, dislike; any case, whole words) on the first `Action:`
  line; none or two different ones make it unusable, and so does a later `Action:` line that does not state that
  same action (two answers). The score is read by `parse_score`. If the action and the
  score disagree, the action wins and the score is clipped into its interval (`protocol.clip_to_action`); a missing
  score gets the interval's midpoint. A missing action is invalid, even with a score, unless
  `config.infer_action_from_score`: the action is the field that ends an episode and that the F1 protocol reads,
  so it is not guessed by default.
  """
  text = text if isinstance(text, str) else ''
  lines = text.splitlines()
  labeled = _labeled_lines(text)
  reason = _reason(lines, labeled)
  action = _parse_action(_first_value(lines, labeled, ACTION_LABEL, continue_lines=False))
  if action is not None and any(
    _parse_action(value) != action for value in _later_values(lines, labeled, ACTION_LABEL)
  ):
    action = None  # two answers: the message hedges, and neither action is the user's
  score, clipped = parse_score(_first_value(lines, labeled, SCORE_LABEL, continue_lines=False))
  inferred = False
  if action is None and score is not None and config.infer_action_from_score:
    action, inferred = action_for_score(score), True
  if action is None or (config.require_reason and not reason):
    return UserParse(valid=False, action=INVALID_ACTION, score=INVALID_SCORE, reason=reason, score_rule=None)
  if score is None:
    return UserParse(
      valid=True,
      action=action,
      score=interval_midpoint(action),
      reason=reason,
      score_rule='midpoint',
      action_inferred=inferred,
    )
  rule = 'clipped' if clipped or not in_interval(action, score) else 'stated'
  return UserParse(
    valid=True,
    action=action,
    score=clip_to_action(action, score),
    reason=reason,
    score_rule=rule,
    action_inferred=inferred,
  )
