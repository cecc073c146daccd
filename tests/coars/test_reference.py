"""The reference trajectory d: exact template texts for both agents, the teacher prompt x + d, SASRec ranks, the
episode adapter and the self-written option."""

import types

import numpy as np
import pytest

from coars_jax.agents.prompts import recommender_messages, user_messages
from coars_jax.coars import reference as ref

MISS = ref.TurnHindsight(turn=1, item_title='Radiohead', sasrec_rank=4, hit=False, action='skip', acceptance_score=0.3)
HIT = ref.TurnHindsight(turn=2, item_title='Muse', sasrec_rank=2, hit=True, action='click', acceptance_score=0.9)
TARGET = dict(target_title='Muse', target_rank=2, num_candidates=20)


def test_recommender_reference_text():
  text = ref.recommender_reference([MISS, HIT], **TARGET)
  assert text == '\n'.join(
    [
      ref.REFERENCE_HEADER,
      'The user\'s true next item was "Muse" (SASRec rank 2 of 20).',
      'Turn 1: you recommended "Radiohead" (SASRec rank 4 of 20); the user reacted skip with score 0.3. That was '
      'wrong: the user\'s true next item was "Muse"; you should have recommended "Muse".',
      'Turn 2: you recommended "Muse" (SASRec rank 2 of 20); the user reacted click with score 0.9. That was right: '
      "it is the user's true next item.",
      'The right recommendation at every turn was "Muse".',
    ]
  )


def test_user_reference_says_which_reaction_was_right():
  starred_miss = ref.TurnHindsight(
    turn=1, item_title='Blur', sasrec_rank=None, hit=False, action='star', acceptance_score=0.6
  )
  skipped_hit = ref.TurnHindsight(
    turn=2, item_title='Muse', sasrec_rank=2, hit=True, action='skip', acceptance_score=0.4
  )
  text = ref.user_reference([MISS, starred_miss, skipped_hit, HIT], target_title='Muse')
  lines = text.splitlines()
  assert lines[:2] == [ref.REFERENCE_HEADER, 'Your true next item was "Muse".']
  assert lines[2] == (
    'Turn 1: the recommender suggested "Radiohead" (SASRec rank 4); you reacted skip with score '
    '0.3. That was right: it is not your true next item ("Muse"), so the right reaction was a low '
    'score (skip or dislike, below 0.5); the lower, the better.'
  )
  assert lines[3] == (
    'Turn 1: the recommender suggested "Blur"; you reacted star with score 0.6. It is not your '
    'true next item ("Muse"), but you may really like it, so this reaction is not judged.'
  )
  assert lines[4].startswith(
    'Turn 2: the recommender suggested "Muse" (SASRec rank 2); you reacted skip with score '
    '0.4. That was wrong: it is your true next item, so the right reaction was click'
  )
  assert lines[5].endswith(
    'That was right: it is your true next item, so the right reaction was click with a high score (at least 0.75).'
  )


def test_invalid_turn_and_float32_scores():
  invalid = ref.TurnHindsight(
    turn=1, item_title=None, sasrec_rank=None, hit=False, action='skip', acceptance_score=np.float32(0.375)
  )
  text = ref.reference_trajectory('recommender', [invalid], target_title='Muse')
  assert text.splitlines()[2] == (
    'Turn 1: your message named no candidate; the user reacted skip with score 0.375. '
    'That was wrong: name exactly one candidate title; the true next item was "Muse", '
    'so you should have recommended "Muse".'
  )
  user_text = ref.reference_trajectory('user', [invalid], target_title='Muse')
  assert 'Turn 1: the recommender named no candidate; you reacted skip with score 0.375. That was right' in user_text
  with pytest.raises(ValueError, match='agent must be one of'):
    ref.reference_trajectory('judge', [invalid], target_title='Muse')


def test_reference_can_omit_each_turns_sampled_item_and_reaction():
  invalid = ref.TurnHindsight(
    turn=3, item_title=None, sasrec_rank=None, hit=False, action='skip', acceptance_score=0.375
  )
  text = ref.recommender_reference([MISS, HIT, invalid], **TARGET, omit_samples=True)
  assert text == '\n'.join(
    [
      ref.REFERENCE_HEADER,
      'The user\'s true next item was "Muse" (SASRec rank 2 of 20).',
      'Turn 1: That was wrong: the user\'s true next item was "Muse"; you should have recommended "Muse".',
      "Turn 2: That was right: it is the user's true next item.",
      'Turn 3: That was wrong: name exactly one candidate title; the true next item was "Muse", so you should have '
      'recommended "Muse".',
      'The right recommendation at every turn was "Muse".',
    ]
  )
  user = ref.reference_trajectory('user', [MISS, HIT], **TARGET, omit_samples=True)
  assert user.splitlines()[2:] == [
    'Turn 1: That was right: it is not your true next item ("Muse"), so the right reaction was a low score (skip or '
    'dislike, below 0.5); the lower, the better.',
    'Turn 2: That was right: it is your true next item, so the right reaction was click with a high score (at '
    'least 0.75).',
  ]
  for agent in ('recommender', 'user'):
    omitted = ref.reference_trajectory(agent, [MISS, HIT], **TARGET, omit_samples=True)
    # No sampled title (Radiohead), its SASRec rank, action or score; the default d (unchanged) has them all.
    for sampled in ('Radiohead', 'rank 4', 'reacted', '0.3', '0.9'):
      assert sampled not in omitted and sampled in ref.reference_trajectory(agent, [MISS, HIT], **TARGET)


def test_turn_hindsight_validates():
  with pytest.raises(ValueError, match='acceptance_score must lie in'):
    ref.TurnHindsight(turn=1, item_title='A', sasrec_rank=1, hit=False, action='skip', acceptance_score=1.5)
  with pytest.raises(ValueError, match='action must be one of'):
    ref.TurnHindsight(turn=1, item_title='A', sasrec_rank=1, hit=False, action='like', acceptance_score=0.5)
  with pytest.raises(ValueError, match='is a hit but names no item'):
    ref.TurnHindsight(turn=1, item_title=None, sasrec_rank=None, hit=True, action='click', acceptance_score=0.9)
  with pytest.raises(ValueError, match='sasrec_rank must be an int >= 1'):
    ref.TurnHindsight(turn=1, item_title='A', sasrec_rank=0, hit=False, action='skip', acceptance_score=0.3)


@pytest.mark.parametrize('agent', ['recommender', 'user'])
def test_teacher_prompt_appends_d_to_the_last_user_message(agent):
  if agent == 'recommender':
    student = recommender_messages(history_titles=['A', 'B'], candidate_titles=['Muse', 'Radiohead'])
  else:
    student = user_messages(history_titles=['A', 'B'], recommended_title='Radiohead', recommender_reason='fits')
  original = [dict(message) for message in student]
  d = ref.reference_trajectory(agent, [MISS, HIT], **TARGET)
  teacher = ref.teacher_messages(student, d, agent=agent)
  assert student == original  # the student prompt is untouched
  assert [m['role'] for m in teacher] == [m['role'] for m in student]
  assert teacher[0] == student[0]  # the system message (role, output format) is unchanged
  assert teacher[-1]['content'] == '\n\n'.join([student[-1]['content'], d, ref.restated_instructions(agent)])
  # x is a prefix of x + d inside the final user turn.
  assert teacher[-1]['content'].startswith(student[-1]['content'] + '\n\n' + ref.REFERENCE_HEADER)
  assert teacher[-1]['content'].endswith(ref.restated_instructions(agent))
  label = 'Item' if agent == 'recommender' else 'Score'
  assert label in ref.restated_instructions(agent)


def test_teacher_prompt_errors():
  with pytest.raises(ValueError, match='has no user message'):
    ref.teacher_messages([{'role': 'system', 'content': 'x'}], 'd', agent='user')
  with pytest.raises(ValueError, match='reference trajectory d is empty'):
    ref.teacher_messages([{'role': 'user', 'content': 'x'}], '  ', agent='user')
  with pytest.raises(ValueError, match=r'student_messages\[0\] must be a dict'):
    ref.teacher_messages([{'role': 'user'}], 'd', agent='user')


def test_candidate_ranks_break_ties_towards_the_earlier_candidate():
  assert ref.candidate_ranks([0.1, 0.9, 0.5, 0.9]) == [4, 1, 3, 2]


def test_episode_reference_from_an_episode():
  # The attribute names of `agents.Episode` / `agents.Turn` that the adapter reads.
  turn = lambda t, item, hit, action, score: types.SimpleNamespace(
    turn=t, item=item, hit=hit, action=action, acceptance_score=score
  )
  episode = types.SimpleNamespace(
    candidates=(11, 12, 13),
    candidate_titles=('Muse', 'Radiohead', 'Blur'),
    target=11,
    target_title='Muse',
    turns=(turn(1, 12, False, 'skip', 0.3), turn(2, -1, False, 'skip', 0.375), turn(3, 11, True, 'click', 0.9)),
  )
  ranks = ref.candidate_ranks([0.2, 0.5, 0.1])  # Radiohead 1, Muse 2, Blur 3
  turns, target_rank = ref.hindsight_turns(episode, ranks)
  assert target_rank == 2
  assert [(t.item_title, t.sasrec_rank, t.hit) for t in turns] == [
    ('Radiohead', 1, False),
    (None, None, False),
    ('Muse', 2, True),
  ]
  text = ref.episode_reference(episode, 'recommender', ranks)
  assert text == ref.recommender_reference(turns, target_title='Muse', target_rank=2, num_candidates=3)
  assert '(SASRec rank 1 of 3)' in text
  assert '(SASRec rank' not in ref.episode_reference(episode, 'recommender')
  with pytest.raises(ValueError, match='2 ranks for 3 candidates'):
    ref.hindsight_turns(episode, [1, 2])


def test_self_written_reference_uses_the_callback_and_falls_back_to_the_template():
  seen = []

  def generate(messages):
    seen.append(messages)
    return '  Turn 1: wrong, Muse was the answer.\n\nTurn 2: right.  \n'

  text = ref.self_written_reference(generate, 'recommender', [MISS, HIT], **TARGET)
  prompt = seen[0][-1]['content']
  assert 'The user\'s true next item was "Muse" (SASRec rank 2 of 20).' in prompt
  assert 'Turn 1: "Radiohead" (SASRec rank 4 of 20) was recommended; the user reacted skip with score 0.3.' in prompt
  assert 'That was' not in prompt  # facts only: the verdicts are the agent's to write
  assert text.splitlines() == [
    ref.REFERENCE_HEADER,
    'The user\'s true next item was "Muse" (SASRec rank 2 of 20).',
    'Turn 1: wrong, Muse was the answer.',
    'Turn 2: right.',
  ]
  fallback = ref.self_written_reference(lambda messages: ' \n', 'user', [MISS, HIT], **TARGET)
  assert fallback == ref.user_reference([MISS, HIT], **TARGET)
