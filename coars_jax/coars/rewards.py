"""Per-segment rewards R_t of both agents (METHOD.md section 3): the CoARS interaction reward (Eq. 7 for the
recommender, Eq. 8 for the user, coupled through hit_t and s_t) with its exclusion rule, the terminal hit reward
(the outcome-RL baseline's, or CoARS's ablation without the interaction reward) and the judge-RL baseline's
terminal 2p - 1; `segment_rewards` picks one of the first two by name (`REWARD_KINDS`) for the trainer's config
(the judge's p comes from a model pass, so the trainer calls `judge_rewards` itself). No invalid (unparseable)
message earns more than the floor of its agent's reward (METHOD.md section 2): wherever the user agent is rewarded,
its own invalid message gets the fixed penalty `invalid_user_reward`, and the recommender's gets the least its reward
can be (-D_t for Eq. 7, the unhit terminal value for the outcome reward, p = 0 for the judge's).
Pure jittable functions of per-segment arrays laid out as `agents.Trajectory` rows.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from coars_jax.agents.protocol import ACTIONS

RECOMMENDER_ID, USER_ID = 0, 1  # as `agents.Trajectory.agent`
# a_t indices (`protocol.ACTIONS`) that accept the recommendation; a miss met with one is excluded (section 3).
POSITIVE_ACTION_IDS = (ACTIONS.index('star'), ACTIONS.index('click'))
REWARD_KINDS = ('interaction', 'outcome')
OUTCOME_ASSIGNMENTS = ('final', 'episode')
INVALID_USER_REWARD = -1.0  # R_user of an invalid user message (METHOD.md section 2)


def stage_weight(turn: jax.Array, gamma: float = 0.9) -> jax.Array:
  """D_t = gamma^(t-1), the stage-sensitivity weight of Eq. 7 (the project's default form; t from 1)."""
  return jnp.asarray(gamma, jnp.float32) ** (jnp.asarray(turn, jnp.float32) - 1.0)


def interaction_rewards(
  hit: jax.Array,
  acceptance_score: jax.Array,
  peer_similarity: jax.Array,
  action: jax.Array,
  turn: jax.Array,
  *,
  gamma: float = 0.9,
  alpha: float = 0.1,
  valid: jax.Array | None = None,
  agent: jax.Array | None = None,
  invalid_user_reward: float = INVALID_USER_REWARD,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The interaction rewards of every segment's turn (Eq. 7, Eq. 8) and which segments enter the loss.

    R_rec_t  = (2 hit_t - 1) (0.5 + 0.5 s_t) D_t,                      D_t = gamma^(t-1)
    R_user_t = (2 hit_t - 1) (2 s_t - 1) (1 - alpha q_t (2 s_t - 1))

  A turn with hit_t = 0 whose user still clicked or starred is excluded from both agents' losses (the item may
  really be liked; logged data are incomplete).

  Invalid messages (METHOD.md section 2). The rollout records an invalid recommender message as a miss (hit_t = 0,
  q_t = 0) and an invalid user message as a skip at s_t = .375; that s_t is the user's effect on the dialogue, so
  a valid recommender message's R_rec_t keeps using it. Neither agent's OWN reward for an invalid message is read
  from Eq. 7-8, since both readings would pay for breaking the format:
  - the user's is the fixed `invalid_user_reward`: read as a skip, a miss would pay R_user = (-1)(2 * .375 - 1) =
    +.25;
  - the recommender's is -D_t, the floor of Eq. 7: read as a miss the user skipped at s = .375, it would earn
    -0.6875 D_t, more than a valid miss the user skips at s just under .5 (-0.75 D_t); and read as a miss the user
    clicked or starred (the user sees what the message said), it would be excluded and earn nothing.
  Each penalty is set on the agent's own invalid segment only, which stays included whatever the exclusion rule
  says of its turn.

  Args:
    hit: bool[S], hit_t = 1 iff i_t = i*.
    acceptance_score: float[S], s_t in [0, 1].
    peer_similarity: float[S], q_t in [-1, 1].
    action: int[S], a_t as an index into `protocol.ACTIONS` (dislike 0, skip 1, star 2, click 3).
    turn: int[S], t from 1.
    gamma: the decay of D_t.
    alpha: the peer-similarity strength alpha of Eq. 8.
    valid: bool[S] or None, whether each segment's own message parsed (`Trajectory.valid`); None: all valid.
    agent: int[S], 0 recommender, 1 user; required with `valid` (each segment is judged by its own message).
    invalid_user_reward: R_user of an invalid user segment (-1 by default).
  Returns:
    (r_rec, r_user, included): float32[S] R_rec_t, float32[S] R_user_t (each segment carries both of its turn's
    rewards; `agent_reward` picks the one of the segment's own agent), and bool[S] False on excluded turns.
  """
  chex.assert_rank([hit, acceptance_score, peer_similarity, action, turn], 1)
  chex.assert_equal_shape([hit, acceptance_score, peer_similarity, action, turn])
  hit = jnp.asarray(hit).astype(bool)
  score = jnp.asarray(acceptance_score, jnp.float32)
  similarity = jnp.asarray(peer_similarity, jnp.float32)
  sign = 2.0 * hit.astype(jnp.float32) - 1.0
  centred = 2.0 * score - 1.0
  stage = stage_weight(turn, gamma)
  r_rec = sign * (0.5 + 0.5 * score) * stage
  r_user = sign * centred * (1.0 - alpha * similarity * centred)
  included = ~(~hit & is_positive_action(action))
  r_rec, included = penalise_invalid_recommender(r_rec, included, valid, agent, -stage, include=True)
  return penalise_invalid_user(r_rec, r_user, included, valid, agent, invalid_user_reward)


def penalise_invalid_recommender(
  r_rec: jax.Array,
  included: jax.Array,
  valid: jax.Array | None,
  agent: jax.Array | None,
  floor: jax.Array | float,
  *,
  include: bool,
) -> tuple[jax.Array, jax.Array]:
  """(r_rec, included) with R_rec = `floor` (a scalar or float[S]) on the recommender's own invalid segments
  (agent = recommender and not valid), and with `include` those segments included too; every other value unchanged.
  `valid` None: nothing to penalise."""
  if valid is None:
    return r_rec, included
  if agent is None:
    raise ValueError(
      "penalise_invalid_recommender: `valid` needs `agent`, so that only the recommender's own segments are penalised"
    )
  chex.assert_equal_shape([r_rec, included, valid, agent])
  invalid_rec = (jnp.asarray(agent) == RECOMMENDER_ID) & ~jnp.asarray(valid).astype(bool)
  r_rec = jnp.where(invalid_rec, jnp.asarray(floor, jnp.float32), r_rec).astype(jnp.float32)
  return r_rec, (included | invalid_rec) if include else included


def penalise_invalid_user(
  r_rec: jax.Array,
  r_user: jax.Array,
  included: jax.Array,
  valid: jax.Array | None,
  agent: jax.Array | None,
  penalty: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(r_rec, r_user, included) with R_user = `penalty` and included = True on the user's own invalid segments
  (agent = user and not valid); every other value unchanged. `valid` None: nothing to penalise."""
  if valid is None:
    return r_rec, r_user, included
  if agent is None:
    raise ValueError("penalise_invalid_user: `valid` needs `agent`, so that only the user's own segments are penalised")
  chex.assert_equal_shape([r_user, included, valid, agent])
  invalid_user = (jnp.asarray(agent) == USER_ID) & ~jnp.asarray(valid).astype(bool)
  r_user = jnp.where(invalid_user, jnp.asarray(penalty, jnp.float32), r_user).astype(jnp.float32)
  return r_rec, r_user, included | invalid_user


def is_positive_action(action: jax.Array) -> jax.Array:
  """bool[S]: a_t is star or click."""
  action = jnp.asarray(action)
  return (action == POSITIVE_ACTION_IDS[0]) | (action == POSITIVE_ACTION_IDS[1])


def outcome_rewards(
  final_hit: jax.Array,
  agent: jax.Array,
  turn: jax.Array,
  last_turn: jax.Array,
  *,
  assign: str = 'final',
  signed: bool = True,
  reward_user: bool = False,
  every_turn: bool = False,
  valid: jax.Array | None = None,
  invalid_user_reward: float = INVALID_USER_REWARD,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A terminal hit reward: by default the outcome-RL baseline's, for the recommender only (METHOD.md section 8);
  with `reward_user` and `every_turn`, CoARS's ablation without the interaction reward, where the reward is the
  only thing that changes.

  The reward is whether the episode's recommendation i_T is the target i*, as 2 hit_T - 1 in {-1, +1} by
  default (`signed`), or hit_T in {0, 1}. Signed is the default because the loss is REINFORCE without a
  baseline: with {0, 1} a missed episode has zero weight and teaches nothing, while -1 pushes its messages
  down, and +-1 matches the sign convention (2 hit - 1) of Eq. 7.

  Args:
    final_hit: bool[S], hit_T of each segment's episode (`Trajectory.final_hit[Trajectory.episode]`).
    agent: int[S], 0 recommender, 1 user.
    turn: int[S], t from 1.
    last_turn: int[S], T of each segment's episode (`Trajectory.num_turns[Trajectory.episode]`).
    assign: 'final' puts the reward on the final turn's segment of each rewarded agent only (the brief's
      terminal reward); 'episode' gives every segment of a rewarded agent the terminal reward, the undiscounted
      return of a reward paid at the end.
    signed: 2 hit_T - 1 when True, hit_T when False.
    reward_user: the user agent's segments get the terminal reward too (False: the baseline, where the user
      agent is not trained and gets 0).
    every_turn: every segment stays included, with R = 0 where `assign` gives no reward, so that a
      self-distillation term lambda_SD A still acts on every turn (False: the baseline, where only the rewarded
      segments carry loss; with lambda_SD = 0 an unrewarded segment's weight is 0 anyway).
    valid, invalid_user_reward: `Trajectory.valid` (None: all valid). With `reward_user`, the user's invalid
      segments get R_user = invalid_user_reward and are included, as in `interaction_rewards`. An included
      recommender segment whose own message is invalid gets the unhit value (-1 signed, 0 unsigned), so that with
      assign 'episode' or `every_turn` an invalid message in a hit episode does not share the episode's +1; which
      segments are included does not change for it (the baseline keeps one segment per episode). With assign
      'final' the final message's validity is already in hit_T, since an invalid message names no item.
  Returns:
    (r_rec, r_user, included): float32[S] the reward on the rewarded recommender segments and 0 elsewhere,
    float32[S] the same on the rewarded user segments (zeros unless `reward_user`), and bool[S] True on the
    rewarded segments (on all of them with `every_turn`).
  """
  if assign not in OUTCOME_ASSIGNMENTS:
    raise ValueError(f'outcome_rewards: assign must be one of {OUTCOME_ASSIGNMENTS}, found {assign!r}')
  chex.assert_rank([final_hit, agent, turn, last_turn], 1)
  chex.assert_equal_shape([final_hit, agent, turn, last_turn])
  final_hit = jnp.asarray(final_hit).astype(jnp.float32)
  value = 2.0 * final_hit - 1.0 if signed else final_hit
  agent = jnp.asarray(agent)
  at_assigned_turn = jnp.asarray(turn) == jnp.asarray(last_turn) if assign == 'final' else jnp.ones(agent.shape, bool)
  rec_rewarded = (agent == RECOMMENDER_ID) & at_assigned_turn
  user_rewarded = (agent == USER_ID) & at_assigned_turn if reward_user else jnp.zeros(agent.shape, bool)
  r_rec = jnp.where(rec_rewarded, value, 0.0)
  r_user = jnp.where(user_rewarded, value, 0.0)
  included = jnp.ones(agent.shape, bool) if every_turn else rec_rewarded | user_rewarded
  r_rec, _ = penalise_invalid_recommender(r_rec, included, valid, agent, -1.0 if signed else 0.0, include=False)
  r_rec = jnp.where(included, r_rec, 0.0)
  if not reward_user:
    return r_rec, r_user, included
  return penalise_invalid_user(r_rec, r_user, included, valid, agent, invalid_user_reward)


def judge_rewards(
  judge_probability: jax.Array, agent: jax.Array, turn: jax.Array, last_turn: jax.Array, *, assign: str = 'final'
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The judge-RL baseline: a terminal reward for the recommender only, 2 p - 1 in [-1, 1], where p is the frozen
  base model's probability that the finished dialogue found an item the user wants next (METHOD.md section 8,
  "judge-based outcome rewards"; the trainer asks the base model, adapters off).

  p must not pay a message the judge could not have seen as an answer: `judge_segment_probability` sets p = 0 on a
  segment whose own message is invalid (the judge reads the text an invalid message wrote, and may like it), so such
  a rewarded segment earns the floor -1; a p that is not a number (NaN, from a degenerate score) earns -1 as well.

  Args:
    judge_probability: float[S], p of each segment's episode (`judge_segment_probability`).
    agent, turn, last_turn, assign: as in `outcome_rewards`.
  Returns:
    (r_rec, r_user, included) laid out as `outcome_rewards` returns them.
  """
  if assign not in OUTCOME_ASSIGNMENTS:
    raise ValueError(f'judge_rewards: assign must be one of {OUTCOME_ASSIGNMENTS}, found {assign!r}')
  chex.assert_rank([judge_probability, agent, turn, last_turn], 1)
  chex.assert_equal_shape([judge_probability, agent, turn, last_turn])
  probability = jnp.asarray(judge_probability, jnp.float32)
  # jnp.clip keeps a NaN, which would turn the whole loss into NaN; a judge that gave no number judged nothing good.
  value = 2.0 * jnp.clip(jnp.where(jnp.isnan(probability), 0.0, probability), 0.0, 1.0) - 1.0
  rewarded = jnp.asarray(agent) == RECOMMENDER_ID
  if assign == 'final':
    rewarded = rewarded & (jnp.asarray(turn) == jnp.asarray(last_turn))
  r_rec = jnp.where(rewarded, value, 0.0)
  return r_rec, jnp.zeros_like(r_rec), rewarded


def judge_segment_probability(judge_probability: jax.Array, episode: jax.Array, valid: jax.Array) -> jax.Array:
  """float32[S]: the judge's p of each segment's episode (`judge_probability` float[E], `episode` int[S] as
  `Trajectory.episode`), and 0 on a segment whose own message is invalid (`Trajectory.valid`), so that
  `judge_rewards` pays an invalid recommender message the floor 2 * 0 - 1 = -1 (METHOD.md section 2)."""
  probability = jnp.asarray(judge_probability, jnp.float32)[jnp.asarray(episode)]
  chex.assert_equal_shape([probability, valid])
  return jnp.where(jnp.asarray(valid).astype(bool), probability, 0.0)


def agent_reward(r_rec: jax.Array, r_user: jax.Array, agent: jax.Array) -> jax.Array:
  """float32[S]: each segment's own agent's reward, R_rec_t on recommender rows and R_user_t on user rows."""
  chex.assert_equal_shape([r_rec, r_user, agent])
  return jnp.where(jnp.asarray(agent) == RECOMMENDER_ID, r_rec, r_user).astype(jnp.float32)


def segment_rewards(
  kind: str,
  *,
  hit: jax.Array,
  acceptance_score: jax.Array,
  peer_similarity: jax.Array,
  action: jax.Array,
  turn: jax.Array,
  agent: jax.Array,
  final_hit: jax.Array,
  last_turn: jax.Array,
  valid: jax.Array | None = None,
  gamma: float = 0.9,
  alpha: float = 0.1,
  invalid_user_reward: float = INVALID_USER_REWARD,
  outcome_assign: str = 'final',
  outcome_signed: bool = True,
  outcome_reward_user: bool = False,
  outcome_every_turn: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """(R[S], included[S]) for the reward named by config (`REWARD_KINDS`): each segment's own agent's reward.

  'interaction' is Eq. 7-8 with the exclusion rule (`interaction_rewards`); 'outcome' the terminal hit reward
  (`outcome_rewards`; its arguments `outcome_assign`, `outcome_signed`, `outcome_reward_user` and
  `outcome_every_turn`). `valid` (`Trajectory.valid`; None: all valid) and `invalid_user_reward` set the user's
  reward on its own invalid segments wherever the user agent is rewarded.
  """
  if kind == 'interaction':
    r_rec, r_user, included = interaction_rewards(
      hit,
      acceptance_score,
      peer_similarity,
      action,
      turn,
      gamma=gamma,
      alpha=alpha,
      valid=valid,
      agent=agent,
      invalid_user_reward=invalid_user_reward,
    )
  elif kind == 'outcome':
    r_rec, r_user, included = outcome_rewards(
      final_hit,
      agent,
      turn,
      last_turn,
      assign=outcome_assign,
      signed=outcome_signed,
      reward_user=outcome_reward_user,
      every_turn=outcome_every_turn,
      valid=valid,
      invalid_user_reward=invalid_user_reward,
    )
  else:
    raise ValueError(f'segment_rewards: kind must be one of {REWARD_KINDS}, found {kind!r}')
  return agent_reward(r_rec, r_user, agent), included


def group_centred(rewards: jax.Array, active: jax.Array, agent: jax.Array, group: jax.Array) -> jax.Array:
  """R_s minus the mean R over the active segments of the same agent and group: section 5's group mean baseline
  (the G rollouts of one window share a group id). Pairwise, so it needs no static group count; the one definition,
  used by the loss and by the trainer's whole-rollout rewards alike."""
  group = jnp.asarray(group)
  chex.assert_equal_shape([group, rewards])
  peers = (group[:, None] == group[None, :]) & (agent[:, None] == agent[None, :]) & active[None, :]
  count = peers.sum(axis=1).astype(jnp.float32)
  baseline = jnp.where(peers, rewards[None, :], 0.0).sum(axis=1) / jnp.maximum(count, 1.0)
  return rewards - baseline
