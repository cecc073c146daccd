"""Interaction rewards (Eq. 7-8) against hand arithmetic, the exclusion rule, D_t, and the outcome baseline."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coars_jax.coars import rewards as rw

DISLIKE, SKIP, STAR, CLICK = 0, 1, 2, 3


def worked_example():
  """Two turns in `Trajectory` row order (rec t1, user t1, rec t2, user t2); per-turn values repeated on both rows.
  Turn 1: miss, the user skips with s = 0.3, q = 0.2. Turn 2: hit, click with s = 0.9, q = 0.5."""
  return dict(
    hit=np.array([False, False, True, True]),
    acceptance_score=np.array([0.3, 0.3, 0.9, 0.9], np.float32),
    peer_similarity=np.array([0.2, 0.2, 0.5, 0.5], np.float32),
    action=np.array([SKIP, SKIP, CLICK, CLICK], np.int32),
    turn=np.array([1, 1, 2, 2], np.int32),
  )


def hand_rewards(gamma=0.9, alpha=0.1):
  """(R_rec_1, R_user_1, R_rec_2, R_user_2) by plain arithmetic."""
  r_rec_1 = -1 * (0.5 + 0.5 * 0.3) * gamma**0  # -0.65
  r_user_1 = -1 * (2 * 0.3 - 1) * (1 - alpha * 0.2 * (2 * 0.3 - 1))  # 0.4 * 1.008 = 0.4032
  r_rec_2 = 1 * (0.5 + 0.5 * 0.9) * gamma**1  # 0.855
  r_user_2 = 1 * (2 * 0.9 - 1) * (1 - alpha * 0.5 * (2 * 0.9 - 1))  # 0.8 * 0.96 = 0.768
  return r_rec_1, r_user_1, r_rec_2, r_user_2


def test_worked_two_turn_example_matches_hand_arithmetic():
  r_rec, r_user, included = jax.jit(rw.interaction_rewards)(**worked_example())
  chex.assert_shape([r_rec, r_user, included], (4,))
  chex.assert_type([r_rec, r_user], jnp.float32)
  chex.assert_type(included, bool)
  r_rec_1, r_user_1, r_rec_2, r_user_2 = hand_rewards()
  assert (r_rec_1, r_user_1, r_rec_2, r_user_2) == pytest.approx((-0.65, 0.4032, 0.855, 0.768))
  np.testing.assert_allclose(r_rec, [r_rec_1, r_rec_1, r_rec_2, r_rec_2], rtol=1e-6)
  np.testing.assert_allclose(r_user, [r_user_1, r_user_1, r_user_2, r_user_2], rtol=1e-6)
  np.testing.assert_array_equal(included, True)
  # Each row's own agent's reward: rec, user, rec, user.
  own = rw.agent_reward(r_rec, r_user, jnp.array([0, 1, 0, 1]))
  np.testing.assert_allclose(own, [r_rec_1, r_user_1, r_rec_2, r_user_2], rtol=1e-6)


def test_gamma_and_alpha_are_used():
  r_rec, r_user, _ = map(np.asarray, rw.interaction_rewards(**worked_example(), gamma=0.5, alpha=0.3))
  r_rec_1, r_user_1, r_rec_2, r_user_2 = hand_rewards(gamma=0.5, alpha=0.3)
  np.testing.assert_allclose(r_rec[[0, 2]], [r_rec_1, r_rec_2], rtol=1e-6)
  np.testing.assert_allclose(r_user[[0, 2]], [r_user_1, r_user_2], rtol=1e-6)
  np.testing.assert_allclose(rw.stage_weight(jnp.array([1, 2, 3, 5]), 0.9), [1.0, 0.9, 0.81, 0.9**4], rtol=1e-6)


def test_miss_with_click_or_star_is_excluded_and_nothing_else():
  actions = np.array([DISLIKE, SKIP, STAR, CLICK] * 2, np.int32)
  hit = np.array([False] * 4 + [True] * 4)
  _, _, included = rw.interaction_rewards(
    hit, np.full(8, 0.5, np.float32), np.zeros(8, np.float32), actions, np.ones(8, np.int32)
  )
  np.testing.assert_array_equal(included, [True, True, False, False, True, True, True, True])


def invalid_user_turns():
  """Two one-turn episodes whose user message did not parse, recorded as a skip at s = .375 (q = 0): a miss at
  turn 3 and a hit at turn 1. Rows: rec, user (invalid), rec, user (invalid)."""
  return dict(
    hit=np.array([False, False, True, True]),
    acceptance_score=np.full(4, 0.375, np.float32),
    peer_similarity=np.zeros(4, np.float32),
    action=np.full(4, SKIP, np.int32),
    turn=np.array([3, 3, 1, 1], np.int32),
    valid=np.array([True, False, True, False]),
    agent=np.array([0, 1, 0, 1], np.int32),
  )


def test_invalid_user_message_gets_exactly_the_penalty_on_a_miss_and_on_a_hit():
  r_rec, r_user, included = jax.jit(rw.interaction_rewards)(**invalid_user_turns())
  # Read as a skip at .375, the miss would pay the user (-1)(2 * .375 - 1) = +.25: the penalty replaces it.
  own = np.asarray(rw.agent_reward(r_rec, r_user, invalid_user_turns()['agent']))
  np.testing.assert_array_equal(own[[1, 3]], [-1.0, -1.0])
  # The recommender's reward on those turns still reads the user as a skip at s = .375.
  np.testing.assert_allclose(own[[0, 2]], [-(0.5 + 0.5 * 0.375) * 0.9**2, 0.5 + 0.5 * 0.375], rtol=1e-6)
  np.testing.assert_array_equal(included, True)
  # Configurable, and the same through `segment_rewards`.
  _, r_user, _ = rw.interaction_rewards(**invalid_user_turns(), invalid_user_reward=-0.3)
  np.testing.assert_allclose(np.asarray(r_user)[[1, 3]], [-0.3, -0.3], rtol=1e-6)
  turns = invalid_user_turns()
  reward, included = rw.segment_rewards(
    'interaction', **turns, final_hit=turns['hit'], last_turn=turns['turn'], invalid_user_reward=-2.0
  )
  np.testing.assert_allclose(np.asarray(reward), [own[0], -2.0, own[2], -2.0], rtol=1e-6)
  np.testing.assert_array_equal(included, True)


def test_valid_messages_are_unchanged_and_each_agent_is_penalised_on_its_own_segment_only():
  example = worked_example()
  agent = np.array([0, 1, 0, 1], np.int32)
  plain = rw.interaction_rewards(**example)
  for got, want in zip(rw.interaction_rewards(**example, valid=np.ones(4, bool), agent=agent), plain):
    np.testing.assert_array_equal(got, want)
  # An invalid RECOMMENDER message (a miss the user starred): its own row gets -D_t and stays included although the
  # exclusion rule drops the turn; no user penalty, and the valid user row of that turn keeps Eq. 8 and is dropped.
  starred = dict(
    hit=np.array([False, False]),
    acceptance_score=np.full(2, 0.6, np.float32),
    peer_similarity=np.zeros(2, np.float32),
    action=np.full(2, STAR, np.int32),
    turn=np.ones(2, np.int32),
  )
  r_rec, r_user, included = rw.interaction_rewards(**starred, valid=np.array([False, True]), agent=agent[:2])
  np.testing.assert_allclose(r_user, [-(2 * 0.6 - 1)] * 2, rtol=1e-6)
  assert float(r_rec[0]) == -1.0
  np.testing.assert_array_equal(included, [True, False])
  # An invalid user row stays included even where the exclusion rule would drop its turn.
  _, r_user, included = rw.interaction_rewards(**starred, valid=np.array([True, False]), agent=agent[:2])
  np.testing.assert_array_equal(included, [False, True])
  assert float(r_user[1]) == -1.0
  with pytest.raises(ValueError, match='needs `agent`'):
    rw.interaction_rewards(**starred, valid=np.array([True, False]))


def test_invalid_recommender_message_earns_minus_d_t_below_every_valid_miss():
  # Turns 1 and 3, each an invalid recommender message read as a miss the user skipped at s = .375 (the invalid
  # user reading) and a valid miss the user skipped at the largest float32 s below .5. Rows: rec, user per turn.
  below_half = float(np.nextafter(np.float32(0.5), np.float32(0)))
  score = np.array([0.375, 0.375, below_half, below_half] * 2, np.float32)
  turn = np.array([1, 1, 1, 1, 3, 3, 3, 3], np.int32)
  agent = np.array([0, 1] * 4, np.int32)
  valid = np.array([False, True, True, True] * 2)
  r_rec, _, included = jax.jit(rw.interaction_rewards)(
    np.zeros(8, bool), score, np.zeros(8, np.float32), np.full(8, SKIP, np.int32), turn, valid=valid, agent=agent
  )
  d_t = np.array([1.0, 0.81])
  np.testing.assert_allclose(np.asarray(r_rec)[[0, 4]], -d_t, rtol=1e-6)  # was -0.6875 D_t, above the valid miss
  np.testing.assert_allclose(np.asarray(r_rec)[[2, 6]], -0.75 * d_t, rtol=1e-6)
  assert (np.asarray(r_rec)[[0, 4]] < np.asarray(r_rec)[[2, 6]]).all()
  np.testing.assert_array_equal(included, True)
  # Only the recommender's own row: the user row of the invalid turn keeps R_rec read from s = .375.
  np.testing.assert_allclose(float(r_rec[1]), -0.6875, rtol=1e-6)
  reward, _ = rw.segment_rewards(
    'interaction',
    hit=np.zeros(8, bool),
    acceptance_score=score,
    peer_similarity=np.zeros(8, np.float32),
    action=np.full(8, SKIP, np.int32),
    turn=turn,
    agent=agent,
    final_hit=np.zeros(8, bool),
    last_turn=turn,
    valid=valid,
  )
  np.testing.assert_allclose(np.asarray(reward)[[0, 4]], -d_t, rtol=1e-6)
  with pytest.raises(ValueError, match='needs `agent`'):
    rw.penalise_invalid_recommender(r_rec, included, valid, None, -1.0, include=True)


def test_outcome_rewards_terminal_hit_for_the_recommender_only():
  # Episode A: 2 turns, final hit; episode B: 1 turn, final miss. Rows: A rec1 user1 rec2 user2, B rec1 user1.
  final_hit = np.array([True] * 4 + [False] * 2)
  agent = np.array([0, 1, 0, 1, 0, 1])
  turn = np.array([1, 1, 2, 2, 1, 1])
  last_turn = np.array([2, 2, 2, 2, 1, 1])
  r_rec, r_user, included = rw.outcome_rewards(final_hit, agent, turn, last_turn)
  np.testing.assert_array_equal(r_rec, [0, 0, 1, 0, -1, 0])
  np.testing.assert_array_equal(r_user, 0)
  np.testing.assert_array_equal(included, [False, False, True, False, True, False])
  r_rec, _, included = rw.outcome_rewards(final_hit, agent, turn, last_turn, assign='episode', signed=False)
  np.testing.assert_array_equal(r_rec, [1, 0, 1, 0, 0, 0])
  np.testing.assert_array_equal(included, [True, False, True, False, True, False])
  with pytest.raises(ValueError, match='assign must be one of'):
    rw.outcome_rewards(final_hit, agent, turn, last_turn, assign='all')


def test_outcome_rewards_for_both_agents_on_every_turn():
  # CoARS without the interaction reward: both agents get 2 hit_T - 1 on the assigned turns, every segment stays
  # included (R = 0 on the others), and the user's invalid segment (row 1) gets the penalty.
  final_hit = np.array([True] * 4 + [False] * 2)
  agent = np.array([0, 1, 0, 1, 0, 1])
  turn = np.array([1, 1, 2, 2, 1, 1])
  last_turn = np.array([2, 2, 2, 2, 1, 1])
  valid = np.array([True, False, True, True, True, True])
  r_rec, r_user, included = rw.outcome_rewards(
    final_hit, agent, turn, last_turn, reward_user=True, every_turn=True, valid=valid
  )
  np.testing.assert_array_equal(rw.agent_reward(r_rec, r_user, agent), [0, -1, 1, 1, -1, -1])
  np.testing.assert_array_equal(included, True)
  r_rec, r_user, included = rw.outcome_rewards(final_hit, agent, turn, last_turn, assign='episode', reward_user=True)
  np.testing.assert_array_equal(rw.agent_reward(r_rec, r_user, agent), [1, 1, 1, 1, -1, -1])
  np.testing.assert_array_equal(included, True)
  # The baseline (recommender only) ignores the user's validity: the user is not rewarded there.
  _, r_user, included = rw.outcome_rewards(final_hit, agent, turn, last_turn, valid=valid)
  np.testing.assert_array_equal(r_user, 0)
  np.testing.assert_array_equal(included, [False, False, True, False, True, False])
  # An invalid recommender message (row 0) of the hit episode: the unhit value wherever it is rewarded, and which
  # rows are included does not change (the terminal-only baseline keeps one row per episode).
  rec_invalid = np.array([False, True, True, True, True, True])
  for kwargs, want_rec, want_included in (
    (dict(assign='episode'), [-1, 0, 1, 0, -1, 0], [True, False, True, False, True, False]),
    (dict(assign='episode', signed=False), [0, 0, 1, 0, 0, 0], [True, False, True, False, True, False]),
    (dict(every_turn=True, reward_user=True), [-1, 0, 1, 1, -1, -1], [True] * 6),
    (dict(), [0, 0, 1, 0, -1, 0], [False, False, True, False, True, False]),
  ):
    r_rec, r_user, included = rw.outcome_rewards(final_hit, agent, turn, last_turn, valid=rec_invalid, **kwargs)
    np.testing.assert_array_equal(rw.agent_reward(r_rec, r_user, agent), want_rec)
    np.testing.assert_array_equal(included, want_included)


def test_judge_rewards_terminal_two_p_minus_one_for_the_recommender_only():
  # Same layout as the outcome test; the judge's p is 0.8 for episode A and 0.1 for episode B.
  probability = np.array([0.8] * 4 + [0.1] * 2, np.float32)
  agent = np.array([0, 1, 0, 1, 0, 1])
  turn = np.array([1, 1, 2, 2, 1, 1])
  last_turn = np.array([2, 2, 2, 2, 1, 1])
  r_rec, r_user, included = rw.judge_rewards(probability, agent, turn, last_turn)
  np.testing.assert_allclose(r_rec, [0, 0, 0.6, 0, -0.8, 0], rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(r_user, 0)
  np.testing.assert_array_equal(included, [False, False, True, False, True, False])
  r_rec, _, included = rw.judge_rewards(probability, agent, turn, last_turn, assign='episode')
  np.testing.assert_allclose(r_rec, [0.6, 0, 0.6, 0, -0.8, 0], rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(included, [True, False, True, False, True, False])
  with pytest.raises(ValueError, match='assign must be one of'):
    rw.judge_rewards(probability, agent, turn, last_turn, assign='all')


def test_judge_pays_an_invalid_message_and_a_nan_probability_the_floor():
  # Episodes A (p = 0.8, its turn-2 recommender message invalid) and B (p = NaN). Rows as above.
  episode = np.array([0, 0, 0, 0, 1, 1])
  valid = np.array([True, True, False, True, True, True])
  probability = rw.judge_segment_probability(np.array([0.8, np.nan]), episode, valid)
  chex.assert_type(probability, jnp.float32)
  np.testing.assert_allclose(np.asarray(probability)[:4], [0.8, 0.8, 0, 0.8], rtol=1e-6)
  agent, turn, last_turn = np.array([0, 1, 0, 1, 0, 1]), np.array([1, 1, 2, 2, 1, 1]), np.array([2, 2, 2, 2, 1, 1])
  r_rec, _, _ = rw.judge_rewards(probability, agent, turn, last_turn, assign='episode')
  np.testing.assert_allclose(r_rec, [0.6, 0, -1, 0, -1, 0], rtol=1e-6, atol=1e-7)


def test_segment_rewards_switches_by_name():
  example = worked_example()
  common = dict(**example, agent=np.array([0, 1, 0, 1]), final_hit=np.array([True] * 4), last_turn=np.full(4, 2))
  reward, included = rw.segment_rewards('interaction', **common)
  np.testing.assert_allclose(reward, hand_rewards(), rtol=1e-6)
  reward, included = rw.segment_rewards('outcome', **common)
  np.testing.assert_array_equal(reward, [0, 0, 1, 0])
  np.testing.assert_array_equal(included, [False, False, True, False])
  with pytest.raises(ValueError, match=r"kind must be one of \('interaction', 'outcome'\)"):
    rw.segment_rewards('judge', **common)
