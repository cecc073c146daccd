"""The RL run's settings (`RLConfig`, METHOD.md sections 3-5, each field with the paper symbol it stands for) and
the learning-rate schedule they define."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import optax

from coars_jax.agents.episodes import AGENTS, RECOMMENDER, LLMBackendConfig
from coars_jax.coars.rewards import INVALID_USER_REWARD, REWARD_KINDS
from coars_jax.data.schema import TRAIN_POOLS
from coars_jax.sampling import LengthBuckets, SamplingParams
from coars_jax.sampling.scoring import MODEL_DISTRIBUTION
from coars_jax.training.optim import warmup_cosine_schedule


# R_t kinds the trainer knows: the two of `coars.segment_rewards` and the judge's terminal 2p - 1.
REWARDS = REWARD_KINDS + ('judge',)
OUTCOME_ASSIGNMENTS = ('final', 'episode')
JUDGE_QUESTION = 'Did the recommender find an item this user wants next? Answer Yes or No.'
JUDGE_SYSTEM = 'You review finished dialogues between a recommender and a user. Answer with one word, Yes or No.'
TRAIN_SPLIT = 'train'


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
  packed_tokens: int = 4096

  def __post_init__(self):
    if self.train_pool not in TRAIN_POOLS:
      raise ValueError(f'RLConfig.train_pool must be one of {TRAIN_POOLS}, found {self.train_pool!r}')
    for name, least in (
      ('iterations', 1),
      ('windows_per_iteration', 1),
      ('rollouts_per_window', 1),
      ('recommender_max_new_tokens', 1),
      ('user_max_new_tokens', 1),
      ('rows_per_microbatch', 1),
      ('warmup_iterations', 0),
      ('max_consecutive_nonfinite', 1),
      ('seed', 0),
      ('ppo_epochs', 1),
      ('packed_tokens', 1),
    ):
      _require_int(self, name, least)
    if self.score_chunk_size is not None:
      _require_int(self, 'score_chunk_size', 1)
    for name in (
      'group_baseline',
      'train_user_agent',
      'outcome_signed',
      'constrained',
      'reference_omits_samples',
      'teacher_reuses_student_cache',
      'remat',
      'prefix_reuse',
      'packed_update',
    ):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f'RLConfig.{name} must be a bool, found {getattr(self, name)!r}')
    if self.reward not in REWARDS:
      raise ValueError(f'RLConfig.reward must be one of {REWARDS}, found {self.reward!r}')
    if self.outcome_assign not in OUTCOME_ASSIGNMENTS:
      raise ValueError(f'RLConfig.outcome_assign must be one of {OUTCOME_ASSIGNMENTS}, found {self.outcome_assign!r}')
    for name, low, high in (
      ('lambda_sd', 0.0, math.inf),
      ('gamma', 0.0, 1.0),
      ('alpha', 0.0, 1.0),
      ('kl_coef', 0.0, math.inf),
      ('weight_decay', 0.0, 1.0),
      ('final_learning_rate_fraction', 0.0, 1.0),
    ):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f'RLConfig.{name} must be a number in [{low}, {high}], found {value!r}')
    for name in ('advantage_clip', 'learning_rate', 'max_grad_norm'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f'RLConfig.{name} must be a positive number, found {value!r}')
    penalty = self.invalid_user_reward
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not -math.inf < penalty <= 0:
      raise ValueError(
        f'RLConfig.invalid_user_reward must be a finite number <= 0 (breaking the format must never '
        f'pay), found {penalty!r}'
      )
    if self.warmup_iterations >= self.iterations and self.warmup_iterations > 0:
      raise ValueError(
        f'RLConfig.warmup_iterations ({self.warmup_iterations}) must be smaller than iterations ({self.iterations})'
      )
    if not isinstance(self.sampling, SamplingParams):
      raise TypeError(f'RLConfig.sampling must be a SamplingParams, found {type(self.sampling).__name__}')
    epsilon = self.ppo_epsilon
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 <= epsilon < 1:
      raise ValueError(f'RLConfig.ppo_epsilon must be a number in [0, 1), found {epsilon!r}')
    if self.ppo_epochs > 1 and not epsilon:
      raise ValueError(
        f'RLConfig.ppo_epochs = {self.ppo_epochs} needs ppo_epsilon > 0: several updates on one '
        f'rollout without the ratio clip would move the policy without bound'
      )
    if epsilon and (self.sampling.greedy or self.sampling.top_k is not None or self.sampling.top_p < 1.0):
      raise ValueError(
        f'RLConfig.ppo_epsilon needs sampling by temperature alone (no top_k / top_p, not greedy): '
        f"the ratio uses the rollout's log-probs as pi_old, found {self.sampling}"
      )
    if not isinstance(self.buckets, LengthBuckets):
      raise TypeError(f'RLConfig.buckets must be a LengthBuckets, found {type(self.buckets).__name__}')
    answers = tuple(self.judge_answers)
    if len(answers) != 2 or not all(isinstance(a, str) and a.strip() for a in answers) or answers[0] == answers[1]:
      raise ValueError(
        f'RLConfig.judge_answers must be two different non-empty strings (yes, no), found {self.judge_answers!r}'
      )
    object.__setattr__(self, 'judge_answers', answers)
    if self.reward == 'judge' and self.train_user_agent:
      raise ValueError(
        f'RLConfig.train_user_agent must be False with reward={self.reward!r}: that reward scores '
        f'the recommender only, so the user adapter would get no signal'
      )

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
    return LLMBackendConfig(
      recommender_max_new_tokens=self.recommender_max_new_tokens,
      user_max_new_tokens=self.user_max_new_tokens,
      sampling=self.sampling,
      buckets=self.buckets,
      constrained=self.constrained,
      prefix_reuse=self.prefix_reuse,
    )

  @property
  def outcome_every_turn(self) -> bool:
    """Under reward='outcome', whether every segment stays in the loss (`coars.outcome_rewards(every_turn=)`):
    while lambda_SD > 0, so that the ablation without the interaction reward keeps self-distillation on every
    turn; with lambda_SD = 0 an unrewarded segment's weight is 0, and the baseline keeps its rewarded ones only."""
    return self.lambda_sd > 0

  def reward_options(self) -> dict[str, Any]:
    """The static arguments of `rollout_rewards` for this config."""
    return dict(
      kind=self.reward,
      gamma=float(self.gamma),
      alpha=float(self.alpha),
      assign=self.outcome_assign,
      signed=self.outcome_signed,
      group_baseline=self.group_baseline,
      invalid_user_reward=float(self.invalid_user_reward),
      outcome_reward_user=self.train_user_agent,
      outcome_every_turn=self.outcome_every_turn,
    )

  def max_loss_rows(self, max_turns: int) -> int:
    """The most segments of one rollout that can carry loss: the bound the microbatch count K is sized for."""
    # One terminal segment per episode: the judge's, and the outcome baseline's (recommender only, so no invalid
    # user segment is penalised, and lambda_SD = 0, so no unrewarded turn stays in).
    terminal_only = self.outcome_assign == 'final' and (
      self.reward == 'judge' or (self.reward == 'outcome' and not self.train_user_agent and not self.outcome_every_turn)
    )
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


def learning_rate_schedule(config: RLConfig) -> optax.Schedule:
  """The AdamW step size per update (`optim.warmup_cosine_schedule`: linear warm-up from peak / (warm-up + 1) to the
  peak, then cosine decay to the final fraction). It is evaluated on the host at the optimizer's update count and
  passed to the step as a scalar, so the compiled step does not depend on the schedule (trainers with other
  budgets share it)."""
  return warmup_cosine_schedule(
    config.learning_rate,
    warmup_steps=config.warmup_iterations,
    total_steps=config.iterations,
    final_fraction=config.final_learning_rate_fraction,
  )
