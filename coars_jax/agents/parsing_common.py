"""What both message parsers share: `ParseConfig` (how tolerant they are) and the reading of labeled lines. A line
starts with a label (`Reason:`, `Item:`, `Action:`, `Score:`, in any case, possibly dressed in markdown) when
`_LABEL_LINE` matches it; `_labeled_lines` marks each line's label, `_values`, `_first_value` and `_later_values`
give a label's values in order (the first is the answer, the later ones must agree with it), and `_reason` reads the
rationale as the first `Reason:` line plus its continuation lines, single-line. `agents.parsing_recommender` and
`agents.parsing_user` build on it; `agents.parsing` re-exports `ParseConfig`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator

from coars_jax.agents.protocol import ACTION_LABEL, ITEM_LABEL, REASON_LABEL, SCORE_LABEL, single_line


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParseConfig:
  """How tolerant the parsers are.

  Attributes:
    fuzzy_threshold: the least difflib ratio between the normalized `Item:` value and a normalized candidate title
      for a `fuzzy` match, in (0, 1]; 1 turns fuzzy matching off in effect (only equal strings reach 1, and those
      already matched as `normalized`). The default accepts one swapped or missing letter in a title of eight
      letters or more (ratio 0.875 or above); with it, no LastFM title outside a random candidate list matched one
      of the list in 2,000 draws.
    require_reason: whether a message without a `Reason:` line (r_t for the recommender, j_t for the user) is
      invalid. Off by default: ValidRatio counts messages that name a candidate, whatever else they say.
    infer_action_from_score: whether a user message with a usable score but no usable action a_t takes the action
      whose interval holds the score; off by default, when such a message is invalid.
  """

  fuzzy_threshold: float = 0.85
  require_reason: bool = False
  infer_action_from_score: bool = False

  def __post_init__(self):
    if not (isinstance(self.fuzzy_threshold, (int, float)) and 0.0 < self.fuzzy_threshold <= 1.0):
      raise ValueError(f'ParseConfig.fuzzy_threshold must be a number in (0, 1], found {self.fuzzy_threshold!r}')
    for name in ('require_reason', 'infer_action_from_score'):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f'ParseConfig.{name} must be a bool, found {getattr(self, name)!r}')


_LABEL_LINE = re.compile(
  r'^[ \t]*(?:[-*+>#]+[ \t]+)*'  # bullets, block quotes and headings before the label
  r'(?P<open>\*\*|__|\*|_)?'  # markdown emphasis opened before the label ...
  r'(?P<label>' + '|'.join((REASON_LABEL, ITEM_LABEL, ACTION_LABEL, SCORE_LABEL)) + r')'
  # ... and closed before the colon, after it, or not at all.
  r'(?:(?(open)(?P=open))[ \t]*:|[ \t]*:(?(open)(?P=open))|[ \t]*:)'
  r'(?P<value>.*)$',
  re.IGNORECASE,
)


def _labeled_lines(text: str) -> list[tuple[str, str] | None]:
  """For each line, (label casefolded, value) when it starts with a label, else None."""
  labeled = []
  for line in text.splitlines():
    match = _LABEL_LINE.match(line)
    labeled.append((match.group('label').casefold(), match.group('value')) if match else None)
  return labeled


def _values(lines: list[str], labeled: list, label: str, continue_lines: bool) -> Iterator[str]:
  """The value of each line labeled `label`, in order.

  With `continue_lines`, following lines up to a blank line or the next label are appended (a reason that runs
  over lines); otherwise an empty value is taken from the next line when that line is neither blank nor labeled
  ("Item:" with the title below it).
  """
  label = label.casefold()
  for index, entry in enumerate(labeled):
    if entry is None or entry[0] != label:
      continue
    value = entry[1]
    following = range(index + 1, len(lines))
    if continue_lines:
      parts = [value]
      for after in following:
        if labeled[after] is not None or not lines[after].strip():
          break
        parts.append(lines[after])
      yield ' '.join(parts)
    elif not value.strip() and index + 1 < len(lines) and labeled[index + 1] is None and lines[index + 1].strip():
      yield lines[index + 1]
    else:
      yield value


def _first_value(lines: list[str], labeled: list, label: str, continue_lines: bool) -> str | None:
  """The value of the first line labeled `label` (`_values`), or None."""
  return next(_values(lines, labeled, label, continue_lines), None)


def _later_values(lines: list[str], labeled: list, label: str) -> set[str]:
  """The distinct non-blank values of the lines labeled `label` after the first: what must agree with it."""
  values = _values(lines, labeled, label, continue_lines=False)
  next(values, None)
  return {value for value in values if value.strip()}


def _reason(lines: list[str], labeled: list) -> str:
  value = _first_value(lines, labeled, REASON_LABEL, continue_lines=True)
  return '' if value is None else single_line(value)
