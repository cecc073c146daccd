"""The co-evolving RL trainer (METHOD.md sections 3-5): one iteration plays a batch of sampled dialogues on
TRAINING windows with both agents' adapters, scores each agent message (segment) with the configured reward
(interaction Eq. 7-8, outcome, or a frozen-base judge), builds each segment's hindsight teacher prompt x + d with
the same chat template, and updates both adapters with Eq. 11-12 in ONE jitted step.

Design. The host (Python) plays turns, renders text and packs arrays; everything numeric is jitted. The update
step takes the segments as [K, R, ...] microbatches (R = `rows_per_microbatch` rows, K fixed by the largest number
of segments a rollout can have), scans over them with a `lax.cond` that skips all-padding microbatches, scores the
teacher (stop-gradient, current parameters) and the student of each microbatch, sums the gradients (each
microbatch's loss is already divided by the rollout's episode count E, so the sum is the rollout's gradient), and
applies one optax AdamW update (warm-up + cosine schedule, global-norm clip) to the LoRA parameters only. The step
is compiled with explicit `in_shardings` / `out_shardings` on a mesh by logical-axis rules (`parallel.Partitioning`:
rows over data and fsdp; base weights, adapters and their Adam moments by their logical names; on a data-only mesh
that is rows over 'data' and everything else replicated) and donates the adapters and the optimizer state. Shapes
depend only on (K, R) and the length buckets, so a run compiles at most one step per bucket triple (student prompt,
teacher prompt, completion); a non-finite loss or gradient norm keeps the old adapters and optimizer state inside
the step, and the host counts such skips.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from coars_jax.agents.episodes import (
  AGENTS,
  RECOMMENDER,
  USER,
  LLMBackend,
  RolloutConfig,
  run_episodes,
)
from coars_jax.agents.record import RolloutRecord
from coars_jax.agents.trajectory import Trajectory
from coars_jax.data.schema import Dataset
from coars_jax.models import tokenizer as tokenizer_lib
from coars_jax.models.decoder import Decoder
from coars_jax.parallel.mesh import DATA_AXIS, make_mesh
from coars_jax.parallel.rules import Rules
from coars_jax.parallel.sharding import Partitioning
from coars_jax.training.credit_sample import credit_sample
from coars_jax.training.loss_rows import pack_loss_rows
from coars_jax.training.rl_metrics import add_update_metrics, iteration_metrics, nonfinite_names
from coars_jax.sampling.model_inputs import inference_view

from coars_jax.training.actor import (
  judge_messages,
  judge_probabilities,
  judge_probabilities_of,
  shared_prefix_length,
  student_messages,
  teacher_prompts,
  write_record,
)
from coars_jax.training.rl_config import (
  JUDGE_QUESTION,
  OUTCOME_ASSIGNMENTS,
  TRAIN_SPLIT,
  RLConfig,
  learning_rate_schedule,
)
from coars_jax.training.segment_rewards import REWARDS_TRACE_NAME, rollout_rewards, trajectory_rewards
from coars_jax.training.trainer_state import (
  NonFiniteUpdateError,
  PlayedRollout,
  TrainerState,
  windows_at,
)
from coars_jax.training.update_step import (
  CONSTRAINT_KEYS,
  STEP_TRACE_NAME,
  TEACHER_CACHE_KEYS,
  TEACHER_KEYS,
  TOKEN_CREDIT,
  StepSettings,
  build_update_step,
  microbatch_constraint,
  step_traces,
)

# The trainer's public names, with those of the modules it composes (actor, config, rewards, update step).
__all__ = [
  'CONSTRAINT_KEYS',
  'JUDGE_QUESTION',
  'NonFiniteUpdateError',
  'OUTCOME_ASSIGNMENTS',
  'REWARDS_TRACE_NAME',
  'RLConfig',
  'RLTrainer',
  'STEP_TRACE_NAME',
  'StepSettings',
  'TEACHER_CACHE_KEYS',
  'TEACHER_KEYS',
  'TrainerState',
  'build_update_step',
  'judge_messages',
  'judge_probabilities',
  'learning_rate_schedule',
  'microbatch_constraint',
  'rollout_rewards',
  'shared_prefix_length',
  'step_traces',
  'student_messages',
  'teacher_prompts',
  'windows_at',
]


class RLTrainer:
  """Runs RL iterations on `model`'s 'recommender' and 'user' adapters, in place.

  Args:
    model: a `Decoder` with both agents' LoRA adapters; only `nnx.LoRAParam`s are trained.
    tokenizer: its tokenizer (the chat template renders every prompt, the teacher's and the judge's too).
    dataset: the training windows and titles.
    sasrec: the peer (hint, p_t, q_t) and the ranks in d: a `recsys.CrossFittedPeer` (each training window served
      by a SASRec that never trained on its user, METHOD.md section 2) or one `recsys.SASRec`.
    config: the RL settings.
    rollout: the dialogue protocol.
    mesh: where rollouts, judge scoring and the update step run; default every device (of every process, after
      `parallel.distributed.initialize`) on one 'data' axis. A mesh spanning processes needs every process to
      build the same trainer and call `iteration` together: they play the same rollouts from the same seeds.
    rules: the logical-axis rules placing parameters, optimizer state and batches on `mesh` (default
      `parallel.DEFAULT_RULES`).
  """

  def __init__(
    self,
    model: Decoder,
    tokenizer,
    dataset: Dataset,
    sasrec,
    config: RLConfig,
    *,
    rollout: RolloutConfig = RolloutConfig(),
    mesh: Mesh | None = None,
    rules: Rules | None = None,
  ):
    if not isinstance(config, RLConfig):
      raise TypeError(f'config must be an RLConfig, found {type(config).__name__}')
    missing = [agent for agent in AGENTS if agent not in model.adapter_names]
    if missing:
      raise ValueError(
        f'RLTrainer: the model has adapters {model.adapter_names}; missing {missing}. Attach both '
        f"agents' adapters (training.warm_start.prepare_model) first"
      )
    self.model, self.tokenizer, self.dataset, self.sasrec = model, tokenizer, dataset, sasrec
    self.config, self.rollout = config, rollout
    self.last_batch: dict[str, np.ndarray] | None = None
    self.last_record: RolloutRecord | None = None
    # Episodes of the next update whose messages get their token credit A for people (`training.credit_sample`);
    # 0 = none. A is the update's own (its first epoch, under the parameters that sampled the rollout), read from
    # `last_credit_sample`.
    self.credit_episodes = 0
    self.last_credit_sample: list[dict[str, Any]] | None = None
    self.mesh = make_mesh() if mesh is None else mesh
    self.rules = rules
    self.partitioning = Partitioning.create(self.mesh, rules)
    data_devices = dict(zip(self.mesh.axis_names, self.mesh.devices.shape)).get(DATA_AXIS, 1)
    if config.rows_per_microbatch % data_devices:
      raise ValueError(
        f'RLConfig.rows_per_microbatch ({config.rows_per_microbatch}) must be a multiple of the '
        f"mesh's '{DATA_AXIS}' axis ({data_devices} devices)"
      )
    self.train_windows = dataset.split(TRAIN_SPLIT).pool(config.train_pool)  # what `windows_at` indexes into
    self.num_train_windows = len(self.train_windows)
    self.pad_id = tokenizer_lib.special_token_ids(tokenizer).pad_id
    # Rollouts run on the same mesh and rules as the update step, so they read the arrays placed below in place.
    self.backend = LLMBackend(
      model,
      tokenizer,
      adapters={RECOMMENDER: RECOMMENDER, USER: USER},
      config=config.backend_config(),
      mesh=self.mesh,
      rules=rules,
    )
    self.adapter_of_agent = np.asarray([model.adapter_names.index(agent) for agent in AGENTS], np.int32)
    mask = np.zeros(len(model.adapter_names), np.float32)
    for agent in config.trained_agents:
      mask[model.adapter_names.index(agent)] = 1.0
    self.adapter_update_mask = mask
    self.num_microbatches = config.num_microbatches(rollout.max_turns)
    self.settings = StepSettings.from_config(config, self.pad_id)
    self.schedule = learning_rate_schedule(config)

    placing = self.partitioning
    self.graphdef, lora, frozen = nnx.split(inference_view(model), nnx.LoRAParam, ...)
    # The model is pointed at the placed arrays, so rollouts and the step share them (no second copy of the base).
    self.frozen = placing.put(frozen, placing.state(frozen))
    self.lora = placing.put(lora, placing.state(lora))
    nnx.update(model, self.frozen, self.lora)
    init = self.settings.make_optimizer().init
    # Created in place on its shardings: the Adam moments never exist whole on one device.
    self.opt_state = jax.jit(init, out_shardings=placing.optimizer(jax.eval_shape(init, self.lora), self.lora))(
      self.lora
    )
    self._step = build_update_step(self.graphdef, self.settings, self.mesh, self.settings.teacher, rules)
    self.state = TrainerState(
      iteration=0, next_window=0, rng=np.asarray(jax.random.key_data(jax.random.key(config.seed)), np.uint32)
    )

  # -- checkpoint contents ----------------------------------------------------------------------------------------

  def checkpoint_tree(self) -> dict[str, Any]:
    """The arrays of a checkpoint: adapters (pure dict), optimizer state (its leaves, in tree order) and the RNG."""
    return {
      'adapters': nnx.to_pure_dict(self.lora),
      'optimizer': {str(i): leaf for i, leaf in enumerate(jax.tree.leaves(self.opt_state))},
      'rng': np.asarray(self.state.rng, np.uint32),
    }

  def restore(self, tree: Mapping[str, Any], state: TrainerState) -> None:
    """Puts a checkpoint's arrays and trainer state back (the inverse of `checkpoint_tree` / `TrainerState`)."""
    placing = self.partitioning
    lora = jax.tree.map(lambda x: x, self.lora)
    nnx.replace_by_pure_dict(lora, tree['adapters'])
    self.lora = placing.put(lora, placing.state(lora))
    nnx.update(self.model, self.lora)
    leaves, treedef = jax.tree.flatten(self.opt_state)
    saved = tree['optimizer']
    if len(saved) != len(leaves):
      raise ValueError(
        f'the checkpoint has {len(saved)} optimizer arrays but this optimizer has {len(leaves)}; it '
        f'was written with other optimizer settings'
      )
    opt_state = jax.tree.unflatten(treedef, [jnp.asarray(saved[str(i)]) for i in range(len(leaves))])
    self.opt_state = placing.put(opt_state, placing.optimizer(opt_state, self.lora))
    self.state = dataclasses.replace(state, rng=np.asarray(tree['rng'], np.uint32))

  # -- one iteration ----------------------------------------------------------------------------------------------

  def _next_seed(self) -> int:
    key, sub = jax.random.split(jax.random.wrap_key_data(jnp.asarray(self.state.rng)))
    self.state.rng = np.asarray(jax.random.key_data(key), np.uint32)
    return int(np.asarray(jax.random.key_data(sub))[-1] & 0x7FFFFFFF)

  def _rewards(self, trajectory: Trajectory, judge_probability: np.ndarray | None, groups: np.ndarray):
    """`segment_rewards.trajectory_rewards` under this trainer's config."""
    return trajectory_rewards(
      trajectory, judge_probability, groups, config=self.config, max_turns=self.rollout.max_turns
    )

  def iteration(self) -> dict[str, Any]:
    """One RL iteration (rollout, rewards and teacher prompts, update); returns its metrics (host values).

    Raises `NonFiniteUpdateError` after `max_consecutive_nonfinite` skipped updates in a row.
    """
    return self.learn(self.play())

  def play(self) -> PlayedRollout:
    """The rollout of the next iteration (its windows from the data position, its seed from the trainer's RNG)."""
    config = self.config
    windows = self.train_windows[
      windows_at(self.num_train_windows, config.seed, self.state.next_window, config.windows_per_iteration)
    ]
    seed = self._next_seed()
    episode_windows = np.repeat(windows, config.rollouts_per_window)
    start = time.perf_counter()
    episodes = run_episodes(
      self.dataset,
      TRAIN_SPLIT,
      episode_windows.tolist(),
      self.backend,
      peer=self.sasrec,
      config=self.rollout,
      seed=seed,
    )
    trajectory = Trajectory.from_episodes(episodes, pad_token_id=self.pad_id)
    return PlayedRollout(
      windows=windows, seed=seed, episodes=episodes, trajectory=trajectory, seconds=time.perf_counter() - start
    )

  def learn(self, played: PlayedRollout) -> dict[str, Any]:
    """Rewards, teacher prompts and the update from a rollout (`play`'s, or another trainer's of the same model:
    the benchmarks update two trainers from one rollout); advances the iteration and the data position. The rollout
    goes through its record (`record`, then `learn_record`), the one hand-off from acting to learning."""
    start = time.perf_counter()
    record = self.record(played)
    self.last_record = record
    return self.learn_record(record, record_seconds=time.perf_counter() - start)

  def record(self, played: PlayedRollout) -> RolloutRecord:
    """The rollout record of `played`: its segments, and what the learner must not recompute afterwards (each
    segment's teacher prompt x + d with the peer's ranks, its grammar when constrained, the judge prompts)."""
    return write_record(
      played,
      config=self.config,
      teacher=self.settings.teacher,
      constrained=self.settings.constrained,
      tokenizer=self.tokenizer,
      backend=self.backend,
      peer=self.sasrec,
      dataset=self.dataset,
      rollout=self.rollout,
    )

  def learn_record(self, record: RolloutRecord, *, record_seconds: float = 0.0) -> dict[str, Any]:
    """Rewards and the update from a rollout record alone (no backend, episodes or SASRec are used): a record
    saved with `RolloutRecord.save` and loaded again gives the same update, bit for bit."""
    config, state = self.config, self.state
    number = state.iteration + 1
    windows, seed, trajectory, groups = record.windows, record.seed, record.trajectory, record.groups
    rollout_seconds = record.seconds

    start = time.perf_counter()
    judge = None
    if config.reward == 'judge':
      judge = judge_probabilities_of(
        self.model,
        self.tokenizer,
        record.judge_ids,
        answers=config.judge_answers,
        buckets=config.buckets,
        chunk_size=config.score_chunk_size,
        mesh=self.mesh,
        rules=self.rules,
      )
    reward, weight, included, carries_loss = self._rewards(trajectory, judge, groups)
    rows = np.flatnonzero(carries_loss)
    teacher_ids = None
    if self.settings.teacher and len(rows):
      teacher_ids = [list(record.teacher_ids[row]) for row in rows]
    grammar = None
    if self.settings.constrained and len(rows):
      grammar = {key: np.asarray(value)[rows] for key, value in record.constraints.items()}
    batch, self.last_packing, slots = None, None, None
    if len(rows):
      batch, self.last_packing, slots = pack_loss_rows(
        trajectory,
        rows,
        weight,
        teacher_ids,
        grammar,
        config=config,
        settings=self.settings,
        adapter_of_agent=self.adapter_of_agent,
        num_microbatches=self.num_microbatches,
        data_devices=dict(zip(self.mesh.axis_names, self.mesh.devices.shape)).get(DATA_AXIS, 1),
        max_positions=self.model.config.max_position_embeddings,
      )
    self.last_batch = batch  # the host arrays of this update, for benchmarks and inspection
    scoring_seconds = time.perf_counter() - start + record_seconds

    start = time.perf_counter()
    update: dict[str, Any] = {}
    # The schedule counts rollouts: each of the ppo_epochs updates of one rollout uses the same step size.
    learning_rate = float(self.schedule(self.optimizer_count() // config.ppo_epochs))
    epochs_finite, token_credit = [], None
    for _ in range(config.ppo_epochs if batch is not None else 0):
      lora, opt_state, step_metrics = self._step(
        self.lora,
        self.frozen,
        self.opt_state,
        batch,
        np.float32(config.episodes_per_iteration),
        self.adapter_update_mask,
        np.float32(learning_rate),
      )
      self.lora, self.opt_state = lora, opt_state
      nnx.update(self.model, self.lora)
      # The metrics are the last epoch's; an epoch with a non-finite loss was skipped inside the step. The token
      # credit is the first epoch's: A under the parameters that sampled the rollout.
      step_metrics = dict(step_metrics)
      credit = step_metrics.pop(TOKEN_CREDIT, None)
      if token_credit is None and credit is not None and self.credit_episodes:
        token_credit = np.asarray(jax.device_get(credit))
      update = {name: float(value) for name, value in jax.device_get(step_metrics).items()}
      epochs_finite.append(bool(update['finite']))
    if len(epochs_finite) > 1:
      update['finite'] = float(all(epochs_finite))
    update_seconds = time.perf_counter() - start
    self.last_credit_sample = None
    if self.credit_episodes:
      self.last_credit_sample = credit_sample(
        record, reward, token_credit, slots, tokenizer=self.tokenizer, episodes=self.credit_episodes
      )

    metrics = iteration_metrics(
      number=number,
      seed=seed,
      windows=windows,
      trajectory=trajectory,
      seconds={'rollout': rollout_seconds, 'scoring': scoring_seconds, 'update': update_seconds},
      loss_rows=len(rows),
      learning_rate=learning_rate,
      reward=reward,
      carries_loss=carries_loss,
      included=included,
      interaction=config.reward == 'interaction',
      judge=judge,
      packing=self.last_packing,
    )
    add_update_metrics(metrics, update, batch, update_seconds, kl_coef=config.kl_coef)
    state.next_window += config.windows_per_iteration
    state.iteration = number
    self._check_finite(metrics, update, windows)
    return metrics

  def optimizer_count(self) -> int:
    """Updates applied so far (skipped ones are not counted): the schedule's step."""
    counts = [
      leaf
      for leaf in jax.tree.leaves(self.opt_state)
      if jnp.ndim(leaf) == 0 and jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.integer)
    ]
    return int(counts[0]) if counts else 0

  def _check_finite(self, metrics: dict, update: Mapping[str, float], windows: np.ndarray) -> None:
    if not update or update['finite']:
      self.state.consecutive_nonfinite = 0
      return
    self.state.consecutive_nonfinite += 1
    bad = nonfinite_names(update)
    message = (
      f'RL iteration {metrics["iteration"]}: non-finite {", ".join(bad)}; the update was skipped '
      f'({self.state.consecutive_nonfinite} in a row). Training windows of this batch: {windows.tolist()}'
    )
    metrics['update/nonfinite_metrics'] = bad
    logging.warning(message)
    if self.state.consecutive_nonfinite >= self.config.max_consecutive_nonfinite:
      raise NonFiniteUpdateError(
        f'{message}. Stopping after max_consecutive_nonfinite = '
        f'{self.config.max_consecutive_nonfinite} skipped updates in a row; lower '
        f'rl.learning_rate or rl.max_grad_norm, or inspect these windows'
      )
