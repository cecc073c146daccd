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
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from coars_jax.agents.episodes import (
  AGENTS,
  RECOMMENDER,
  USER,
  Episode,
  LLMBackend,
  RolloutConfig,
  bind_peer,
  run_episodes,
)
from coars_jax.agents.record import RolloutRecord
from coars_jax.agents.trajectory import Trajectory
from coars_jax.coars.reference import candidate_ranks
from coars_jax.data.schema import Dataset
from coars_jax.models import tokenizer as tokenizer_lib
from coars_jax.models.decoder import Decoder
from coars_jax.parallel.mesh import DATA_AXIS, make_mesh
from coars_jax.parallel.rules import Rules
from coars_jax.parallel.sharding import Partitioning
from coars_jax.recsys.crossfit import CrossFittedPeer
from coars_jax.recsys.sasrec import SASRec
from coars_jax.training.update_batch import pack_update_batch
from coars_jax.training.turn_rows import pack_turn_rows
from coars_jax.training.rl_metrics import add_update_metrics, iteration_metrics, nonfinite_names
from coars_jax.sampling.model_inputs import inference_view

from coars_jax.training.actor import (
  judge_messages,
  judge_probabilities,
  judge_probabilities_of,
  judge_prompt_ids,
  segment_constraints,
  shared_prefix_length,
  student_messages,
  teacher_prompts,
)
from coars_jax.training.rl_config import (
  JUDGE_QUESTION,
  JUDGE_SYSTEM,
  OUTCOME_ASSIGNMENTS,
  REWARDS,
  TRAIN_SPLIT,
  RLConfig,
  learning_rate_schedule,
)
from coars_jax.training.segment_rewards import REWARDS_TRACE_NAME, rollout_rewards
from coars_jax.training.update_step import (
  BATCH_KEYS,
  CONSTRAINT_KEYS,
  CONSTRAINT_ROW_FIELDS,
  CONSTRAINT_SHARED_FIELDS,
  PACKED_BATCH_KEYS,
  PACKED_TEACHER_KEYS,
  PPO_KEYS,
  STEP_TRACE_NAME,
  TEACHER_CACHE_KEYS,
  TEACHER_KEYS,
  StepSettings,
  UpdateStep,
  build_update_step,
  microbatch_constraint,
  step_traces,
)

# The trainer's public names, with those of the modules it composes (actor, config, rewards, update step).
__all__ = [
  'BATCH_KEYS',
  'CONSTRAINT_KEYS',
  'CONSTRAINT_ROW_FIELDS',
  'CONSTRAINT_SHARED_FIELDS',
  'JUDGE_QUESTION',
  'JUDGE_SYSTEM',
  'NonFiniteUpdateError',
  'OUTCOME_ASSIGNMENTS',
  'PACKED_BATCH_KEYS',
  'PACKED_TEACHER_KEYS',
  'PPO_KEYS',
  'PlayedRollout',
  'REWARDS',
  'REWARDS_TRACE_NAME',
  'RLConfig',
  'RLTrainer',
  'STEP_TRACE_NAME',
  'StepSettings',
  'TEACHER_CACHE_KEYS',
  'TEACHER_KEYS',
  'TRAIN_SPLIT',
  'TrainerState',
  'UpdateStep',
  'build_update_step',
  'judge_messages',
  'judge_probabilities',
  'judge_probabilities_of',
  'judge_prompt_ids',
  'learning_rate_schedule',
  'microbatch_constraint',
  'rollout_rewards',
  'segment_constraints',
  'shared_prefix_length',
  'step_traces',
  'student_messages',
  'teacher_prompts',
  'window_order',
  'windows_at',
]


def window_order(num_windows: int, seed: int, epoch: int) -> np.ndarray:
  """The permutation of the training windows used in `epoch` (a pure function of the seed and the epoch)."""
  return np.random.default_rng([int(seed), int(epoch), 0x52AB]).permutation(num_windows)


def windows_at(num_windows: int, seed: int, position: int, count: int) -> np.ndarray:
  """`count` window indices of the endless stream epoch 0, epoch 1, ..., starting at global `position`; the stream
  is what a checkpoint's data position points into, so a resumed run draws exactly the same windows."""
  if num_windows < 1:
    raise ValueError('the training split has no windows')
  out = []
  while len(out) < count:
    epoch, offset = divmod(position, num_windows)
    take = min(count - len(out), num_windows - offset)
    out.extend(window_order(num_windows, seed, epoch)[offset : offset + take].tolist())
    position += take
  return np.asarray(out, np.int64)


# --- the trainer -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class TrainerState:
  """What a checkpoint must hold besides the adapters and the optimizer state to resume exactly.

  Attributes:
    iteration: finished iterations.
    next_window: the data position, an index into the endless window stream (`windows_at`).
    rng: the raw key data (uint32) of the JAX PRNG key the rollout seeds are split from.
    consecutive_nonfinite: skipped updates in a row so far.
  """

  iteration: int
  next_window: int
  rng: np.ndarray
  consecutive_nonfinite: int = 0

  def to_json(self) -> dict[str, Any]:
    return {
      'iteration': self.iteration,
      'next_window': self.next_window,
      'rng': self.rng.tolist(),
      'consecutive_nonfinite': self.consecutive_nonfinite,
    }

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> 'TrainerState':
    return cls(
      iteration=int(data['iteration']),
      next_window=int(data['next_window']),
      rng=np.asarray(data['rng'], np.uint32),
      consecutive_nonfinite=int(data['consecutive_nonfinite']),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlayedRollout:
  """One iteration's rollout: the training windows, the sampling seed, the episodes, their `Trajectory`, and the
  rollout's wall time in seconds."""

  windows: np.ndarray
  seed: int
  episodes: Sequence[Episode]
  trajectory: Trajectory
  seconds: float


class NonFiniteUpdateError(FloatingPointError):
  """`max_consecutive_nonfinite` updates in a row had a non-finite loss or gradient."""


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
    sasrec: SASRec | CrossFittedPeer,
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
    # 0 = none. Scored before the update, with the model that sampled them; read from `last_credit_sample`.
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
    """Host arrays of every segment, from the fixed-shape jitted `rollout_rewards`: (R, the loss weight R or
    R - group mean, included by the reward rule, carries loss: included, of a trained agent, with tokens)."""
    from coars_jax.coars.rewards import judge_segment_probability

    config, size = self.config, self.config.episodes_per_iteration * self.rollout.max_turns * len(AGENTS)
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

  def _ranks(self, episodes: Sequence[Episode]) -> list[list[int]]:
    """The peer's rank of every candidate of each episode (`coars.candidate_ranks`), for d: on these training
    windows, the out-of-fold SASRec's when the peer is cross-fitted."""
    windows = self.dataset.split(TRAIN_SPLIT)
    indices = np.asarray([e.window_index for e in episodes], np.int64)
    candidates = np.asarray([e.candidates for e in episodes], np.int32)
    peer = bind_peer(self.sasrec, TRAIN_SPLIT, windows.users[indices])
    scores = np.asarray(peer.candidate_scores(windows.history[indices], windows.lengths[indices], candidates))
    return [candidate_ranks(row) for row in scores]

  def _pack_dialogues(
    self,
    trajectory: Trajectory,
    rows: np.ndarray,
    weight: np.ndarray,
    teacher_ids: list[list[int]] | None,
    grammar: Mapping[str, np.ndarray] | None = None,
  ):
    """The loss-carrying segments `rows` as packed dialogue rows (`update_batch.pack_update_batch`)."""
    data_devices = dict(zip(self.mesh.axis_names, self.mesh.devices.shape)).get(DATA_AXIS, 1)
    prompts = [trajectory.prompt_tokens[r][trajectory.prompt_mask[r]] for r in range(trajectory.num_segments)]
    completions = [
      trajectory.completion_tokens[r][trajectory.completion_mask[r]] for r in range(trajectory.num_segments)
    ]
    behaviour = None
    if self.settings.ppo_epsilon:
      behaviour = [trajectory.behaviour_log_probs[r][trajectory.completion_mask[r]] for r in rows]
    longest = max(len(completions[r]) for r in rows)
    # A row holds one dialogue at least and a microbatch `data_devices` rows at least: K never needs more.
    dialogues = self.config.episodes_per_iteration * len(self.config.trained_agents)
    capacity = -(-dialogues // data_devices)
    return pack_update_batch(
      prompts=prompts,
      completions=completions,
      rows=rows,
      episode=trajectory.episode,
      agent=trajectory.agent,
      turn=trajectory.turn,
      reward=weight[rows].astype(np.float32),
      adapter_of_agent=self.adapter_of_agent,
      num_microbatches=capacity,
      tokens_per_microbatch=self.config.packed_tokens,
      completion_length=self.config.buckets.completion_length(longest),
      pad_token_id=self.pad_id,
      row_multiple=data_devices,
      teacher_ids=teacher_ids,
      per_segment=grammar,
      behaviour_log_probs=behaviour,
      max_positions=self.model.config.max_position_embeddings,
    )

  def _pack(
    self,
    trajectory: Trajectory,
    rows: np.ndarray,
    weight: np.ndarray,
    teacher_ids: list[list[int]] | None,
    grammar: Mapping[str, np.ndarray] | None = None,
  ) -> dict[str, np.ndarray]:
    """The loss-carrying segments `rows` as one row per turn (`turn_rows.pack_turn_rows`)."""
    return pack_turn_rows(
      trajectory,
      rows,
      weight,
      teacher_ids,
      grammar if self.settings.constrained else None,
      buckets=self.config.buckets,
      num_microbatches=self.num_microbatches,
      rows_per_microbatch=self.config.rows_per_microbatch,
      adapter_of_agent=self.adapter_of_agent,
      pad_token_id=self.pad_id,
      max_positions=self.model.config.max_position_embeddings,
      behaviour=bool(self.settings.ppo_epsilon),
      teacher_cache=self.settings.teacher_cache,
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
    config, episodes, trajectory = self.config, played.episodes, played.trajectory
    teacher_ids = constraints = judge_ids = None
    segments = np.flatnonzero(trajectory.completion_mask.any(axis=1))
    if self.settings.teacher:
      rendered = (
        teacher_prompts(
          self.tokenizer,
          episodes,
          trajectory,
          segments,
          ranks=self._ranks(episodes),
          rollout=self.rollout,
          dataset_name=self.dataset.name,
          omit_samples=config.reference_omits_samples,
        )
        if len(segments)
        else []
      )
      teacher_ids = [np.zeros(0, np.int32)] * trajectory.num_segments
      for row, ids in zip(segments, rendered):
        teacher_ids[row] = np.asarray(ids, np.int32)
    if self.settings.constrained:
      constraints = segment_constraints(self.backend, episodes, trajectory, np.arange(trajectory.num_segments))
    if config.reward == 'judge':
      judge_ids = [np.asarray(ids, np.int32) for ids in judge_prompt_ids(self.tokenizer, episodes, self.dataset.name)]
    groups = np.repeat(np.arange(config.windows_per_iteration), config.rollouts_per_window).astype(np.int32)
    return RolloutRecord(
      trajectory=trajectory,
      windows=np.asarray(played.windows, np.int64),
      groups=groups,
      seed=int(played.seed),
      seconds=float(played.seconds),
      teacher_ids=teacher_ids,
      constraints=constraints,
      judge_ids=judge_ids,
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
    self.last_credit_sample = None
    if self.credit_episodes:
      from coars_jax.training.credit_sample import credit_sample  # Imported here: it imports this trainer's pieces.

      self.last_credit_sample = credit_sample(self, record, reward, episodes=self.credit_episodes)
    rows = np.flatnonzero(carries_loss)
    teacher_ids = None
    if self.settings.teacher and len(rows):
      teacher_ids = [list(record.teacher_ids[row]) for row in rows]
    grammar = None
    if self.settings.constrained and len(rows):
      grammar = {key: np.asarray(value)[rows] for key, value in record.constraints.items()}
    self.last_packing = None
    if not len(rows):
      batch = None
    elif self.settings.packed:
      batch, self.last_packing = self._pack_dialogues(trajectory, rows, weight, teacher_ids, grammar)
    else:
      batch = self._pack(trajectory, rows, weight, teacher_ids, grammar)
    self.last_batch = batch  # the host arrays of this update, for benchmarks and inspection
    scoring_seconds = time.perf_counter() - start + record_seconds

    start = time.perf_counter()
    update: dict[str, Any] = {}
    # The schedule counts rollouts: each of the ppo_epochs updates of one rollout uses the same step size.
    learning_rate = float(self.schedule(self.optimizer_count() // config.ppo_epochs))
    epochs_finite = []
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
      # The metrics are the last epoch's; an epoch with a non-finite loss was skipped inside the step.
      update = {name: float(value) for name, value in jax.device_get(step_metrics).items()}
      epochs_finite.append(bool(update['finite']))
    if len(epochs_finite) > 1:
      update['finite'] = float(all(epochs_finite))
    update_seconds = time.perf_counter() - start

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
