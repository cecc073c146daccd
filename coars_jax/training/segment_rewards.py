"""Every segment's reward from the record's reward inputs, as one fixed-shape jitted program (`rollout_rewards`):
interaction (Eq. 7-8 with the exclusion rule), outcome or judge, with the optional group baseline; and
`trajectory_rewards`, which feeds it a rollout's segments and returns host arrays."""

from __future__ import annotations

import functools
from typing import Mapping

import chex
import jax
import jax.numpy as jnp

import numpy as np

from coars_jax.agents.protocol import AGENTS
from coars_jax.agents.trajectory import Trajectory
from coars_jax.coars.rewards import (
  INVALID_USER_REWARD,
  agent_reward,
  group_centred,
  judge_rewards,
  judge_segment_probability,
  segment_rewards,
)
from coars_jax.sampling.compilation import count_trace
from coars_jax.training.rl_config import RLConfig


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
  count_trace(REWARDS_TRACE_NAME)
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


def trajectory_rewards(
  trajectory: Trajectory,
  judge_probability: np.ndarray | None,
  groups: np.ndarray,
  *,
  config: RLConfig,
  max_turns: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Host arrays of every segment of `trajectory`, from the fixed-shape jitted `rollout_rewards` (padded to the
  most segments an iteration of `config` with `max_turns` turns can have, so one program serves every iteration):
  (R, the loss weight R or R - group mean, included by the reward rule, carries loss: included, of a trained agent,
  with tokens). `judge_probability` is the judge's per-episode probability (judge reward only), `groups` each
  episode's group id (the rollouts of one window)."""
  size = config.episodes_per_iteration * max_turns * len(AGENTS)
  segments = trajectory.num_segments

  def padded(values, dtype, fill=0):
    out = np.full(size, fill, dtype)
    out[:segments] = values
    return out

  episode = trajectory.episode
  rows = {
    'hit': padded(trajectory.hit, bool),
    'acceptance_score': padded(trajectory.acceptance_score, np.float32),
    'peer_similarity': padded(trajectory.peer_similarity, np.float32),
    'action': padded(trajectory.action, np.int32),
    'turn': padded(trajectory.turn, np.int32, 1),
    'agent': padded(trajectory.agent, np.int32),
    'valid': padded(trajectory.valid, bool, True),
    'final_hit': padded(trajectory.final_hit[episode], bool),
    'last_turn': padded(trajectory.num_turns[episode], np.int32, 1),
    'judge_probability': padded(
      np.zeros(segments)
      if judge_probability is None
      else judge_segment_probability(judge_probability, episode, trajectory.valid),
      np.float32,
    ),
    'group': padded(groups[episode], np.int32),
    'real': padded(np.ones(segments, bool), bool),
  }
  reward, weight, included = rollout_rewards(rows, **config.reward_options())
  reward, weight, included = (np.asarray(a)[:segments] for a in (reward, weight, included))
  trained = np.isin(trajectory.agent, [AGENTS.index(a) for a in config.trained_agents])
  return reward, weight, included, included & trained & trajectory.completion_mask.any(axis=1)
