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
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import math
import re
import unicodedata
from typing import Iterable, Iterator, Sequence

from coars_jax.agents.protocol import (
  ACTION_LABEL,
  ACTIONS,
  ITEM_LABEL,
  REASON_LABEL,
  SCORE_LABEL,
  action_for_score,
  clip_to_action,
  in_interval,
  interval_midpoint,
  single_line,
)

# The user's output when it is invalid: a skip at the skip interval's midpoint (METHOD.md section 2).
INVALID_ACTION = 'skip'
INVALID_SCORE = interval_midpoint(INVALID_ACTION)
MATCH_RULES = ('exact', 'normalized', 'fuzzy')
SCORE_RULES = ('stated', 'clipped', 'midpoint')


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecommenderParse:
  """A parsed recommender message m_rec_t.

  Attributes:
    valid: whether the message names exactly one candidate (and has a reason, if the config requires one).
    candidate_index: the position of the named item i_t in the candidate list C, or None.
    item_id: its item id when the caller gave candidate ids, else None.
    title: the matched candidate's title, or None.
    match_rule: 'exact', 'normalized' or 'fuzzy'; None when nothing matched.
    reason: the rationale r_t, single-line; '' when absent.
    item_text: what the `Item:` line said, single-line; None when there was no `Item:` line.
  """

  valid: bool
  candidate_index: int | None
  item_id: int | None
  title: str | None
  match_rule: str | None
  reason: str
  item_text: str | None


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


_LABEL_LINE = re.compile(
  r'^[ \t]*(?:[-*+>#]+[ \t]+)*'  # bullets, block quotes and headings before the label
  r'(?P<open>\*\*|__|\*|_)?'  # markdown emphasis opened before the label ...
  r'(?P<label>' + '|'.join((REASON_LABEL, ITEM_LABEL, ACTION_LABEL, SCORE_LABEL)) + r')'
  # ... and closed before the colon, after it, or not at all.
  r'(?:(?(open)(?P=open))[ \t]*:|[ \t]*:(?(open)(?P=open))|[ \t]*:)'
  r'(?P<value>.*)$',
  re.IGNORECASE,
)
# Characters that may wrap a title or an action: quotes, markdown emphasis and code, and the template's <...>.
_WRAPPERS = '*_`"\'“”‘’«»„‚<>'
_TRAILING_PUNCTUATION = '.,;:!?'
_LIST_NUMBER = re.compile(r'^(?:#?\d{1,3}[.)]|\[\d{1,3}\]|\(\d{1,3}\))[ \t]+')
_APOSTROPHES = re.compile(r"['’‘`´]")
_NON_WORD = re.compile(r'[\W_]+')
_TRAILING_ARTICLE = re.compile(r',\s*(?:the|a|an)\s*$')
_LEADING_ARTICLE = re.compile(r'^(?:the|a|an) ')
_NUMBER = re.compile(r'(?<![\w.])[-+]?(?:\d+(?:[.,]\d*)?|[.,]\d+)(?:[eE][-+]?\d+)?')
_FRACTION_DENOMINATOR = re.compile(r'[ \t]*/[ \t]*(\d+(?:\.\d*)?|\.\d+)')
_ACTION_WORDS = re.compile(r'(?<![^\W\d_])(' + '|'.join(ACTIONS) + r')(?![^\W\d_])', re.IGNORECASE)


def normalize_title(text: str) -> str:
  """The form titles are compared in by the `normalized` rule.

  NFKC, then invisible format characters (Unicode category Cf: zero-width spaces and joiners, soft hyphens) deleted,
  diacritics dropped (a model writing "Beyonce" for "Beyoncé" or "Sigur Ros" for "Sigur Rós" still names the
  candidate), casefolded, a trailing ", The" and a leading "the/a/an" removed, apostrophes deleted, other punctuation
  and whitespace collapsed to one space. Letters of other scripts are kept as they are: a Cyrillic or Greek look-alike
  of a Latin letter stays a different letter. A title of symbols only ("!!!", "#####") keeps its symbols, so
  that such titles stay distinct.
  """
  text = unicodedata.normalize('NFKC', text)
  # Invisible format characters (zero-width spaces and joiners, soft hyphens, byte-order and direction marks) are
  # deleted rather than read as punctuation, which would split a word in two.
  text = ''.join(c for c in text if unicodedata.category(c) != 'Cf')
  text = ''.join(c for c in unicodedata.normalize('NFKD', text) if not unicodedata.combining(c))
  text = unicodedata.normalize('NFKC', text).casefold()
  text = _TRAILING_ARTICLE.sub('', text)
  words = _NON_WORD.sub(' ', _APOSTROPHES.sub('', text)).strip()
  if not words:
    return ' '.join(text.split())
  return _LEADING_ARTICLE.sub('', words) or words


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


def title_forms(value: str) -> list[str]:
  """The forms of an `Item:` value tried in turn, least changed first: as written, without wrapping quotes or
  markdown, without trailing punctuation, then the same again without a leading list number."""
  forms: list[str] = []

  def add(form: str) -> str:
    form = form.strip()
    if form and form not in forms:
      forms.append(form)
    return form

  current = add(value)
  for _ in range(2):
    previous = None
    while current != previous:
      previous = current
      current = add(current.strip(_WRAPPERS))
      current = add(current.rstrip(_TRAILING_PUNCTUATION))
    marker = _LIST_NUMBER.match(current)
    if marker is None:
      break
    current = add(current[marker.end() :])
  return forms


def _unique(indices: list[int]) -> int | None:
  return indices[0] if len(indices) == 1 else None


def _digits(text: str) -> str:
  return ''.join(c for c in text if c.isdigit())


def _scripts(text: str) -> set[str]:
  """The scripts of the letters in `text`, by the first word of each letter's Unicode name ('LATIN', 'CYRILLIC',
  'GREEK', 'CJK', ...): close enough to the Script property to tell look-alike letters apart."""
  return {unicodedata.name(c, '?').split(' ', 1)[0] for c in text if c.isalpha()}


def _may_be_misspelling(query: str, title: str) -> bool:
  """Whether the normalized value `query` may be a misspelling of the normalized `title`, whatever their ratio:
  at most one character longer (a second title or a comment added is another answer, not a typo), the same digits
  in the same order (a sequel, a volume or a year names another item), and no letter from a script the title does
  not use (Cyrillic 'а' for Latin 'a' is a look-alike, not a typo)."""
  return len(query) <= len(title) + 1 and _digits(query) == _digits(title) and _scripts(query) <= _scripts(title)


def match_candidate(
  value: str, candidate_titles: Sequence[str], config: ParseConfig = ParseConfig()
) -> tuple[int | None, str | None]:
  """(candidate index, rule) for an `Item:` value, or (None, None) when it names no single candidate.

  Only the candidate titles are searched, by the first rule that fits: `exact` (one of `title_forms(value)` equals
  a title), `normalized` (`normalize_title` of a form equals that of a title), then `fuzzy` (the difflib ratio of
  the most changed form's normalized text with a normalized title is at least `config.fuzzy_threshold`, among the
  titles it may be a misspelling of: at most one character longer, the same digits, no letter of another script;
  see `_may_be_misspelling`). A form
  that fits two candidates (duplicate titles, or titles that normalize alike such as "IRA" and "Ira!") and a best
  fuzzy ratio shared by two candidates are ambiguous: invalid, since picking one would reward or punish the model
  for a coin it did not toss. A bare number is not read as a position in the list: some titles are numbers
  (LastFM has "3", "311" and "2002"), and the prompt asks for the title.
  """
  forms = title_forms(value)
  if not forms:
    return None, None
  by_title = collections.defaultdict(list)
  by_normal = collections.defaultdict(list)
  normals = []
  for index, title in enumerate(candidate_titles):
    by_title[title].append(index)
    normals.append(normalize_title(title))
    by_normal[normals[-1]].append(index)
  # Each rule stops at the first form it recognises, and an ambiguous form is invalid rather than passed on:
  # a less changed form is better evidence of what the model meant than a more changed one.
  for form in forms:
    if form in by_title:
      index = _unique(by_title[form])
      return (index, 'exact') if index is not None else (None, None)
  normal_forms = [normalize_title(form) for form in forms]
  for normal in normal_forms:
    if normal in by_normal:
      index = _unique(by_normal[normal])
      return (index, 'normalized') if index is not None else (None, None)
  query = normal_forms[-1]
  best_ratio, best = -1.0, []
  for index, normal in enumerate(normals):
    shortest, total = min(len(query), len(normal)), len(query) + len(normal)
    # difflib's ratio is at most 2 * shortest / total; skipping candidates that cannot reach the threshold keeps a
    # very long value from costing a quadratic comparison with every candidate.
    if total == 0 or 2 * shortest / total < config.fuzzy_threshold or not _may_be_misspelling(query, normal):
      continue
    ratio = difflib.SequenceMatcher(None, query, normal, autojunk=False).ratio()
    if ratio > best_ratio:
      best_ratio, best = ratio, [index]
    elif ratio == best_ratio:
      best.append(index)
  if best_ratio >= config.fuzzy_threshold and len(best) == 1:
    return best[0], 'fuzzy'
  return None, None


def parse_recommender_output(
  text: str,
  candidate_titles: Sequence[str],
  candidate_ids: Sequence[int] | None = None,
  config: ParseConfig = ParseConfig(),
) -> RecommenderParse:
  """Reads a recommender message m_rec_t against its candidate list C; never raises on `text`.

  Args:
    text: the model's message; anything that is not a str reads as an empty message.
    candidate_titles: the titles of C, in the order the prompt listed them.
    candidate_ids: the item ids of C in the same order, to fill `item_id`; None leaves it None.
    config: tolerance settings.
  """
  if candidate_ids is not None and len(candidate_ids) != len(candidate_titles):
    raise ValueError(
      f'candidate_ids has {len(candidate_ids)} entries but candidate_titles has '
      f'{len(candidate_titles)}; they must describe the same list'
    )
  text = text if isinstance(text, str) else ''
  lines = text.splitlines()
  labeled = _labeled_lines(text)
  reason = _reason(lines, labeled)
  item_value = _first_value(lines, labeled, ITEM_LABEL, continue_lines=False)
  index, rule = (None, None) if item_value is None else match_candidate(item_value, candidate_titles, config)
  if index is not None and any(
    match_candidate(value, candidate_titles, config)[0] != index for value in _later_values(lines, labeled, ITEM_LABEL)
  ):
    # Two answers: reading the first as the answer would pay a hedge over several items as a hit.
    index, rule = None, None
  valid = index is not None and (bool(reason) or not config.require_reason)
  return RecommenderParse(
    valid=valid,
    candidate_index=index,
    item_id=None if index is None or candidate_ids is None else int(candidate_ids[index]),
    title=None if index is None else candidate_titles[index],
    match_rule=rule,
    reason=reason,
    item_text=None if item_value is None else single_line(item_value),
  )


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
