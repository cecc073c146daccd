import math
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from coars_jax.agents import parsing, protocol
from coars_jax.agents.parsing import ParseConfig, parse_recommender_output, parse_user_output
from coars_jax.agents.prompts import format_recommender_output, format_user_output

CANDIDATES = [
  'Muse',
  'The Prodigy',
  'IRA',
  'Ira!',
  '3',
  '311',
  '!!!',
  '#####',
  'Beyoncé',
  'Lee "Scratch" Perry',
  'Coldplay',
  'Shawshank Redemption',
]


def _item(text, candidates=CANDIDATES, **config):
  result = parse_recommender_output(text, candidates, config=ParseConfig(**config))
  return result.title, result.match_rule


@pytest.mark.parametrize(
  'text, title, rule',
  [
    ('Reason: fits\nItem: Muse', 'Muse', 'exact'),
    ('**Item:** "Muse".', 'Muse', 'exact'),
    ('- **Item**: *The Prodigy*!', 'The Prodigy', 'exact'),
    ('### item: <Coldplay>', 'Coldplay', 'exact'),
    ('Item: 3. Muse', 'Muse', 'exact'),  # a list number copied from the prompt
    ('Item: 11) Coldplay', 'Coldplay', 'exact'),
    ('Item: 3', '3', 'exact'),  # a title that is a number
    ('Item: 311.', '311', 'exact'),
    ('Item: Ira!', 'Ira!', 'exact'),  # the title's own punctuation is tried before it is stripped
    ('Item: !!!', '!!!', 'exact'),
    ('Item:\nMuse', 'Muse', 'exact'),  # the title on the line below its label
    ('Item: prodigy', 'The Prodigy', 'normalized'),
    ('Item: Prodigy, The', 'The Prodigy', 'normalized'),
    ('Item: beyonce', 'Beyoncé', 'normalized'),
    ('Item: lee scratch perry', 'Lee "Scratch" Perry', 'normalized'),
    ('Item: ＭＵＳＥ', 'Muse', 'normalized'),  # full-width letters (NFKC)
    ('Item: Coldpaly', 'Coldplay', 'fuzzy'),
    ('Item: The Shawshank Redemptoin', 'Shawshank Redemption', 'fuzzy'),
    ('Item: Cold\u200bplay\u00ad', 'Coldplay', 'normalized'),  # invisible format characters are deleted
  ],
)
def test_item_matching_rules(text, title, rule):
  assert _item(text) == (title, rule)


@pytest.mark.parametrize(
  'text',
  [
    'Item: 7',  # a bare number is not a position in the list
    'Item: ira',  # 'IRA' and 'Ira!' normalize alike: ambiguous
    'Item: Blur',  # not a candidate
    'Item: ...',
    'Item:',
    'Reason: I pick Muse',  # no Item line
    'Reason: x Item: Muse',  # a label inside a line is not a label
    'Recommended item: Muse',
    'Item: Cоldplay',  # Cyrillic o: a look-alike is not a misspelling
    'Item: Shawshank Redemption, Muse',  # a second title is not a misspelling
    'Item: Shawshank Redemption 2',  # nor is a changed digit
  ],
)
def test_item_text_that_names_no_single_candidate_is_invalid(text):
  result = parse_recommender_output(text, CANDIDATES)
  assert not result.valid and result.candidate_index is None and result.match_rule is None


def test_duplicate_candidate_titles_are_ambiguous():
  assert _item('Item: Sabrina', ['Sabrina', 'Heat', 'Sabrina']) == (None, None)
  assert _item('Item: Heat', ['Sabrina', 'Heat', 'Sabrina']) == ('Heat', 'exact')


def test_fuzzy_ties_and_threshold():
  # One edit from both, ratio 20/22 with each: the best ratio is shared, so nothing matches.
  assert _item('Item: Blackmore Z', ['Blackmore X', 'Blackmore Y', 'Muse']) == (None, None)
  assert _item('Item: Blackmore Z', ['Blackmore X', 'Muse']) == ('Blackmore X', 'fuzzy')
  assert _item('Item: Coldpaly', fuzzy_threshold=1.0) == (None, None)
  assert _item('Item: Coldpaly', fuzzy_threshold=0.8) == ('Coldplay', 'fuzzy')


def test_first_item_line_is_the_answer_and_a_later_one_must_agree():
  ids = list(range(100, 100 + len(CANDIDATES)))
  result = parse_recommender_output(
    'Reason: Guitar\n bands.\nItem: 311\nItem: **311**\nItem:\nReason: later', CANDIDATES, candidate_ids=ids
  )
  assert result == parsing.RecommenderParse(
    valid=True, candidate_index=5, item_id=105, title='311', match_rule='exact', reason='Guitar bands.', item_text='311'
  )
  # A later line naming another candidate, or nothing known, is a second answer: ambiguous, whichever came first.
  for text in ('Item: 311\nItem: Muse', 'Item: Muse\nItem: 311', 'Item: 311\nItem: Blur'):
    hedged = parse_recommender_output(text, CANDIDATES, candidate_ids=ids)
    assert (hedged.valid, hedged.candidate_index, hedged.title, hedged.match_rule) == (False, None, None, None)
    assert hedged.item_text == text.split('\n')[0][len('Item: ') :]
  missing = parse_recommender_output('Item: Blur', CANDIDATES)
  assert missing.item_text == 'Blur' and missing.reason == '' and missing.item_id is None


def test_require_reason():
  assert parse_recommender_output('Item: Muse', CANDIDATES).valid
  assert not parse_recommender_output('Item: Muse', CANDIDATES, config=ParseConfig(require_reason=True)).valid
  assert parse_recommender_output('Reason: r\nItem: Muse', CANDIDATES, config=ParseConfig(require_reason=True)).valid


def test_candidate_ids_must_match_titles():
  with pytest.raises(ValueError, match='candidate_ids has 1 entries but candidate_titles has 12'):
    parse_recommender_output('Item: Muse', CANDIDATES, candidate_ids=[1])


F32_BELOW = {end: float(np.nextafter(np.float32(end), np.float32(0))) for end in (0.25, 0.5, 0.75)}


@pytest.mark.parametrize(
  'text, action, score, rule',
  [
    ('Reason: meh\nAction: skip\nScore: 0.3', 'skip', 0.3, 'stated'),
    ('ACTION: **Click**\nScore: 0.9', 'click', 0.9, 'stated'),
    ('Action: star.\nScore: 60%', 'star', 0.6, 'stated'),
    ('Action: click\nScore: 17/20', 'click', 0.85, 'stated'),
    ('Action: skip\nScore: 0,4', 'skip', 0.4, 'stated'),
    ('Action: I would click it\nScore: 1', 'click', 1.0, 'stated'),
    ('Action: click\nScore: 0.3', 'click', 0.75, 'clipped'),  # the action wins
    ('Action: skip\nScore: 0.9', 'skip', F32_BELOW[0.5], 'clipped'),
    ('Action: dislike\nScore: 0.25', 'dislike', F32_BELOW[0.25], 'clipped'),
    ('Action: click\nScore: 85', 'click', 1.0, 'clipped'),  # clipped to [0, 1]
    ('Action: dislike\nScore: -0.2', 'dislike', 0.0, 'clipped'),
    ('Action: star', 'star', 0.625, 'midpoint'),
    ('Action: dislike\nScore: none', 'dislike', 0.125, 'midpoint'),
    ('Action: skip\nScore: 1e999', 'skip', 0.375, 'midpoint'),  # not finite: missing
  ],
)
def test_user_rules(text, action, score, rule):
  result = parse_user_output(text)
  assert (result.valid, result.action, result.score, result.score_rule) == (True, action, score, rule)
  assert protocol.in_interval(action, float(np.float32(result.score)))


@pytest.mark.parametrize(
  'text',
  [
    'Score: 0.9',  # no action
    'Action: love\nScore: 0.9',
    'Action: click|star|skip|dislike\nScore: 0.9',  # the template copied: more than one action
    'Action: clicked',
    '',
  ],
)
def test_user_output_without_a_usable_action_is_a_skip_at_0375(text):
  result = parse_user_output(text)
  assert (result.valid, result.action, result.score, result.score_rule) == (False, 'skip', 0.375, None)


def test_infer_action_from_score_and_require_reason():
  inferred = parse_user_output('Score: 0.6', ParseConfig(infer_action_from_score=True))
  assert (inferred.valid, inferred.action, inferred.score, inferred.action_inferred) == (True, 'star', 0.6, True)
  assert not parse_user_output('Action: love', ParseConfig(infer_action_from_score=True)).valid
  assert not parse_user_output('Action: click', ParseConfig(require_reason=True)).valid
  assert parse_user_output('Reason: yes\nAction: click', ParseConfig(require_reason=True)).valid


@pytest.mark.parametrize(
  'kwargs, message',
  [
    (dict(fuzzy_threshold=0.0), 'fuzzy_threshold must be a number in'),
    (dict(fuzzy_threshold=1.5), 'fuzzy_threshold must be a number in'),
    (dict(require_reason='yes'), 'require_reason must be a bool'),
  ],
)
def test_parse_config_validates(kwargs, message):
  with pytest.raises(ValueError, match=message):
    ParseConfig(**kwargs)


def test_summary_and_valid_ratio():
  recs = [parse_recommender_output(t, CANDIDATES) for t in ('Item: Muse', 'Item: prodigy', 'Item: Blur', '')]
  users = [parse_user_output(t) for t in ('Action: click\nScore: 0.9', 'Action: star', 'nonsense')]
  summary = parsing.summarize(recs, users)
  assert summary.valid_ratio == 0.5 and summary.user_valid_ratio == pytest.approx(2 / 3)
  assert dict(summary.match_rules) == {'exact': 1, 'normalized': 1, 'fuzzy': 0}
  assert dict(summary.score_rules) == {'stated': 1, 'clipped': 0, 'midpoint': 1}
  doubled = summary + summary
  assert (doubled.recommender_messages, doubled.recommender_valid, doubled.valid_ratio) == (8, 4, 0.5)
  assert doubled.as_metrics()['parse/match_normalized'] == 2.0
  assert math.isnan(parsing.summarize().valid_ratio)


# --- fuzzing --------------------------------------------------------------------------------------------------

LABEL_PREFIXES = ('Item:', 'item :', '**Item:**', '- Item:', 'Reason:', 'Action:', 'Score:', '3.', '', '\n')
_line = st.tuples(st.sampled_from(LABEL_PREFIXES), st.text(max_size=40)).map(lambda p: ' '.join(p))
_messy_text = st.one_of(st.text(max_size=400), st.lists(_line, max_size=30).map('\n'.join))
_titles = st.lists(
  st.text(min_size=1, max_size=30).filter(protocol.is_single_line_title), min_size=1, max_size=20, unique=True
)
_FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check_recommender_invariants(result, candidates):
  assert isinstance(result, parsing.RecommenderParse)
  if result.candidate_index is None:
    assert not result.valid and result.title is None and result.match_rule is None
  else:
    assert result.title == candidates[result.candidate_index] and result.match_rule in parsing.MATCH_RULES
  assert '\n' not in result.reason


def _check_user_invariants(result):
  assert protocol.in_interval(result.action, result.score)
  assert protocol.in_interval(result.action, float(np.float32(result.score)))
  if not result.valid:
    assert (result.action, result.score) == ('skip', 0.375)


@_FAST
@given(text=_messy_text, candidates=_titles)
def test_parsers_never_raise_on_any_text(text, candidates):
  _check_recommender_invariants(parse_recommender_output(text, candidates), candidates)
  _check_user_invariants(parse_user_output(text))


@_FAST
@given(text=_messy_text)
def test_parsers_never_raise_with_titles_that_look_like_markup(text):
  candidates = ['3', '**', '"', 'Item: x', '.', 'The', 'a']
  _check_recommender_invariants(parse_recommender_output(text, candidates), candidates)
  _check_recommender_invariants(
    parse_recommender_output(text, candidates, config=ParseConfig(fuzzy_threshold=0.1)), candidates
  )


def test_parsers_never_raise_on_non_text_and_stay_fast_on_huge_text():
  assert not parse_recommender_output(None, CANDIDATES).valid and not parse_user_output(b'Action: click').valid
  huge = 'Item: ' + 'Coldplay' * 30_000 + '\n' + 'Item: Muse\n' * 10_000 + 'Score: 9' * 10_000
  start = time.perf_counter()
  assert not parse_recommender_output(huge, CANDIDATES).valid  # the first Item line is the one that counts
  assert not parse_user_output(huge).valid
  assert time.perf_counter() - start < 5.0


@_FAST
@given(candidates=_titles, data=st.data(), reason=st.text(max_size=80), tail=_messy_text)
def test_well_formed_recommender_output_reads_back_exactly(candidates, data, reason, tail):
  index = data.draw(st.integers(0, len(candidates) - 1))
  text = format_recommender_output(reason, candidates[index])
  ids = list(range(7, 7 + len(candidates)))
  expected = parsing.RecommenderParse(
    valid=True,
    candidate_index=index,
    item_id=7 + index,
    title=candidates[index],
    match_rule='exact',
    reason=protocol.single_line(reason),
    item_text=protocol.single_line(candidates[index]),
  )
  assert parse_recommender_output(text, candidates, ids) == expected
  # The first lines are the answer: whatever a model writes after it changes nothing, except a second answer (a later
  # `Item:` line naming something else), which makes the message invalid.
  after = parse_recommender_output(text + '\n' + tail, candidates, ids)
  later = [value for value in parsing._later_values(*_lines(text + '\n' + tail), protocol.ITEM_LABEL)]
  if all(parsing.match_candidate(value, candidates)[0] == index for value in later):
    assert after == expected
  else:
    assert not after.valid and after.candidate_index is None and after.item_text == expected.item_text


def _lines(text):
  return text.splitlines(), parsing._labeled_lines(text)


def _interval_scores(action):
  low, high = protocol.ACTION_INTERVALS[action]
  upper = high if action == 'click' else float(np.nextafter(np.float32(high), np.float32(low)))
  return st.one_of(st.sampled_from([low, upper]), st.floats(low, upper)).filter(
    lambda s: protocol.in_interval(action, s)
  )


@_FAST
@given(data=st.data(), reason=st.text(max_size=80), tail=_messy_text)
def test_well_formed_user_output_reads_back_exactly(data, reason, tail):
  action = data.draw(st.sampled_from(protocol.ACTIONS))
  score = data.draw(_interval_scores(action))
  text = format_user_output(reason, action, score)
  expected = parsing.UserParse(
    valid=True, action=action, score=score, reason=protocol.single_line(reason), score_rule='stated'
  )
  assert parse_user_output(text) == expected
  after = parse_user_output(text + '\n' + tail)
  later = parsing._later_values(*_lines(text + '\n' + tail), protocol.ACTION_LABEL)
  if all(parsing._parse_action(value) == action for value in later):
    assert after == expected
  else:  # a second, different answer
    assert (after.valid, after.action, after.score) == (False, 'skip', 0.375)
