import dataclasses
import inspect
import types

import numpy as np
import pytest

from coars_jax.agents import prompts
from coars_jax.agents.prompts import Memory, PromptConfig, MemoryTurn
from coars_jax.data import candidate_list, lastfm
from coars_jax.models.tokenizer import render_chat
from coars_jax.recsys.peer import peer_opinion
from tests.conftest import require_files

CANDIDATES = ['Muse', 'The Prodigy', '311', 'Lee "Scratch" Perry', 'Cable -  Straight']
HISTORY = ['Radiohead', 'Coldplay']


def _turn(title='Muse', action='skip', score=0.3, number=1):
  return MemoryTurn(
    item_title=title,
    recommender_reason=f'reason {number}\nwith a break',
    user_action=action,
    user_score=score,
    user_reason=f'user reason {number}',
  )


def test_recommender_messages_hold_format_history_candidates_and_hint():
  messages = prompts.recommender_messages(
    history_titles=HISTORY, candidate_titles=CANDIDATES, hint_title='311', config=PromptConfig.for_dataset('lastfm')
  )
  assert [m['role'] for m in messages] == ['system', 'user']
  system, user = messages[0]['content'], messages[1]['content']
  assert 'Reason: <' in system and 'Item: <the exact title of one candidate' in system and 'artist' in system
  assert "The user's history, oldest first:\n- Radiohead\n- Coldplay" in user
  numbered = '\n'.join(f'{n}. {t}' for n, t in enumerate(CANDIDATES, start=1))
  assert f'Candidate artists:\n{numbered}' in user  # titles verbatim, inner double spaces included
  assert 'Turn' not in user  # turn 1: no earlier turn
  assert 'ranks this candidate first among those not recommended yet in this dialogue:\nItem: 311' in user


def test_recommender_messages_refuse_a_hint_outside_the_candidates():
  with pytest.raises(ValueError, match="hint_title 'Blur' is not one of the candidate titles"):
    prompts.recommender_messages(history_titles=HISTORY, candidate_titles=CANDIDATES, hint_title='Blur')
  with pytest.raises(TypeError, match='candidate_titles must be a sequence of titles'):
    prompts.recommender_messages(history_titles=HISTORY, candidate_titles='Muse')
  with pytest.raises(ValueError, match='at least one title'):
    prompts.recommender_messages(history_titles=HISTORY, candidate_titles=[])


def test_empty_history_and_no_hint():
  user = prompts.recommender_messages(history_titles=[], candidate_titles=CANDIDATES)[1]['content']
  assert 'oldest first:\n(none)' in user and 'Hint' not in user


def test_dialogues_are_append_only_and_hold_every_earlier_turn():
  """Turn t's messages are turn t-1's, the agent's own reply, and one new user message with what the turn
  brought: the moving hint and the user's reaction for the recommender, the recommender's next message for the
  user. The peer opinion stays in the first message."""
  empty = Memory()
  one = empty.append(
    dataclasses.replace(
      _turn(),
      recommender_message='Reason: r1\nItem: Muse',
      user_message='Reason: u1\nAction: skip\nScore: 0.3',
      hint_title='311',
    )
  )
  # No raw messages at turn 2: the canonical forms stand in.
  two = one.append(dataclasses.replace(_turn('311', 'star', 0.6, number=2), hint_title='Muse'))
  assert (len(empty), len(one), len(two)) == (0, 1, 2) and two.turns[0] is one.turns[0]
  hints = ['311', 'Muse', 'The Prodigy']
  rec = [
    prompts.recommender_messages(
      history_titles=HISTORY, candidate_titles=CANDIDATES, memory=memory, hint_title=hints[len(memory)]
    )
    for memory in (empty, one, two)
  ]
  usr = [
    prompts.user_messages(
      history_titles=HISTORY,
      recommended_title=title,
      recommender_reason=reason,
      memory=memory,
      peer_opinion=peer_opinion('Muse'),
    )
    for memory, title, reason in (
      (empty, 'Muse', 'reason 1\nwith a break'),
      (one, '311', 'reason 2\nwith a break'),
      (two, 'The Prodigy', 'why'),
    )
  ]
  for chats in (rec, usr):
    for earlier, later in zip(chats, chats[1:]):
      assert later[: len(earlier)] == earlier and len(later) == len(earlier) + 2
      assert [m['role'] for m in later[len(earlier) :]] == ['assistant', 'user']
  assert rec[1][2]['content'] == 'Reason: r1\nItem: Muse'
  assert rec[2][4]['content'] == 'Reason: reason 2 with a break\nItem: 311'
  assert rec[1][3]['content'].startswith(
    "Turn 1: the user reacted to Muse.\nUser's action: skip\nUser's score: 0.3\nUser's reason: user reason 1"
  )
  assert rec[1][3]['content'].endswith('Item: Muse') and rec[2][5]['content'].endswith('Item: The Prodigy')
  assert usr[1][2]['content'] == 'Reason: u1\nAction: skip\nScore: 0.3'
  assert usr[2][4]['content'] == 'Reason: user reason 2\nAction: star\nScore: 0.6'
  assert usr[2][5]['content'] == "The recommender now says:\nRecommended item: The Prodigy\nRecommender's reason: why"
  assert 'Peer opinion' in usr[2][1]['content'] and all('Peer opinion' not in m['content'] for m in usr[2][2:])
  with pytest.raises(ValueError, match="hint_title 'Blur' is not one of the candidate titles"):
    prompts.recommender_messages(
      history_titles=HISTORY,
      candidate_titles=CANDIDATES,
      memory=Memory((dataclasses.replace(_turn(), hint_title='Blur'),)),
    )
  assert 'Turn 2:\nRecommended item: 311' in prompts.render_memory(two)  # the summary kept for reports


def test_turn_record_validates_action_and_score():
  with pytest.raises(ValueError, match='MemoryTurn.user_action must be one of'):
    _turn(action='love')
  with pytest.raises(ValueError, match=r"MemoryTurn.user_score must be a finite number in 'click'"):
    _turn(action='click', score=0.5)
  with pytest.raises(TypeError, match='Memory.turns\\[0\\] must be a MemoryTurn'):
    Memory(('not a turn',))
  assert type(_turn(score=np.float32(0.25)).user_score) is float


def test_user_messages_hold_message_peer_opinion_and_format():
  messages = prompts.user_messages(
    history_titles=HISTORY,
    recommended_title='Muse',
    recommender_reason='You like\nguitar bands.',
    peer_opinion=peer_opinion('311'),
  )
  system, user = messages[0]['content'], messages[1]['content']
  assert 'Action: <click|star|skip|dislike>' in system and 'Score: <' in system
  assert 'dislike [0, 0.25), skip [0.25, 0.5), star [0.5, 0.75), click [0.75, 1]' in system
  assert "Recommended item: Muse\nRecommender's reason: You like guitar bands." in user
  assert 'Peer opinion: People with a history like yours chose "311".' in user
  assert (
    'Peer opinion'
    not in prompts.user_messages(history_titles=HISTORY, recommended_title='Muse', recommender_reason='r')[1]['content']
  )


def test_user_builder_cannot_receive_the_target_or_the_candidates():
  parameters = set(inspect.signature(prompts.user_messages).parameters)
  assert parameters == {'history_titles', 'recommended_title', 'recommender_reason', 'memory', 'peer_opinion', 'config'}


def test_formatters_refuse_what_would_not_read_back():
  assert prompts.format_recommender_output('a\nb', 'Muse') == 'Reason: a b\nItem: Muse'
  assert prompts.format_user_output(' ok ', 'star', 0.5) == 'Reason: ok\nAction: star\nScore: 0.5'
  with pytest.raises(ValueError, match='title must be non-empty, without line breaks'):
    prompts.format_recommender_output('r', 'Mu\nse')
  with pytest.raises(ValueError, match=r"score must be a finite number in 'skip'\'s interval"):
    prompts.format_user_output('r', 'skip', 0.5)


def test_prompt_config_validates_and_maps_datasets():
  assert PromptConfig.for_dataset('movielens').item_noun_plural == 'movies'
  assert PromptConfig.for_dataset('unknown') == PromptConfig()
  with pytest.raises(ValueError, match='PromptConfig.item_noun must be a non-empty single-line word'):
    PromptConfig(item_noun='two\nlines')


def test_messages_render_through_the_plain_chat_fallback():
  tokenizer = types.SimpleNamespace(chat_template=None)
  messages = prompts.user_messages(history_titles=HISTORY, recommended_title='Muse', recommender_reason='r')
  text = render_chat(tokenizer, messages)
  assert text.startswith('System: You are a user') and text.endswith('Assistant:')


# --- the user agent never sees the target ---------------------------------------------------------------------

SENTINEL = '\u2063TARGET-TITLE\u2063'  # invisible separators: occurs in no title and no template
_WORDS = ('calm', 'loud', 'guitar', 'synth', 'older', 'newer', 'dark', 'bright', 'live', 'remix', 'sad', 'fun')


def _user_prompts(dataset, split, index, titles, seed):
  """User-agent prompt texts of one scripted episode, each with the item ids it showed so far.

  The script picks the recommended item and the peer's pick uniformly from C, so the target is shown in some
  turns and not in others; `titles` decides only how items are written, so two calls with the same seed and
  different `titles` play the same episode.
  """
  rng = np.random.default_rng(seed)
  window = dataset.split(split).window(index)
  candidates = candidate_list(dataset, split, index, seed=0)
  history = [titles[i] for i in window.history]
  memory, memory_items = Memory(), []
  for _ in range(5):
    item, peer = (int(candidates[rng.integers(len(candidates))]) for _ in range(2))
    reason = ' '.join(rng.choice(_WORDS, size=6))
    messages = prompts.user_messages(
      history_titles=history,
      recommended_title=titles[item],
      recommender_reason=reason,
      memory=memory,
      peer_opinion=peer_opinion(titles[peer]),
    )
    text = '\n'.join(m['content'] for m in messages)
    yield text, set(window.history) | set(memory_items) | {item, peer}
    action = ('dislike', 'skip', 'star', 'click')[rng.integers(4)]
    memory = memory.append(
      MemoryTurn(
        item_title=titles[item],
        recommender_reason=reason,
        user_action=action,
        user_score={'dislike': 0.1, 'skip': 0.3, 'star': 0.6, 'click': 0.8}[action],
        user_reason=' '.join(rng.choice(_WORDS, size=4)),
      )
    )
    memory_items.append(item)


def _check_no_leak(dataset, split, indices):
  """Plays each window with the real titles and again with the target's title swapped for a sentinel.

  Titles can be substrings of other titles and of template words (LastFM has 'Ef', '3' and 'Zu'), so searching
  the prompt for the target's title proves nothing. Instead: when the target was not shown, the prompt must not
  change at all when the target's title does, and must not hold the sentinel; when it was shown, the sentinel
  must be there (which shows the check can fail).
  """
  counts = {'shown': 0, 'hidden': 0}
  for index in indices:
    target = int(dataset.split(split).targets[index])
    real = list(dataset.catalog.titles)
    swapped = list(real)
    swapped[target] = SENTINEL
    pairs = zip(
      _user_prompts(dataset, split, index, real, seed=index), _user_prompts(dataset, split, index, swapped, seed=index)
    )
    for (text, shown), (text_swapped, shown_again) in pairs:
      assert shown == shown_again
      if target in shown:
        counts['shown'] += 1
        assert SENTINEL in text_swapped
      else:
        counts['hidden'] += 1
        assert SENTINEL not in text_swapped, (split, index)
        assert text == text_swapped, (split, index)
  assert counts['shown'] > 0 and counts['hidden'] > 0, counts
  return counts


def test_target_title_reaches_no_user_prompt_unless_shown_synthetic(synthetic_dataset):
  train = synthetic_dataset.split('train')
  _check_no_leak(synthetic_dataset, 'train', range(0, len(train), 3))
  for split in ('val', 'test'):
    _check_no_leak(synthetic_dataset, split, range(len(synthetic_dataset.split(split))))


def test_target_title_reaches_no_user_prompt_unless_shown_lastfm():
  root = require_files(lastfm.ITEM_FILE, *lastfm.SPLIT_FILES.values(), lastfm.STATS_FILE)
  dataset = lastfm.load(root, allow_download=False)
  counts = _check_no_leak(dataset, 'test', range(len(dataset.split('test'))))
  assert sum(counts.values()) == 5 * 122


def test_recommender_prompt_lists_the_target_among_the_candidates(synthetic_dataset):
  titles = synthetic_dataset.catalog.titles
  candidates = candidate_list(synthetic_dataset, 'test', 0, seed=0)
  target = int(synthetic_dataset.split('test').targets[0])
  user = prompts.recommender_messages(history_titles=[], candidate_titles=[titles[i] for i in candidates])[1]
  position = int(np.flatnonzero(candidates == target)[0]) + 1
  assert f'\n{position}. {titles[target]}\n' in user['content'] + '\n'
