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
  return dict(hit=np.array([False, False, True, True]), acceptance_score=np.array([0.3, 0.3, 0.9, 0.9], np.float32),
              peer_similarity=np.array([0.2, 0.2, 0.5, 0.5], np.float32),
              action=np.array([SKIP, SKIP, CLICK, CLICK], np.int32), turn=np.array([1, 1, 2, 2], np.int32))


def hand_rewards(gamma=0.9, alpha=0.1):
  """(R_rec_1, R_user_1, R_rec_2, R_user_2) by plain arithmetic."""
  r_rec_1 = -1 * (0.5 + 0.5 * 0.3) * gamma ** 0  # -0.65
  r_user_1 = -1 * (2 * 0.3 - 1) * (1 - alpha * 0.2 * (2 * 0.3 - 1))  # 0.4 * 1.008 = 0.4032
  r_rec_2 = 1 * (0.5 + 0.5 * 0.9) * gamma ** 1  # 0.855
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
  np.testing.assert_allclose(rw.stage_weight(jnp.array([1, 2, 3, 5]), 0.9), [1.0, 0.9, 0.81, 0.9 ** 4], rtol=1e-6)


def test_miss_with_click_or_star_is_excluded_and_nothing_else():
  actions = np.array([DISLIKE, SKIP, STAR, CLICK] * 2, np.int32)
  hit = np.array([False] * 4 + [True] * 4)
  _, _, included = rw.interaction_rewards(hit, np.full(8, 0.5, np.float32), np.zeros(8, np.float32), actions,
                                          np.ones(8, np.int32))
  np.testing.assert_array_equal(included, [True, True, False, False, True, True, True, True])


def invalid_user_turns():
  """Two one-turn episodes whose user message did not parse, recorded as a skip at s = .375 (q = 0): a miss at
  turn 3 and a hit at turn 1. Rows: rec, user (invalid), rec, user (invalid)."""
  return dict(hit=np.array([False, False, True, True]), acceptance_score=np.full(4, 0.375, np.float32),
              peer_similarity=np.zeros(4, np.float32), action=np.full(4, SKIP, np.int32),
              turn=np.array([3, 3, 1, 1], np.int32), valid=np.array([True, False, True, False]),
              agent=np.array([0, 1, 0, 1], np.int32))


def test_invalid_user_message_gets_exactly_the_penalty_on_a_miss_and_on_a_hit():
  r_rec, r_user, included = jax.jit(rw.interaction_rewards)(**invalid_user_turns())
  # Read as a skip at .375, the miss would pay the user (-1)(2 * .375 - 1) = +.25: the penalty replaces it.
  own = np.asarray(rw.agent_reward(r_rec, r_user, invalid_user_turns()['agent']))
  np.testing.assert_array_equal(own[[1, 3]], [-1.0, -1.0])
  # The recommender's reward on those turns still reads the user as a skip at s = .375.
  np.testing.assert_allclose(own[[0, 2]], [-(0.5 + 0.5 * 0.375) * 0.9 ** 2, 0.5 + 0.5 * 0.375], rtol=1e-6)
  np.testing.assert_array_equal(included, True)
  # Configurable, and the same through `segment_rewards`.
  _, r_user, _ = rw.interaction_rewards(**invalid_user_turns(), invalid_user_reward=-0.3)
  np.testing.assert_allclose(np.asarray(r_user)[[1, 3]], [-0.3, -0.3], rtol=1e-6)
  turns = invalid_user_turns()
  reward, included = rw.segment_rewards('interaction', **turns, final_hit=turns['hit'], last_turn=turns['turn'],
                                        invalid_user_reward=-2.0)
  np.testing.assert_allclose(np.asarray(reward), [own[0], -2.0, own[2], -2.0], rtol=1e-6)
  np.testing.assert_array_equal(included, True)


def test_valid_messages_are_unchanged_and_only_the_users_own_segment_is_penalised():
  example = worked_example()
  agent = np.array([0, 1, 0, 1], np.int32)
  plain = rw.interaction_rewards(**example)
  for got, want in zip(rw.interaction_rewards(**example, valid=np.ones(4, bool), agent=agent), plain):
    np.testing.assert_array_equal(got, want)
  # An invalid RECOMMENDER message (a miss the user starred): no user penalty on its row, and the exclusion rule
  # still drops the turn; the valid user row of that turn keeps Eq. 8.
  starred = dict(hit=np.array([False, False]), acceptance_score=np.full(2, 0.6, np.float32),
                 peer_similarity=np.zeros(2, np.float32), action=np.full(2, STAR, np.int32), turn=np.ones(2, np.int32))
  r_rec, r_user, included = rw.interaction_rewards(**starred, valid=np.array([False, True]), agent=agent[:2])
  np.testing.assert_allclose(r_user, [-(2 * 0.6 - 1)] * 2, rtol=1e-6)
  np.testing.assert_array_equal(included, [False, False])
  # An invalid user row stays included even where the exclusion rule would drop its turn.
  _, r_user, included = rw.interaction_rewards(**starred, valid=np.array([True, False]), agent=agent[:2])
  np.testing.assert_array_equal(included, [False, True])
  assert float(r_user[1]) == -1.0
  with pytest.raises(ValueError, match='needs `agent`'):
    rw.interaction_rewards(**starred, valid=np.array([True, False]))


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
  with pytest.raises(ValueError, match="assign must be one of"):
    rw.outcome_rewards(final_hit, agent, turn, last_turn, assign='all')


def test_outcome_rewards_for_both_agents_on_every_turn():
  # CoARS without the interaction reward: both agents get 2 hit_T - 1 on the assigned turns, every segment stays
  # included (R = 0 on the others), and the user's invalid segment (row 1) gets the penalty.
  final_hit = np.array([True] * 4 + [False] * 2)
  agent = np.array([0, 1, 0, 1, 0, 1])
  turn = np.array([1, 1, 2, 2, 1, 1])
  last_turn = np.array([2, 2, 2, 2, 1, 1])
  valid = np.array([True, False, True, True, True, True])
  r_rec, r_user, included = rw.outcome_rewards(final_hit, agent, turn, last_turn, reward_user=True, every_turn=True,
                                               valid=valid)
  np.testing.assert_array_equal(rw.agent_reward(r_rec, r_user, agent), [0, -1, 1, 1, -1, -1])
  np.testing.assert_array_equal(included, True)
  r_rec, r_user, included = rw.outcome_rewards(final_hit, agent, turn, last_turn, assign='episode', reward_user=True)
  np.testing.assert_array_equal(rw.agent_reward(r_rec, r_user, agent), [1, 1, 1, 1, -1, -1])
  np.testing.assert_array_equal(included, True)
  # The baseline (recommender only) ignores validity: the user is not rewarded there.
  _, r_user, included = rw.outcome_rewards(final_hit, agent, turn, last_turn, valid=valid)
  np.testing.assert_array_equal(r_user, 0)
  np.testing.assert_array_equal(included, [False, False, True, False, True, False])


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
  with pytest.raises(ValueError, match="assign must be one of"):
    rw.judge_rewards(probability, agent, turn, last_turn, assign='all')


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
