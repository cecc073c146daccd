"""Parsing a recommender message m_rec_t against its candidate list C: `RecommenderParse` (the result),
`normalize_title` and `title_forms` (the forms an `Item:` value and the titles are compared in), `match_candidate`
(the `exact`, `normalized` and `fuzzy` rules, with the misspelling guards: no added second title, no changed digit,
no letter of another script) and `parse_recommender_output`, which reads the first `Item:` line and refuses a
message whose later `Item:` lines name another candidate. `agents.parsing` re-exports all of it.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import re
import unicodedata
from typing import Sequence

from coars_jax.agents.parsing_common import ParseConfig, _first_value, _labeled_lines, _later_values, _reason
from coars_jax.agents.protocol import ITEM_LABEL, single_line


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


# Characters that may wrap a title or an action: quotes, markdown emphasis and code, and the template's <...>.
_WRAPPERS = '*_`"\'“”‘’«»„‚<>'
_TRAILING_PUNCTUATION = '.,;:!?'
_LIST_NUMBER = re.compile(r'^(?:#?\d{1,3}[.)]|\[\d{1,3}\]|\(\d{1,3}\))[ \t]+')
_APOSTROPHES = re.compile(r"['’‘`´]")
_NON_WORD = re.compile(r'[\W_]+')
_TRAILING_ARTICLE = re.compile(r',\s*(?:the|a|an)\s*$')
_LEADING_ARTICLE = re.compile(r'^(?:the|a|an) ')


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
