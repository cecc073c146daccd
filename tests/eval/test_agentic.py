import json
import re

import numpy as np
import pytest

from coars_jax.agents.episodes import RolloutConfig, ScriptedBackend, turn_seed
from coars_jax.agents.reflexion import ReflexionConfig, batch_seed
from coars_jax.data import synthetic, user_sim_set
from coars_jax.eval import agentic
from coars_jax.eval.agentic import AgenticEvalConfig, evaluate_agentic, format_markdown
from coars_jax.eval.user_f1 import UserF1Config, roc_auc
from tests.eval.test_user_f1 import scripted_tokenizer, shown_history

DATASET = synthetic.synthetic_dataset()
WINDOWS = DATASET.split('test')


class ColumnPeer:
  def top_candidates(self, history, lengths, candidates):
    return candidates[:, 3]

  def candidate_similarities(self, history, lengths, candidates):
    return np.zeros(candidates.shape)


def next_item(item):
  return (item + 1) % DATASET.num_items  # the synthetic dataset's users walk the catalog with stride 1


def rec_history(messages):
  first_user = next(m for m in messages if m['role'] == 'user')  # the fixed data sits in the first message
  block = first_user['content'].split("The user's history, oldest first:\n")[1].split('\n\n')[0]
  return [int(line.rsplit(' ', 1)[1]) for line in block.splitlines()]


def scripted_agents():
  """Recommender: the true next item after an even last item; after an odd one, a title outside C at turn 1 and
  a wrong candidate at turn 2. User (episodes and F1 alike): click exactly the item that follows the history."""

  def respond(agent, episode, turn, messages):
    if agent == 'user':
      shown = re.search(r'^Recommended item: (.*)$', messages[-1]['content'], re.M).group(1)
      accept = shown == f'Item {next_item(shown_history(messages)[-1])}'
      return 'Reason: yes\nAction: click\nScore: 0.9' if accept else 'Reason: no\nAction: skip\nScore: 0.3'
    last = rec_history(messages)[-1]
    if last % 2 == 0:
      item = f'Item {next_item(last)}'
    elif turn == 1:
      item = 'Not A Candidate'
    else:
      first_user = next(m for m in messages if m['role'] == 'user')  # C sits in the first message
      block = first_user['content'].split('Candidate items:\n')[1].split('\n\n')[0]
      item = next(
        line.split('. ', 1)[1] for line in block.splitlines() if line.split('. ', 1)[1] != f'Item {next_item(last)}'
      )
    return f'Reason: fits\nItem: {item}'

  return ScriptedBackend(scripted_tokenizer(), respond)


def expected_episode_metrics():
  even = np.asarray([WINDOWS.window(i).history[-1] % 2 == 0 for i in range(len(WINDOWS))])
  assert 0 < even.sum() < len(even)  # precondition: both branches occur
  n_even, n_odd = int(even.sum()), int((~even).sum())
  return {
    'hit@1': n_even / len(even),
    'avg_turns': (n_even + 2 * n_odd) / len(even),
    'valid_ratio': (n_even + n_odd) / (n_even + 2 * n_odd),
    'click_rate': n_even / len(even),
  }


def test_row_has_the_protocol_metrics_and_user_f1():
  scripted = scripted_agents()
  config = AgenticEvalConfig(batch_size=4, rollout=RolloutConfig(max_turns=2), progress=False)
  result = evaluate_agentic(
    DATASET,
    scripted,
    peer=ColumnPeer(),
    method='zero-shot',
    model='scripted',
    seed=7,
    config=config,
    user_sim=user_sim_set(DATASET),
  )
  row = result.row
  assert list(row)[: len(agentic.ROW_KEYS)] == list(agentic.ROW_KEYS)
  for key, value in expected_episode_metrics().items():
    assert row[key] == pytest.approx(value), key
  assert (row['dataset'], row['method'], row['model'], row['seed']) == ('synthetic', 'zero-shot', 'scripted', 7)
  assert row['num_windows'] == len(WINDOWS) == len(result.episodes) and row['prior_episodes'] == 0
  # F1: each user accepts exactly its first future item out of 7 positives and 7 negatives: P = 1, R = 1/7.
  assert row['user_precision'] == 1.0 and row['user_recall'] == pytest.approx(1 / 7)
  assert row['user_f1'] == pytest.approx(0.25) and row['user_f1_macro'] == pytest.approx(0.25)
  assert row['user_f1_invalid'] == 0 and row['user_f1_judgements'] == 84
  assert row['wall_seconds'] >= row['episode_seconds'] >= 0
  json.dumps(row)  # JSON-ready
  # Windows run in batches of 4 (then 2), each batch with its own seed; the F1 judgements in rounds: 14 calls (one
  # per item position) of the 6 users, each call turn k + 1 of every user's case.
  turn_one = [c for c in scripted.calls if c.turn == 1 and c.agent == 'recommender']
  assert [c.batch_size for c in turn_one] == [4, 2]
  assert [c.seed for c in turn_one] == [turn_seed(batch_seed(7, b), 1, 'recommender') for b in (0, 1)]
  f1_calls = scripted.calls[-14:]
  assert [(c.agent, c.turn, c.batch_size) for c in f1_calls] == [('user', k + 1, 6) for k in range(14)]
  assert [e.window_index for e in result.episodes] == list(range(len(WINDOWS)))


def test_reflexion_rows_count_only_the_evaluation_windows():
  config = AgenticEvalConfig(
    window_indices=(0, 2, 4),
    rollout=RolloutConfig(max_turns=2),
    reflexion=ReflexionConfig(num_prior_episodes=2),
    progress=False,
  )
  result = evaluate_agentic(
    DATASET, scripted_agents(), peer=ColumnPeer(), method='reflexion', model='scripted', config=config
  )
  row = result.row
  assert row['num_windows'] == 3 and row['prior_episodes'] == 6 and row['user_f1'] is None
  assert [e.window_index for e in result.episodes] == [0, 2, 4]
  assert all(e.split == 'test' for e in result.episodes)
  expected = np.mean([WINDOWS.window(i).history[-1] % 2 == 0 for i in (0, 2, 4)])
  assert row['hit@1'] == pytest.approx(expected)
  assert len(result.reflexion.chains) == 3


def test_markdown_summarises_over_seeds_and_marks_missing_metrics():
  base = {'dataset': 'synthetic', 'model': 'tiny', 'valid_ratio': 1.0, 'avg_turns': 2.0, 'click_rate': 0.5}
  rows = [
    {
      **base,
      'method': 'coars',
      'seed': 0,
      'hit@1': 0.2,
      'user_f1': 0.5,
      'user_f1_macro': 0.4,
      'user_precision': 0.5,
      'user_auc': 0.6,
    },
    {
      **base,
      'method': 'coars',
      'seed': 1,
      'hit@1': 0.4,
      'user_f1': 0.7,
      'user_f1_macro': 0.6,
      'user_precision': 0.7,
      'user_auc': 0.8,
    },
    {**base, 'method': 'zero-shot', 'seed': 0, 'hit@1': 0.1, 'user_f1': None},
  ]
  table = format_markdown(rows)
  lines = table.splitlines()
  assert lines[0] == (
    '| dataset | method | model | Hit@1 | ValidRatio | avg turns | click rate | user F1 (micro) | '
    'user F1 (macro) | user P | user AUC | seeds |'
  )
  assert lines[2] == (
    '| synthetic | coars | tiny | 0.3000 ± 0.1000 | 1.0000 ± 0.0000 | 2.0000 ± 0.0000 | '
    '0.5000 ± 0.0000 | 0.6000 ± 0.1000 | 0.5000 ± 0.1000 | 0.6000 ± 0.1000 | 0.7000 ± 0.1000 | '
    '[0, 1] |'
  )
  assert lines[3] == '| synthetic | zero-shot | tiny | 0.1000 | 1.0000 | 2.0000 | 0.5000 | — | — | — | — | [0] |'
  assert (
    '| synthetic | coars | tiny | 1 | 0.4000 | 1.0000 | 2.0000 | 0.5000 | 0.7000 | 0.6000 | 0.7000 | 0.8000 |'
  ) in lines
  with pytest.raises(ValueError, match='at least one row'):
    format_markdown([])


def test_config_and_names_are_validated():
  with pytest.raises(ValueError, match="AgenticEvalConfig.split must be 'val' or 'test'"):
    AgenticEvalConfig(split='train')
  with pytest.raises(ValueError, match='AgenticEvalConfig.batch_size must be an int >= 1'):
    AgenticEvalConfig(batch_size=0)
  with pytest.raises(ValueError, match='AgenticEvalConfig.window_indices must be None or a non-empty'):
    AgenticEvalConfig(window_indices=())
  with pytest.raises(ValueError, match='AgenticEvalConfig.user_f1_both_peer_settings must be a bool'):
    AgenticEvalConfig(user_f1_both_peer_settings=1)
  with pytest.raises(TypeError, match='AgenticEvalConfig.reflexion must be a ReflexionConfig'):
    AgenticEvalConfig(reflexion={'num_prior_episodes': 2})
  assert AgenticEvalConfig(window_indices=[np.int64(3)]).window_indices == (3,)
  with pytest.raises(ValueError, match='method must be a non-empty str'):
    evaluate_agentic(DATASET, scripted_agents(), peer=ColumnPeer(), method=' ', model='m')


class ScoringPeer(ColumnPeer):
  """ColumnPeer that can also score items: SASRec's score of item i is -i whatever the history."""

  def candidate_scores(self, history, lengths, candidates):
    return -np.asarray(candidates, np.float32)


def peer_minded_agents():
  """Recommender: the first candidate. User: click exactly when its prompt carries the peer opinion p_t."""

  def respond(agent, episode, turn, messages):
    content = '\n\n'.join(m['content'] for m in messages if m['role'] == 'user')  # the whole dialogue's data
    if agent == 'user':
      return (
        'Reason: peers\nAction: click\nScore: 0.9'
        if 'Peer opinion: People with a history like yours chose' in content
        else 'Reason: alone\nAction: skip\nScore: 0.3'
      )
    first = content.split('Candidate items:\n')[1].splitlines()[0].split('. ', 1)[1]
    return f'Reason: fits\nItem: {first}'

  return ScriptedBackend(scripted_tokenizer(), respond)


def test_both_peer_settings_report_with_p_t_as_the_main_f1_and_without_it_prefixed():
  sim = user_sim_set(DATASET)
  scripted = peer_minded_agents()
  # The user-f1 config says off; the two-pass mode still makes the main pass the one with p_t.
  config = AgenticEvalConfig(
    window_indices=(0, 1),
    rollout=RolloutConfig(max_turns=1),
    progress=False,
    user_f1=UserF1Config(show_peer_opinion=False),
    user_f1_both_peer_settings=True,
  )
  result = evaluate_agentic(
    DATASET, scripted, peer=ScoringPeer(), method='coars', model='scripted', config=config, user_sim=sim
  )
  row = result.row
  assert row['user_f1_peer_opinion'] is True
  # With p_t every item is clicked: the accept-all values. Without it nothing is.
  assert row['user_f1'] == pytest.approx(2 / 3) and row['user_precision'] == 0.5 and row['user_recall'] == 1.0
  assert row['user_accept_rate'] == 1.0 and row['user_auc'] == 0.5
  assert row['no_peer_user_f1'] == 0.0 and row['no_peer_user_recall'] == 0.0 and row['no_peer_user_accept_rate'] == 0
  assert row['no_peer_user_auc'] == 0.5 and row['no_peer_user_f1_judgements'] == 84
  assert result.user_f1.scores['micro_f1'] == row['user_f1']
  assert result.user_f1_no_peer.scores['micro_f1'] == row['no_peer_user_f1']
  # The set's references appear once, unprefixed, from the scoring peer.
  labels = [j.label for j in result.user_f1.judgements]
  assert row['sasrec_auc'] == pytest.approx(roc_auc(labels, [-j.item for j in result.user_f1.judgements]))
  assert row['accept_all_f1'] == pytest.approx(2 / 3)
  assert not any(k.startswith('no_peer_') and not k.startswith('no_peer_user_') for k in row)
  json.dumps(row)
  # Two F1 passes after the episodes (14 rounds of the 6 users each), the main pass's prompts showing p_t and the
  # other's not.
  f1_calls = scripted.calls[-28:]
  assert [(c.agent, c.turn, c.batch_size) for c in f1_calls] == [('user', k + 1, 6) for k in range(14)] * 2
  assert all('Peer opinion:' in j.generation.prompt_text for j in result.user_f1.judgements)
  assert not any('Peer opinion:' in j.generation.prompt_text for j in result.user_f1_no_peer.judgements)


def test_single_pass_records_its_peer_setting_and_has_no_prefixed_keys():
  sim = user_sim_set(DATASET)
  for show, expected_f1 in ((False, 0.0), (True, 2 / 3)):
    config = AgenticEvalConfig(
      window_indices=(0,),
      rollout=RolloutConfig(max_turns=1),
      progress=False,
      user_f1=UserF1Config(show_peer_opinion=show),
    )
    result = evaluate_agentic(
      DATASET, peer_minded_agents(), peer=ColumnPeer(), method='coars', model='scripted', config=config, user_sim=sim
    )
    assert result.row['user_f1_peer_opinion'] is show and result.row['user_f1'] == pytest.approx(expected_f1)
    assert result.user_f1_no_peer is None and not any(k.startswith('no_peer_') for k in result.row)
    assert result.row['sasrec_auc'] is None  # ColumnPeer cannot score items


def test_a_killed_evaluation_resumes_after_its_last_finished_batch(tmp_path):
  config = AgenticEvalConfig(
    batch_size=4,
    rollout=RolloutConfig(max_turns=2),
    progress=False,
    resume_dir=str(tmp_path / 'kept'),
    resume_key='agents A',
  )
  sim = user_sim_set(DATASET)
  whole = evaluate_agentic(
    DATASET,
    scripted_agents(),
    peer=ColumnPeer(),
    method='m',
    model='s',
    seed=7,
    config=AgenticEvalConfig(batch_size=4, rollout=RolloutConfig(max_turns=2), progress=False),
    user_sim=sim,
  )

  class Killed(Exception):
    pass

  dying = scripted_agents()
  generate = dying.generate

  def die_in_the_second_batch(agent, prompts, **kwargs):
    if len(dying.calls) >= 4:  # batch 1 is 2 turns x 2 agents; its last batch of 2 windows never starts
      raise Killed
    return generate(agent, prompts, **kwargs)

  dying.generate = die_in_the_second_batch
  with pytest.raises(Killed):
    evaluate_agentic(DATASET, dying, peer=ColumnPeer(), method='m', model='s', seed=7, config=config, user_sim=sim)
  assert len(list((tmp_path / 'kept').glob('*.json'))) == 1  # the first batch was kept

  resumed = scripted_agents()
  result = evaluate_agentic(
    DATASET, resumed, peer=ColumnPeer(), method='m', model='s', seed=7, config=config, user_sim=sim
  )
  # Batch 1 came from disk: the resumed run's first recommender call is batch 2's, of its 2 windows.
  assert resumed.calls[0].batch_size == 2 and resumed.calls[0].agent == 'recommender'
  for key in ('hit@1', 'valid_ratio', 'avg_turns', 'user_f1'):
    assert result.row[key] == whole.row[key], key
  assert result.row['window_hits'] == whole.row['window_hits']
  # A third run has everything kept (episodes and the F1 pass) and calls nothing; another key reads none of it.
  again = scripted_agents()
  evaluate_agentic(DATASET, again, peer=ColumnPeer(), method='m', model='s', seed=7, config=config, user_sim=sim)
  assert again.calls == []
  other = scripted_agents()
  evaluate_agentic(
    DATASET,
    other,
    peer=ColumnPeer(),
    method='m',
    model='s',
    seed=7,
    user_sim=sim,
    config=AgenticEvalConfig(
      batch_size=4,
      rollout=RolloutConfig(max_turns=2),
      progress=False,
      resume_dir=str(tmp_path / 'kept'),
      resume_key='agents B',
    ),
  )
  assert other.calls and other.calls[0].batch_size == 4


def test_kept_pieces_are_data_only_json_that_rebuilds_the_same_objects():
  result = evaluate_agentic(
    DATASET,
    scripted_agents(),
    peer=ColumnPeer(),
    method='m',
    model='s',
    seed=7,
    config=AgenticEvalConfig(batch_size=4, rollout=RolloutConfig(max_turns=2), progress=False),
    user_sim=user_sim_set(DATASET),
  )
  for value in (list(result.episodes), result.user_f1):
    text = json.dumps(agentic._encode(value))
    back = agentic._decode(json.loads(text))
    assert json.dumps(agentic._encode(back)) == text  # the same objects, field by field, arrays and dtypes included
  episodes = agentic._decode(json.loads(json.dumps(agentic._encode(list(result.episodes)))))
  assert agentic.episode_metrics(episodes) == agentic.episode_metrics(list(result.episodes))
  assert episodes[0].turns[0].recommender.prompt_ids.dtype == np.int32
  # Only this package's dataclasses are rebuilt: a file naming anything else is refused.
  with pytest.raises(ValueError, match="names 'subprocess:Popen', outside coars_jax"):
    agentic._decode({'__dataclass__': 'subprocess:Popen', 'fields': {'args': 'true'}})
  with pytest.raises(ValueError, match='which is not a dataclass'):
    agentic._decode({'__dataclass__': 'coars_jax.eval.agentic:evaluate_agentic', 'fields': {}})
