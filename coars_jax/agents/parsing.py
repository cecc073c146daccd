"""Reading the agents' messages back into structured turns, for any text a model may write: the parsers never
raise on text, and a message that names no candidate or breaks the format is a result with `valid=False`, which
METHOD.md section 2 counts as a miss for the recommender and as a skip at s = .375 for the user. Labels (`Reason:`,
`Item:`, `Action:`, `Score:`) are found at the start of a line, in any case, and may be dressed in markdown
(`**Item:**`, `- Item:`, `### Item:`); the FIRST line with a label is the answer, and a message answers one thing:
a later `Item:` line may repeat the candidate and a later `Action:` line the action (a repeated answer changes
nothing), but one that names anything else makes the message ambiguous and invalid, so that a hedge over several
items never reads as a hit of one of them (a later `Score:` or `Reason:` line is ignored: it cannot change the
action, whose interval holds the score). A reason is the first `Reason:` line plus any following lines up to a
blank line or the next label, in `protocol.single_line` form, and '' when absent. Titles are compared as written,
then after `normalize_title`, which applies NFKC (full-width and other compatibility letters count as their plain
letters) and drops case, diacritics and invisible format characters such as zero-width spaces; and the `fuzzy`
rule is for misspellings only: it never crosses scripts (look-alike letters, such as Cyrillic 'а' for Latin 'a',
name no Latin title: NFKC does not fold them and no rule here does), never changes a digit (a sequel or a volume is
another item) and never adds more than one character (a second title or a comment is not a typo).

The parsers live in three modules, re-exported here (import from this one): `parsing_common` (`ParseConfig` and the
labeled-line reading both use), `parsing_recommender` (title matching and `parse_recommender_output`) and
`parsing_user` (`parse_score` and `parse_user_output`). This module keeps the counts over parsed messages
(`ParseSummary`, `summarize`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable

from coars_jax.agents.parsing_common import ParseConfig
from coars_jax.agents.parsing_common import _labeled_lines as _labeled_lines
from coars_jax.agents.parsing_common import _later_values as _later_values
from coars_jax.agents.parsing_recommender import (
  RecommenderParse,
  match_candidate,
  normalize_title,
  parse_recommender_output,
  title_forms,
)
from coars_jax.agents.parsing_user import INVALID_ACTION, INVALID_SCORE, UserParse, parse_score, parse_user_output
from coars_jax.agents.parsing_user import _parse_action as _parse_action

__all__ = [
  'INVALID_ACTION',
  'INVALID_SCORE',
  'MATCH_RULES',
  'SCORE_RULES',
  'ParseConfig',
  'ParseSummary',
  'RecommenderParse',
  'UserParse',
  'match_candidate',
  'normalize_title',
  'parse_recommender_output',
  'parse_score',
  'parse_user_output',
  'summarize',
  'title_forms',
]

MATCH_RULES = ('exact', 'normalized', 'fuzzy')
SCORE_RULES = ('stated', 'clipped', 'midpoint')


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParseSummary:
  """Counts of parsed messages; add summaries of several batches with `+`.

  Attributes:
    recommender_messages: recommender messages read.
    recommender_valid: those that named a candidate (and gave a reason, if the config requires one): the
      numerator of ValidRatio.
    match_rules: valid recommender messages per rule ('exact', 'normalized', 'fuzzy').
    user_messages: user messages read.
    user_valid: those with a usable action.
    score_rules: valid user messages per score rule ('stated', 'clipped', 'midpoint').
    actions_inferred: valid user messages whose action came from the score.
  """

  recommender_messages: int = 0
  recommender_valid: int = 0
  match_rules: tuple[tuple[str, int], ...] = tuple((rule, 0) for rule in MATCH_RULES)
  user_messages: int = 0
  user_valid: int = 0
  score_rules: tuple[tuple[str, int], ...] = tuple((rule, 0) for rule in SCORE_RULES)
  actions_inferred: int = 0

  @property
  def valid_ratio(self) -> float:
    """ValidRatio: the share of recommender messages that name a candidate; NaN when none were read."""
    return self.recommender_valid / self.recommender_messages if self.recommender_messages else math.nan

  @property
  def user_valid_ratio(self) -> float:
    """The share of user messages with a usable action; NaN when none were read."""
    return self.user_valid / self.user_messages if self.user_messages else math.nan

  def __add__(self, other: 'ParseSummary') -> 'ParseSummary':
    if not isinstance(other, ParseSummary):
      return NotImplemented
    add = lambda a, b: tuple((rule, count + dict(b)[rule]) for rule, count in a)
    return ParseSummary(
      recommender_messages=self.recommender_messages + other.recommender_messages,
      recommender_valid=self.recommender_valid + other.recommender_valid,
      match_rules=add(self.match_rules, other.match_rules),
      user_messages=self.user_messages + other.user_messages,
      user_valid=self.user_valid + other.user_valid,
      score_rules=add(self.score_rules, other.score_rules),
      actions_inferred=self.actions_inferred + other.actions_inferred,
    )

  def as_metrics(self, prefix: str = 'parse/') -> dict[str, float]:
    """Flat scalars for a metric writer."""
    metrics = {
      f'{prefix}valid_ratio': self.valid_ratio,
      f'{prefix}user_valid_ratio': self.user_valid_ratio,
      f'{prefix}recommender_messages': float(self.recommender_messages),
      f'{prefix}user_messages': float(self.user_messages),
      f'{prefix}actions_inferred': float(self.actions_inferred),
    }
    metrics.update({f'{prefix}match_{rule}': float(count) for rule, count in self.match_rules})
    metrics.update({f'{prefix}score_{rule}': float(count) for rule, count in self.score_rules})
    return metrics


def summarize(recommender: Iterable[RecommenderParse] = (), user: Iterable[UserParse] = ()) -> ParseSummary:
  """Counts over parsed messages of both agents."""
  recommender, user = list(recommender), list(user)
  rec_valid = [r for r in recommender if r.valid]
  user_valid = [u for u in user if u.valid]
  return ParseSummary(
    recommender_messages=len(recommender),
    recommender_valid=len(rec_valid),
    match_rules=tuple((rule, sum(r.match_rule == rule for r in rec_valid)) for rule in MATCH_RULES),
    user_messages=len(user),
    user_valid=len(user_valid),
    score_rules=tuple((rule, sum(u.score_rule == rule for u in user_valid)) for rule in SCORE_RULES),
    actions_inferred=sum(u.action_inferred for u in user_valid),
  )
