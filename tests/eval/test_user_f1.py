import functools
import re
import tempfile

import numpy as np
import pytest
from flax import nnx

from coars_jax.agents.episodes import ScriptedBackend, turn_seed
from coars_jax.agents.prompts import recommender_system_prompt, user_system_prompt
from coars_jax.data import synthetic, user_sim_set
from coars_jax.data.schema import MAX_HISTORY
from coars_jax.data.user_sim import UserSimCase, UserSimSet
from coars_jax.eval.user_f1 import (
  NEUTRAL_REASON,
  UserF1Config,
  evaluate_user_f1,
  f1_scores,
  judgement_prompts,
  peer_scores,
  roc_auc,
  shared_prefix_calls,
  top_k_predictions,
)
from coars_jax.models import tokenizer as tokenizer_lib
from coars_jax.recsys import peer as peer_lib
from coars_jax.recsys.sasrec import SASRec, SASRecConfig

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
  first_user = next(m for m in messages if m['role'] == 'user')  # the history sits in the first message
  block = first_user['content'].split('Your history, oldest first:\n')[1].split('\n\n')[0]
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
    assert agent == 'user'
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
  assert (result.scores['true_positives'], result.scores['false_positives'], result.scores['false_negatives']) == (
    tp,
    fp,
    fn,
  )
  assert result.num_invalid == invalid
  assert result.scores['micro_precision'] == pytest.approx(tp / (tp + fp))
  assert result.scores['micro_recall'] == pytest.approx(tp / (tp + fn))
  row = result.as_dict()
  assert row['user_f1'] == result.scores['micro_f1'] and row['user_f1_invalid'] == invalid
  assert row['user_f1_judgements'] == 84 and row['user_f1_users'] == 6
  # Every judgement is tied to its case, item and label.
  assert [(j.user, j.item, j.label) for j in result.judgements] == [
    (c.user, i, l) for c in SIM_SET.cases for i, l in zip(c.items, c.labels)
  ]


def test_shared_prefix_calls_hold_whole_users_in_groups_of_one_size():
  """Users of 20, 18, 9, 4 and 3 judgements at batch_size 40: groups of 20 rows (the 20 and the 18, largest
  first), then 12 rows (three per call, one user), then 4 rows (ten per call, two users); every judgement once."""
  sizes = {0: 4, 1: 20, 2: 9, 3: 18, 4: 3}
  prompts = [(case, position, []) for case, count in sizes.items() for position in range(count)]
  calls = shared_prefix_calls(prompts, UserF1Config(batch_size=40))
  assert [(rows, groups, [prompts[m[0]][0] for m in members]) for rows, groups, members in calls] == [
    (20, 2, [1, 3]),
    (12, 3, [2]),
    (4, 10, [0, 4]),
  ]
  indices = sorted(i for _, _, members in calls for m in members for i in m)
  assert indices == list(range(len(prompts)))
  assert all(len(m) <= rows for rows, _, members in calls for m in members)
  assert all(prompts[i][0] == prompts[m[0]][0] for _, _, members in calls for m in members for i in m)
  with pytest.raises(ValueError, match='batching must be one of'):
    UserF1Config(batching='rows')


def test_flat_judgements_are_batched_into_few_calls():
  flat = UserF1Config(batching='flat')
  backend = policy_backend(lambda label, item: 'skip')
  evaluate_user_f1(DATASET, SIM_SET, backend, seed=4, config=flat)
  assert [(c.agent, c.turn, c.batch_size) for c in backend.calls] == [('user', 1, 84)]
  assert backend.calls[0].seed == turn_seed(4, 1, 'user')
  backend = policy_backend(lambda label, item: 'skip')
  evaluate_user_f1(DATASET, SIM_SET, backend, config=UserF1Config(batch_size=32, batching='flat'))
  assert [c.batch_size for c in backend.calls] == [32, 32, 20]
  assert [c.episode_ids[0] for c in backend.calls] == [0, 32, 64]
  assert len({c.seed for c in backend.calls}) == 3


def test_rounds_hold_one_judgement_per_user_and_give_the_same_result():
  policy = lambda label, item: 'click' if (label + item) % 3 else 'dislike'  # noqa: E731
  flat = evaluate_user_f1(DATASET, SIM_SET, policy_backend(policy), config=UserF1Config(batching='flat'))
  backend = policy_backend(policy)
  rounds = evaluate_user_f1(DATASET, SIM_SET, backend, config=UserF1Config(batch_size=4))
  # Users 0-3, then 4-5; call k asks each user of the group for its k-th item, as turn k + 1, episode = the case.
  sizes = [len(case.items) for case in SIM_SET.cases]
  expected = [
    (k + 1, tuple(c for c in group if k < sizes[c]))
    for group in ((0, 1, 2, 3), (4, 5))
    for k in range(max(sizes[c] for c in group))
  ]
  assert [(c.turn, c.episode_ids) for c in backend.calls] == expected
  assert [(j.case, j.item, j.positive) for j in rounds.judgements] == [
    (j.case, j.item, j.positive) for j in flat.judgements
  ]
  assert rounds.scores == flat.scores


def test_prompts_have_empty_memory_and_say_nothing_about_the_label():
  prompts = judgement_prompts(DATASET, SIM_SET)
  assert len(prompts) == 84
  reason = NEUTRAL_REASON.replace('{noun}', 'item')
  per_case = {}
  for case_index, position, messages in prompts:
    case = SIM_SET.cases[case_index]
    content = messages[-1]['content']
    assert [m['role'] for m in messages] == ['system', 'user'] and 'Turn ' not in content  # no earlier turn
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
    evaluate_user_f1(
      DATASET, UserSimSet(dataset='synthetic', cases=(), users_left_out=3), policy_backend(lambda label, item: 'skip')
    )
  with pytest.raises(ValueError, match='UserF1Config.batch_size must be None or an int >= 1'):
    UserF1Config(batch_size=0)
  with pytest.raises(ValueError, match='UserF1Config.recommender_reason must be a non-empty str'):
    UserF1Config(recommender_reason='  ')


# --- discrimination: AUC, accept rate and the references beside F1 (issue 13) ------------------------------------


def pairwise_auc(labels, scores):
  """The AUC straight from its definition, over every (positive, negative) pair, a tie counting 1/2."""
  pos = [s for s, l in zip(scores, labels) if l]
  neg = [s for s, l in zip(scores, labels) if not l]
  return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def test_roc_auc_hand_computed_with_and_without_ties():
  # Positives 0.2, 0.8 against negatives 0.3, 0.1, 0.5: 0.2 beats only 0.1 (1), 0.8 beats all three (3) -> 4/6.
  assert roc_auc([True, False, False, True, False], [0.2, 0.3, 0.1, 0.8, 0.5]) == pytest.approx(2 / 3)
  # Positives 0.9, 0.4 against negatives 0.1, 0.4: 1 + 1 + 1 + 1/2 (the tie) -> 3.5/4.
  assert roc_auc([1, 0, 1, 0], [0.9, 0.1, 0.4, 0.4]) == pytest.approx(0.875)
  # A three-way tie across classes: positives 0.5, 0.5, 0.7 against negatives 0.5, 0.2:
  # 0.5 vs (0.5, 0.2) -> 1.5 twice, 0.7 -> 2; 5/6.
  assert roc_auc([True, True, True, False, False], [0.5, 0.5, 0.7, 0.5, 0.2]) == pytest.approx(5 / 6)
  assert roc_auc([True, False, True, False], [0.3] * 4) == 0.5  # a constant score is chance
  assert roc_auc([True, False], [1.0, 0.0]) == 1.0 and roc_auc([True, False], [0.0, 1.0]) == 0.0


def test_roc_auc_matches_the_pairwise_definition_on_heavily_tied_scores():
  rng = np.random.default_rng(0)
  for _ in range(20):
    labels = rng.random(30) < 0.4
    labels[:2] = True, False
    scores = np.round(rng.random(30), 1)  # few distinct values, so many ties within and across classes
    assert roc_auc(labels, scores) == pytest.approx(pairwise_auc(labels, scores))


def test_roc_auc_rejects_one_class_and_bad_inputs():
  with pytest.raises(ValueError, match='needs both classes but found 3 positives and 0 negatives'):
    roc_auc([True, True, True], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match='needs both classes but found 0 positives and 2 negatives'):
    roc_auc([False, False], [0.1, 0.2])
  with pytest.raises(ValueError, match='equal-length'):
    roc_auc([True, False], [0.1])
  with pytest.raises(ValueError, match='finite'):
    roc_auc([True, False], [0.1, float('nan')])
  with pytest.raises(ValueError, match='booleans'):
    roc_auc([2, 0], [0.1, 0.2])


def test_top_k_predictions_takes_the_highest_scores_and_breaks_ties_by_order():
  assert top_k_predictions([0.1, 0.9, 0.5, 0.7], 2) == [False, True, False, True]
  assert top_k_predictions([0.5, 0.5, 0.5, 0.1], 2) == [True, True, False, False]
  assert top_k_predictions([0.2, 0.3], 0) == [False, False]
  with pytest.raises(ValueError, match='0 <= k <= its length'):
    top_k_predictions([0.2, 0.3], 3)


# Two hand-made cases of different sizes (4 items, then 2), so the peer is called once per size.
SMALL_SET = UserSimSet(
  dataset='synthetic',
  users_left_out=1,
  cases=(
    UserSimCase(user=3, history=(1, 2, 3), items=(10, 11, 12, 13), labels=(True, False, True, False)),
    UserSimCase(user=8, history=(5, 6), items=(20, 21), labels=(False, True)),
  ),
)
# The user's answer per item: 12's garbage is invalid and reads as s = .375.
SMALL_ACTIONS = {10: 'click', 11: 'star', 12: 'garbage', 13: 'dislike', 20: 'skip', 21: 'skip'}
# SASRec's score per item; 20 and 21 tie, and the earlier (20, a negative) wins the one slot of case 1.
SMALL_PEER_SCORES = {10: 3.0, 11: 1.0, 12: 2.0, 13: 0.0, 20: 0.5, 21: 0.5}


def item_backend(actions):
  scores = {'click': 0.9, 'star': 0.6, 'skip': 0.3, 'dislike': 0.1}

  def respond(agent, episode, turn, messages):
    action = actions[shown_item(messages)]
    return 'no idea, honestly' if action == 'garbage' else user_answer(action, scores[action])

  return ScriptedBackend(scripted_tokenizer(), respond)


class TablePeer:
  """Scores items from a fixed table, checking it is handed each case's own history; records its calls."""

  def __init__(self, table):
    self.table, self.shapes = table, []

  def top_candidates(self, history, lengths, candidates):
    raise AssertionError('the peer opinion is off, so no top item is asked for')

  def candidate_scores(self, history, lengths, candidates):
    self.shapes.append(candidates.shape)
    for row, items in enumerate(candidates):
      case = next(c for c in SMALL_SET.cases if c.items == tuple(items))
      assert tuple(history[row, : lengths[row]]) == case.history
      assert (history[row, lengths[row] :] == DATASET.catalog.pad_id).all()
    return np.vectorize(self.table.get)(candidates).astype(np.float32)


def test_small_set_reports_user_auc_accept_rate_and_references_exactly():
  peer = TablePeer(SMALL_PEER_SCORES)
  result = evaluate_user_f1(DATASET, SMALL_SET, item_backend(SMALL_ACTIONS), peer=peer)
  assert sorted(peer.shapes) == [(1, 2), (1, 4)]
  row = result.as_dict()
  # User: accepts 10 (+) and 11 (-): TP 1, FP 1, FN 2 -> P 1/2, R 1/3, F1 2 (1/6) / (5/6) = 2/5; accept rate 2/6.
  assert (row['user_precision'], row['user_recall']) == (0.5, pytest.approx(1 / 3))
  assert row['user_f1'] == pytest.approx(0.4) and row['user_accept_rate'] == pytest.approx(1 / 3)
  # User AUC: positives s = .9, .375 (invalid), .3 against negatives .6, .1, .3: 3 + 2 + (0 + 1 + 1/2) -> 6.5/9.
  assert result.num_invalid == 1 and row['user_auc'] == pytest.approx(6.5 / 9)
  # Accept-all: 3 of 6 true -> P 1/2, R 1, F1 2/3 (from the labels, whatever the user did).
  assert row['accept_all_f1'] == pytest.approx(2 / 3) and row['accept_all_precision'] == 0.5
  # SASRec AUC: positives 3, 2, .5 against negatives 1, 0, .5: 3 + 3 + (0 + 1 + 1/2) -> 7.5/9.
  assert row['sasrec_auc'] == pytest.approx(7.5 / 9)
  # Top half: case 0 accepts 10, 12 (both true); case 1 accepts 20 (the tie's earlier item, false), misses 21:
  # TP 2, FP 1, FN 1 -> P = R = F1 = 2/3.
  assert row['sasrec_top_half_precision'] == pytest.approx(2 / 3)
  assert row['sasrec_top_half_recall'] == pytest.approx(2 / 3)
  assert row['sasrec_top_half_f1'] == pytest.approx(2 / 3)
  assert [j.peer_score for j in result.judgements] == [3.0, 1.0, 2.0, 0.0, 0.5, 0.5]
  assert row['user_f1_users_left_out'] == 1


def test_references_are_none_without_a_scoring_peer():
  row = evaluate_user_f1(DATASET, SMALL_SET, item_backend(SMALL_ACTIONS)).as_dict()
  assert row['user_auc'] == pytest.approx(6.5 / 9) and row['accept_all_f1'] == pytest.approx(2 / 3)
  for key in ('sasrec_auc', 'sasrec_top_half_f1', 'sasrec_top_half_precision', 'sasrec_top_half_recall'):
    assert row[key] is None, key
  # A peer that can only name its top item (no candidate_scores) gives the peer opinion but no references.
  row = evaluate_user_f1(
    DATASET,
    SIM_SET,
    policy_backend(lambda label, item: 'skip'),
    config=UserF1Config(show_peer_opinion=True),
    peer=FirstItemPeer(),
  ).as_dict()
  assert row['sasrec_auc'] is None and row['user_auc'] == 0.5


def test_user_auc_and_accept_rate_on_the_protocol_set():
  oracle = evaluate_user_f1(DATASET, SIM_SET, policy_backend(lambda label, item: 'click' if label else 'dislike'))
  assert oracle.user_auc == 1.0 and oracle.accept_rate == 0.5
  # Accepting everything at one score: F1 2/3 as the accept-all reference says, yet AUC 1/2 (no discrimination).
  accept = evaluate_user_f1(DATASET, SIM_SET, policy_backend(lambda label, item: 'star')).as_dict()
  assert accept['user_f1'] == pytest.approx(accept['accept_all_f1']) == pytest.approx(2 / 3)
  assert accept['user_auc'] == 0.5 and accept['user_accept_rate'] == 1.0
  inverted = evaluate_user_f1(DATASET, SIM_SET, policy_backend(lambda label, item: 'skip' if label else 'click'))
  assert inverted.user_auc == 0.0 and inverted.accept_rate == 0.5


def test_sasrec_references_equal_the_directly_computed_sasrec_scores():
  model = SASRec(
    SASRecConfig(num_items=DATASET.num_items, hidden=16, num_heads=2, num_blocks=1, dropout=0.0), rngs=nnx.Rngs(3)
  )
  result = evaluate_user_f1(DATASET, SIM_SET, policy_backend(lambda label, item: 'skip'), peer=model)  # bare SASRec
  labels, scores, top_half = [], [], []
  for case in SIM_SET.cases:
    history = np.full((1, MAX_HISTORY), DATASET.catalog.pad_id, np.int32)
    history[0, : len(case.history)] = case.history
    row = np.asarray(
      peer_lib.candidate_scores(
        model, history, np.asarray([len(case.history)], np.int32), np.asarray([case.items], np.int32)
      )
    )[0]
    labels += case.labels
    scores += row.tolist()
    keep = np.zeros(len(row), bool)
    keep[np.argsort(-row)[: sum(case.labels)]] = True
    top_half.append(keep.tolist())
  assert [j.peer_score for j in result.judgements] == pytest.approx(scores, abs=1e-5)
  assert len(set(np.round(scores, 4))) == len(scores)  # precondition: no ties, so the ranking is unambiguous
  row = result.as_dict()
  assert row['sasrec_auc'] == pytest.approx(roc_auc(labels, scores))
  expected = f1_scores([list(c.labels) for c in SIM_SET.cases], top_half)
  assert row['sasrec_top_half_f1'] == pytest.approx(expected['micro_f1'])
  assert row['sasrec_top_half_precision'] == pytest.approx(expected['micro_precision'])
  assert np.allclose(peer_scores(DATASET, SIM_SET, model), np.reshape(scores, (6, 14)), atol=1e-5)


def test_rounds_and_shared_prefixes_reuse_each_users_history_on_an_llm_backend():
  """A micro decoder: rounds (prefix reuse) and shared prefixes (`generate_grouped`) prefill each user's history
  once, and their greedy judgements equal the flat batching's, where every prompt is prefilled whole."""
  from coars_jax.agents.episodes import LLMBackend, LLMBackendConfig
  from coars_jax.sampling import GREEDY
  from tests.training.test_rl import BUCKETS, micro_model
  from tests.training.test_warm_start import small_tokenizer

  sim = UserSimSet(dataset=SIM_SET.dataset, cases=SIM_SET.cases[:3], users_left_out=0)

  def run(batching):
    backend = LLMBackend(
      micro_model(),
      small_tokenizer(),
      adapters={'user': 'user'},
      config=LLMBackendConfig(user_max_new_tokens=8, sampling=GREEDY, buckets=BUCKETS),
    )
    result = evaluate_user_f1(DATASET, sim, backend, config=UserF1Config(batch_size=4, batching=batching))
    return result, backend

  flat, flat_backend = run('flat')
  assert flat_backend.prefill_tokens['reused'] == 0
  for batching in ('rounds', 'shared_prefix'):
    other, backend = run(batching)
    assert [j.generation.text for j in other.judgements] == [j.generation.text for j in flat.judgements], batching
    assert [j.item for j in other.judgements] == [j.item for j in flat.judgements]
    # Every judgement after a user's first reads the user's shared prefix: most prompt tokens are reused.
    total = backend.prefill_tokens['prefilled'] + backend.prefill_tokens['reused']
    assert total == flat_backend.prefill_tokens['prefilled'] and backend.prefill_tokens['reused'] > 0.6 * total
    prompts = judgement_prompts(DATASET, sim)
    calls = shared_prefix_calls(prompts, UserF1Config(batch_size=4)) if batching == 'shared_prefix' else None
    assert calls is None or len(backend.calls) == len(calls)
  assert not backend._last_prompts  # cleared when the evaluation ends
