"""The CoARS objective (METHOD.md section 5, Eq. 11 and Eq. 12) for both agents from one batch:

  L_agent = -(1/E) sum_{segments s of agent} (1/|y_s|) sum_n w_{s,n} log pi_S(y_{s,n} | x_s, y_{s,<n}),
  w_{s,n} = stop_gradient(R_s + lambda_SD A_{s,n}),          L = L_rec + L_user,

REINFORCE with token-level reward shaping; rows carry their own agent's adapter id, so each adapter's gradient
comes from its own segments only. `coars_loss` is the pure function of per-token arrays; `coars_objective` runs
the scoring pass on a model and calls it, the function a jitted update step differentiates. The off-by-default
options of section 5 are keyword arguments: a group mean baseline, PPO-style ratio clipping and a k3 KL penalty
towards the base model.
"""

from __future__ import annotations

from typing import Any, Mapping

import chex
import jax
import jax.numpy as jnp

from coars_jax.agents.protocol import AGENTS
from coars_jax.coars.rewards import group_centred
from coars_jax.coars.credit import teacher_student_log_probs, token_advantages
from coars_jax.models.decoder import Decoder
from coars_jax.sampling.distributions import SamplingParams
from coars_jax.sampling.packed import packed_log_probs
from coars_jax.sampling.scoring import MODEL_DISTRIBUTION, completion_log_probs, shared_prefix_log_probs

# |log ratio| bound before exp() in the PPO ratio and the k3 estimator: a token whose behaviour or base
# log-prob is -inf (outside a sampler's top-k) would otherwise give inf * 0 = NaN in the loss and its gradient.
MAX_LOG_RATIO = 20.0


def coars_loss(
  student_log_probs: jax.Array,
  advantages: jax.Array,
  rewards: jax.Array,
  included: jax.Array,
  completion_mask: jax.Array,
  agent: jax.Array,
  *,
  num_episodes: int | jax.Array,
  lambda_sd: float = 0.1,
  group: jax.Array | None = None,
  behaviour_log_probs: jax.Array | None = None,
  ppo_epsilon: float | None = None,
  base_log_probs: jax.Array | None = None,
  kl_coef: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Eq. 11 + Eq. 12 as a loss to minimise, with its metrics.

  A segment (row) whose turn is excluded (`included` False, the reward rule) or whose completion mask is empty
  (filler rows of a fixed-shape batch) contributes exactly 0, options included.

  Args:
    student_log_probs: float[S, N], log pi_S(y_{t,n} | x_t, y_{t,<n}) under each row's own adapter; the only
      input the loss is differentiated through.
    advantages: float[S, N], A_{t,n} (Eq. 10, `token_advantages`); 0 off the mask. Held constant.
    rewards: float[S], R_t of each row's own agent (`rewards.segment_rewards`). Held constant.
    included: bool[S], False on segments the reward rule excludes.
    completion_mask: bool/int[S, N], the tokens the row's agent generated; |y_t| is its row sum.
    agent: int[S], 0 recommender, 1 user.
    num_episodes: E, the number of episodes (u) the expectation E_u averages over. When a rollout is split into
      several minibatches whose gradients are summed, pass the rollout's E to every one of them.
    lambda_sd: lambda_SD of Eq. 11-12 (0.1 in the paper; 0 is the "without self-distillation" ablation).
    group: int[S] or None. When given, the group mean baseline is on: R_t of each segment is replaced by
      R_t - mean(R) over the included segments of the same agent in the same group (the G rollouts of one
      window share a group id), all turns pooled. Off (None) by default, as in the paper.
    behaviour_log_probs: float[S, N], log pi_old of the sampled tokens under the model's own distribution
      (score the rollout with `sampling.score` before the update; the sampler's own log-probs are under its
      temperature / top-k distribution and would bias the ratio). Required by `ppo_epsilon`.
    ppo_epsilon: None (default) for plain REINFORCE; else eps of PPO-style clipping: the token term w log pi_S
      becomes min(rho w, clip(rho, 1 - eps, 1 + eps) w) with rho = pi_S / pi_old. At rho = 1 its gradient equals
      the REINFORCE one; it only matters for several epochs over one rollout.
    base_log_probs: float[S, N], log pi_base of the sampled tokens from a pass with the adapters off (adapter
      id -1, `models.ADAPTERS_OFF`). Required when kl_coef > 0. Held constant.
    kl_coef: beta of the KL penalty (0 = off, the default). The penalty adds beta (1/|y_t|) sum_n k3_{t,n} per
      segment, with k3 = exp(l) - l - 1, l = log pi_base - log pi_S (Schulman's k3 estimator): non-negative per
      token, unbiased for KL(pi_S || pi_base) on tokens sampled from pi_S, and low-variance. As a loss term its
      expected gradient on such samples is that of the forward KL(pi_base || pi_S), as in GRPO.
  Returns:
    (loss, metrics): the scalar L_rec + L_user, and float32 scalars: loss, loss_<agent>, reward_<agent> (mean
    raw R over the agent's included segments), advantage_mean / advantage_std / advantage_abs_mean (over the
    masked tokens of included segments) and advantage_abs_mean_<agent>, segments_<agent> (included count),
    excluded_share (excluded segments among those with tokens), and, when on, kl, ppo_clip_fraction and
    ratio_mean.
  """
  chex.assert_rank([student_log_probs, advantages, completion_mask], 2)
  chex.assert_equal_shape([student_log_probs, advantages, completion_mask])
  chex.assert_rank([rewards, included, agent], 1)
  chex.assert_equal_shape([rewards, included, agent])
  chex.assert_equal_shape_prefix([student_log_probs, rewards], 1)
  if isinstance(num_episodes, int) and num_episodes <= 0:
    raise ValueError(f'coars_loss: num_episodes must be positive, found {num_episodes}')
  if ppo_epsilon is not None:
    if not ppo_epsilon > 0:
      raise ValueError(f'coars_loss: ppo_epsilon must be positive or None, found {ppo_epsilon!r}')
    if behaviour_log_probs is None:
      raise ValueError('coars_loss: ppo_epsilon needs behaviour_log_probs (log pi_old of the sampled tokens)')
    chex.assert_equal_shape([behaviour_log_probs, student_log_probs])
  if kl_coef < 0:
    raise ValueError(f'coars_loss: kl_coef must be >= 0, found {kl_coef!r}')
  if kl_coef > 0:
    if base_log_probs is None:
      raise ValueError('coars_loss: kl_coef > 0 needs base_log_probs (a scoring pass with adapter id -1)')
    chex.assert_equal_shape([base_log_probs, student_log_probs])

  mask = jnp.asarray(completion_mask) != 0
  agent = jnp.asarray(agent)
  student = student_log_probs.astype(jnp.float32)
  lengths = mask.sum(axis=1).astype(jnp.float32)
  active = jnp.asarray(included).astype(bool) & (lengths > 0)
  raw_rewards = jax.lax.stop_gradient(jnp.asarray(rewards, jnp.float32))
  shaped_rewards = raw_rewards if group is None else group_centred(raw_rewards, active, agent, group)
  advantages = jnp.where(mask, jax.lax.stop_gradient(advantages.astype(jnp.float32)), 0.0)
  weights = jax.lax.stop_gradient(shaped_rewards[:, None] + lambda_sd * advantages)
  token_rows = mask & active[:, None]  # the tokens that carry loss

  metrics: dict[str, jax.Array] = {}
  if ppo_epsilon is None:
    token_objective = weights * student
  else:
    log_ratio = jnp.clip(
      student - jax.lax.stop_gradient(behaviour_log_probs.astype(jnp.float32)), -MAX_LOG_RATIO, MAX_LOG_RATIO
    )
    ratio = jnp.exp(jnp.where(mask, log_ratio, 0.0))
    clipped = jnp.clip(ratio, 1.0 - ppo_epsilon, 1.0 + ppo_epsilon)
    token_objective = jnp.minimum(ratio * weights, clipped * weights)
    metrics['ppo_clip_fraction'] = _masked_mean(jnp.abs(ratio - 1.0) > ppo_epsilon, token_rows)
    metrics['ratio_mean'] = _masked_mean(ratio, token_rows)
  per_token = 1.0 / jnp.maximum(lengths, 1.0)
  segment_loss = -jnp.where(mask, token_objective, 0.0).sum(axis=1) * per_token
  if kl_coef > 0:
    gap = jnp.clip(jax.lax.stop_gradient(base_log_probs.astype(jnp.float32)) - student, -MAX_LOG_RATIO, MAX_LOG_RATIO)
    gap = jnp.where(mask, gap, 0.0)
    k3 = jnp.exp(gap) - gap - 1.0
    segment_kl = jnp.where(mask, k3, 0.0).sum(axis=1) * per_token
    segment_loss = segment_loss + kl_coef * segment_kl
    metrics['kl'] = _masked_mean(segment_kl, active)
  segment_loss = jnp.where(active, segment_loss, 0.0)

  episodes = jnp.asarray(num_episodes, jnp.float32)
  total = jnp.zeros((), jnp.float32)
  for index, name in enumerate(AGENTS):
    mine = agent == index
    agent_loss = jnp.where(mine, segment_loss, 0.0).sum() / episodes
    total = total + agent_loss
    metrics[f'loss_{name}'] = agent_loss
    metrics[f'reward_{name}'] = _masked_mean(raw_rewards, active & mine)
    metrics[f'advantage_abs_mean_{name}'] = _masked_mean(jnp.abs(advantages), token_rows & mine[:, None])
    metrics[f'segments_{name}'] = (active & mine).sum().astype(jnp.float32)
  advantage_mean = _masked_mean(advantages, token_rows)
  metrics['advantage_mean'] = advantage_mean
  metrics['advantage_std'] = jnp.sqrt(_masked_mean(jnp.square(advantages - advantage_mean), token_rows))
  metrics['advantage_abs_mean'] = _masked_mean(jnp.abs(advantages), token_rows)
  real = lengths > 0
  metrics['excluded_share'] = _masked_mean(~jnp.asarray(included).astype(bool), real)
  metrics['loss'] = total
  return total, metrics


def _masked_mean(values: jax.Array, where: jax.Array) -> jax.Array:
  """Mean of `values` over `where` (0 when empty), float32."""
  where = jnp.broadcast_to(where, values.shape)
  return jnp.where(where, values.astype(jnp.float32), 0.0).sum() / jnp.maximum(where.sum().astype(jnp.float32), 1.0)


def coars_objective(
  model: Decoder,
  batch: Mapping[str, jax.Array],
  *,
  lambda_sd: float = 0.1,
  advantage_clip: float = 1.0,
  ppo_epsilon: float | None = None,
  kl_coef: float = 0.0,
  params: SamplingParams = MODEL_DISTRIBUTION,
  chunk_size: int | None = None,
  pad_token_id: int = 0,
  **model_call_kwargs: Any,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The loss of one batch of segments on `model`: scoring, token advantages (Eq. 10) and `coars_loss`.

  Differentiate it with `nnx.value_and_grad(..., argnums=nnx.DiffState(0, nnx.LoRAParam), has_aux=True)` so only
  the adapters are trained; each row runs under its own agent's adapter (`batch['adapter']`).

  The teacher comes from one of three places:
    - `batch['teacher_suffix_tokens' / 'teacher_suffix_mask' / 'teacher_shared_length']` (the default of the RL
      trainer): the teacher prompt is x[:shared] + suffix, and the teacher reads x[:shared] from the student
      pass's keys and values (`sampling.shared_prefix_log_probs`), scoring only the suffix and y;
    - `batch['teacher_log_probs']` if present (scored beforehand, e.g. by `sampling.score` on x + d): the model
      then runs the student rows only;
    - else, when lambda_sd != 0, the teacher prompts `batch['teacher_prompt_tokens' / 'teacher_prompt_mask']`,
      scored with the student in one pass (`credit.teacher_student_log_probs`), under stop-gradient.
  With lambda_sd = 0 and no precomputed teacher, no teacher is scored and A = 0.

  Args:
    model: the decoder with the agents' adapters.
    batch: 'prompt_tokens', 'prompt_mask' [S, P] (x, left-padded); 'completion_tokens', 'completion_mask' [S, N]
      (y, right-padded); 'adapter' int32[S] (each row's agent's adapter index); 'agent' int32[S]; 'reward'
      float32[S] and 'included' bool[S] (`rewards.segment_rewards`); 'num_episodes' (E, a scalar); and as the
      options need them: 'teacher_log_probs' or 'teacher_prompt_tokens' + 'teacher_prompt_mask',
      'behaviour_log_probs' (ppo_epsilon), 'base_log_probs' (kl_coef > 0), 'group' (the group mean baseline is
      on exactly when the batch has it).
    lambda_sd, ppo_epsilon, kl_coef: as in `coars_loss`.
    advantage_clip: the clip bound of Eq. 10.
    params, chunk_size, pad_token_id, model_call_kwargs: passed to the scoring call.
  Returns:
    (loss, metrics) of `coars_loss`, and metrics['token_advantages'] float[S, N]: A (Eq. 10, clipped; 0 off the
    mask and where no teacher is scored).
  """
  completion_tokens, completion_mask = batch['completion_tokens'], batch['completion_mask']
  if 'dialogue_tokens' in batch:
    # Packed dialogues (`training.update_batch`): one student forward per row of dialogues, the teacher segments
    # reading the student's keys and values; the adapter is chosen per row (one agent per row).
    kwargs = dict(model_call_kwargs, adapter=batch['row_adapter'])
    student, teacher = packed_log_probs(
      model, batch, teacher=lambda_sd != 0, params=params, chunk_size=chunk_size, **kwargs
    )
    teacher = student if teacher is None else teacher
  elif 'teacher_suffix_tokens' in batch and lambda_sd != 0:
    student, teacher = shared_prefix_log_probs(
      model,
      batch['prompt_tokens'],
      batch['prompt_mask'],
      completion_tokens,
      completion_mask,
      batch['teacher_suffix_tokens'],
      batch['teacher_suffix_mask'],
      batch['teacher_shared_length'],
      params=params,
      chunk_size=chunk_size,
      adapter=batch['adapter'],
      **model_call_kwargs,
    )
  elif 'teacher_log_probs' in batch:
    student = completion_log_probs(
      model,
      batch['prompt_tokens'],
      batch['prompt_mask'],
      completion_tokens,
      completion_mask,
      params=params,
      chunk_size=chunk_size,
      adapter=batch['adapter'],
      **model_call_kwargs,
    )
    teacher = batch['teacher_log_probs']
  elif lambda_sd != 0:
    missing = [key for key in ('teacher_prompt_tokens', 'teacher_prompt_mask') if key not in batch]
    if missing:
      raise ValueError(
        f'coars_objective: lambda_sd = {lambda_sd} needs the teacher: the batch has no '
        f"'teacher_log_probs' and lacks {missing}"
      )
    student, teacher = teacher_student_log_probs(
      model,
      batch['prompt_tokens'],
      batch['prompt_mask'],
      batch['teacher_prompt_tokens'],
      batch['teacher_prompt_mask'],
      completion_tokens,
      completion_mask,
      adapter=batch['adapter'],
      pad_token_id=pad_token_id,
      params=params,
      chunk_size=chunk_size,
      **model_call_kwargs,
    )
  else:
    student = completion_log_probs(
      model,
      batch['prompt_tokens'],
      batch['prompt_mask'],
      completion_tokens,
      completion_mask,
      params=params,
      chunk_size=chunk_size,
      adapter=batch['adapter'],
      **model_call_kwargs,
    )
    teacher = student
  advantages = token_advantages(teacher, student, completion_mask, clip=advantage_clip)
  loss, metrics = coars_loss(
    student,
    advantages,
    batch['reward'],
    batch['included'],
    completion_mask,
    batch['agent'],
    num_episodes=batch['num_episodes'],
    lambda_sd=lambda_sd,
    group=batch.get('group'),
    behaviour_log_probs=batch.get('behaviour_log_probs'),
    ppo_epsilon=ppo_epsilon,
    base_log_probs=batch.get('base_log_probs'),
    kl_coef=kl_coef,
  )
  # A per token, as the loss weighed it: the token credit people read (`training.credit_sample`) comes from here,
  # so no token is scored a second time for it.
  metrics['token_advantages'] = jax.lax.stop_gradient(advantages)
  return loss, metrics
