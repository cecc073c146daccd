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
import functools
import logging
import math
import time
from typing import Any, Mapping, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from coars_jax.agents.episodes import (AGENTS, RECOMMENDER, USER, Episode, LLMBackend, LLMBackendConfig,
                                       RolloutConfig, bind_peer, encode_prompt, run_episodes)
from coars_jax.agents.prompts import Message, PromptConfig, recommender_messages, user_messages
from coars_jax.agents.record import RolloutRecord
from coars_jax.agents.protocol import single_line
from coars_jax.agents.trajectory import Trajectory
from coars_jax.coars.loss import coars_objective
from coars_jax.coars.reference import candidate_ranks, episode_reference, teacher_messages
from coars_jax.coars.rewards import (INVALID_USER_REWARD, REWARD_KINDS, agent_reward, group_centred,
                                     judge_rewards, segment_rewards)
from coars_jax.data.schema import TRAIN_POOLS, Dataset
from coars_jax.models import tokenizer as tokenizer_lib
from coars_jax.models.decoder import Decoder
from coars_jax.models.lora import ADAPTERS_OFF
from coars_jax.parallel.distributed import fetch
from coars_jax.parallel.mesh import DATA_AXIS, make_mesh
from coars_jax.parallel.rules import Rules
from coars_jax.parallel.sharding import Partitioning, activation_scope, sharded_jit
from coars_jax.recsys.peer import peer_opinion
from coars_jax.recsys.crossfit import CrossFittedPeer
from coars_jax.recsys.sasrec import SASRec
from coars_jax.sampling import LengthBuckets, SamplingParams, score
from coars_jax.sampling.buckets import left_pad, right_pad
from coars_jax.sampling.constraints import ChoiceConstraint
from coars_jax.sampling import packed as packed_lib
from coars_jax.training.update_batch import pack_update_batch
from coars_jax.sampling.sampler import common_prefix_length
from coars_jax.sampling.compilation import record_trace, trace_counts
from coars_jax.sampling.model_inputs import inference_view
from coars_jax.sampling.scoring import MODEL_DISTRIBUTION, completion_log_probs
from coars_jax.training.optim import clipped_adamw, warmup_cosine_schedule

# The names `record_trace` counts the jitted functions of this module under (`sampling.trace_counts()`).
STEP_TRACE_NAME = 'training.rl.update'
REWARDS_TRACE_NAME = 'training.rl.rewards'
# R_t kinds the trainer knows: the two of `coars.segment_rewards` and the judge's terminal 2p - 1.
REWARDS = REWARD_KINDS + ('judge',)
OUTCOME_ASSIGNMENTS = ('final', 'episode')
JUDGE_QUESTION = 'Did the recommender find an item this user wants next? Answer Yes or No.'
JUDGE_SYSTEM = 'You review finished dialogues between a recommender and a user. Answer with one word, Yes or No.'
TRAIN_SPLIT = 'train'


# --- config ------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class RLConfig:
  """One RL run (METHOD.md sections 3-5); the rollout protocol itself is an `agents.RolloutConfig`.

  Attributes:
    iterations: RL iterations; each is one rollout batch and ONE optimizer update of both adapters.
    windows_per_iteration: training windows (users u) per iteration, drawn without replacement from a seeded
      per-epoch permutation of the training windows.
    rollouts_per_window: G, sampled episodes per window (E = windows_per_iteration x G episodes per iteration).
    train_pool: the training windows drawn from (`data.TRAIN_POOLS`): 'all', or 'last_per_user', each training
      user's last window, shaped like the val and test windows (`data.WindowSplit.pool`).
    group_baseline: subtract from R_t the mean R over the same agent's included segments of the G rollouts of
      the same window (section 5's off-by-default option; needs G >= 2 to do anything).
    reward: 'interaction' (Eq. 7-8 with the exclusion rule), 'outcome' (terminal hit reward 2 hit_T - 1) or
      'judge' (terminal 2p - 1 from the frozen base model, recommender only). With 'outcome' the agents rewarded
      are the trained ones (`train_user_agent`), and while lambda_sd > 0 every segment stays in the loss (R = 0 on
      the turns `outcome_assign` leaves unrewarded) so that self-distillation still acts on every turn: CoARS's
      ablation without the interaction reward changes the reward alone. The outcome-RL baseline (recommender
      only, lambda_sd = 0) keeps only its rewarded segments.
    invalid_user_reward: R_user of the user's own invalid (unparseable) message, in place of Eq. 8 (METHOD.md
      section 2: -1 by default, so that breaking the format never pays); such a segment stays in the loss. The
      recommender's reward on that turn still reads the message as a skip at s = .375.
    lambda_sd: lambda_SD of Eq. 11-12 (0.1 in the paper; 0 = without self-distillation, no teacher pass).
    reference_omits_samples: the reference trajectory d leaves out each turn's sampled item and reaction, keeping
      the ground truth and each turn's verdict (an ablation: the default d repeats them, so the teacher could
      raise A by copying them).
    train_user_agent: update the user adapter too (co-evolution); False trains the recommender alone, the user
      adapter still plays the user in rollouts.
    gamma: the decay of D_t = gamma^(t-1) in Eq. 7.
    alpha: the peer-similarity strength alpha of Eq. 8.
    advantage_clip: the clip bound of A_{t,n} in Eq. 10 (1 in the paper).
    outcome_assign: which recommender segments get a terminal reward ('final': the last turn's; 'episode': all).
    outcome_signed: terminal hit reward 2 hit_T - 1 (True) or hit_T (False).
    kl_coef: beta of the optional k3 KL penalty towards the base model (0 = off, as in the paper).
    constrained: sample the rollouts under the agents' output grammars (`LLMBackendConfig.constrained`: every
      Item line names a candidate, every Action line one of the four actions) and score the student, the
      teacher and the KL base under the same per-segment grammar, so that the log-probs of the loss are those
      of the distribution that was sampled. Off by default.
    ppo_epochs: optimizer updates per rollout (1, the paper's on-policy setting). More than 1 needs ppo_epsilon.
    ppo_epsilon: eps of PPO-style ratio clipping (section 5's option; 0 = off): each token's term becomes
      min(rho w, clip(rho, 1 - eps, 1 + eps) w), rho = pi_S / pi_old, with pi_old the rollout's own log-probs.
      Those are under the sampling distribution, so it must have no top-k / top-p filter (the student is scored
      under the temperature alone) and must not be greedy.
    sampling: the rollout distribution (temperature / top-k / top-p). The student is scored under its
      temperature alone (top-k / top-p filters would give -inf to teacher tokens), the distribution the policy
      gradient is taken of.
    recommender_max_new_tokens, user_max_new_tokens: token budgets of m_rec_t and m_user_t.
    buckets: prompt and completion lengths padded to; teacher prompts x + d use the prompt buckets too.
    rows_per_microbatch: R, segments per microbatch of the update (a multiple of the mesh's data axis).
    score_chunk_size: completion positions projected onto the vocabulary at once (None: all).
    learning_rate: peak AdamW step size, after `warmup_iterations` linear steps, cosine-decayed to
      `final_learning_rate_fraction` of the peak at `iterations` (`training.optim.warmup_cosine_schedule`).
    warmup_iterations: linear warm-up updates: update k < warm-up uses peak (k + 1) / (warmup_iterations + 1).
    final_learning_rate_fraction: where the cosine decay ends, as a fraction of the peak.
    weight_decay: AdamW's decoupled weight decay.
    max_grad_norm: global gradient-norm clip.
    max_consecutive_nonfinite: after this many updates in a row with a non-finite loss or gradient (each one
      skipped), the run stops with an error naming the iteration, the metric and the windows.
    judge_answers: the (yes, no) completions whose probabilities under the base model give the judge's p.
    seed: the window order and the rollout sampling seeds.
    teacher_reuses_student_cache: score the teacher on d + y only, reading the prefix it shares with x (x up to the
      end of its last user message) from the student pass's keys and values (`sampling.shared_prefix_log_probs`)
      instead of a second pass over the whole x + d. The same A to float rounding; off = the naive teacher pass.
    remat: rematerialise each decoder layer in the update's backward pass (`Decoder.hidden_states(remat=)`):
      activation memory of one layer input per layer, for one more forward pass of the adapted layers.
    prefix_reuse: rollouts prefill only what each prompt adds to the same episode's previous prompt of that agent
      (`agents.LLMBackendConfig.prefix_reuse`); the same tokens and log-probs to float rounding.
    packed_update: the update reads each agent's dialogue ONCE (`training.update_batch`, `sampling.packed`): the
      append-only dialogue up to its last loss turn is one sequence, several share a row, one student forward gives
      every turn's log-probs and the teacher of turn t reads the student's keys and values of x_t's shared part.
      Off: one row per turn (x_t, y_t), each prompt forwarded again. The same loss and gradients to float rounding.
    packed_tokens: tokens per microbatch of the packed update (rows x row length; at least one row of a multiple
      of the data axis): the memory knob of the packed step.
  """

  iterations: int = 200
  windows_per_iteration: int = 16
  rollouts_per_window: int = 1
  group_baseline: bool = False
  reward: str = 'interaction'
  invalid_user_reward: float = INVALID_USER_REWARD
  lambda_sd: float = 0.1
  reference_omits_samples: bool = False
  train_user_agent: bool = True
  gamma: float = 0.9
  alpha: float = 0.1
  advantage_clip: float = 1.0
  outcome_assign: str = 'final'
  outcome_signed: bool = True
  kl_coef: float = 0.0
  constrained: bool = False
  ppo_epochs: int = 1
  ppo_epsilon: float = 0.0
  sampling: SamplingParams = SamplingParams(temperature=1.0)
  recommender_max_new_tokens: int = 96
  user_max_new_tokens: int = 64
  buckets: LengthBuckets = LengthBuckets()
  rows_per_microbatch: int = 16
  score_chunk_size: int | None = 256
  learning_rate: float = 1e-4
  warmup_iterations: int = 10
  final_learning_rate_fraction: float = 0.1
  weight_decay: float = 0.0
  max_grad_norm: float = 1.0
  max_consecutive_nonfinite: int = 3
  judge_answers: tuple[str, str] = ('Yes', 'No')
  seed: int = 0
  train_pool: str = 'all'
  teacher_reuses_student_cache: bool = True
  remat: bool = True
  prefix_reuse: bool = True
  packed_update: bool = True
  packed_tokens: int = 8192

  def __post_init__(self):
    if self.train_pool not in TRAIN_POOLS:
      raise ValueError(f'RLConfig.train_pool must be one of {TRAIN_POOLS}, found {self.train_pool!r}')
    for name, least in (('iterations', 1), ('windows_per_iteration', 1), ('rollouts_per_window', 1),
                        ('recommender_max_new_tokens', 1), ('user_max_new_tokens', 1), ('rows_per_microbatch', 1),
                        ('warmup_iterations', 0), ('max_consecutive_nonfinite', 1), ('seed', 0),
                        ('ppo_epochs', 1), ('packed_tokens', 1)):
      _require_int(self, name, least)
    if self.score_chunk_size is not None:
      _require_int(self, 'score_chunk_size', 1)
    for name in ('group_baseline', 'train_user_agent', 'outcome_signed', 'constrained', 'reference_omits_samples',
                 'teacher_reuses_student_cache', 'remat', 'prefix_reuse', 'packed_update'):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f'RLConfig.{name} must be a bool, found {getattr(self, name)!r}')
    if self.reward not in REWARDS:
      raise ValueError(f'RLConfig.reward must be one of {REWARDS}, found {self.reward!r}')
    if self.outcome_assign not in OUTCOME_ASSIGNMENTS:
      raise ValueError(f'RLConfig.outcome_assign must be one of {OUTCOME_ASSIGNMENTS}, found {self.outcome_assign!r}')
    for name, low, high in (('lambda_sd', 0.0, math.inf), ('gamma', 0.0, 1.0), ('alpha', 0.0, 1.0),
                            ('kl_coef', 0.0, math.inf), ('weight_decay', 0.0, 1.0),
                            ('final_learning_rate_fraction', 0.0, 1.0)):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f'RLConfig.{name} must be a number in [{low}, {high}], found {value!r}')
    for name in ('advantage_clip', 'learning_rate', 'max_grad_norm'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f'RLConfig.{name} must be a positive number, found {value!r}')
    penalty = self.invalid_user_reward
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not -math.inf < penalty <= 0:
      raise ValueError(f'RLConfig.invalid_user_reward must be a finite number <= 0 (breaking the format must never '
                       f'pay), found {penalty!r}')
    if self.warmup_iterations >= self.iterations and self.warmup_iterations > 0:
      raise ValueError(f'RLConfig.warmup_iterations ({self.warmup_iterations}) must be smaller than iterations '
                       f'({self.iterations})')
    if not isinstance(self.sampling, SamplingParams):
      raise TypeError(f'RLConfig.sampling must be a SamplingParams, found {type(self.sampling).__name__}')
    epsilon = self.ppo_epsilon
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 <= epsilon < 1:
      raise ValueError(f'RLConfig.ppo_epsilon must be a number in [0, 1), found {epsilon!r}')
    if self.ppo_epochs > 1 and not epsilon:
      raise ValueError(f'RLConfig.ppo_epochs = {self.ppo_epochs} needs ppo_epsilon > 0: several updates on one '
                       f'rollout without the ratio clip would move the policy without bound')
    if epsilon and (self.sampling.greedy or self.sampling.top_k is not None or self.sampling.top_p < 1.0):
      raise ValueError(f'RLConfig.ppo_epsilon needs sampling by temperature alone (no top_k / top_p, not greedy): '
                       f'the ratio uses the rollout\'s log-probs as pi_old, found {self.sampling}')
    if not isinstance(self.buckets, LengthBuckets):
      raise TypeError(f'RLConfig.buckets must be a LengthBuckets, found {type(self.buckets).__name__}')
    answers = tuple(self.judge_answers)
    if len(answers) != 2 or not all(isinstance(a, str) and a.strip() for a in answers) or answers[0] == answers[1]:
      raise ValueError(f'RLConfig.judge_answers must be two different non-empty strings (yes, no), found '
                       f'{self.judge_answers!r}')
    object.__setattr__(self, 'judge_answers', answers)
    if self.reward == 'judge' and self.train_user_agent:
      raise ValueError(f"RLConfig.train_user_agent must be False with reward={self.reward!r}: that reward scores "
                       f"the recommender only, so the user adapter would get no signal")

  @property
  def episodes_per_iteration(self) -> int:
    """E, the episodes of one rollout batch."""
    return self.windows_per_iteration * self.rollouts_per_window

  @property
  def trained_agents(self) -> tuple[str, ...]:
    return AGENTS if self.train_user_agent else (RECOMMENDER,)

  @property
  def score_params(self) -> SamplingParams:
    """The distribution the student and teacher are scored under: the rollout's temperature alone."""
    if self.sampling.greedy or self.sampling.temperature == 1.0:
      return MODEL_DISTRIBUTION
    return SamplingParams(temperature=float(self.sampling.temperature))

  def backend_config(self) -> LLMBackendConfig:
    return LLMBackendConfig(recommender_max_new_tokens=self.recommender_max_new_tokens,
                            user_max_new_tokens=self.user_max_new_tokens, sampling=self.sampling,
                            buckets=self.buckets, constrained=self.constrained, prefix_reuse=self.prefix_reuse)

  @property
  def outcome_every_turn(self) -> bool:
    """Under reward='outcome', whether every segment stays in the loss (`coars.outcome_rewards(every_turn=)`):
    while lambda_SD > 0, so that the ablation without the interaction reward keeps self-distillation on every
    turn; with lambda_SD = 0 an unrewarded segment's weight is 0, and the baseline keeps its rewarded ones only."""
    return self.lambda_sd > 0

  def reward_options(self) -> dict[str, Any]:
    """The static arguments of `rollout_rewards` for this config."""
    return dict(kind=self.reward, gamma=float(self.gamma), alpha=float(self.alpha), assign=self.outcome_assign,
                signed=self.outcome_signed, group_baseline=self.group_baseline,
                invalid_user_reward=float(self.invalid_user_reward),
                outcome_reward_user=self.train_user_agent, outcome_every_turn=self.outcome_every_turn)

  def max_loss_rows(self, max_turns: int) -> int:
    """The most segments of one rollout that can carry loss: the bound the microbatch count K is sized for."""
    # One terminal segment per episode: the judge's, and the outcome baseline's (recommender only, so no invalid
    # user segment is penalised, and lambda_SD = 0, so no unrewarded turn stays in).
    terminal_only = self.outcome_assign == 'final' and (
        self.reward == 'judge' or (self.reward == 'outcome' and not self.train_user_agent
                                   and not self.outcome_every_turn))
    if terminal_only:
      return self.episodes_per_iteration
    return self.episodes_per_iteration * max_turns * len(self.trained_agents)

  def num_microbatches(self, max_turns: int) -> int:
    """K, fixed for the run so that the update step's shapes never depend on how long the dialogues were."""
    return -(-self.max_loss_rows(max_turns) // self.rows_per_microbatch)


def _require_int(config, name: str, least: int) -> None:
  value = getattr(config, name)
  if isinstance(value, bool) or not isinstance(value, int) or value < least:
    raise ValueError(f'{type(config).__name__}.{name} must be an int >= {least}, found {value!r}')


# --- data order --------------------------------------------------------------------------------------------------

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
    out.extend(window_order(num_windows, seed, epoch)[offset:offset + take].tolist())
    position += take
  return np.asarray(out, np.int64)


# --- prompts: the student's, the teacher's and the judge's -------------------------------------------------------

def student_messages(episode: Episode, turn_number: int, agent: str, *, rollout: RolloutConfig,
                     dataset_name: str) -> list[Message]:
  """x_t of `agent` at turn t, rebuilt from the finished episode with the prompt builders `run_episodes` used
  (same history, candidates, memory M_{t-1}, hint and peer opinion); `teacher_prompts` checks that it renders to
  exactly the prompt the backend saw."""
  prompt_config = rollout.prompt or PromptConfig.for_dataset(dataset_name)
  memory = episode.memory(before_turn=turn_number)
  turn = episode.turns[turn_number - 1]
  if agent == RECOMMENDER:
    # The hint moves on after turn 1 (`RolloutConfig.show_hint`), so each turn keeps the one it showed.
    return recommender_messages(history_titles=episode.history_titles, candidate_titles=episode.candidate_titles,
                                memory=memory, hint_title=turn.hint_title if rollout.show_hint else None,
                                config=prompt_config)
  return user_messages(history_titles=episode.history_titles, recommended_title=turn.shown_title,
                       recommender_reason=turn.shown_reason, memory=memory,
                       peer_opinion=peer_opinion(episode.peer_title) if rollout.show_peer_opinion else None,
                       config=prompt_config)


def teacher_prompts(tokenizer, episodes: Sequence[Episode], trajectory: Trajectory, rows: Sequence[int], *,
                    ranks: Sequence[Sequence[int]] | None, rollout: RolloutConfig, dataset_name: str,
                    omit_samples: bool = False) -> list[list[int]]:
  """The token ids of the teacher prompt x + d of each segment in `rows` (`coars.teacher_messages` on the
  rebuilt student messages, d = `coars.episode_reference` of the segment's episode and agent, without each
  turn's sampled item and reaction when `omit_samples`), rendered with the same chat template as the student's
  prompt."""
  references: dict[tuple[int, int], str] = {}
  out = []
  for row in rows:
    episode_id, agent_id, turn_number = (int(trajectory.episode[row]), int(trajectory.agent[row]),
                                         int(trajectory.turn[row]))
    episode, agent = episodes[episode_id], AGENTS[agent_id]
    messages = student_messages(episode, turn_number, agent, rollout=rollout, dataset_name=dataset_name)
    generation = getattr(episode.turns[turn_number - 1], agent)
    rendered, _ = encode_prompt(tokenizer, messages)
    if rendered != generation.prompt_text:
      raise RuntimeError(f'the rebuilt {agent} prompt of window {episode.window_index}, turn {turn_number} differs '
                         f'from the prompt the backend was given; agents.prompts and training.rl.student_messages '
                         f'must build x_t the same way')
    key = (episode_id, agent_id)
    if key not in references:
      references[key] = episode_reference(episode, agent, None if ranks is None else ranks[episode_id],
                                          omit_samples=omit_samples)
    _, ids = encode_prompt(tokenizer, teacher_messages(messages, references[key], agent=agent))
    out.append(ids)
  return out


def shared_prefix_length(student_ids: Sequence[int], teacher_ids: Sequence[int]) -> int:
  """How many leading tokens the teacher prompt x + d shares with the student prompt x: x up to the end of its last
  user message's text, where d is inserted (`coars.teacher_messages`). At least 1 (the prompts start alike) and
  short of the whole teacher prompt (d is never empty)."""
  shared = common_prefix_length(student_ids, teacher_ids)
  if not 0 < shared < len(teacher_ids):
    raise ValueError(f'the teacher prompt shares {shared} of its {len(teacher_ids)} tokens with the student prompt '
                     f'({len(student_ids)} tokens); x + d must start with x\'s first token and add d')
  return shared


def judge_messages(episode: Episode, prompt_config: PromptConfig) -> list[Message]:
  """The judge-RL prompt: the user's history, the finished dialogue, and `JUDGE_QUESTION`."""
  history = '\n'.join(f'- {single_line(title)}' for title in episode.history_titles) or '(empty)'
  lines = []
  for turn in episode.turns:
    lines.append(f'Turn {turn.turn}: the recommender suggested the {prompt_config.item_noun} '
                 f'"{single_line(turn.shown_title)}" because: {single_line(turn.shown_reason) or "(no reason)"}. '
                 f'The user reacted {turn.action} with score {turn.acceptance_score:.2f}: '
                 f'{single_line(turn.user_parse.reason) or "(no reason)"}.')
  content = (f"The user's history, oldest first:\n{history}\n\nThe dialogue:\n" + '\n'.join(lines)
             + f'\n\n{JUDGE_QUESTION}')
  return [{'role': 'system', 'content': JUDGE_SYSTEM}, {'role': 'user', 'content': content}]


def judge_prompt_ids(tokenizer, episodes: Sequence[Episode], dataset_name: str) -> list[list[int]]:
  """The token ids of each finished dialogue's judge prompt (`judge_messages`), rendered with the chat template."""
  prompt_config = PromptConfig.for_dataset(dataset_name)
  return [encode_prompt(tokenizer, judge_messages(e, prompt_config))[1] for e in episodes]


def judge_probabilities(model: Decoder, tokenizer, episodes: Sequence[Episode], *, answers: tuple[str, str],
                        buckets: LengthBuckets, dataset_name: str, chunk_size: int | None = None,
                        mesh: Mesh | None = None, rules: Rules | None = None) -> np.ndarray:
  """float64[E]: p = P(yes) / (P(yes) + P(no)) of each finished dialogue under the frozen base model
  (`judge_probabilities_of` on `judge_prompt_ids`)."""
  return judge_probabilities_of(model, tokenizer, judge_prompt_ids(tokenizer, episodes, dataset_name),
                                answers=answers, buckets=buckets, chunk_size=chunk_size, mesh=mesh, rules=rules)


def judge_probabilities_of(model: Decoder, tokenizer, contexts: Sequence[Sequence[int]], *,
                           answers: tuple[str, str], buckets: LengthBuckets, chunk_size: int | None = None,
                           mesh: Mesh | None = None, rules: Rules | None = None) -> np.ndarray:
  """float64[E]: p = P(yes) / (P(yes) + P(no)) after each judge prompt (token ids) under the frozen base model
  (adapters off, id -1), from one `sampling.score` pass over the two answers (sharded on `mesh` when given); no
  generation is needed."""
  contexts = [list(map(int, c)) for c in contexts]
  answer_ids = [list(tokenizer(a, add_special_tokens=False)['input_ids']) for a in answers]
  if not all(answer_ids):
    raise ValueError(f'RLConfig.judge_answers {answers!r}: an answer encodes to no tokens')
  pad = tokenizer_lib.special_token_ids(tokenizer).pad_id
  context_length = buckets.prompt_length(max(len(c) for c in contexts))
  context_tokens, context_mask = left_pad(contexts + contexts, context_length, pad)
  completion_tokens, completion_mask = right_pad([answer_ids[0]] * len(contexts) + [answer_ids[1]] * len(contexts),
                                                 max(len(a) for a in answer_ids), pad)
  adapter = np.full(2 * len(contexts), ADAPTERS_OFF, np.int32) if model.adapter_names else None
  kwargs = {} if adapter is None else {'adapter': adapter}
  scores = fetch(score(model, context_tokens, context_mask, completion_tokens, completion_mask, buckets=buckets,
                       chunk_size=chunk_size, pad_token_id=pad, mesh=mesh, rules=rules, **kwargs)).astype(np.float64)
  totals = scores.sum(axis=1)
  yes, no = totals[:len(contexts)], totals[len(contexts):]
  return 1.0 / (1.0 + np.exp(no - yes))


# --- rewards -----------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=('kind', 'gamma', 'alpha', 'assign', 'signed', 'group_baseline',
                                             'invalid_user_reward', 'outcome_reward_user',
                                             'outcome_every_turn'))
def rollout_rewards(rows: Mapping[str, jax.Array], *, kind: str, gamma: float, alpha: float, assign: str,
                    signed: bool, group_baseline: bool,
                    invalid_user_reward: float = INVALID_USER_REWARD, outcome_reward_user: bool = False,
                    outcome_every_turn: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
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
    r_rec, r_user, included = judge_rewards(rows['judge_probability'], rows['agent'], rows['turn'],
                                            rows['last_turn'], assign=assign)
    reward = agent_reward(r_rec, r_user, rows['agent'])
  else:
    reward, included = segment_rewards(kind, hit=rows['hit'], acceptance_score=rows['acceptance_score'],
                                       peer_similarity=rows['peer_similarity'], action=rows['action'],
                                       turn=rows['turn'], agent=rows['agent'], final_hit=rows['final_hit'],
                                       last_turn=rows['last_turn'], valid=rows['valid'], gamma=gamma, alpha=alpha,
                                       invalid_user_reward=invalid_user_reward, outcome_assign=assign,
                                       outcome_signed=signed, outcome_reward_user=outcome_reward_user,
                                       outcome_every_turn=outcome_every_turn)
  included = included & rows['real']
  reward = jnp.where(rows['real'], reward, 0.0)
  weight = reward
  if group_baseline:
    weight = group_centred(reward, included, rows['agent'], rows['group'])
  return reward, weight, included


# --- optimizer and the update step -------------------------------------------------------------------------------

def learning_rate_schedule(config: RLConfig) -> optax.Schedule:
  """The AdamW step size per update (`optim.warmup_cosine_schedule`: linear warm-up from peak / (warm-up + 1) to the
  peak, then cosine decay to the final fraction). It is evaluated on the host at the optimizer's update count and
  passed to the step as a scalar, so the compiled step does not depend on the schedule (trainers with other
  budgets share it)."""
  return warmup_cosine_schedule(config.learning_rate, warmup_steps=config.warmup_iterations,
                                total_steps=config.iterations,
                                final_fraction=config.final_learning_rate_fraction)


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
    return cls(lambda_sd=float(config.lambda_sd), advantage_clip=float(config.advantage_clip),
               kl_coef=float(config.kl_coef), score_params=config.score_params, chunk_size=config.score_chunk_size,
               pad_token_id=int(pad_token_id), max_grad_norm=float(config.max_grad_norm),
               weight_decay=float(config.weight_decay), ppo_epsilon=float(config.ppo_epsilon) or None,
               constrained=bool(config.constrained),
               teacher_cache=bool(config.teacher_reuses_student_cache and config.lambda_sd != 0),
               remat=bool(config.remat), packed=bool(config.packed_update))

  def make_optimizer(self) -> optax.GradientTransformation:
    """`optim.clipped_adamw` without its step size: the step scales the update by -learning_rate."""
    return clipped_adamw(max_grad_norm=self.max_grad_norm, weight_decay=self.weight_decay)

  @property
  def teacher(self) -> bool:
    return self.lambda_sd != 0


# Batch keys of the update step; every array is [K, R, ...].
BATCH_KEYS = ('prompt_tokens', 'prompt_mask', 'completion_tokens', 'completion_mask', 'adapter', 'agent', 'reward',
              'included')
TEACHER_KEYS = ('teacher_prompt_tokens', 'teacher_prompt_mask')
# The teacher prompt as x[:shared] + suffix, read against the student's cache (`sampling.shared_prefix_log_probs`).
TEACHER_CACHE_KEYS = ('teacher_suffix_tokens', 'teacher_suffix_mask', 'teacher_shared_length')
PPO_KEYS = ('behaviour_log_probs',)  # pi_old of the ratio clip, when it is on
# The packed update (`training.update_batch`): rows of dialogues [K, R, L], reply segments [K, J, ...].
PACKED_BATCH_KEYS = packed_lib.DIALOGUE_KEYS + ('row_adapter', 'adapter', 'agent', 'reward', 'included')
PACKED_TEACHER_KEYS = packed_lib.TEACHER_KEYS
# Each segment's output grammar (`sampling.constraints.ChoiceConstraint`), when rollouts are constrained: the
# per-row fields, then the vocabulary-wide ones, which are repeated on every row so that all keys are [K, R, ...].
CONSTRAINT_ROW_FIELDS = ('head', 'head_lengths', 'choices', 'choice_lengths', 'line_budget', 'final_free',
                         'final_budget')
CONSTRAINT_SHARED_FIELDS = ('free_ok', 'line_end', 'end_token_id')
CONSTRAINT_KEYS = tuple(f'constraint_{name}' for name in CONSTRAINT_ROW_FIELDS + CONSTRAINT_SHARED_FIELDS)


def segment_constraints(backend: LLMBackend, episodes: Sequence[Episode], trajectory: Trajectory,
                        rows: Sequence[int]) -> dict[str, np.ndarray]:
  """The grammar each segment of `rows` was sampled under (`LLMBackend.constraint`: the recommender's over its
  episode's candidate titles, the user's over the four actions), as host arrays with one leading row per
  segment under the `CONSTRAINT_KEYS` names. Choice slots are padded to the widest of the two agents (padding
  slots have length 0 and are never alive, so the grammar is unchanged)."""
  rows = np.asarray(rows, np.int64)
  parts = {}
  for index, agent in enumerate(AGENTS):
    where = np.flatnonzero(trajectory.agent[rows] == index)  # positions in `rows` of this agent's segments
    if len(where):
      candidates = [episodes[int(trajectory.episode[r])].candidate_titles for r in rows[where]] \
          if agent == RECOMMENDER else None
      parts[agent] = (where, backend.constraint(agent, len(where), candidates))
  some = next(iter(parts.values()))[1]
  num_choices = max(int(c.choices.shape[1]) for _, c in parts.values())
  choice_length = max(int(c.choices.shape[2]) for _, c in parts.values())
  head_length = max(int(c.head.shape[1]) for _, c in parts.values())
  out = {name: None for name in CONSTRAINT_ROW_FIELDS}
  for where, constraint in parts.values():
    fields = {name: np.asarray(getattr(constraint, name)) for name in CONSTRAINT_ROW_FIELDS}
    fields['head'] = np.pad(fields['head'], ((0, 0), (0, head_length - fields['head'].shape[1])))
    fields['choices'] = np.pad(fields['choices'], ((0, 0), (0, num_choices - fields['choices'].shape[1]),
                                                   (0, choice_length - fields['choices'].shape[2])))
    fields['choice_lengths'] = np.pad(fields['choice_lengths'],
                                      ((0, 0), (0, num_choices - fields['choice_lengths'].shape[1])))
    for name, value in fields.items():
      if out[name] is None:
        out[name] = np.zeros((len(rows),) + value.shape[1:], value.dtype)
      out[name][where] = value
  batch = {f'constraint_{name}': value for name, value in out.items()}
  for name in CONSTRAINT_SHARED_FIELDS:
    value = np.asarray(getattr(some, name))
    batch[f'constraint_{name}'] = np.broadcast_to(value, (len(rows),) + value.shape).copy()
  return batch


def microbatch_constraint(micro: Mapping[str, jax.Array]) -> ChoiceConstraint:
  """The `ChoiceConstraint` of one microbatch's rows from its `CONSTRAINT_KEYS` arrays ([R, ...])."""
  fields = {name: micro[f'constraint_{name}'] for name in CONSTRAINT_ROW_FIELDS}
  fields.update({name: micro[f'constraint_{name}'][0] for name in CONSTRAINT_SHARED_FIELDS})
  return ChoiceConstraint(**fields)
# Metrics summed over microbatches in the step, then turned into means on the host.
_SUMMED = ('loss', 'loss_recommender', 'loss_user', 'segments_recommender', 'segments_user', 'tokens',
           'tokens_recommender', 'tokens_user', 'advantage_sum', 'advantage_square_sum', 'advantage_abs_recommender',
           'advantage_abs_user', 'kl_sum', 'microbatches')


def _microbatch_sums(metrics: Mapping[str, jax.Array], micro: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Per-microbatch means of `coars_loss` turned into sums, so that microbatches add up exactly."""
  mask = micro['completion_mask'] != 0
  active = micro['included'] & mask.any(axis=1)
  token_rows = mask & active[:, None]
  tokens = token_rows.sum().astype(jnp.float32)
  sums = {'loss': metrics['loss'], 'tokens': tokens, 'microbatches': jnp.ones((), jnp.float32),
          'advantage_sum': metrics['advantage_mean'] * tokens,
          'advantage_square_sum': (jnp.square(metrics['advantage_std']) + jnp.square(metrics['advantage_mean']))
                                  * tokens,
          'kl_sum': metrics.get('kl', jnp.zeros((), jnp.float32)) * active.sum()}
  for index, name in enumerate(AGENTS):
    agent_tokens = (token_rows & (micro['agent'] == index)[:, None]).sum().astype(jnp.float32)
    sums[f'loss_{name}'] = metrics[f'loss_{name}']
    sums[f'segments_{name}'] = metrics[f'segments_{name}']
    sums[f'tokens_{name}'] = agent_tokens
    sums[f'advantage_abs_{name}'] = metrics[f'advantage_abs_mean_{name}'] * agent_tokens
  return {name: sums[name].astype(jnp.float32) for name in _SUMMED}


def _update_body(lora: nnx.State, frozen: nnx.State, opt_state: optax.OptState, batch: dict[str, jax.Array],
                 num_episodes: jax.Array, adapter_update_mask: jax.Array, learning_rate: jax.Array, *,
                 graphdef: nnx.GraphDef,
                 settings: StepSettings) -> tuple[nnx.State, optax.OptState, dict[str, jax.Array]]:
  """One optimizer update from all microbatches of a rollout; see the module docstring."""
  record_trace(STEP_TRACE_NAME)
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
    return coars_objective(nnx.merge(graphdef, params, frozen), micro, lambda_sd=settings.lambda_sd,
                           advantage_clip=settings.advantage_clip, kl_coef=settings.kl_coef,
                           ppo_epsilon=settings.ppo_epsilon, pad_token_id=settings.pad_token_id, **grammar,
                           **scoring, **({'remat': True} if settings.remat else {}))

  def microbatch(micro):
    micro = dict(micro, num_episodes=num_episodes)
    model = nnx.merge(graphdef, lora, frozen)
    # Constrained rollouts: every log-prob is taken under the segment's own grammar, as the sampler drew it.
    grammar = {'constraint': microbatch_constraint(micro)} if settings.constrained else {}
    if settings.teacher and not settings.teacher_cache and not settings.packed:
      # pi_T: the same adapter and the current parameters on x + d; a forward pass only (no gradient). With
      # teacher_cache the objective scores it instead, on d + y against the student pass's keys and values.
      micro['teacher_log_probs'] = jax.lax.stop_gradient(completion_log_probs(
          model, micro['teacher_prompt_tokens'], micro['teacher_prompt_mask'], micro['completion_tokens'],
          micro['completion_mask'], adapter=micro['adapter'], **grammar, **scoring))
    if settings.kl_coef > 0 and settings.packed:
      base, _ = packed_lib.packed_log_probs(model, micro, teacher=False, adapter=jnp.full_like(
          micro['row_adapter'], ADAPTERS_OFF), **grammar, **scoring)
      micro['base_log_probs'] = jax.lax.stop_gradient(base)
    elif settings.kl_coef > 0:
      micro['base_log_probs'] = jax.lax.stop_gradient(completion_log_probs(
          model, micro['prompt_tokens'], micro['prompt_mask'], micro['completion_tokens'], micro['completion_mask'],
          adapter=jnp.full_like(micro['adapter'], ADAPTERS_OFF), **grammar, **scoring))
    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(lora, micro, grammar)
    return grads, _microbatch_sums(dict(metrics, loss=loss), micro)

  def accumulate(carry, micro):
    grads_total, sums_total = carry
    shapes = jax.eval_shape(microbatch, micro)
    grads, sums = jax.lax.cond(
        (micro['completion_mask'] != 0).any() & micro['included'].any(), microbatch,
        lambda _: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), micro)
    return (jax.tree.map(jnp.add, grads_total, grads), jax.tree.map(jnp.add, sums_total, sums)), None

  zero_grads = jax.tree.map(jnp.zeros_like, lora)
  zero_sums = {name: jnp.zeros((), jnp.float32) for name in _SUMMED}
  (grads, sums), _ = jax.lax.scan(accumulate, (zero_grads, zero_sums), batch)

  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(sums['loss']) & jnp.isfinite(grad_norm)
  updates, new_opt_state = tx.update(grads, opt_state, lora)
  # Adapters are stacked on a leading axis; a frozen agent's slice gets no update at all (AdamW's weight decay
  # included), so train_user_agent=False leaves the user adapter bit-identical.
  updates = jax.tree.map(
      lambda u: -learning_rate * u * adapter_update_mask.astype(u.dtype).reshape((-1,) + (1,) * (u.ndim - 1)),
      updates)
  new_lora = optax.apply_updates(lora, updates)
  keep_if_bad = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
  metrics = dict(sums, grad_norm=grad_norm, finite=finite)
  return keep_if_bad(new_lora, lora), keep_if_bad(new_opt_state, opt_state), metrics


@functools.lru_cache(maxsize=16)
def build_update_step(graphdef: nnx.GraphDef, settings: StepSettings, mesh: Mesh, teacher_keys: bool,
                      rules: Rules | None = None) -> 'UpdateStep':
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
  return UpdateStep(scoped_body, partitioning, keys + teacher +
                    (PPO_KEYS if settings.ppo_epsilon else ()) + (CONSTRAINT_KEYS if settings.constrained else ()))


class UpdateStep:
  """A callable update step: the shardings of the arguments are derived on each call from their logical names
  (adapters and base weights by the rules, the Adam moments like the adapters they track, batch rows [K, R, ...]
  by the batch rule on R, scalars replicated), and the step jitted with them is memoised (`parallel.sharded_jit`),
  so equal shapes reuse one compiled program."""

  def __init__(self, body, partitioning: Partitioning, batch_keys: tuple[str, ...]):
    self.body, self.partitioning, self.batch_keys = body, partitioning, batch_keys

  def shardings(self, lora: nnx.State, frozen: nnx.State, opt_state: optax.OptState,
                batch: Mapping[str, Any]) -> tuple[tuple, tuple]:
    """(in_shardings, out_shardings) of the step for these arguments."""
    placing = self.partitioning
    whole = placing.replicated()
    lora_shardings, opt_shardings = placing.state(lora), placing.optimizer(opt_state, lora)
    rows = {key: placing.batch(np.shape(batch[key]), row_axis=1) for key in self.batch_keys}
    return ((lora_shardings, placing.state(frozen), opt_shardings, rows, whole, whole, whole),
            (lora_shardings, opt_shardings, whole))

  def jitted(self, lora, frozen, opt_state, batch):
    in_shardings, out_shardings = self.shardings(lora, frozen, opt_state, batch)
    return sharded_jit(self.body, in_shardings, out_shardings, donate_argnums=(0, 2))

  def __call__(self, lora, frozen, opt_state, batch, num_episodes, adapter_update_mask, learning_rate):
    return self.jitted(lora, frozen, opt_state, batch)(lora, frozen, opt_state, batch, num_episodes,
                                                       adapter_update_mask, learning_rate)

  def lower(self, lora, frozen, opt_state, batch, num_episodes, adapter_update_mask, learning_rate):
    """`jax.stages.Lowered` of the step for these arguments (for memory and cost analysis)."""
    return self.jitted(lora, frozen, opt_state, batch).lower(lora, frozen, opt_state, batch, num_episodes,
                                                             adapter_update_mask, learning_rate)


def step_traces() -> int:
  """How many times the update step has been traced (compiled) in this process."""
  return trace_counts().get(STEP_TRACE_NAME, 0)


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
    return {'iteration': self.iteration, 'next_window': self.next_window, 'rng': self.rng.tolist(),
            'consecutive_nonfinite': self.consecutive_nonfinite}

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> 'TrainerState':
    return cls(iteration=int(data['iteration']), next_window=int(data['next_window']),
               rng=np.asarray(data['rng'], np.uint32), consecutive_nonfinite=int(data['consecutive_nonfinite']))


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

  def __init__(self, model: Decoder, tokenizer, dataset: Dataset, sasrec: SASRec | CrossFittedPeer, config: RLConfig, *,
               rollout: RolloutConfig = RolloutConfig(), mesh: Mesh | None = None, rules: Rules | None = None):
    if not isinstance(config, RLConfig):
      raise TypeError(f'config must be an RLConfig, found {type(config).__name__}')
    missing = [agent for agent in AGENTS if agent not in model.adapter_names]
    if missing:
      raise ValueError(f'RLTrainer: the model has adapters {model.adapter_names}; missing {missing}. Attach both '
                       f'agents\' adapters (training.warm_start.prepare_model) first')
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
      raise ValueError(f'RLConfig.rows_per_microbatch ({config.rows_per_microbatch}) must be a multiple of the '
                       f"mesh's '{DATA_AXIS}' axis ({data_devices} devices)")
    self.train_windows = dataset.split(TRAIN_SPLIT).pool(config.train_pool)  # what `windows_at` indexes into
    self.num_train_windows = len(self.train_windows)
    self.pad_id = tokenizer_lib.special_token_ids(tokenizer).pad_id
    # Rollouts run on the same mesh and rules as the update step, so they read the arrays placed below in place.
    self.backend = LLMBackend(model, tokenizer, adapters={RECOMMENDER: RECOMMENDER, USER: USER},
                              config=config.backend_config(), mesh=self.mesh, rules=rules)
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
        self.lora)
    self._step = build_update_step(self.graphdef, self.settings, self.mesh, self.settings.teacher, rules)
    self.state = TrainerState(iteration=0, next_window=0,
                              rng=np.asarray(jax.random.key_data(jax.random.key(config.seed)), np.uint32))

  # -- checkpoint contents ----------------------------------------------------------------------------------------

  def checkpoint_tree(self) -> dict[str, Any]:
    """The arrays of a checkpoint: adapters (pure dict), optimizer state (its leaves, in tree order) and the RNG."""
    return {'adapters': nnx.to_pure_dict(self.lora),
            'optimizer': {str(i): leaf for i, leaf in enumerate(jax.tree.leaves(self.opt_state))},
            'rng': np.asarray(self.state.rng, np.uint32)}

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
      raise ValueError(f'the checkpoint has {len(saved)} optimizer arrays but this optimizer has {len(leaves)}; it '
                       f'was written with other optimizer settings')
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
        'hit': padded(trajectory.hit, bool), 'acceptance_score': padded(trajectory.acceptance_score, np.float32),
        'peer_similarity': padded(trajectory.peer_similarity, np.float32),
        'action': padded(trajectory.action, np.int32), 'turn': padded(trajectory.turn, np.int32, 1),
        'agent': padded(trajectory.agent, np.int32), 'valid': padded(trajectory.valid, bool, True),
        'final_hit': padded(trajectory.final_hit[episode], bool),
        'last_turn': padded(trajectory.num_turns[episode], np.int32, 1),
        'judge_probability': padded(np.zeros(segments) if judge_probability is None
                                    else judge_segment_probability(judge_probability, episode, trajectory.valid),
                                    np.float32),
        'group': padded(groups[episode], np.int32), 'real': padded(np.ones(segments, bool), bool),
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

  def _pack_dialogues(self, trajectory: Trajectory, rows: np.ndarray, weight: np.ndarray,
                      teacher_ids: list[list[int]] | None, grammar: Mapping[str, np.ndarray] | None = None):
    """The loss-carrying segments `rows` as packed dialogue rows (`update_batch.pack_update_batch`)."""
    data_devices = dict(zip(self.mesh.axis_names, self.mesh.devices.shape)).get(DATA_AXIS, 1)
    prompts = [trajectory.prompt_tokens[r][trajectory.prompt_mask[r]] for r in range(trajectory.num_segments)]
    completions = [trajectory.completion_tokens[r][trajectory.completion_mask[r]]
                   for r in range(trajectory.num_segments)]
    behaviour = None
    if self.settings.ppo_epsilon:
      behaviour = [trajectory.behaviour_log_probs[r][trajectory.completion_mask[r]] for r in rows]
    longest = max(len(completions[r]) for r in rows)
    # A row holds one dialogue at least and a microbatch `data_devices` rows at least: K never needs more.
    dialogues = self.config.episodes_per_iteration * len(self.config.trained_agents)
    capacity = -(-dialogues // data_devices)
    return pack_update_batch(
        prompts=prompts, completions=completions, rows=rows, episode=trajectory.episode, agent=trajectory.agent,
        turn=trajectory.turn, reward=weight[rows].astype(np.float32), adapter_of_agent=self.adapter_of_agent,
        num_microbatches=capacity, tokens_per_microbatch=self.config.packed_tokens,
        completion_length=self.config.buckets.completion_length(longest), pad_token_id=self.pad_id,
        row_multiple=data_devices, teacher_ids=teacher_ids, per_segment=grammar, behaviour_log_probs=behaviour,
        max_positions=self.model.config.max_position_embeddings)

  def _pack(self, trajectory: Trajectory, rows: np.ndarray, weight: np.ndarray,
            teacher_ids: list[list[int]] | None, grammar: Mapping[str, np.ndarray] | None = None
            ) -> dict[str, np.ndarray]:
    """The loss-carrying segments `rows` as [K, R, ...] microbatches at their length buckets; padding rows copy
    the first row's prompt and have an empty completion mask and included=False."""
    buckets, capacity = self.config.buckets, self.num_microbatches * self.config.rows_per_microbatch
    if len(rows) > capacity:
      raise AssertionError(f'{len(rows)} loss rows exceed the {capacity} slots of the update step')
    prompts = [trajectory.prompt_tokens[r][trajectory.prompt_mask[r]] for r in rows]
    completions = [trajectory.completion_tokens[r][trajectory.completion_mask[r]] for r in rows]
    filler = [0] * (capacity - len(rows))
    order = list(range(len(rows))) + filler

    def padded(sequences, length, side):
      return (left_pad if side == 'left' else right_pad)([sequences[i] for i in order], length, self.pad_id)

    prompt_tokens, prompt_mask = padded(prompts, buckets.prompt_length(max(map(len, prompts))), 'left')
    completion_tokens, completion_mask = padded(completions, buckets.completion_length(max(map(len, completions))),
                                                'right')
    real = np.arange(capacity) < len(rows)
    completion_mask[~real] = 0
    agent = trajectory.agent[rows][order].astype(np.int32)
    batch = {'prompt_tokens': prompt_tokens, 'prompt_mask': prompt_mask, 'completion_tokens': completion_tokens,
             'completion_mask': completion_mask, 'agent': agent, 'adapter': self.adapter_of_agent[agent],
             'reward': np.where(real, weight[rows][order], 0.0).astype(np.float32), 'included': real}
    if self.settings.ppo_epsilon:
      behaviour = np.zeros(completion_tokens.shape, np.float32)
      for position, row in enumerate(rows):  # the real rows come first, in `rows` order
        values = trajectory.behaviour_log_probs[row][trajectory.completion_mask[row]]
        behaviour[position, :len(values)] = values
      batch['behaviour_log_probs'] = behaviour
    if self.settings.constrained:
      batch.update({key: np.asarray(value)[order] for key, value in grammar.items()})
    if teacher_ids is not None:
      # Positions count real tokens only (padding is masked), so the limit applies to real lengths, not buckets.
      longest = max(len(t) + len(c) for t, c in zip(teacher_ids, completions))
      limit = self.model.config.max_position_embeddings
      if longest > limit:
        raise ValueError(f'a teacher prompt x + d plus its completion is {longest} tokens, beyond the model\'s '
                         f'max_position_embeddings {limit}; lower rollout.max_turns or the token budgets')
      if self.settings.teacher_cache:
        shared = [shared_prefix_length(x, t) for x, t in zip(prompts, teacher_ids)]
        suffixes = [t[n:] for t, n in zip(teacher_ids, shared)]
        length = buckets.prompt_length(max(map(len, suffixes)))
        batch['teacher_suffix_tokens'], batch['teacher_suffix_mask'] = padded(suffixes, length, 'left')
        batch['teacher_shared_length'] = np.asarray([shared[i] for i in order], np.int32)
      else:
        length = buckets.prompt_length(max(map(len, teacher_ids)))
        batch['teacher_prompt_tokens'], batch['teacher_prompt_mask'] = padded(teacher_ids, length, 'left')
    shape = (self.num_microbatches, self.config.rows_per_microbatch)
    return {key: value.reshape(shape + value.shape[1:]) for key, value in batch.items()}

  def iteration(self) -> dict[str, Any]:
    """One RL iteration (rollout, rewards and teacher prompts, update); returns its metrics (host values).

    Raises `NonFiniteUpdateError` after `max_consecutive_nonfinite` skipped updates in a row.
    """
    return self.learn(self.play())

  def play(self) -> PlayedRollout:
    """The rollout of the next iteration (its windows from the data position, its seed from the trainer's RNG)."""
    config = self.config
    windows = self.train_windows[windows_at(self.num_train_windows, config.seed, self.state.next_window,
                                            config.windows_per_iteration)]
    seed = self._next_seed()
    episode_windows = np.repeat(windows, config.rollouts_per_window)
    start = time.perf_counter()
    episodes = run_episodes(self.dataset, TRAIN_SPLIT, episode_windows.tolist(), self.backend, peer=self.sasrec,
                            config=self.rollout, seed=seed)
    trajectory = Trajectory.from_episodes(episodes, pad_token_id=self.pad_id)
    return PlayedRollout(windows=windows, seed=seed, episodes=episodes, trajectory=trajectory,
                         seconds=time.perf_counter() - start)

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
      rendered = teacher_prompts(self.tokenizer, episodes, trajectory, segments, ranks=self._ranks(episodes),
                                 rollout=self.rollout, dataset_name=self.dataset.name,
                                 omit_samples=config.reference_omits_samples) if len(segments) else []
      teacher_ids = [np.zeros(0, np.int32)] * trajectory.num_segments
      for row, ids in zip(segments, rendered):
        teacher_ids[row] = np.asarray(ids, np.int32)
    if self.settings.constrained:
      constraints = segment_constraints(self.backend, episodes, trajectory, np.arange(trajectory.num_segments))
    if config.reward == 'judge':
      judge_ids = [np.asarray(ids, np.int32) for ids in judge_prompt_ids(self.tokenizer, episodes,
                                                                         self.dataset.name)]
    groups = np.repeat(np.arange(config.windows_per_iteration), config.rollouts_per_window).astype(np.int32)
    return RolloutRecord(trajectory=trajectory, windows=np.asarray(played.windows, np.int64), groups=groups,
                         seed=int(played.seed), seconds=float(played.seconds), teacher_ids=teacher_ids,
                         constraints=constraints, judge_ids=judge_ids)

  def learn_record(self, record: RolloutRecord, *, record_seconds: float = 0.0) -> dict[str, Any]:
    """Rewards and the update from a rollout record alone (no backend, episodes or SASRec are used): a record
    saved with `RolloutRecord.save` and loaded again gives the same update, bit for bit."""
    config, state = self.config, self.state
    number = state.iteration + 1
    windows, seed, trajectory, groups = record.windows, record.seed, record.trajectory, record.groups
    rollout_seconds = record.seconds
    generated = int(trajectory.completion_mask.sum())

    start = time.perf_counter()
    judge = None
    if config.reward == 'judge':
      judge = judge_probabilities_of(self.model, self.tokenizer, record.judge_ids, answers=config.judge_answers,
                                     buckets=config.buckets, chunk_size=config.score_chunk_size, mesh=self.mesh,
                                     rules=self.rules)
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
      lora, opt_state, step_metrics = self._step(self.lora, self.frozen, self.opt_state, batch,
                                                 np.float32(config.episodes_per_iteration), self.adapter_update_mask,
                                                 np.float32(learning_rate))
      self.lora, self.opt_state = lora, opt_state
      nnx.update(self.model, self.lora)
      # The metrics are the last epoch's; an epoch with a non-finite loss was skipped inside the step.
      update = {name: float(value) for name, value in jax.device_get(step_metrics).items()}
      epochs_finite.append(bool(update['finite']))
    if len(epochs_finite) > 1:
      update['finite'] = float(all(epochs_finite))
    update_seconds = time.perf_counter() - start

    metrics: dict[str, Any] = {'iteration': number, 'seed': seed, 'windows': windows.tolist()}
    metrics.update({f'rollout/{k}': v for k, v in trajectory.metrics().items()})
    metrics.update({
        'rollout/episodes': trajectory.num_episodes, 'rollout/generated_tokens': generated,
        'time/rollout_seconds': rollout_seconds, 'time/scoring_seconds': scoring_seconds,
        'time/update_seconds': update_seconds,
        'time/rollout_tokens_per_second': generated / max(rollout_seconds, 1e-9),
        'update/loss_rows': int(len(rows)), 'update/learning_rate': learning_rate,
    })
    for index, agent in enumerate(AGENTS):
      mine = carries_loss & (trajectory.agent == index)
      metrics[f'reward/{agent}'] = float(reward[mine].mean()) if mine.any() else 0.0
      metrics[f'reward/{agent}_segments'] = int(mine.sum())
    real = trajectory.completion_mask.any(axis=1)
    metrics['reward/excluded_share'] = float((~included[real]).mean()) if config.reward == 'interaction' else 0.0
    if judge is not None:
      metrics['reward/judge_probability'] = float(judge.mean())
    if self.last_packing is not None:
      packing = self.last_packing
      metrics.update({'update/padding': packing.padding, 'update/packed_rows': packing.rows,
                      'update/packed_microbatches': packing.microbatches,
                      'update/packed_dialogues': packing.dialogues,
                      'update/student_tokens': packing.student_real, 'update/teacher_tokens': packing.teacher_real})
    self._update_metrics(metrics, update, batch, update_seconds)
    state.next_window += config.windows_per_iteration
    state.iteration = number
    self._check_finite(metrics, update, windows)
    return metrics

  def optimizer_count(self) -> int:
    """Updates applied so far (skipped ones are not counted): the schedule's step."""
    counts = [leaf for leaf in jax.tree.leaves(self.opt_state) if jnp.ndim(leaf) == 0 and
              jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.integer)]
    return int(counts[0]) if counts else 0

  def _update_metrics(self, metrics: dict, update: Mapping[str, float], batch, seconds: float) -> None:
    if not update:
      metrics['update/skipped'] = True
      metrics['update/reason'] = 'no segment carries loss'
      return
    tokens = max(update['tokens'], 1.0)
    mean = update['advantage_sum'] / tokens
    metrics.update({
        'update/skipped': not update['finite'], 'loss/total': update['loss'], 'update/grad_norm': update['grad_norm'],
        'update/microbatches': int(update['microbatches']), 'advantage/mean': mean,
        'advantage/std': math.sqrt(max(update['advantage_square_sum'] / tokens - mean * mean, 0.0))
                         if math.isfinite(mean) else math.nan,
        'time/update_tokens_per_second': float(np.asarray(batch['completion_mask']).sum()) / max(seconds, 1e-9),
    })
    for agent in AGENTS:
      metrics[f'loss/{agent}'] = update[f'loss_{agent}']
      metrics[f'advantage/abs_mean_{agent}'] = update[f'advantage_abs_{agent}'] / max(update[f'tokens_{agent}'], 1.0)
    if self.config.kl_coef > 0:
      metrics['update/kl'] = update['kl_sum'] / max(update['segments_recommender'] + update['segments_user'], 1.0)

  def _check_finite(self, metrics: dict, update: Mapping[str, float], windows: np.ndarray) -> None:
    if not update or update['finite']:
      self.state.consecutive_nonfinite = 0
      return
    self.state.consecutive_nonfinite += 1
    bad = [name for name in ('loss', 'grad_norm') if not math.isfinite(update[name])]
    bad += [name for name, value in update.items() if name not in bad and name != 'finite'
            and not math.isfinite(value)]
    message = (f'RL iteration {metrics["iteration"]}: non-finite {", ".join(bad)}; the update was skipped '
               f'({self.state.consecutive_nonfinite} in a row). Training windows of this batch: {windows.tolist()}')
    metrics['update/nonfinite_metrics'] = bad
    logging.warning(message)
    if self.state.consecutive_nonfinite >= self.config.max_consecutive_nonfinite:
      raise NonFiniteUpdateError(f'{message}. Stopping after max_consecutive_nonfinite = '
                                 f'{self.config.max_consecutive_nonfinite} skipped updates in a row; lower '
                                 f'rl.learning_rate or rl.max_grad_norm, or inspect these windows')

