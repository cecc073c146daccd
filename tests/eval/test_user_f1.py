import functools
import re
import tempfile

import pytest

from coars_jax.agents.episodes import ScriptedBackend, turn_seed
from coars_jax.agents.prompts import recommender_system_prompt, user_system_prompt
from coars_jax.data import synthetic, user_sim_set
from coars_jax.data.user_sim import UserSimSet
from coars_jax.eval.user_f1 import NEUTRAL_REASON, UserF1Config, evaluate_user_f1, f1_scores, judgement_prompts
from coars_jax.models import tokenizer as tokenizer_lib

DATASET = synthetic.synthetic_dataset()
SIM_SET = user_sim_set(DATASET)


@functools.lru_cache(maxsize=None)
def scripted_tokenizer():
  """A small BPE trained on the synthetic titles and both system prompts; ScriptedBackend only tokenizes with it."""
  lines = tokenizer_lib.tokenizer_corpus([DATASET.catalog.titles], repeats=2)
  for text in (recommender_system_prompt(), user_system_prompt()):
    lines += [line for line in text.splitlines() if line]
  folder = tokenizer_lib.build_tokenizer(lines, tempfile.mkdtemp(prefix='eval-tokenizer-'), vocab_size=600)
  return tokenizer_lib.load_tokenizer(folder)


def user_answer(action, score, reason='my reaction'):
  return f'Reason: {reason}\nAction: {action}\nScore: {score}'


def shown_item(messages):
  """The item id in a user prompt's 'Recommended item: Item <id>' line."""
  return int(re.search(r'^Recommended item: Item (\d+)$', messages[-1]['content'], re.M).group(1))


def shown_history(messages):
  block = messages[-1]['content'].split('Your history, oldest first:\n')[1].split('\n\n')[0]
  return tuple(int(line.rsplit(' ', 1)[1]) for line in block.splitlines())


def truth_by_history():
  """(history, item) -> label, read off the set: what a perfect user agent would know about each case."""
  return {(case.history, item): label for case in SIM_SET.cases for item, label in zip(case.items, case.labels)}


def policy_backend(policy):
  """A user agent that answers policy(label, item) for the (history, item) its prompt shows: 'click', 'star',
  'skip', 'dislike', or 'garbage' for text without any label."""
  truth = truth_by_history()
  scores = {'click': 0.9, 'star': 0.6, 'skip': 0.3, 'dislike': 0.1}

  def respond(agent, episode, turn, messages):
    assert agent == 'user' and turn == 1
    item = shown_item(messages)
    action = policy(truth[(shown_history(messages), item)], item)
    return 'no idea, honestly' if action == 'garbage' else user_answer(action, scores[action])

  return ScriptedBackend(scripted_tokenizer(), respond)


# --- the pure metric ---------------------------------------------------------------------------------------------

def test_f1_scores_hand_computed():
  labels = [[True, True, False, False], [True, False], [True, True, True, False]]
  predictions = [[True, False, True, False], [False, False], [True, True, True, True]]
  # User 0: TP 1, FP 1, FN 1 -> P = R = F1 = 1/2. User 1: nothing predicted -> P = 0 (zero division), R = 0, F1 = 0.
  # User 2: TP 3, FP 1, FN 0 -> P = 3/4, R = 1, F1 = 6/7. Micro: TP 4, FP 2, FN 2 -> P = R = F1 = 2/3.
  scores = f1_scores(labels, predictions)
  assert (scores['true_positives'], scores['false_positives'], scores['false_negatives']) == (4, 2, 2)
  assert scores['micro_precision'] == pytest.approx(2 / 3)
  assert scores['micro_recall'] == pytest.approx(2 / 3)
  assert scores['micro_f1'] == pytest.approx(2 / 3)
  assert scores['macro_precision'] == pytest.approx((1 / 2 + 0 + 3 / 4) / 3)
  assert scores['macro_recall'] == pytest.approx((1 / 2 + 0 + 1) / 3)
  assert scores['macro_f1'] == pytest.approx((1 / 2 + 0 + 6 / 7) / 3)


def test_f1_scores_micro_and_macro_differ_when_users_differ_in_size():
  # One user with 8 items all right, one with 2 items all wrong: micro is pulled by the big user, macro is not.
  scores = f1_scores([[True] * 4 + [False] * 4, [True, False]], [[True] * 4 + [False] * 4, [False, True]])
  assert scores['micro_precision'] == pytest.approx(4 / 5) and scores['micro_recall'] == pytest.approx(4 / 5)
  assert scores['macro_f1'] == pytest.approx(0.5)
  assert scores['micro_f1'] == pytest.approx(0.8)


def test_f1_scores_rejects_mismatched_inputs():
  with pytest.raises(ValueError, match='user 1: labels has shape \\(2,\\) but predictions has \\(1,\\)'):
    f1_scores([[True], [True, False]], [[True], [True]])
  with pytest.raises(ValueError, match='labels has 2 users but predictions has 1'):
    f1_scores([[True], [False]], [[True]])
  with pytest.raises(ValueError, match='at least one user'):
    f1_scores([], [])


# --- the protocol through a scripted user agent ------------------------------------------------------------------

def test_sim_set_is_the_one_to_one_protocol():
  # Precondition of the exact values below: 6 test users, each with 7 positives and 7 negatives.
  assert len(SIM_SET) == 6 and SIM_SET.users_left_out == 0
  assert all(len(c.items) == 14 and sum(c.labels) == 7 for c in SIM_SET.cases)


def test_perfect_user_agent_scores_one_and_accept_all_scores_half_precision():
  oracle = evaluate_user_f1(DATASET, SIM_SET, policy_backend(lambda label, item: 'click' if label else 'dislike'))
  assert oracle.scores['micro_f1'] == 1.0 and oracle.scores['macro_f1'] == 1.0 and oracle.num_invalid == 0
  # star counts as positive just as click does; with the 1:1 set precision is exactly 1/2.
  accept = evaluate_user_f1(DATASET, SIM_SET, policy_backend(lambda label, item: 'star'))
  assert accept.scores['micro_precision'] == 0.5 and accept.scores['micro_recall'] == 1.0
  assert accept.scores['micro_f1'] == pytest.approx(2 / 3) and accept.scores['macro_f1'] == pytest.approx(2 / 3)
  inverted = evaluate_user_f1(DATASET, SIM_SET, policy_backend(lambda label, item: 'skip' if label else 'click'))
  assert inverted.scores['micro_f1'] == 0.0 and inverted.scores['true_positives'] == 0


def test_mixed_answers_count_exactly_and_invalid_answers_are_negatives():
  def policy(label, item):
    if item % 5 == 0:
      return 'garbage'
    if item % 3 == 0:
      return 'star'
    return 'click' if label else 'skip'

  result = evaluate_user_f1(DATASET, SIM_SET, policy_backend(policy))
  tp = fp = fn = invalid = 0
  for case in SIM_SET.cases:
    for item, label in zip(case.items, case.labels):
      action = policy(label, item)
      invalid += action == 'garbage'
      positive = action in ('click', 'star')
      tp, fp, fn = tp + (positive and label), fp + (positive and not label), fn + (label and not positive)
  assert invalid > 0 and fp > 0 and fn > 0  # the policy exercises every path on this set
  assert (result.scores['true_positives'], result.scores['false_positives'],
          result.scores['false_negatives']) == (tp, fp, fn)
  assert result.num_invalid == invalid
  assert result.scores['micro_precision'] == pytest.approx(tp / (tp + fp))
  assert result.scores['micro_recall'] == pytest.approx(tp / (tp + fn))
  row = result.as_dict()
  assert row['user_f1'] == result.scores['micro_f1'] and row['user_f1_invalid'] == invalid
  assert row['user_f1_judgements'] == 84 and row['user_f1_users'] == 6
  # Every judgement is tied to its case, item and label.
  assert [(j.user, j.item, j.label) for j in result.judgements] == [
      (c.user, i, l) for c in SIM_SET.cases for i, l in zip(c.items, c.labels)]


def test_judgements_are_batched_into_few_calls():
  backend = policy_backend(lambda label, item: 'skip')
  evaluate_user_f1(DATASET, SIM_SET, backend, seed=4)
  assert [(c.agent, c.turn, c.batch_size) for c in backend.calls] == [('user', 1, 84)]
  assert backend.calls[0].seed == turn_seed(4, 1, 'user')
  backend = policy_backend(lambda label, item: 'skip')
  evaluate_user_f1(DATASET, SIM_SET, backend, config=UserF1Config(batch_size=32))
  assert [c.batch_size for c in backend.calls] == [32, 32, 20]
  assert [c.episode_ids[0] for c in backend.calls] == [0, 32, 64]
  assert len({c.seed for c in backend.calls}) == 3


def test_prompts_have_empty_memory_and_say_nothing_about_the_label():
  prompts = judgement_prompts(DATASET, SIM_SET)
  assert len(prompts) == 84
  reason = NEUTRAL_REASON.replace('{noun}', 'item')
  per_case = {}
  for case_index, position, messages in prompts:
    case = SIM_SET.cases[case_index]
    content = messages[-1]['content']
    assert 'Earlier turns of this dialogue:\n(none: this is the first turn)' in content
    assert f"Recommender's reason: {reason}" in content and 'Peer opinion' not in content
    assert shown_item(messages) == case.items[position] and shown_history(messages) == case.history
    # With the item's title masked, every prompt of a case is the same text, positive or negative.
    per_case.setdefault(case_index, set()).add(content.replace(f'Item {case.items[position]}\n', 'ITEM\n'))
  assert all(len(texts) == 1 for texts in per_case.values())
  # The dataset's item noun reaches the neutral reason (the synthetic dataset has the generic 'item').
  movie = judgement_prompts(DATASET, SIM_SET, config=UserF1Config(recommender_reason='A {noun} for you.'))
  assert "Recommender's reason: A item for you." in movie[0][2][-1]['content']


class FirstItemPeer:
  def top_candidates(self, history, lengths, candidates):
    assert history.shape == (len(candidates), 10)
    return candidates[:, 0]


def test_peer_opinion_names_the_peers_pick_among_the_case_items_when_asked():
  prompts = judgement_prompts(DATASET, SIM_SET, config=UserF1Config(show_peer_opinion=True), peer=FirstItemPeer())
  for case_index, _, messages in prompts:
    first = SIM_SET.cases[case_index].items[0]
    assert f'Peer opinion: People with a history like yours chose "Item {first}".' in messages[-1]['content']
  with pytest.raises(ValueError, match='show_peer_opinion is on but no peer was given'):
    judgement_prompts(DATASET, SIM_SET, config=UserF1Config(show_peer_opinion=True))


def test_inputs_and_config_are_validated():
  other = UserSimSet(dataset='lastfm', cases=SIM_SET.cases, users_left_out=0)
  with pytest.raises(ValueError, match="user-sim set is for dataset 'lastfm' but the dataset is 'synthetic'"):
    judgement_prompts(DATASET, other)
  with pytest.raises(ValueError, match='has no cases'):
    evaluate_user_f1(DATASET, UserSimSet(dataset='synthetic', cases=(), users_left_out=3),
                     policy_backend(lambda label, item: 'skip'))
  with pytest.raises(ValueError, match='UserF1Config.batch_size must be None or an int >= 1'):
    UserF1Config(batch_size=0)
  with pytest.raises(ValueError, match='UserF1Config.recommender_reason must be a non-empty str'):
    UserF1Config(recommender_reason='  ')
