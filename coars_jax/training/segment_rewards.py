"""Every segment's reward from the record's reward inputs, as one fixed-shape jitted program (`rollout_rewards`):
interaction (Eq. 7-8 with the exclusion rule), outcome or judge, with the optional group baseline."""

from __future__ import annotations

import functools
from typing import Mapping

import chex
import jax
import jax.numpy as jnp

from coars_jax.coars.rewards import INVALID_USER_REWARD, agent_reward, group_centred, judge_rewards, segment_rewards
from coars_jax.sampling.compilation import record_trace


REWARDS_TRACE_NAME = 'training.rl.rewards'


@functools.partial(
  jax.jit,
  static_argnames=(
    'kind',
    'gamma',
    'alpha',
    'assign',
    'signed',
    'group_baseline',
    'invalid_user_reward',
    'outcome_reward_user',
    'outcome_every_turn',
  ),
)
def rollout_rewards(
  rows: Mapping[str, jax.Array],
  *,
  kind: str,
  gamma: float,
  alpha: float,
  assign: str,
  signed: bool,
  group_baseline: bool,
  invalid_user_reward: float = INVALID_USER_REWARD,
  outcome_reward_user: bool = False,
  outcome_every_turn: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(R[S], R used as the weight[S], included[S]) for the whole rollout, padded to a fixed S.

  rows: int/bool/float [S] arrays 'hit', 'acceptance_score', 'peer_similarity', 'action', 'turn', 'agent',
    'valid' (the segment's own message parsed, `Trajectory.valid`), 'final_hit', 'last_turn', 'judge_probability',
    'group' (window of the episode) and 'real' (False on padding).
  The keyword arguments are `RLConfig.reward_options()`; `invalid_user_reward`, `outcome_reward_user` and
  `outcome_every_turn` as in `coars.segment_rewards`.
  With `group_baseline`, the weight is R minus the mean R over the included segments of the same agent and group
  (the G rollouts of one window), computed here over the whole rollout so that splitting it into microbatches
  does not change the baseline.
  """
  record_trace(REWARDS_TRACE_NAME)
  chex.assert_rank(list(rows.values()), 1)
  chex.assert_equal_shape(list(rows.values()))
  if kind == 'judge':
    r_rec, r_user, included = judge_rewards(
      rows['judge_probability'], rows['agent'], rows['turn'], rows['last_turn'], assign=assign
    )
    reward = agent_reward(r_rec, r_user, rows['agent'])
  else:
    reward, included = segment_rewards(
      kind,
      hit=rows['hit'],
      acceptance_score=rows['acceptance_score'],
      peer_similarity=rows['peer_similarity'],
      action=rows['action'],
      turn=rows['turn'],
      agent=rows['agent'],
      final_hit=rows['final_hit'],
      last_turn=rows['last_turn'],
      valid=rows['valid'],
      gamma=gamma,
      alpha=alpha,
      invalid_user_reward=invalid_user_reward,
      outcome_assign=assign,
      outcome_signed=signed,
      outcome_reward_user=outcome_reward_user,
      outcome_every_turn=outcome_every_turn,
    )
  included = included & rows['real']
  reward = jnp.where(rows['real'], reward, 0.0)
  weight = reward
  if group_baseline:
    weight = group_centred(reward, included, rows['agent'], rows['group'])
  return reward, weight, included
