"""The jitted update step: one optax AdamW update of both adapters from all microbatches of a rollout (packed
dialogues or one row per turn), with explicit shardings and donated state; see `training.rl` for the design."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from coars_jax.agents.episodes import AGENTS
from coars_jax.coars.loss import coars_objective
from coars_jax.models.lora import ADAPTERS_OFF
from coars_jax.parallel.rules import Rules
from coars_jax.parallel.sharding import Partitioning, activation_scope, sharded_jit
from coars_jax.sampling import SamplingParams
from coars_jax.sampling.constraints import ChoiceConstraint
from coars_jax.sampling import packed as packed_lib
from coars_jax.sampling.compilation import count_trace, trace_counts
from coars_jax.sampling.scoring import completion_log_probs
from coars_jax.training.optim import clipped_adamw
from coars_jax.training.rl_config import RLConfig


# The name `count_trace` counts the update step's traces under (`sampling.trace_counts()`).
STEP_TRACE_NAME = 'training.rl.update'


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepSettings:
  """What the compiled update step is specialised on (hashable: it keys the step cache).

  The optimizer is rebuilt from `max_grad_norm` and `weight_decay` (the step size is an argument), so two
  trainers with the same settings share one compiled program.
  """

  lambda_sd: float
  advantage_clip: float
  kl_coef: float
  score_params: SamplingParams
  chunk_size: int | None
  pad_token_id: int
  max_grad_norm: float
  weight_decay: float
  ppo_epsilon: float | None = None
  constrained: bool = False
  teacher_cache: bool = False
  remat: bool = False
  packed: bool = False

  @classmethod
  def from_config(cls, config: RLConfig, pad_token_id: int) -> 'StepSettings':
    return cls(
      lambda_sd=float(config.lambda_sd),
      advantage_clip=float(config.advantage_clip),
      kl_coef=float(config.kl_coef),
      score_params=config.score_params,
      chunk_size=config.score_chunk_size,
      pad_token_id=int(pad_token_id),
      max_grad_norm=float(config.max_grad_norm),
      weight_decay=float(config.weight_decay),
      ppo_epsilon=float(config.ppo_epsilon) or None,
      constrained=bool(config.constrained),
      teacher_cache=bool(config.teacher_reuses_student_cache and config.lambda_sd != 0),
      remat=bool(config.remat),
      packed=bool(config.packed_update),
    )

  def make_optimizer(self) -> optax.GradientTransformation:
    """`optim.clipped_adamw` without its step size: the step scales the update by -learning_rate."""
    return clipped_adamw(max_grad_norm=self.max_grad_norm, weight_decay=self.weight_decay)

  @property
  def teacher(self) -> bool:
    return self.lambda_sd != 0


# The step's metric holding A per reply token [K, J, N] (with a teacher): the loss's own token credit, read by
# `training.credit_sample`; every other metric is a scalar.
TOKEN_CREDIT = 'token_credit'

# Batch keys of the update step; every array is [K, R, ...].
BATCH_KEYS = (
  'prompt_tokens',
  'prompt_mask',
  'completion_tokens',
  'completion_mask',
  'adapter',
  'agent',
  'reward',
  'included',
)
TEACHER_KEYS = ('teacher_prompt_tokens', 'teacher_prompt_mask')
# The teacher prompt as x[:shared] + suffix, read against the student's cache (`sampling.shared_prefix_log_probs`).
TEACHER_CACHE_KEYS = ('teacher_suffix_tokens', 'teacher_suffix_mask', 'teacher_shared_length')
PPO_KEYS = ('behaviour_log_probs',)  # pi_old of the ratio clip, when it is on
# The packed update (`training.update_batch`): rows of dialogues [K, R, L], reply segments [K, J, ...].
PACKED_BATCH_KEYS = packed_lib.DIALOGUE_KEYS + ('row_adapter', 'adapter', 'agent', 'reward', 'included')
PACKED_TEACHER_KEYS = packed_lib.TEACHER_KEYS
# Each segment's output grammar (`sampling.constraints.ChoiceConstraint`), when rollouts are constrained: the
# per-row fields, then the vocabulary-wide ones, which are repeated on every row so that all keys are [K, R, ...].
CONSTRAINT_ROW_FIELDS = (
  'head',
  'head_lengths',
  'choices',
  'choice_lengths',
  'line_budget',
  'final_free',
  'final_budget',
)
CONSTRAINT_SHARED_FIELDS = ('free_ok', 'line_end', 'end_token_id')
CONSTRAINT_KEYS = tuple(f'constraint_{name}' for name in CONSTRAINT_ROW_FIELDS + CONSTRAINT_SHARED_FIELDS)


def microbatch_constraint(micro: Mapping[str, jax.Array]) -> ChoiceConstraint:
  """The `ChoiceConstraint` of one microbatch's rows from its `CONSTRAINT_KEYS` arrays ([R, ...])."""
  fields = {name: micro[f'constraint_{name}'] for name in CONSTRAINT_ROW_FIELDS}
  fields.update({name: micro[f'constraint_{name}'][0] for name in CONSTRAINT_SHARED_FIELDS})
  return ChoiceConstraint(**fields)


# Metrics summed over microbatches in the step, then turned into means on the host.
_SUMMED = (
  'loss',
  'loss_recommender',
  'loss_user',
  'segments_recommender',
  'segments_user',
  'tokens',
  'tokens_recommender',
  'tokens_user',
  'advantage_sum',
  'advantage_square_sum',
  'advantage_abs_recommender',
  'advantage_abs_user',
  'kl_sum',
  'microbatches',
)


def _microbatch_sums(metrics: Mapping[str, jax.Array], micro: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Per-microbatch means of `coars_loss` turned into sums, so that microbatches add up exactly."""
  mask = micro['completion_mask'] != 0
  active = micro['included'] & mask.any(axis=1)
  token_rows = mask & active[:, None]
  tokens = token_rows.sum().astype(jnp.float32)
  sums = {
    'loss': metrics['loss'],
    'tokens': tokens,
    'microbatches': jnp.ones((), jnp.float32),
    'advantage_sum': metrics['advantage_mean'] * tokens,
    'advantage_square_sum': (jnp.square(metrics['advantage_std']) + jnp.square(metrics['advantage_mean'])) * tokens,
    'kl_sum': metrics.get('kl', jnp.zeros((), jnp.float32)) * active.sum(),
  }
  for index, name in enumerate(AGENTS):
    agent_tokens = (token_rows & (micro['agent'] == index)[:, None]).sum().astype(jnp.float32)
    sums[f'loss_{name}'] = metrics[f'loss_{name}']
    sums[f'segments_{name}'] = metrics[f'segments_{name}']
    sums[f'tokens_{name}'] = agent_tokens
    sums[f'advantage_abs_{name}'] = metrics[f'advantage_abs_mean_{name}'] * agent_tokens
  return {name: sums[name].astype(jnp.float32) for name in _SUMMED}


def _update_body(
  lora: nnx.State,
  frozen: nnx.State,
  opt_state: optax.OptState,
  batch: dict[str, jax.Array],
  num_episodes: jax.Array,
  adapter_update_mask: jax.Array,
  learning_rate: jax.Array,
  *,
  graphdef: nnx.GraphDef,
  settings: StepSettings,
) -> tuple[nnx.State, optax.OptState, dict[str, jax.Array]]:
  """One optimizer update from all microbatches of a rollout; see the module docstring."""
  count_trace(STEP_TRACE_NAME)
  first = 'dialogue_tokens' if settings.packed else 'prompt_tokens'
  chex.assert_rank([batch[first], batch['completion_tokens'], batch['completion_mask']], 3)
  chex.assert_rank([batch['reward'], batch['included'], batch['agent'], batch['adapter']], 2)
  chex.assert_equal_shape_prefix([batch['completion_tokens'], batch['reward']], 2)
  chex.assert_equal_shape_prefix([batch[first], batch['completion_tokens']], 1)
  chex.assert_rank(adapter_update_mask, 1)
  chex.assert_rank([num_episodes, learning_rate], 0)
  tx = settings.make_optimizer()
  scoring = dict(params=settings.score_params, chunk_size=settings.chunk_size)

  def objective(params, micro, grammar):
    return coars_objective(
      nnx.merge(graphdef, params, frozen),
      micro,
      lambda_sd=settings.lambda_sd,
      advantage_clip=settings.advantage_clip,
      kl_coef=settings.kl_coef,
      ppo_epsilon=settings.ppo_epsilon,
      pad_token_id=settings.pad_token_id,
      **grammar,
      **scoring,
      **({'remat': True} if settings.remat else {}),
    )

  def microbatch(micro):
    micro = dict(micro, num_episodes=num_episodes)
    model = nnx.merge(graphdef, lora, frozen)
    # Constrained rollouts: every log-prob is taken under the segment's own grammar, as the sampler drew it.
    grammar = {'constraint': microbatch_constraint(micro)} if settings.constrained else {}
    if settings.teacher and not settings.teacher_cache and not settings.packed:
      # pi_T: the same adapter and the current parameters on x + d; a forward pass only (no gradient). With
      # teacher_cache the objective scores it instead, on d + y against the student pass's keys and values.
      micro['teacher_log_probs'] = jax.lax.stop_gradient(
        completion_log_probs(
          model,
          micro['teacher_prompt_tokens'],
          micro['teacher_prompt_mask'],
          micro['completion_tokens'],
          micro['completion_mask'],
          adapter=micro['adapter'],
          **grammar,
          **scoring,
        )
      )
    if settings.kl_coef > 0 and settings.packed:
      base, _ = packed_lib.packed_log_probs(
        model, micro, teacher=False, adapter=jnp.full_like(micro['row_adapter'], ADAPTERS_OFF), **grammar, **scoring
      )
      micro['base_log_probs'] = jax.lax.stop_gradient(base)
    elif settings.kl_coef > 0:
      micro['base_log_probs'] = jax.lax.stop_gradient(
        completion_log_probs(
          model,
          micro['prompt_tokens'],
          micro['prompt_mask'],
          micro['completion_tokens'],
          micro['completion_mask'],
          adapter=jnp.full_like(micro['adapter'], ADAPTERS_OFF),
          **grammar,
          **scoring,
        )
      )
    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(lora, micro, grammar)
    # A per reply token as the loss weighed it (the credit people read), only when a teacher scores it.
    credit = metrics['token_advantages'] if settings.teacher else None
    return grads, _microbatch_sums(dict(metrics, loss=loss), micro), credit

  def accumulate(carry, micro):
    grads_total, sums_total = carry
    shapes = jax.eval_shape(microbatch, micro)
    grads, sums, credit = jax.lax.cond(
      (micro['completion_mask'] != 0).any() & micro['included'].any(),
      microbatch,
      lambda _: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
      micro,
    )
    return (jax.tree.map(jnp.add, grads_total, grads), jax.tree.map(jnp.add, sums_total, sums)), credit

  zero_grads = jax.tree.map(jnp.zeros_like, lora)
  zero_sums = {name: jnp.zeros((), jnp.float32) for name in _SUMMED}
  (grads, sums), credit = jax.lax.scan(accumulate, (zero_grads, zero_sums), batch)

  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(sums['loss']) & jnp.isfinite(grad_norm)
  updates, new_opt_state = tx.update(grads, opt_state, lora)
  # Adapters are stacked on a leading axis; a frozen agent's slice gets no update at all (AdamW's weight decay
  # included), so train_user_agent=False leaves the user adapter bit-identical.
  updates = jax.tree.map(
    lambda u: -learning_rate * u * adapter_update_mask.astype(u.dtype).reshape((-1,) + (1,) * (u.ndim - 1)), updates
  )
  new_lora = optax.apply_updates(lora, updates)
  keep_if_bad = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
  metrics = dict(sums, grad_norm=grad_norm, finite=finite)
  if credit is not None:
    metrics[TOKEN_CREDIT] = credit  # [K, J, N], under the parameters before this update
  return keep_if_bad(new_lora, lora), keep_if_bad(new_opt_state, opt_state), metrics


@functools.lru_cache(maxsize=16)
def build_update_step(
  graphdef: nnx.GraphDef, settings: StepSettings, mesh: Mesh, teacher_keys: bool, rules: Rules | None = None
) -> 'UpdateStep':
  """The jitted update step `(lora, frozen, opt_state, batch, num_episodes, adapter_update_mask, learning_rate)
  -> (lora, opt_state, metrics)`, with explicit shardings on `mesh` by `rules` (default `parallel.DEFAULT_RULES`)
  and the adapters and optimizer state donated. Cached on its static inputs, so trainers with equal settings
  share it."""
  partitioning = Partitioning.create(mesh, rules)
  body = functools.partial(_update_body, graphdef=graphdef, settings=settings)

  def scoped_body(lora, frozen, opt_state, batch, *scalars):
    config = nnx.merge(graphdef, lora, frozen).config  # trace time only
    rows = batch['dialogue_tokens' if settings.packed else 'prompt_tokens'].shape[1]
    with activation_scope(partitioning, config, rows):
      return body(lora, frozen, opt_state, batch, *scalars)

  if settings.packed:
    keys, teacher = PACKED_BATCH_KEYS, PACKED_TEACHER_KEYS if teacher_keys else ()
  else:
    keys = BATCH_KEYS
    teacher = (TEACHER_CACHE_KEYS if settings.teacher_cache else TEACHER_KEYS) if teacher_keys else ()
  return UpdateStep(
    scoped_body,
    partitioning,
    keys + teacher + (PPO_KEYS if settings.ppo_epsilon else ()) + (CONSTRAINT_KEYS if settings.constrained else ()),
  )


class UpdateStep:
  """A callable update step: the shardings of the arguments are derived on each call from their logical names
  (adapters and base weights by the rules, the Adam moments like the adapters they track, batch rows [K, R, ...]
  by the batch rule on R, scalars replicated), and the step jitted with them is memoised (`parallel.sharded_jit`),
  so equal shapes reuse one compiled program."""

  def __init__(self, body, partitioning: Partitioning, batch_keys: tuple[str, ...]):
    self.body, self.partitioning, self.batch_keys = body, partitioning, batch_keys

  def shardings(
    self, lora: nnx.State, frozen: nnx.State, opt_state: optax.OptState, batch: Mapping[str, Any]
  ) -> tuple[tuple, tuple]:
    """(in_shardings, out_shardings) of the step for these arguments."""
    placing = self.partitioning
    whole = placing.replicated()
    lora_shardings, opt_shardings = placing.state(lora), placing.optimizer(opt_state, lora)
    rows = {key: placing.batch(np.shape(batch[key]), row_axis=1) for key in self.batch_keys}
    return (
      (lora_shardings, placing.state(frozen), opt_shardings, rows, whole, whole, whole),
      (lora_shardings, opt_shardings, whole),
    )

  def jitted(self, lora, frozen, opt_state, batch):
    in_shardings, out_shardings = self.shardings(lora, frozen, opt_state, batch)
    return sharded_jit(self.body, in_shardings, out_shardings, donate_argnums=(0, 2))

  def __call__(self, lora, frozen, opt_state, batch, num_episodes, adapter_update_mask, learning_rate):
    return self.jitted(lora, frozen, opt_state, batch)(
      lora, frozen, opt_state, batch, num_episodes, adapter_update_mask, learning_rate
    )

  def lower(self, lora, frozen, opt_state, batch, num_episodes, adapter_update_mask, learning_rate):
    """`jax.stages.Lowered` of the step for these arguments (for memory and cost analysis)."""
    return self.jitted(lora, frozen, opt_state, batch).lower(
      lora, frozen, opt_state, batch, num_episodes, adapter_update_mask, learning_rate
    )


def step_traces() -> int:
  """How many times the update step has been traced (compiled) in this process."""
  return trace_counts().get(STEP_TRACE_NAME, 0)
