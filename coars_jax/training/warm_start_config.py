"""The warm start's settings (`WarmStartConfig`) and the research model's defaults for it: SmolLM2's SFT budget,
training pool, length buckets and SASRec settings, shared by every SmolLM2 config so that every method starts
from one warm start.
"""

from __future__ import annotations

import dataclasses


from coars_jax.agents.episodes import (
  RolloutConfig,
)
from coars_jax.data import TRAIN_POOLS
from coars_jax.models.lora import LoRAConfig
from coars_jax.sampling import LengthBuckets


# --- config ------------------------------------------------------------------------------------------------------

# The research model's warm start (SmolLM2-135M-Instruct, issue 13): both agents' LoRA adapters on the frozen GGUF
# base, SFT on scripted dialogues built from out-of-fold peer signals, with the moving hint shown. Shared by
# configs/warm_start_smollm2.py and the SmolLM2 training configs (`pipeline.experiment.smollm2_config`), so that
# every method starts from one warm start. The pretrained base learns the protocol in tens of batch-1 steps (a
# 24-step probe took its ValidRatio from 0 to 0.95); one ~1,000-token row peaks at about 8.4 GB here, so batch 1.
SMOLLM2_WARM_START = {
  'train_base': False,
  'num_dialogues': 64,
  'shuffled_dialogues': 16,
  'steps': 48,
  'batch_size': 1,
  'learning_rate': 5e-4,
  'warmup_steps': 4,
  # item_loss_weight stays 1, chosen on val windows (BUILD_NOTES Part 11): on the study's first 16 val windows the
  # weight-1 warm start gave recommender ValidRatio 1.000 and Hit@1 0.062, the weight-4 one 0.875 and 0.000; the
  # demo's 24-step warm start also named fewer candidates at weight 4 (0.125 against 0.583 on its 8 windows).
}
# Training windows of the SmolLM2 configs: each training user's last window. On LastFM the out-of-fold peer's top
# pick is the target in 79% of windows drawn from all training windows, but in 36% of last windows (val 35%,
# test 34%): earlier windows' targets are popular items of the training period, which val and test are not.
SMOLLM2_TRAIN_POOL = 'last_per_user'
# Length buckets of the SmolLM2 configs: its prompts are 300 to 1,000 tokens (x + d up to 2,048) and its messages
# 20 to 90, so a few coarse buckets; each (prompt, completion) pair is one more compile of a 30-layer program, which
# costs 30 to 60 s on 2 cores, more than the padding saved.
SMOLLM2_BUCKETS = {'prompt_buckets': (512, 1024, 2048), 'completion_buckets': (64, 128)}
# SASRec for the SmolLM2 configs: capped epochs (CPU budget) and 5 user folds for the training windows' peer.
SMOLLM2_SASREC = {'sasrec_max_epochs': 20, 'sasrec_folds': 5}


@dataclasses.dataclass(frozen=True, kw_only=True)
class WarmStartConfig:
  """The scripted dialogues and the SFT run.

  Attributes:
    num_dialogues: how many training windows get a scripted dialogue (drawn without replacement, seeded).
    train_pool: which training windows they are drawn from (`data.TRAIN_POOLS`): 'all', or 'last_per_user', each
      training user's last window, shaped like the val and test windows (see `WindowSplit.pool`).
    shuffled_dialogues: how many more training windows (a second seeded draw) get a dialogue whose scripted
      recommender, hint and peer follow a random order of the candidates instead of SASRec's. On training windows
      SASRec's top candidate is nearly always the target, so its scripts are one turn long and their Item lines
      skew towards what SASRec fits; random orders give five-turn dialogues with memory, moving hints and
      rejections, and an Item line that only copying the hint predicts.
    max_turns: T_u of the scripted episodes; the script recommends SASRec's t-th ranked candidate at turn t, so
      a dialogue runs until the target's rank or T_u.
    candidate_seed: the seed of the candidate lists C (`data.candidate_list`), as in `agents.RolloutConfig`.
    show_hint: whether the recommender prompt carries SASRec's hint; must match what inference will use.
    steps: optimizer updates.
    batch_size: agent messages (rows) per update; every batch has exactly this many rows (partial batches are
      filled with rows whose loss mask is empty), so shapes depend only on the length buckets.
    learning_rate: peak AdamW step size, reached after `warmup_steps` linear steps, then cosine-decayed to
      `final_learning_rate_fraction` of the peak at `steps`.
    warmup_steps: linear warm-up updates: update k < warm-up uses peak (k + 1) / (warmup_steps + 1).
    final_learning_rate_fraction: where the cosine decay ends, as a fraction of the peak.
    weight_decay: AdamW's decoupled weight decay.
    max_grad_norm: global gradient-norm clip.
    lora_rank: r of the adapters `prepare_model` attaches (when the model has none yet).
    lora_alpha: the LoRA alpha (delta scaled by alpha / r).
    lora_layers: the layers that get adapters (`LoRAConfig.layers`: 'all', 'top_third', ...).
    train_base: also train the base weights, shared by both agents. Off for pretrained bases (the paper trains
      adapters only); on for a randomly initialised base such as the `tiny` preset, which has no language to
      adapt and whose frozen random (tied) embedding would otherwise fix the output projection.
    item_loss_weight: the weight of the recommender's `Item:` title tokens (and its end-of-turn token) in its
      row's loss, against 1 for the other tokens; a row's loss is its weighted mean. The reason templates are
      most of a recommender message, so at 1 the title the ValidRatio bar depends on is a small share of the loss.
    seed: the dialogue draw, the batch order and the adapters' initial values.
    buckets: prompt and completion lengths batches are padded up to; a run compiles at most one update program
      per (prompt bucket, completion bucket) pair its batches use.
    progress: show a tqdm bar.
  """

  num_dialogues: int = 512
  train_pool: str = 'all'
  shuffled_dialogues: int = 0
  max_turns: int = 5
  candidate_seed: int = 0
  show_hint: bool = False
  steps: int = 1000
  batch_size: int = 8
  learning_rate: float = 1e-3
  warmup_steps: int = 20
  final_learning_rate_fraction: float = 0.1
  weight_decay: float = 0.0
  max_grad_norm: float = 1.0
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_layers: str = 'all'
  train_base: bool = False
  item_loss_weight: float = 1.0
  seed: int = 0
  buckets: LengthBuckets = LengthBuckets()
  progress: bool = True

  def __post_init__(self):
    for name, least in (
      ('num_dialogues', 1),
      ('shuffled_dialogues', 0),
      ('max_turns', 1),
      ('candidate_seed', 0),
      ('steps', 1),
      ('batch_size', 1),
      ('warmup_steps', 0),
      ('lora_rank', 1),
      ('seed', 0),
    ):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f'WarmStartConfig.{name} must be an int >= {least}, found {value!r}')
    for name in ('learning_rate', 'lora_alpha', 'max_grad_norm', 'item_loss_weight'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f'WarmStartConfig.{name} must be a positive number, found {value!r}')
    for name in ('weight_decay', 'final_learning_rate_fraction'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f'WarmStartConfig.{name} must be a number in [0, 1], found {value!r}')
    for name in ('show_hint', 'train_base', 'progress'):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f'WarmStartConfig.{name} must be a bool, found {getattr(self, name)!r}')
    self.lora  # checks lora_layers' spelling
    if self.train_base and self.lora_layers != 'all':
      raise ValueError(
        f"WarmStartConfig.lora_layers must be 'all' when train_base is on (found "
        f'{self.lora_layers!r}): the backward pass stops below the lowest adapted layer'
      )
    if self.train_pool not in TRAIN_POOLS:
      raise ValueError(f'WarmStartConfig.train_pool must be one of {TRAIN_POOLS}, found {self.train_pool!r}')
    if self.warmup_steps >= self.steps:
      raise ValueError(f'WarmStartConfig.warmup_steps ({self.warmup_steps}) must be smaller than steps ({self.steps})')
    if not isinstance(self.buckets, LengthBuckets):
      raise TypeError(f'WarmStartConfig.buckets must be a sampling.LengthBuckets, found {type(self.buckets).__name__}')

  @property
  def rollout(self) -> RolloutConfig:
    """The protocol the scripted episodes are played under."""
    return RolloutConfig(max_turns=self.max_turns, candidate_seed=self.candidate_seed, show_hint=self.show_hint)

  @property
  def lora(self) -> LoRAConfig:
    return LoRAConfig(rank=self.lora_rank, alpha=float(self.lora_alpha), layers=self.lora_layers)
