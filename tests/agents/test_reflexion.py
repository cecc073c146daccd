import dataclasses

import numpy as np
import pytest

from coars_jax.agents import reflexion
from coars_jax.agents.episodes import RolloutConfig, ScriptedBackend
from coars_jax.agents.reflexion import (
  SECTION_TITLE,
  ReflexionConfig,
  prior_windows,
  reflection_section,
  run_reflexion_episodes,
  with_section,
)
from coars_jax.data import candidate_list, synthetic
from coars_jax.data.schema import ItemCatalog, Window, WindowSplit
from tests.eval.test_user_f1 import scripted_tokenizer

DATASET = synthetic.synthetic_dataset()
SPLIT = 'test'
SENTINEL = '\u2063TARGET-TITLE\u2063'


class ColumnPeer:
  """The peer's pick is the 4th candidate."""

  def top_candidates(self, history, lengths, candidates):
    return candidates[:, 3]

  def candidate_similarities(self, history, lengths, candidates):
    return np.zeros(candidates.shape)


def first_user(messages):
  return next(m for m in messages if m['role'] == 'user')


def candidates_in(messages):
  block = first_user(messages)['content'].split('Candidate items:\n')[1].split('\n\n')[0]
  return [line.split('. ', 1)[1] for line in block.splitlines()]


def backend(pick=None, user_text='Reason: not for me\nAction: skip\nScore: 0.3'):
  """Recommender: pick(messages, candidate titles, turn) or the turn-th candidate; user: always `user_text`."""

  def respond(agent, episode, turn, messages):
    if agent == 'user':
      return user_text
    titles = candidates_in(messages)
    return f'Reason: worth a try\nItem: {pick(messages, titles, turn) if pick else titles[turn]}'

  return ScriptedBackend(scripted_tokenizer(), respond)


def prompts_of(step):
  return [(turn.recommender.prompt_text, turn.user.prompt_text) for turn in step.episode.turns]


def test_prior_windows_are_cut_from_the_history_oldest_first():
  window = Window(user=7, history=tuple(range(1, 11)), target=99)
  assert prior_windows(window, ReflexionConfig(num_prior_episodes=3)) == [
    Window(7, tuple(range(1, 8)), 8),
    Window(7, tuple(range(1, 9)), 9),
    Window(7, tuple(range(1, 10)), 10),
  ]
  short = Window(user=7, history=(1, 2, 3, 4), target=99)
  assert prior_windows(short, ReflexionConfig(num_prior_episodes=3)) == [Window(7, (1, 2, 3), 4)]
  assert prior_windows(short, ReflexionConfig(num_prior_episodes=3, min_prior_history=4)) == []
  assert prior_windows(window, ReflexionConfig(num_prior_episodes=0)) == []


def test_with_section_appends_to_the_first_user_message_only():
  messages = [{'role': 'system', 'content': 'S'}, {'role': 'user', 'content': 'U'}]
  assert with_section(messages, 'R') == [{'role': 'system', 'content': 'S'}, {'role': 'user', 'content': 'U\n\nR'}]
  # A later turn's prompt keeps the section where turn 1 had it, so it still starts with turn 1's prompt.
  later = messages + [{'role': 'assistant', 'content': 'A'}, {'role': 'user', 'content': 'V'}]
  assert with_section(later, 'R') == with_section(messages, 'R') + later[2:]
  assert messages[1]['content'] == 'U'  # the caller's prompt is not changed
  assert with_section(messages, '') == messages
  with pytest.raises(ValueError, match='no user message'):
    with_section([{'role': 'system', 'content': 'S'}], 'R')


def run_chains(config, **kwargs):
  scripted = backend(**kwargs)
  run = run_reflexion_episodes(
    DATASET,
    SPLIT,
    range(len(DATASET.split(SPLIT))),
    scripted,
    peer=ColumnPeer(),
    config=config,
    rollout=RolloutConfig(max_turns=2),
  )
  return run, scripted


def test_reflections_reach_the_same_users_later_episodes_and_no_other_user():
  run, scripted = run_chains(ReflexionConfig(num_prior_episodes=2))
  users = [int(u) for u in DATASET.split(SPLIT).users]
  assert sorted(run.chains) == sorted(users) and run.num_prior_episodes == 2 * len(users)
  reflections = [step.reflection for chain in run.chains.values() for step in chain]
  assert len(set(reflections)) == len(reflections)  # precondition: each is a distinct string
  for user, chain in run.chains.items():
    assert [step.evaluated for step in chain] == [False, False, True]
    assert [step.position for step in chain] == [0, 1, 2]
    assert chain[0].shown_reflections == ''
    for k, step in enumerate(chain):
      earlier = [s.reflection for s in chain[:k]]
      assert step.shown_reflections == reflection_section(earlier)
      for rec_prompt, user_prompt in prompts_of(step):
        assert all(r in rec_prompt for r in earlier)
        assert SECTION_TITLE not in user_prompt  # the user agent sees no reflections by default
      for other_user, other_chain in run.chains.items():
        if other_user == user:
          continue
        for other in other_chain:
          assert all(step.reflection not in text for pair in prompts_of(other) for text in pair)
    # The reflection summarises the dialogue: each shown title with the user's reaction, and the outcome.
    last = chain[-1]
    for turn in last.episode.turns:
      assert f'"{turn.shown_title}" (user: skip, score 0.3)' in last.reflection
    assert last.reflection.startswith('Session 3: ') and 'failure' in last.reflection
  # Chains of equal length run side by side: 3 stages, each one call per agent per turn for all 6 users.
  assert [(c.agent, c.batch_size) for c in scripted.calls if c.turn == 1] == [('recommender', 6), ('user', 6)] * 3


def test_evaluation_windows_keep_their_own_candidates_and_order():
  run, _ = run_chains(ReflexionConfig(num_prior_episodes=2))
  for index, episode in enumerate(run.episodes):
    assert (episode.split, episode.window_index) == (SPLIT, index)
    assert list(episode.candidates) == [int(c) for c in candidate_list(DATASET, SPLIT, index, seed=0)]
  for chain in run.chains.values():
    window = DATASET.split(SPLIT).window(chain[-1].episode.window_index)
    for step, j in zip(chain[:2], (2, 1)):
      # Prior j of a window plays history[:L - j] -> history[L - j].
      assert step.episode.history == window.history[:-j] and step.episode.target == window.history[-j]


def next_title(messages):
  """The synthetic dataset's true next item for the history in a recommender prompt (stride 1)."""
  block = first_user(messages)['content'].split("The user's history, oldest first:\n")[1].split('\n\n')[0]
  last = int(block.splitlines()[-1].rsplit(' ', 1)[1])
  return last, f'Item {(last + 1) % DATASET.num_items}'


def test_outcomes_are_reported_and_options_apply():
  def pick(messages, titles, turn):
    # The right answer after an even last item, a wrong one after an odd one, so both outcomes occur.
    last, right = next_title(messages)
    return right if last % 2 == 0 else next(t for t in titles if t != right)

  run, _ = run_chains(
    ReflexionConfig(num_prior_episodes=2, max_reflections=1, show_to_user=True),
    pick=pick,
    user_text='Reason: love it\nAction: click\nScore: 0.9',
  )
  outcomes = set()
  for chain in run.chains.values():
    for k, step in enumerate(chain):
      # max_reflections=1: only the previous episode's reflection is shown, to both agents.
      shown = reflection_section([chain[k - 1].reflection]) if k else ''
      assert step.shown_reflections == shown
      for rec_prompt, user_prompt in prompts_of(step):
        if k:
          assert shown in rec_prompt and shown in user_prompt
        if k > 1:
          assert chain[0].reflection not in rec_prompt and chain[0].reflection not in user_prompt
      episode = step.episode
      assert episode.num_turns == 1 and episode.clicked
      last_title = episode.turns[-1].shown_title
      if episode.final_hit:
        assert f'Outcome: success: "{last_title}" was the item the user chose next.' in step.reflection
      else:
        assert (
          f'Outcome: failure: the user clicked "{last_title}", but it was not the item they chose next.'
          in step.reflection
        )
        assert f'"{episode.target_title}"' not in step.reflection  # a failure never names the right item
      outcomes.add(episode.final_hit)
  assert outcomes == {True, False}


def test_a_later_target_never_leaks_into_earlier_dialogues_or_reflections():
  windows = DATASET.split(SPLIT)
  targets = {int(t) for t in windows.targets}
  # Known items without the targets: without the exclusion, prior candidate lists could then draw a target.
  stripped = dataclasses.replace(
    DATASET, user_items={u: frozenset(s.tolist()) - targets for u, s in DATASET.user_sequences.items()}
  )
  counts = {'shown': 0, 'hidden': 0}
  for index in range(len(windows)):
    titles = list(DATASET.catalog.titles)
    target = int(windows.targets[index])
    titles[target] = SENTINEL
    dataset = dataclasses.replace(stripped, catalog=ItemCatalog(tuple(titles)))

    def pick(messages, candidates, turn):
      # Adversarial: name the sentinel whenever it is a candidate, except at turn 1, so some turns stay hidden.
      others = [t for t in candidates if t != SENTINEL]
      return SENTINEL if SENTINEL in candidates and turn > 1 else others[turn]

    scripted = backend(pick=pick)
    run = run_reflexion_episodes(
      dataset,
      SPLIT,
      [index],
      scripted,
      peer=ColumnPeer(),
      config=ReflexionConfig(num_prior_episodes=3, show_to_user=True),
      rollout=RolloutConfig(max_turns=3),
    )
    (chain,) = run.chains.values()
    assert len(chain) == 4
    for step in chain[:-1]:
      assert SENTINEL not in step.reflection
      assert all(SENTINEL not in text for pair in prompts_of(step) for text in pair)
    final = chain[-1].episode
    named = {final.peer_item}
    for turn in final.turns:
      named.add(turn.item)
      if target in named:
        counts['shown'] += 1
        assert SENTINEL in turn.user.prompt_text
      else:
        counts['hidden'] += 1
        assert SENTINEL not in turn.user.prompt_text
  assert counts['shown'] > 0 and counts['hidden'] > 0, counts
  # The test has teeth: without the exclusion some prior candidate list of these windows would hold its target.
  leaky = 0
  for index in range(len(windows)):
    priors = prior_windows(windows.window(index), ReflexionConfig(num_prior_episodes=3))
    split = WindowSplit.from_windows(priors, DATASET.catalog.pad_id)
    plain = dataclasses.replace(stripped, splits={**stripped.splits, 'train': split})
    leaky += any(int(windows.targets[index]) in candidate_list(plain, 'train', k, seed=0) for k in range(len(priors)))
  assert leaky > 0


def test_users_with_several_evaluation_windows_play_them_in_order():
  train = DATASET.split('train')
  # The last two training windows of users 0 and 1 as an evaluation split: two windows per user.
  rows = [i for u in (0, 1) for i in np.flatnonzero(train.users == u)[-2:]]
  split = train.select(np.asarray(rows))
  dataset = dataclasses.replace(DATASET, splits={**DATASET.splits, 'test': split})
  scripted = backend()
  run = run_reflexion_episodes(
    dataset,
    SPLIT,
    [3, 2, 1, 0],
    scripted,
    peer=ColumnPeer(),
    config=ReflexionConfig(num_prior_episodes=1),
    rollout=RolloutConfig(max_turns=1),
  )
  assert [e.window_index for e in run.episodes] == [3, 2, 1, 0]
  for user, first, second in ((0, 0, 1), (1, 2, 3)):
    chain = run.chains[user]
    assert [(s.evaluated, s.episode.window_index) for s in chain] == [
      (False, chain[0].episode.window_index),
      (True, first),
      (True, second),
    ]
    assert chain[1].reflection in chain[2].episode.turns[0].recommender.prompt_text
    assert chain[0].reflection in chain[2].episode.turns[0].recommender.prompt_text


def test_inputs_are_validated():
  scripted = backend()
  with pytest.raises(ValueError, match=r'window_indices repeats \[1\]'):
    run_reflexion_episodes(DATASET, SPLIT, [1, 1], scripted, peer=ColumnPeer())
  with pytest.raises(ValueError, match="split 'train' is where its prior windows are played"):
    run_reflexion_episodes(DATASET, 'train', [0], scripted, peer=ColumnPeer())
  with pytest.raises(ValueError, match=r'window_indices \[99\] are outside split'):
    run_reflexion_episodes(DATASET, SPLIT, [99], scripted, peer=ColumnPeer())
  with pytest.raises(ValueError, match='ReflexionConfig.num_prior_episodes must be an int >= 0'):
    ReflexionConfig(num_prior_episodes=-1)
  with pytest.raises(ValueError, match='ReflexionConfig.max_reflections must be None or an int >= 1'):
    ReflexionConfig(max_reflections=0)
  assert reflexion.batch_seed(0, 1, 2) == reflexion.batch_seed(0, 1, 2) != reflexion.batch_seed(0, 2, 1)


def test_without_priors_single_window_users_play_plain_episodes():
  run, scripted = run_chains(ReflexionConfig(num_prior_episodes=0))
  assert run.num_prior_episodes == 0 and all(len(chain) == 1 for chain in run.chains.values())
  assert all(
    step.shown_reflections == '' and SECTION_TITLE not in prompt
    for chain in run.chains.values()
    for step in chain
    for pair in prompts_of(step)
    for prompt in pair
  )
  assert [(c.agent, c.batch_size) for c in scripted.calls if c.turn == 1] == [('recommender', 6), ('user', 6)]


def test_batch_size_splits_each_stage_into_calls():
  scripted = backend()
  run_reflexion_episodes(
    DATASET,
    SPLIT,
    range(6),
    scripted,
    peer=ColumnPeer(),
    config=ReflexionConfig(num_prior_episodes=1),
    rollout=RolloutConfig(max_turns=1),
    batch_size=4,
  )
  assert [(c.agent, c.batch_size) for c in scripted.calls] == [
    ('recommender', 4),
    ('user', 4),
    ('recommender', 2),
    ('user', 2),
  ] * 2
  assert len({c.seed for c in scripted.calls if c.agent == 'recommender'}) == 4
