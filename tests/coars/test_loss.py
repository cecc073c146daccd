"""The Eq. 11-12 loss: a worked 2-turn example by hand, the exclusion rule, masks, the constant weight
R + lambda A (no gradient to the teacher or through A), the options (group baseline, PPO clip, k3 KL), and on a
tiny decoder with two adapters: fused teacher scoring equals precomputed, and one optimizer step moves only the
adapters, each only when its own segments carry weight."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from coars_jax.coars import coars_loss, coars_objective, interaction_rewards, token_advantages
from coars_jax.sampling import completion_log_probs, left_pad, right_pad
from tests.coars.conftest import PAD

LAMBDA = 0.1
DISLIKE, SKIP, STAR, CLICK = 0, 1, 2, 3

# The worked example: turn 1 a miss (skip, s = .3, q = .2), turn 2 a hit (click, s = .9, q = .5). Rows in
# Trajectory order: rec t1 (3 tokens), user t1 (2), rec t2 (2), user t2 (4).
AGENT = [0, 1, 0, 1]
LENGTHS = [3, 2, 2, 4]
STUDENT = [[-1.0, -0.5, -2.0, 0.0], [-0.3, -1.5, 0.0, 0.0], [-0.2, -0.8, 0.0, 0.0], [-0.6, -0.4, -1.1, -0.9]]
TEACHER = [[-0.4, -2.0, -0.5, 0.0], [-0.2, -1.7, 0.0, 0.0], [-0.1, -0.3, 0.0, 0.0], [-2.0, -0.3, -1.0, -0.2]]
R_REC_1 = -1 * (0.5 + 0.5 * 0.3) * 1.0
R_USER_1 = -1 * (2 * 0.3 - 1) * (1 - 0.1 * 0.2 * (2 * 0.3 - 1))
R_REC_2 = 1 * (0.5 + 0.5 * 0.9) * 0.9
R_USER_2 = 1 * (2 * 0.9 - 1) * (1 - 0.1 * 0.5 * (2 * 0.9 - 1))
REWARDS = [R_REC_1, R_USER_1, R_REC_2, R_USER_2]


def hand_advantage(teacher, student):
  return max(-1.0, min(1.0, teacher - student))


def hand_weights(rewards=REWARDS, lam=LAMBDA):
  return [
    [rewards[s] + lam * hand_advantage(TEACHER[s][n], STUDENT[s][n]) for n in range(LENGTHS[s])] for s in range(4)
  ]


def hand_agent_losses(rewards=REWARDS, lam=LAMBDA, episodes=1):
  """(L_rec, L_user) of Eq. 11-12 by plain arithmetic: -(1/E) sum_t (1/|y_t|) sum_n w log pi_S."""
  weights = hand_weights(rewards, lam)
  losses = [0.0, 0.0]
  for s in range(4):
    losses[AGENT[s]] -= sum(w * STUDENT[s][n] for n, w in enumerate(weights[s])) / LENGTHS[s] / episodes
  return losses


def example_arrays():
  mask = np.zeros((4, 4), bool)
  for s, length in enumerate(LENGTHS):
    mask[s, :length] = True
  return (
    jnp.asarray(STUDENT, jnp.float32),
    jnp.asarray(TEACHER, jnp.float32),
    jnp.asarray(mask),
    jnp.asarray(AGENT, jnp.int32),
  )


def loss_from_log_probs(student, teacher, rewards, included, mask, agent, **kwargs):
  return coars_loss(student, token_advantages(teacher, student, mask), rewards, included, mask, agent, **kwargs)


def test_worked_two_turn_example_by_hand():
  student, teacher, mask, agent = example_arrays()
  r_rec, r_user, included = interaction_rewards(
    jnp.array([False, False, True, True]),
    jnp.array([0.3, 0.3, 0.9, 0.9]),
    jnp.array([0.2, 0.2, 0.5, 0.5]),
    jnp.array([SKIP, SKIP, CLICK, CLICK]),
    jnp.array([1, 1, 2, 2]),
  )
  rewards = jnp.where(agent == 0, r_rec, r_user)
  np.testing.assert_allclose(rewards, REWARDS, rtol=1e-6)
  advantages = token_advantages(teacher, student, mask)
  # A by hand: rec t1 (0.6, -1.5 -> -1, 1.5 -> 1), user t1 (0.1, -0.2), rec t2 (0.1, 0.5), user t2 (-1, .1, .1, .7).
  np.testing.assert_allclose(
    advantages, [[0.6, -1.0, 1.0, 0.0], [0.1, -0.2, 0.0, 0.0], [0.1, 0.5, 0.0, 0.0], [-1.0, 0.1, 0.1, 0.7]], atol=1e-6
  )
  loss, metrics = jax.jit(functools.partial(coars_loss, num_episodes=1, lambda_sd=LAMBDA))(
    student, advantages, rewards, included, mask, agent
  )
  chex.assert_shape(loss, ())
  chex.assert_type(loss, jnp.float32)
  l_rec, l_user = hand_agent_losses()
  # Spelled out once for the recommender: -[(1/3)((-0.65+0.06)(-1) + (-0.65-0.1)(-0.5) + (-0.65+0.1)(-2))
  #                                         + (1/2)((0.855+0.01)(-0.2) + (0.855+0.05)(-0.8))]
  spelled = -(
    (((-0.65 + 0.06) * -1.0) + ((-0.65 - 0.1) * -0.5) + ((-0.65 + 0.1) * -2.0)) / 3
    + (((0.855 + 0.01) * -0.2) + ((0.855 + 0.05) * -0.8)) / 2
  )
  assert l_rec == pytest.approx(spelled, rel=1e-12)
  np.testing.assert_allclose(metrics['loss_recommender'], l_rec, rtol=1e-5)
  np.testing.assert_allclose(metrics['loss_user'], l_user, rtol=1e-5)
  np.testing.assert_allclose(loss, l_rec + l_user, rtol=1e-5)
  np.testing.assert_allclose(metrics['reward_recommender'], (R_REC_1 + R_REC_2) / 2, rtol=1e-5)
  np.testing.assert_allclose(metrics['reward_user'], (R_USER_1 + R_USER_2) / 2, rtol=1e-5)
  values = [0.6, -1.0, 1.0, 0.1, -0.2, 0.1, 0.5, -1.0, 0.1, 0.1, 0.7]
  mean = sum(values) / len(values)
  np.testing.assert_allclose(metrics['advantage_mean'], mean, atol=1e-6)
  np.testing.assert_allclose(
    metrics['advantage_std'], math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)), atol=1e-6
  )
  np.testing.assert_allclose(metrics['advantage_abs_mean'], sum(map(abs, values)) / len(values), atol=1e-6)
  assert float(metrics['excluded_share']) == 0.0
  assert float(metrics['segments_recommender']) == 2 and float(metrics['segments_user']) == 2


def test_weight_is_constant_teacher_gets_no_gradient():
  student, teacher, mask, agent = example_arrays()
  rewards, included = jnp.asarray(REWARDS, jnp.float32), jnp.ones(4, bool)

  def total(student, teacher, rewards):
    return loss_from_log_probs(student, teacher, rewards, included, mask, agent, num_episodes=1, lambda_sd=LAMBDA)[0]

  grad_student, grad_teacher, grad_rewards = jax.grad(total, argnums=(0, 1, 2))(student, teacher, rewards)
  np.testing.assert_array_equal(grad_teacher, 0.0)
  np.testing.assert_array_equal(grad_rewards, 0.0)
  # d loss / d log pi_S = -w / |y_t| exactly: any gradient through A = clip(T - S) would add lambda terms here.
  expected = np.zeros((4, 4))
  for s, weights in enumerate(hand_weights()):
    for n, w in enumerate(weights):
      expected[s, n] = -w / LENGTHS[s]
  np.testing.assert_allclose(grad_student, expected, atol=1e-6)


def test_miss_with_star_is_excluded_and_contributes_nothing():
  student, teacher, mask, agent = example_arrays()
  # A second episode of one turn: a miss the user starred (s = .6). Its rows get large log-probs and weights.
  student2 = jnp.concatenate([student, jnp.array([[-3.0, -2.0, 0, 0], [-1.0, -4.0, -2.0, 0]])])
  teacher2 = jnp.concatenate([teacher, jnp.array([[-0.1, -0.1, 0, 0], [-0.1, -0.1, -0.1, 0]])])
  mask2 = jnp.concatenate([mask, jnp.array([[1, 1, 0, 0], [1, 1, 1, 0]], bool)])
  agent2 = jnp.array(AGENT + [0, 1])
  r_rec, r_user, included = interaction_rewards(
    jnp.array([False, False, True, True, False, False]),
    jnp.array([0.3, 0.3, 0.9, 0.9, 0.6, 0.6]),
    jnp.array([0.2, 0.2, 0.5, 0.5, 0.1, 0.1]),
    jnp.array([SKIP, SKIP, CLICK, CLICK, STAR, STAR]),
    jnp.array([1, 1, 2, 2, 1, 1]),
  )
  np.testing.assert_array_equal(included, [True, True, True, True, False, False])
  rewards = jnp.where(agent2 == 0, r_rec, r_user)

  def total(student):
    return loss_from_log_probs(student, teacher2, rewards, included, mask2, agent2, num_episodes=2, lambda_sd=LAMBDA)

  (loss, metrics), grad = jax.value_and_grad(total, has_aux=True)(student2)
  l_rec, l_user = hand_agent_losses(episodes=2)
  np.testing.assert_allclose(loss, l_rec + l_user, rtol=1e-5)
  np.testing.assert_array_equal(grad[4:], 0.0)
  np.testing.assert_allclose(metrics['excluded_share'], 2 / 6, rtol=1e-6)
  # The excluded rows' rewards do not enter the reward metrics either.
  np.testing.assert_allclose(metrics['reward_recommender'], (R_REC_1 + R_REC_2) / 2, rtol=1e-5)


def test_tokens_off_the_mask_and_the_other_agents_rows_do_not_change_an_agents_loss():
  student, teacher, mask, agent = example_arrays()
  rewards, included = jnp.asarray(REWARDS, jnp.float32), jnp.ones(4, bool)
  run = functools.partial(loss_from_log_probs, num_episodes=1, lambda_sd=LAMBDA)
  _, reference = run(student, teacher, rewards, included, mask, agent)
  noise = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4)) * 5, jnp.float32)
  # Off the completion mask (padding slots): any values, no change to anything.
  _, off_mask = run(jnp.where(mask, student, noise), jnp.where(mask, teacher, -noise), rewards, included, mask, agent)
  for name in reference:
    np.testing.assert_allclose(off_mask[name], reference[name], atol=1e-6, err_msg=name)
  # The user's rows: any log-probs and rewards leave the recommender's loss as it was, and vice versa.
  user_rows = (agent == 1)[:, None]
  _, user_changed = run(
    jnp.where(user_rows, noise, student),
    jnp.where(user_rows, -noise, teacher),
    jnp.where(agent == 1, 7.0, rewards),
    included,
    mask,
    agent,
  )
  np.testing.assert_allclose(user_changed['loss_recommender'], reference['loss_recommender'], atol=1e-6)
  assert abs(float(user_changed['loss_user'] - reference['loss_user'])) > 1e-3
  _, rec_changed = run(
    jnp.where(~user_rows, noise, student), teacher, jnp.where(agent == 0, -3.0, rewards), included, mask, agent
  )
  np.testing.assert_allclose(rec_changed['loss_user'], reference['loss_user'], atol=1e-6)
  # Gradient off the mask is zero.
  grad = jax.grad(lambda s: run(s, teacher, rewards, included, mask, agent)[0])(student)
  np.testing.assert_array_equal(np.asarray(grad)[~np.asarray(mask)], 0.0)


def test_empty_mask_rows_contribute_nothing():
  student, teacher, mask, agent = example_arrays()
  rewards = jnp.asarray(REWARDS + [5.0], jnp.float32)
  padded = functools.partial(loss_from_log_probs, num_episodes=1, lambda_sd=LAMBDA)
  loss, metrics = padded(
    jnp.concatenate([student, -jnp.ones((1, 4))]),
    jnp.concatenate([teacher, jnp.zeros((1, 4))]),
    rewards,
    jnp.ones(5, bool),
    jnp.concatenate([mask, jnp.zeros((1, 4), bool)]),
    jnp.concatenate([agent, jnp.array([0])]),
  )
  np.testing.assert_allclose(loss, sum(hand_agent_losses()), rtol=1e-5)
  assert float(metrics['segments_recommender']) == 2 and float(metrics['excluded_share']) == 0.0


def test_group_mean_baseline_by_hand():
  # Two rollouts (group 0) of one window and one of another (group 1), one turn each, lambda = 0, one token each.
  student = jnp.array([[-1.0], [-2.0], [-0.5], [-1.5], [-0.7], [-0.9]])
  mask = jnp.ones((6, 1), bool)
  agent = jnp.array([0, 1, 0, 1, 0, 1])
  rewards = jnp.array([0.8, 0.4, -0.6, 0.2, 0.3, -0.5])
  group = jnp.array([0, 0, 0, 0, 1, 1])
  loss, metrics = coars_loss(
    student,
    jnp.zeros_like(student),
    rewards,
    jnp.ones(6, bool),
    mask,
    agent,
    num_episodes=3,
    lambda_sd=0.0,
    group=group,
  )
  rec_baseline, user_baseline = (0.8 - 0.6) / 2, (0.4 + 0.2) / 2
  l_rec = -((0.8 - rec_baseline) * -1.0 + (-0.6 - rec_baseline) * -0.5 + (0.3 - 0.3) * -0.7) / 3
  l_user = -((0.4 - user_baseline) * -2.0 + (0.2 - user_baseline) * -1.5 + (-0.5 + 0.5) * -0.9) / 3
  np.testing.assert_allclose(metrics['loss_recommender'], l_rec, rtol=1e-5)
  np.testing.assert_allclose(metrics['loss_user'], l_user, rtol=1e-5)
  np.testing.assert_allclose(metrics['reward_recommender'], (0.8 - 0.6 + 0.3) / 3, rtol=1e-5)  # raw R
  # An excluded segment is left out of its group's mean.
  _, metrics = coars_loss(
    student,
    jnp.zeros_like(student),
    rewards,
    jnp.array([True, True, False, True, True, True]),
    mask,
    agent,
    num_episodes=3,
    lambda_sd=0.0,
    group=group,
  )
  np.testing.assert_allclose(metrics['loss_recommender'], 0.0, atol=1e-7)  # 0.8 - 0.8 and 0.3 - 0.3


def test_ppo_clip_by_hand():
  student = jnp.array([[-1.0, -1.0, -1.0]])
  mask = jnp.ones((1, 3), bool)
  rewards = jnp.array([0.5])
  agent, included = jnp.array([0]), jnp.array([True])
  advantages = jnp.array([[0.0, -10.0, 0.0]])  # with lambda = 0.1 the weights are 0.5, -0.5, 0.5
  behaviour = jnp.array([[-1.0, -1.5, -1.5]])  # ratios 1, e^0.5, e^0.5
  epsilon = 0.2

  def total(student, behaviour):
    return coars_loss(
      student,
      advantages,
      rewards,
      included,
      mask,
      agent,
      num_episodes=1,
      lambda_sd=0.1,
      behaviour_log_probs=behaviour,
      ppo_epsilon=epsilon,
    )

  (loss, metrics), grad = jax.value_and_grad(total, has_aux=True)(student, behaviour)
  ratio = math.exp(0.5)
  # Token 1: w = .5, ratio 1 -> .5. Token 2: w = -.5, ratio e^.5 > 1.2: min(-.5 e^.5, -.5 * 1.2) = -.5 e^.5 (kept).
  # Token 3: w = .5, ratio e^.5: min(.5 e^.5, .5 * 1.2) = .6 (clipped, no gradient).
  np.testing.assert_allclose(loss, -(0.5 - 0.5 * ratio + 0.6) / 3, rtol=1e-5)
  np.testing.assert_allclose(grad, [[-0.5 / 3, 0.5 * ratio / 3, 0.0]], rtol=1e-5)
  np.testing.assert_allclose(metrics['ppo_clip_fraction'], 2 / 3, rtol=1e-6)
  # On-policy (behaviour = the current log-probs) the gradient is REINFORCE's: -w / |y|.
  reinforce = jax.grad(lambda s: total(s, jax.lax.stop_gradient(s))[0])(student)
  np.testing.assert_allclose(reinforce, [[-0.5 / 3, 0.5 / 3, -0.5 / 3]], rtol=1e-5)
  with pytest.raises(ValueError, match='ppo_epsilon needs behaviour_log_probs'):
    coars_loss(student, advantages, rewards, included, mask, agent, num_episodes=1, ppo_epsilon=0.2)


def test_k3_kl_penalty_by_hand():
  student = jnp.array([[-1.0, -2.0, 0.0]])
  base = jnp.array([[-1.5, -1.0, 0.0]])
  mask = jnp.array([[True, True, False]])
  zeros = jnp.zeros_like(student)
  beta = 0.5

  def total(student):
    return coars_loss(
      student,
      zeros,
      jnp.array([0.0]),
      jnp.array([True]),
      mask,
      jnp.array([1]),
      num_episodes=1,
      base_log_probs=base,
      kl_coef=beta,
    )

  (loss, metrics), grad = jax.value_and_grad(total, has_aux=True)(student)
  k3 = [math.exp(l) - l - 1 for l in (-1.5 + 1.0, -1.0 + 2.0)]  # l = log pi_base - log pi_S
  np.testing.assert_allclose(metrics['kl'], sum(k3) / 2, rtol=1e-5)
  np.testing.assert_allclose(loss, beta * sum(k3) / 2, rtol=1e-5)
  # d k3 / d log pi_S = 1 - exp(l); off the mask nothing.
  np.testing.assert_allclose(grad, [[beta * (1 - math.exp(-0.5)) / 2, beta * (1 - math.exp(1.0)) / 2, 0.0]], rtol=1e-5)
  same, _ = coars_loss(
    base,
    zeros,
    jnp.array([0.0]),
    jnp.array([True]),
    mask,
    jnp.array([1]),
    num_episodes=1,
    base_log_probs=base,
    kl_coef=beta,
  )
  assert float(same) == 0.0
  with pytest.raises(ValueError, match='kl_coef > 0 needs base_log_probs'):
    coars_loss(student, zeros, jnp.array([0.0]), jnp.array([True]), mask, jnp.array([1]), num_episodes=1, kl_coef=beta)


def test_all_options_together_under_jit():
  student, teacher, mask, agent = example_arrays()
  advantages = token_advantages(teacher, student, mask)
  run = jax.jit(functools.partial(coars_loss, lambda_sd=LAMBDA, ppo_epsilon=0.2, kl_coef=0.05))
  loss, metrics = run(
    student,
    advantages,
    jnp.asarray(REWARDS),
    jnp.ones(4, bool),
    mask,
    agent,
    num_episodes=jnp.float32(1),
    group=jnp.zeros(4, jnp.int32),
    behaviour_log_probs=student - 0.1,
    base_log_probs=teacher,
  )
  chex.assert_tree_all_finite((loss, metrics))
  assert {'kl', 'ppo_clip_fraction', 'ratio_mean'} <= set(metrics)
  np.testing.assert_allclose(metrics['ratio_mean'], math.exp(0.1), rtol=1e-5)


# --- on a tiny decoder with two adapters -------------------------------------------------------------------------

PROMPTS = [[5, 9, 14], [7, 1, 22, 40, 11], [5, 9, 14, 2, 8], [7, 1, 22, 40, 11, 3]]
TEACHER_SUFFIX = [50, 51, 52]  # d, appended to every prompt
COMPLETIONS = [[20, 21, 22, 23], [30, 31], [24, 25, 26], [32, 33, 34, 35, 36]]


def model_batch(rewards=(-0.65, 0.4, 0.85, 0.77), included=(True, True, True, True)):
  prompt_tokens, prompt_mask = left_pad(PROMPTS, 6, PAD)
  teacher_tokens, teacher_mask = left_pad([p + TEACHER_SUFFIX for p in PROMPTS], 9, PAD)
  completion_tokens, completion_mask = right_pad(COMPLETIONS, 6, PAD)
  agent = np.array(AGENT, np.int32)
  return {
    'prompt_tokens': prompt_tokens,
    'prompt_mask': prompt_mask,
    'teacher_prompt_tokens': teacher_tokens,
    'teacher_prompt_mask': teacher_mask,
    'completion_tokens': completion_tokens,
    'completion_mask': completion_mask,
    'agent': agent,
    'adapter': agent.copy(),
    'reward': np.asarray(rewards, np.float32),
    'included': np.asarray(included, bool),
    'num_episodes': np.float32(1.0),
  }


def as_jax(batch):
  return {key: jnp.asarray(value) for key, value in batch.items()}


@functools.partial(nnx.jit, static_argnames=('lambda_sd',))
def loss_and_lora_grads(model, batch, lambda_sd):
  grad_fn = nnx.value_and_grad(
    functools.partial(coars_objective, lambda_sd=lambda_sd), argnums=nnx.DiffState(0, nnx.LoRAParam), has_aux=True
  )
  return grad_fn(model, batch)


# One transformation object: the optimizer's graph definition holds it, and a new one per test would recompile.
SGD = optax.sgd(0.5)


@functools.partial(jax.jit, static_argnames=('graphdef', 'lambda_sd'))
def _sgd_step(graphdef, state, batch, lambda_sd):
  model, optimizer = nnx.merge(graphdef, state)
  (_, metrics), grads = nnx.value_and_grad(
    functools.partial(coars_objective, lambda_sd=lambda_sd), argnums=nnx.DiffState(0, nnx.LoRAParam), has_aux=True
  )(model, batch)
  optimizer.update(model, grads)
  return nnx.state((model, optimizer)), metrics


def sgd_step(model, optimizer, batch, lambda_sd):
  """One update in place; split and jitted as the trainer does, so fresh copies of the model reuse the program."""
  graphdef, state = nnx.split((model, optimizer))
  state, metrics = _sgd_step(graphdef, state, batch, lambda_sd=lambda_sd)
  nnx.update((model, optimizer), state)
  return metrics


def flat_params(model):
  """{path: (is LoRA, value)} of every parameter."""
  return {
    path: (isinstance(variable, nnx.LoRAParam), np.array(variable.get_value()))
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


def test_fused_teacher_pass_equals_precomputed_teacher(shared_model):
  batch = model_batch()
  (loss, metrics), grads = loss_and_lora_grads(shared_model, as_jax(batch), lambda_sd=LAMBDA)
  teacher = nnx.jit(
    lambda m, b: completion_log_probs(
      m,
      b['teacher_prompt_tokens'],
      b['teacher_prompt_mask'],
      b['completion_tokens'],
      b['completion_mask'],
      adapter=b['adapter'],
    )
  )(shared_model, as_jax(batch))
  precomputed = {k: v for k, v in batch.items() if not k.startswith('teacher_prompt')}
  precomputed['teacher_log_probs'] = np.asarray(teacher)
  (loss2, metrics2), grads2 = loss_and_lora_grads(shared_model, as_jax(precomputed), lambda_sd=LAMBDA)
  np.testing.assert_allclose(loss2, loss, atol=1e-5)
  assert float(metrics['advantage_abs_mean']) > 1e-3  # the teacher's context changed something
  np.testing.assert_allclose(metrics2['advantage_mean'], metrics['advantage_mean'], atol=1e-5)
  for g, g2 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2)):
    np.testing.assert_allclose(g2, g, atol=1e-5)


@pytest.mark.parametrize('case', ['recommender_only', 'user_only', 'user_excluded', 'both'])
def test_one_update_moves_only_adapters_each_by_its_own_segments(shared_model, case):
  rewards = {
    'recommender_only': (-0.65, 0.0, 0.85, 0.0),
    'user_only': (0.0, 0.4, 0.0, 0.77),
    'user_excluded': (-0.65, 0.4, 0.85, 0.77),
    'both': (-0.65, 0.4, 0.85, 0.77),
  }[case]
  included = (True, False, True, False) if case == 'user_excluded' else (True,) * 4
  model = nnx.clone(shared_model)
  optimizer = nnx.Optimizer(model, SGD, wrt=nnx.LoRAParam)
  before = flat_params(model)
  # lambda = 0: the weight of a segment is its reward alone, so a zero reward means no weight.
  sgd_step(model, optimizer, as_jax(model_batch(rewards, included)), lambda_sd=0.0)
  after = flat_params(model)
  moved = {0: False, 1: False}
  for path, (is_lora, value) in before.items():
    if not is_lora:
      np.testing.assert_array_equal(after[path][1], value, err_msg=f'base parameter {path} changed')
      continue
    for index in (0, 1):  # LoRA parameters are stacked on a leading adapter axis
      moved[index] |= not np.array_equal(after[path][1][index], value[index])
  expected = {
    'recommender_only': (True, False),
    'user_only': (False, True),
    'user_excluded': (True, False),
    'both': (True, True),
  }[case]
  assert (moved[0], moved[1]) == expected


def test_other_agents_tokens_and_padding_do_not_change_an_agents_loss_or_gradient(shared_model):
  batch = model_batch()
  (_, metrics), grads = loss_and_lora_grads(shared_model, as_jax(batch), lambda_sd=LAMBDA)
  changed = {key: np.array(value) for key, value in batch.items()}
  user_rows = changed['agent'] == 1
  # The user's rows get other prompts (student and teacher) and other completions, and the recommender's rows
  # other tokens in their padding slots (prompt padding and past the completion mask).
  changed['prompt_tokens'][user_rows] = np.where(
    changed['prompt_mask'][user_rows] != 0, 17, changed['prompt_tokens'][user_rows]
  )
  changed['teacher_prompt_tokens'][user_rows] = np.where(
    changed['teacher_prompt_mask'][user_rows] != 0, 18, changed['teacher_prompt_tokens'][user_rows]
  )
  changed['completion_tokens'][user_rows] = np.where(changed['completion_mask'][user_rows] != 0, 19, 0)
  rec_rows = ~user_rows
  changed['completion_tokens'][rec_rows] = np.where(
    changed['completion_mask'][rec_rows] != 0, changed['completion_tokens'][rec_rows], 44
  )
  changed['prompt_tokens'][rec_rows] = np.where(
    changed['prompt_mask'][rec_rows] != 0, changed['prompt_tokens'][rec_rows], 45
  )
  (_, metrics2), grads2 = loss_and_lora_grads(shared_model, as_jax(changed), lambda_sd=LAMBDA)
  np.testing.assert_allclose(metrics2['loss_recommender'], metrics['loss_recommender'], atol=1e-6)
  assert abs(float(metrics2['loss_user'] - metrics['loss_user'])) > 1e-4
  # The recommender adapter's gradient (index 0) comes from the recommender's rows alone.
  for g, g2 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2)):
    np.testing.assert_allclose(np.asarray(g2)[0], np.asarray(g)[0], atol=1e-6)
