"""The SFT warm start (project issue 4 section 3) for models that do not yet speak the dialogue protocol: scripted
recommender-user dialogues on TRAINING windows, played through the real episode loop so every prompt is exactly
what inference will show, then token-level cross-entropy on each agent's own completion tokens through its own
LoRA adapter (optionally the base too), in fixed-shape length-bucketed batches under one jitted, donating update
step; plus the Orbax save/load of the result and the ml_collections experiment (`default_config`, `validate`,
`run`) that `experiments/warm_start.py` calls.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
import shutil
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from flax import nnx

from coars_jax import configlib
from coars_jax.agents import backbone
from coars_jax.agents.episodes import (
  AGENTS,
  RECOMMENDER,
  USER,
  Episode,
  LLMBackend,
  LLMBackendConfig,
  RolloutConfig,
  ScriptedBackend,
  bind_peer,
  episode_metrics,
  run_episodes,
)
from coars_jax.agents.prompts import format_recommender_output, format_user_output
from coars_jax.agents.protocol import ACTION_INTERVALS, ITEM_LABEL, is_single_line_title, single_line
from coars_jax.agents.trajectory import Trajectory
from coars_jax.data import DATASETS, TRAIN_POOLS, Dataset, candidate_list, load_dataset
from coars_jax.models import tokenizer as tokenizer_lib
from coars_jax.models.adapter_checkpoint import load_adapters, save_adapters
from coars_jax.models.config import DecoderConfig, RopeScaling
from coars_jax.models.decoder import Decoder
from coars_jax.models.lora import BASE_PARAMS, LoRAConfig, add_lora, adapter_index
from coars_jax.parallel import distributed
from coars_jax.recsys import experiment as sasrec_experiment
from coars_jax.sampling import GREEDY, LengthBuckets, completion_log_probs
from coars_jax.sampling.buckets import left_pad, right_pad
from coars_jax.sampling.compilation import record_trace, trace_counts
from coars_jax.training.optim import clipped_adamw, warmup_cosine_schedule

# The name `record_trace` counts the update step under (`sampling.trace_counts()`).
STEP_TRACE_NAME = 'training.warm_start.step'
# The scripted user's score for a non-target lies in [0, .75) (dislike, skip or star, by q); for the target in
# [.75, 1] (click). Scores are written with two decimals, the shape the tokenizer's protocol corpus was built on.
SCORE_DECIMALS = 2


# --- config ------------------------------------------------------------------------------------------------------

# The research model's warm start (SmolLM2-135M-Instruct, issue 13): both agents' LoRA adapters on the frozen GGUF
# base, SFT on scripted dialogues built from out-of-fold peer signals, with the moving hint shown. Shared by
# configs/warm_start_smollm2.py and the SmolLM2 training configs (`training.experiment.smollm2_config`), so that
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


# --- scripted dialogues ------------------------------------------------------------------------------------------

# Rationales are templates over the history (recommender) or the recommended item (user), picked per (episode,
# turn) by a seeded generator; a few phrasings keep the adapters from learning one fixed sentence per agent.
RECOMMENDER_REASONS = (
  'The history ends with {last}, and this candidate fits right after it.',
  'After {last} and {earlier}, this is the closest candidate to the history.',
  'Listeners of {last} tend to pick this candidate next.',
  'It matches the items in the history, most of all {last}.',
)
USER_REASONS = {
  'click': ('{item} is exactly what I wanted after {last}.', 'I like {item}; it fits my history well.'),
  'star': ('{item} looks good, but I want to see more.', '{item} is close to my taste; show me more.'),
  'skip': ('{item} does not interest me right now.', 'I am not sure about {item}; it is not what I want.'),
  'dislike': ('{item} is not my taste at all.', 'I do not want {item}; it is far from my history.'),
}


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class DialogueScript:
  """What the scripted agents know about each episode row.

  Attributes:
    split: the split the windows come from.
    window_indices: int[E], the window each row plays.
    ranked: int32[E, C], each row's candidate list C in SASRec's order, best first; turn t recommends
      ranked[e, t - 1].
    similarity: float32[E, C], q in [-1, 1] of each ranked item (same order as `ranked`).
    target: int32[E], i*.
  """

  split: str
  window_indices: np.ndarray
  ranked: np.ndarray
  similarity: np.ndarray
  target: np.ndarray

  def recommended(self, episode: int, turn: int) -> int:
    """The item the scripted recommender names at turn t of row `episode`."""
    if not 1 <= turn <= self.ranked.shape[1]:
      raise ValueError(
        f'turn {turn} is outside 1..{self.ranked.shape[1]} (the candidate list has {self.ranked.shape[1]} items)'
      )
    return int(self.ranked[episode, turn - 1])


def dialogue_script(
  dataset: Dataset,
  peer,
  split: str,
  window_indices: Sequence[int],
  *,
  rollout: RolloutConfig = RolloutConfig(),
  shuffle_seed: int | None = None,
) -> DialogueScript:
  """The peer's ranking of each window's candidate list and the similarity q of every candidate.

  `peer` is a `recsys.CrossFittedPeer` (training windows get their user's out-of-fold SASRec, METHOD.md section 2),
  a `recsys.SASRec`, or any `agents.Peer` with `candidate_scores`. The candidate lists are `data.candidate_list`
  with the rollout's seed and size, the very lists `run_episodes` shows, and ties are broken towards the earlier
  candidate as `recsys.peer.top_candidate`'s argmax does, so the script's first pick is the peer's top candidate.
  With `shuffle_seed`, each row's order is instead a random permutation of its candidates (seeded by
  `shuffle_seed` and the window), and q still comes from the peer.
  """
  indices = np.asarray([int(i) for i in window_indices], np.int64)
  windows = dataset.split(split)
  candidates = np.stack(
    [candidate_list(dataset, split, int(i), rollout.candidate_seed, rollout.num_candidates) for i in indices]
  ).astype(np.int32)
  history = np.asarray(windows.history[indices], np.int32)
  lengths = np.asarray(windows.lengths[indices], np.int32)
  bound = bind_peer(peer, split, windows.users[indices])
  scores = np.asarray(bound.candidate_scores(history, lengths, candidates))
  if shuffle_seed is None:
    order = np.argsort(-scores, axis=1, kind='stable')
  else:
    order = np.stack(
      [np.random.default_rng([shuffle_seed, int(i), 0x5AF]).permutation(candidates.shape[1]) for i in indices]
    )
  similarity = np.asarray(bound.candidate_similarities(history, lengths, candidates), np.float32)
  return DialogueScript(
    split=split,
    window_indices=indices,
    ranked=np.take_along_axis(candidates, order, axis=1),
    similarity=np.take_along_axis(similarity, order, axis=1),
    target=np.asarray(windows.targets[indices], np.int32),
  )


class ScriptPeer:
  """The `agents.Peer` of a shuffled script: its ranking (so the hint and p_t) is the script's order, and q is the
  script's own (the peer's). It serves `run_episodes` on exactly the script's windows, in the script's order."""

  def __init__(self, script: DialogueScript):
    self.script = script

  def _check(self, candidates) -> None:
    candidates = np.asarray(candidates)
    if (
      candidates.shape != self.script.ranked.shape
      or not (np.sort(candidates, axis=1) == np.sort(self.script.ranked, axis=1)).all()
    ):
      raise ValueError('ScriptPeer serves only the candidate lists of its own script, in its order')

  def candidate_ranking(self, history, lengths, candidates):
    self._check(candidates)
    return self.script.ranked

  def top_candidates(self, history, lengths, candidates):
    return self.candidate_ranking(history, lengths, candidates)[:, 0]

  def candidate_similarities(self, history, lengths, candidates):
    self._check(candidates)
    # q in the caller's candidate order; the script holds it in its own ranked order.
    lookups = [
      dict(zip(ranked.tolist(), similarity.tolist()))
      for ranked, similarity in zip(self.script.ranked, self.script.similarity)
    ]
    return np.asarray(
      [[lookup[int(item)] for item in row] for lookup, row in zip(lookups, np.asarray(candidates))], np.float32
    )


def scripted_user_reaction(is_target: bool, similarity: float) -> tuple[str, float]:
  """(a_t, s_t) of the scripted user: the target is clicked, anything else is not.

  q in [-1, 1] is mapped linearly onto the action's range: [.75, 1] for the target, [0, .75) for the rest, so a
  non-target's action follows from q (dislike below q = -1/3, skip below 1/3, star above). Scores are rounded
  down to `SCORE_DECIMALS` and kept inside the interval.
  """
  unit = (min(max(float(similarity), -1.0), 1.0) + 1.0) / 2.0
  scale = 10**SCORE_DECIMALS
  if is_target:
    low, high = ACTION_INTERVALS['click']
    return 'click', math.floor((low + unit * (high - low)) * scale) / scale
  high = ACTION_INTERVALS['star'][1]
  score = min(math.floor(unit * high * scale), high * scale - 1) / scale
  action = next(name for name, (lo, hi) in ACTION_INTERVALS.items() if lo <= score < hi)
  return action, score


def _title_for_output(title: str) -> str:
  # The script writes the candidate's title verbatim; a title with stray whitespace or line breaks is written in
  # its one-line form, which the parser's normalized rule still matches to the candidate.
  return title if is_single_line_title(title) else single_line(title)


class ScriptedAgents:
  """The `ScriptedBackend` responder of the warm start: the recommender follows SASRec's ranking, the user clicks
  exactly on the target. Deterministic in (seed, episode row, turn)."""

  def __init__(self, dataset: Dataset, script: DialogueScript, *, seed: int = 0):
    self.script, self.seed = script, int(seed)
    titles = dataset.catalog.titles
    self.titles = titles
    windows = dataset.split(script.split)
    self.history_titles = [[titles[item] for item in windows.window(int(i)).history] for i in script.window_indices]

  def _choice(self, options: Sequence[str], episode: int, turn: int, agent: int) -> str:
    rng = np.random.default_rng([self.seed, int(self.script.window_indices[episode]), turn, agent])
    return options[int(rng.integers(len(options)))]

  def _history_names(self, episode: int) -> tuple[str, str]:
    history = self.history_titles[episode] or ['nothing yet']
    last = single_line(history[-1])
    earlier = single_line(history[-2]) if len(history) > 1 else last
    return last, earlier

  def __call__(self, agent: str, episode: int, turn: int, messages) -> str:
    del messages  # The script knows the episode; the prompt it was given is what the model will learn from.
    item = self.script.recommended(episode, turn)
    last, earlier = self._history_names(episode)
    if agent == RECOMMENDER:
      reason = self._choice(RECOMMENDER_REASONS, episode, turn, 0).format(last=last, earlier=earlier)
      return format_recommender_output(reason, _title_for_output(self.titles[item]))
    if agent != USER:
      raise ValueError(f'agent must be one of {AGENTS}, found {agent!r}')
    column = int(np.flatnonzero(self.script.ranked[episode] == item)[0])
    action, score = scripted_user_reaction(
      item == int(self.script.target[episode]), float(self.script.similarity[episode, column])
    )
    reason = self._choice(USER_REASONS[action], episode, turn, 1).format(item=single_line(self.titles[item]), last=last)
    return format_user_output(reason, action, score)


def draw_windows(dataset: Dataset, count: int, *, seed: int, split: str = 'train', pool: str = 'all') -> np.ndarray:
  """`count` distinct window indices of `split`'s `pool` (`WindowSplit.pool`), drawn with `seed`, ascending."""
  candidates = dataset.split(split).pool(pool)
  if count > len(candidates):
    raise ValueError(
      f'num_dialogues={count} exceeds the {len(candidates)} {split} windows of {dataset.name!r} in '
      f'pool {pool!r}; lower num_dialogues to at most {len(candidates)}'
    )
  rng = np.random.default_rng([seed, 0x5F7])
  return np.sort(candidates[rng.choice(len(candidates), size=count, replace=False)])


def scripted_dialogues(
  dataset: Dataset,
  peer,
  tokenizer,
  window_indices: Sequence[int],
  *,
  rollout: RolloutConfig = RolloutConfig(),
  split: str = 'train',
  seed: int = 0,
  shuffled: bool = False,
) -> list[Episode]:
  """Plays the scripted agents through `agents.run_episodes` (so prompts, memory and stopping are the real
  loop's) on `window_indices` of `split`; one episode per window, in order. `shuffled` scripts follow a random
  order of the candidates (seeded by `seed`), which the hint and the peer opinion follow too (`ScriptPeer`)."""
  script = dialogue_script(
    dataset, peer, split, window_indices, rollout=rollout, shuffle_seed=seed if shuffled else None
  )
  backend = ScriptedBackend(tokenizer, ScriptedAgents(dataset, script, seed=seed))
  return run_episodes(
    dataset,
    split,
    list(script.window_indices),
    backend,
    peer=ScriptPeer(script) if shuffled else peer,
    config=rollout,
    seed=seed,
  )


# --- SFT examples and fixed-shape batches ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class SFTExamples:
  """One row per agent message: the unpadded prompt x and completion y token ids, and the agent (0 recommender,
  1 user, as `Trajectory.agent`)."""

  prompts: tuple[np.ndarray, ...]
  completions: tuple[np.ndarray, ...]
  agent: np.ndarray
  # int[S]: where each row's Item-line title starts in its completion (-1: none, e.g. user rows); None = unknown.
  item_start: np.ndarray | None = None

  def __post_init__(self):
    if not len(self.prompts) == len(self.completions) == len(self.agent):
      raise ValueError(
        f'SFTExamples: {len(self.prompts)} prompts, {len(self.completions)} completions and '
        f'{len(self.agent)} agent ids; expected one of each per row'
      )
    if not len(self.prompts):
      raise ValueError('SFTExamples needs at least one row')
    if self.item_start is not None and len(self.item_start) != len(self.prompts):
      raise ValueError(f'SFTExamples: {len(self.item_start)} item starts for {len(self.prompts)} rows')

  def with_item_starts(self, tokenizer) -> 'SFTExamples':
    """These rows with `item_start` found by decoding each recommender completion (`item_title_start`)."""
    starts = np.asarray(
      [
        item_title_start(tokenizer, completion) if agent == AGENTS.index(RECOMMENDER) else -1
        for completion, agent in zip(self.completions, self.agent)
      ],
      np.int64,
    )
    return dataclasses.replace(self, item_start=starts)

  def __len__(self) -> int:
    return len(self.prompts)

  @classmethod
  def from_trajectory(cls, trajectory: Trajectory) -> 'SFTExamples':
    prompts = tuple(trajectory.prompt_tokens[row][trajectory.prompt_mask[row]] for row in range(len(trajectory.agent)))
    completions = tuple(
      trajectory.completion_tokens[row][trajectory.completion_mask[row]] for row in range(len(trajectory.agent))
    )
    return cls(prompts=prompts, completions=completions, agent=trajectory.agent.astype(np.int32))

  def max_completion_tokens(self, agent: str) -> int:
    """The longest completion of `agent`, end-of-turn token included (0 if it has no rows)."""
    rows = np.flatnonzero(self.agent == AGENTS.index(agent))
    return max((len(self.completions[row]) for row in rows), default=0)


def item_title_start(tokenizer, completion: np.ndarray) -> int:
  """The index of the first token after `Item:` in a recommender completion's ids (the title's first token), or
  -1 when its text has no Item line."""
  marker = f'\n{ITEM_LABEL}:'
  for end in range(1, len(completion) + 1):
    if marker in tokenizer.decode(completion[:end], skip_special_tokens=False):
      return end if end < len(completion) else -1
  return -1


def batch_shapes(examples: SFTExamples, buckets: LengthBuckets) -> np.ndarray:
  """int[S, 2]: the (prompt, completion) bucket of every row."""
  return np.asarray(
    [
      (buckets.prompt_length(len(p)), buckets.completion_length(len(c)))
      for p, c in zip(examples.prompts, examples.completions)
    ],
    np.int64,
  )


def batch_indices(examples: SFTExamples, batch_size: int, buckets: LengthBuckets, *, seed: int) -> Iterator[np.ndarray]:
  """Endless rows of `batch_size` row indices (-1 = filler), one epoch after another.

  Rows are grouped by their (prompt, completion) bucket, shuffled within groups, cut into batches, and the
  batches of an epoch are shuffled; a group's last partial batch is filled with -1. Grouping keeps each batch
  as short as its own rows (turn-1 prompts are far shorter than turn-5 ones) and the shapes to one per group.
  """
  shapes = batch_shapes(examples, buckets)
  groups = collections.defaultdict(list)
  for row, shape in enumerate(map(tuple, shapes)):
    groups[shape].append(row)
  keys = sorted(groups)
  rng = np.random.default_rng([seed, 0xBA7C])
  while True:
    batches = []
    for key in keys:
      rows = rng.permutation(groups[key])
      for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batches.append(np.concatenate([chunk, np.full(batch_size - len(chunk), -1, np.int64)]))
    for position in rng.permutation(len(batches)):
      yield batches[position]


def make_batch(
  examples: SFTExamples,
  rows: np.ndarray,
  buckets: LengthBuckets,
  adapter_of_agent: Sequence[int],
  *,
  pad_token_id: int = 0,
  item_loss_weight: float = 1.0,
) -> dict[str, np.ndarray]:
  """Host arrays of one batch: left-padded prompts and right-padded completions at their buckets, the adapter
  of each row (its agent's), the agent id, an empty completion mask on filler rows (index -1), which copy
  the first real row's tokens so every context has a real token, and each completion token's loss weight
  (`item_loss_weight` from a row's `item_start` on, 1 before; it needs `examples.item_start` unless it is 1)."""
  real = [int(row) for row in rows if row >= 0]
  if not real:
    raise ValueError('make_batch: the batch has no real rows')
  filled = [int(row) if row >= 0 else real[0] for row in rows]
  prompt_length = buckets.prompt_length(max(len(examples.prompts[row]) for row in real))
  completion_length = buckets.completion_length(max(len(examples.completions[row]) for row in real))
  prompt_tokens, prompt_mask = left_pad([examples.prompts[row] for row in filled], prompt_length, pad_token_id)
  completion_tokens, completion_mask = right_pad(
    [examples.completions[row] for row in filled], completion_length, pad_token_id
  )
  completion_mask[np.asarray(rows) < 0] = 0
  weight = np.ones(completion_mask.shape, np.float32)
  if item_loss_weight != 1.0:
    if examples.item_start is None:
      raise ValueError('make_batch: item_loss_weight != 1 needs SFTExamples.item_start (with_item_starts)')
    for position, row in enumerate(filled):
      start = int(examples.item_start[row])
      if start >= 0:
        weight[position, start:] = item_loss_weight
  agent = examples.agent[filled].astype(np.int32)
  return {
    'prompt_tokens': prompt_tokens,
    'prompt_mask': prompt_mask,
    'completion_tokens': completion_tokens,
    'completion_mask': completion_mask,
    'completion_weight': weight * completion_mask,
    'agent': agent,
    'adapter': np.asarray(adapter_of_agent, np.int32)[agent],
  }


# --- loss and update step ----------------------------------------------------------------------------------------


def sft_loss(model: Decoder, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Token-level cross-entropy of each row's own completion under its own adapter.

  A row's loss is the mean of -log pi(y_n | x, y_<n) over its masked completion tokens (the tokens its agent
  generated), weighted by `completion_weight` where the batch has it (`make_batch`); the batch loss is the mean
  over rows with any masked token. Returns (loss, metrics) where metrics hold each agent's mean row loss and row
  count.
  """
  log_probs = completion_log_probs(
    model,
    batch['prompt_tokens'],
    batch['prompt_mask'],
    batch['completion_tokens'],
    batch['completion_mask'],
    adapter=batch['adapter'],
  )
  mask = batch['completion_mask'].astype(jnp.float32)
  weight = batch.get('completion_weight', mask).astype(jnp.float32) * mask
  tokens = mask.sum(axis=1)
  row_loss = -(log_probs * weight).sum(axis=1) / jnp.maximum(weight.sum(axis=1), 1e-6)
  real = tokens > 0

  def mean_over(rows):
    count = rows.sum()
    return jnp.where(rows, row_loss, 0.0).sum() / jnp.maximum(count, 1), count

  loss, _ = mean_over(real)
  metrics = {'loss': loss}
  for index, agent in enumerate(AGENTS):
    metrics[f'loss_{agent}'], metrics[f'rows_{agent}'] = mean_over(real & (batch['agent'] == index))
  return loss, metrics


def trainable_filter(train_base: bool):
  """What the optimizer updates: the adapters (`nnx.LoRAParam`) alone, or every parameter."""
  return nnx.Param if train_base else nnx.LoRAParam


@functools.partial(jax.jit, static_argnames=('graphdef', 'train_base'), donate_argnames=('state',))
def _train_step(
  graphdef: nnx.GraphDef, state: nnx.State, batch: dict[str, jax.Array], *, train_base: bool
) -> tuple[nnx.State, dict[str, jax.Array]]:
  record_trace(STEP_TRACE_NAME)
  model, optimizer = nnx.merge(graphdef, state)
  grad_fn = nnx.value_and_grad(sft_loss, argnums=nnx.DiffState(0, trainable_filter(train_base)), has_aux=True)
  (_, metrics), grads = grad_fn(model, batch)
  metrics['grad_norm'] = optax.tree.norm(grads)
  optimizer.update(model, grads)
  return nnx.state((model, optimizer)), metrics


def learning_rate_schedule(config: WarmStartConfig) -> optax.Schedule:
  """The SFT step size per update: `optim.warmup_cosine_schedule` over `steps`."""
  return warmup_cosine_schedule(
    config.learning_rate,
    warmup_steps=config.warmup_steps,
    total_steps=config.steps,
    final_fraction=config.final_learning_rate_fraction,
  )


def make_optimizer(model: Decoder, config: WarmStartConfig) -> nnx.Optimizer:
  tx = clipped_adamw(
    max_grad_norm=config.max_grad_norm, weight_decay=config.weight_decay, learning_rate=learning_rate_schedule(config)
  )
  return nnx.Optimizer(model, tx, wrt=trainable_filter(config.train_base))


def agent_adapters(model: Decoder) -> tuple[int, ...]:
  """The adapter index of each agent in `AGENTS` order; both must exist on the model."""
  missing = [agent for agent in AGENTS if agent not in model.adapter_names]
  if missing:
    raise ValueError(
      f'the model has adapters {model.adapter_names}; the warm start needs one per agent '
      f'{list(AGENTS)} (missing {missing}); attach them with models.add_lora or prepare_model'
    )
  return tuple(adapter_index(model, agent) for agent in AGENTS)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainResult:
  """What `train_sft` reports: per-step metrics (host floats) and the number of update-step traces."""

  history: tuple[dict[str, float], ...]
  traces: int
  seconds: float


def train_sft(
  model: Decoder, examples: SFTExamples, config: WarmStartConfig, *, pad_token_id: int = 0, steps: int | None = None
) -> TrainResult:
  """Runs `config.steps` (or `steps`) updates on `model`, in place.

  The model and optimizer state are split once and donated to each jitted step, so parameters are updated in
  place on the device; the trained values are written back into `model` at the end (an exception mid-run leaves
  `model` holding donated buffers: rebuild it).
  """
  adapters = agent_adapters(model)
  optimizer = make_optimizer(model, config)
  graphdef, state = nnx.split((model, optimizer))
  order = batch_indices(examples, config.batch_size, config.buckets, seed=config.seed)
  total = config.steps if steps is None else steps
  history, traces_before = [], _step_traces()
  start = time.perf_counter()
  bar = tqdm.tqdm(range(total), desc='warm start', disable=not config.progress, dynamic_ncols=True)
  for _ in bar:
    batch = make_batch(
      examples,
      next(order),
      config.buckets,
      adapters,
      pad_token_id=pad_token_id,
      item_loss_weight=config.item_loss_weight,
    )
    state, metrics = _train_step(
      graphdef, state, {k: jnp.asarray(v) for k, v in batch.items()}, train_base=config.train_base
    )
    history.append({name: float(value) for name, value in jax.device_get(metrics).items()})
    bar.set_postfix(
      loss=f'{history[-1]["loss"]:.3f}',
      rec=f'{history[-1]["loss_recommender"]:.3f}',
      user=f'{history[-1]["loss_user"]:.3f}',
    )
  trained_model, _ = nnx.merge(graphdef, state)
  nnx.update(model, nnx.state(trained_model))
  return TrainResult(history=tuple(history), traces=_step_traces() - traces_before, seconds=time.perf_counter() - start)


def _step_traces() -> int:
  return trace_counts().get(STEP_TRACE_NAME, 0)


# --- the warm start as one call ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class WarmStartResult:
  """What `warm_start_agents` did.

  Attributes:
    episodes: the scripted dialogues trained on.
    examples: their agent messages as SFT rows.
    train: the optimizer run.
    dialogue_metrics: `episode_metrics` of the SASRec-ordered scripted dialogues (their Hit@1 is SASRec's on those
      windows); the shuffled ones are left out.
  """

  episodes: tuple[Episode, ...]
  examples: SFTExamples
  train: TrainResult
  dialogue_metrics: dict[str, float]

  def max_new_tokens(self, agent: str, margin: int = 8) -> int:
    """A token budget for greedy evaluation: the longest scripted message of `agent` plus `margin`; a model that
    imitates the script never needs more."""
    return self.examples.max_completion_tokens(agent) + margin


def prepare_model(model: Decoder, config: WarmStartConfig) -> Decoder:
  """Attaches the recommender and user adapters (`config.lora`, seeded by `config.seed`) unless the model has
  them; returns `model`."""
  if not model.adapter_names:
    add_lora(model, config.lora, list(AGENTS), rngs=nnx.Rngs(config.seed))
  agent_adapters(model)
  return model


def warm_start_agents(
  model: Decoder, tokenizer, dataset: Dataset, peer, config: WarmStartConfig = WarmStartConfig()
) -> WarmStartResult:
  """Scripted dialogues on `config.num_dialogues` training windows, then SFT of `model` on them, in place.

  `model` gets the two agents' adapters if it has none (`prepare_model`).
  """
  prepare_model(model, config)
  if len(tokenizer) > model.config.vocab_size:
    raise ValueError(
      f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
      f"{model.config.vocab_size}; use the model's own tokenizer"
    )
  windows = draw_windows(dataset, config.num_dialogues, seed=config.seed, pool=config.train_pool)
  episodes = scripted_dialogues(dataset, peer, tokenizer, windows, rollout=config.rollout, seed=config.seed)
  if config.shuffled_dialogues:
    shuffled_windows = draw_windows(dataset, config.shuffled_dialogues, seed=config.seed + 1, pool=config.train_pool)
    episodes += scripted_dialogues(
      dataset, peer, tokenizer, shuffled_windows, rollout=config.rollout, seed=config.seed, shuffled=True
    )
  pad_id = tokenizer_lib.special_token_ids(tokenizer).pad_id
  examples = SFTExamples.from_trajectory(Trajectory.from_episodes(episodes, pad_token_id=pad_id))
  if config.item_loss_weight != 1.0:
    examples = examples.with_item_starts(tokenizer)
  logging.info('warm start: %d dialogues, %d agent messages', len(episodes), len(examples))
  train = train_sft(model, examples, config, pad_token_id=pad_id)
  return WarmStartResult(
    episodes=tuple(episodes), examples=examples, train=train, dialogue_metrics=episode_metrics(episodes[: len(windows)])
  )


def evaluate_dialogues(
  model: Decoder,
  tokenizer,
  dataset: Dataset,
  peer,
  window_indices: Sequence[int],
  *,
  split: str = 'val',
  rollout: RolloutConfig = RolloutConfig(),
  recommender_max_new_tokens: int = 64,
  user_max_new_tokens: int = 64,
  buckets: LengthBuckets = LengthBuckets(),
  seed: int = 0,
) -> tuple[dict[str, float], list[Episode]]:
  """Greedy rollouts of both adapted agents on `window_indices` of `split`: (`episode_metrics`, episodes)."""
  backend = LLMBackend(
    model,
    tokenizer,
    adapters={RECOMMENDER: RECOMMENDER, USER: USER},
    config=LLMBackendConfig(
      recommender_max_new_tokens=recommender_max_new_tokens,
      user_max_new_tokens=user_max_new_tokens,
      sampling=GREEDY,
      buckets=buckets,
    ),
  )
  episodes = run_episodes(dataset, split, list(window_indices), backend, peer=peer, config=rollout, seed=seed)
  return episode_metrics(episodes), episodes


# --- checkpoints -------------------------------------------------------------------------------------------------

BASE_DIR, ADAPTERS_DIR, META_FILE = 'base', 'adapters', 'warm_start.json'


def save_warm_start(
  model: Decoder, directory: str | os.PathLike, *, save_base: bool, metadata: dict[str, Any] | None = None
) -> pathlib.Path:
  """Writes the adapters (`models.save_adapters`) and, if `save_base`, the base weights (Orbax) with the decoder
  config, under `directory`; `META_FILE` is written last, so a folder without it is an interrupted save. In a
  multi-host run every process calls it (the Orbax saves are collective); the primary alone clears the old files
  and writes `META_FILE`."""
  directory = pathlib.Path(directory).absolute()  # Orbax requires absolute paths.
  meta_path = directory / META_FILE
  if distributed.is_primary():
    directory.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)
  distributed.barrier(f'warm-start-cleared-{directory}')
  save_adapters(model, directory / ADAPTERS_DIR, overwrite=True)
  if distributed.is_primary() and (directory / BASE_DIR).exists():
    shutil.rmtree(directory / BASE_DIR)
  distributed.barrier(f'warm-start-base-cleared-{directory}')
  if save_base:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / BASE_DIR, nnx.to_pure_dict(nnx.state(model, BASE_PARAMS)))
    checkpointer.wait_until_finished()
  meta = {'decoder_config': dataclasses.asdict(model.config), 'base_saved': bool(save_base), **(metadata or {})}
  if distributed.is_primary():
    tmp = directory / (META_FILE + '.tmp')
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    os.replace(tmp, meta_path)
  distributed.barrier(f'warm-start-saved-{directory}')
  return directory


def load_warm_start(directory: str | os.PathLike, base: Decoder | None = None) -> tuple[Decoder, dict[str, Any]]:
  """(model with the warm-started adapters, metadata) from `save_warm_start`'s folder.

  A folder with a saved base rebuilds the decoder from its config and weights; otherwise `base` (the frozen base
  the adapters were trained on, e.g. from `load_hf_checkpoint`) receives the adapters, in place.
  """
  directory = pathlib.Path(directory).absolute()
  meta_path = directory / META_FILE
  if not meta_path.is_file():
    raise FileNotFoundError(
      f'{directory} holds no complete warm start ({META_FILE} is missing); run '
      f'experiments/warm_start.py or save_warm_start first'
    )
  meta = json.loads(meta_path.read_text())
  if meta['base_saved']:
    fields = dict(meta['decoder_config'])
    fields['eos_token_ids'] = tuple(fields['eos_token_ids'])
    if fields.get('rope_scaling') is not None:
      fields['rope_scaling'] = RopeScaling(**fields['rope_scaling'])
    model = Decoder(DecoderConfig(**fields), rngs=nnx.Rngs(0))
    state = nnx.state(model, BASE_PARAMS)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(state))
    restored = ocp.StandardCheckpointer().restore(directory / BASE_DIR, abstract)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
  elif base is None:
    raise ValueError(
      f'{directory} holds adapters only (the base was frozen); pass the base model they were trained on as base='
    )
  else:
    model = base
  load_adapters(model, directory / ADAPTERS_DIR)
  return model, meta


# --- the experiment ----------------------------------------------------------------------------------------------


def default_config(dataset: str = 'lastfm') -> ml_collections.ConfigDict:
  """Defaults for `configs/warm_start_*.py`; each field documents what it controls."""
  defaults = WarmStartConfig()
  return ml_collections.ConfigDict(
    {
      'dataset': dataset,  # lastfm | movielens | instruments
      'data_root': '',  # '' -> $COARS_DATA_DIR -> the per-user cache folder
      'allow_download': True,  # fetch missing public originals (checksum-verified) when the network allows
      'workdir': f'runs/warm_start_{dataset}',  # adapters/, base/ (when trained) and warm_start.json
      'model': 'tiny',  # 'tiny' (random init, own tokenizer), 'smollm2-135m', or an HF checkpoint folder
      'tokenizer_vocab_size': tokenizer_lib.DEFAULT_VOCAB_SIZE,  # the tiny tokenizer's size (model='tiny' only)
      'model_seed': 0,  # the tiny model's random initialisation
      'sasrec_workdir': f'runs/sasrec_{dataset}',  # where SASRec's checkpoint is (trained there if absent)
      'sasrec_seed': 0,  # which SASRec training seed ranks the candidates and gives q
      'sasrec_max_epochs': 0,  # cap on SASRec's epochs when it is trained here (0 = its own default, early-stopped)
      'sasrec_folds': 5,  # K user folds: training windows get an out-of-fold SASRec (0 = the full one, an oracle)
      'sasrec_fold_seed': 0,  # the permutation that deals training users into folds
      'warm_start': {f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults) if f.name != 'buckets'},
      'prompt_buckets': defaults.buckets.prompt,
      'completion_buckets': defaults.buckets.completion,
      'eval': {
        'split': 'val',  # the windows greedy rollouts are scored on
        'num_windows': 8,  # the first this many windows of the split (0 skips the evaluation)
        'token_margin': 8,  # greedy budget = longest scripted message of that agent + this
      },
    }
  )


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails on the first bad field, naming it; runs before any data is read."""
  configlib.check_keys(config, default_config(config.get('dataset', 'lastfm')))
  configlib.require(config.dataset in DATASETS, 'dataset', f'one of {DATASETS}', config.dataset)
  for name in ('workdir', 'sasrec_workdir', 'model'):
    configlib.require(isinstance(config[name], str) and config[name], name, 'a non-empty string', config[name])
  configlib.require(
    backbone.is_known(config.model),
    'model',
    f'one of {sorted(backbone.ALIASES)} or an existing HF checkpoint folder',
    config.model,
  )
  configlib.require(config.eval.split in ('val', 'test'), 'eval.split', "'val' or 'test'", config.eval.split)
  for name in ('num_windows', 'token_margin'):
    value = config.eval[name]
    configlib.require(
      isinstance(value, int) and not isinstance(value, bool) and value >= 0, f'eval.{name}', 'an int >= 0', value
    )
  configlib.require_peer_fields(config)
  try:
    warm_start_config(config)
  except (TypeError, ValueError) as error:
    raise configlib.ConfigError(f'Config group warm_start / prompt_buckets / completion_buckets: {error}') from error


def warm_start_config(config: ml_collections.ConfigDict) -> WarmStartConfig:
  return WarmStartConfig(
    **config.warm_start.to_dict(),
    buckets=LengthBuckets(
      prompt=tuple(int(n) for n in config.prompt_buckets), completion=tuple(int(n) for n in config.completion_buckets)
    ),
  )


def load_model_and_tokenizer(config: ml_collections.ConfigDict) -> tuple[Decoder, Any]:
  """The base decoder and its tokenizer (`agents.backbone.load_backbone`): the `tiny` preset at random init with
  the tiny tokenizer, SmolLM2-135M-Instruct from its GGUF, or an HF checkpoint folder."""
  return backbone.load_backbone(
    backbone.BackboneSpec(
      name=config.model,
      data_root=config.data_root or None,
      allow_download=config.allow_download,
      tiny_vocab_size=config.tokenizer_vocab_size,
      seed=config.model_seed,
    )
  )


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The whole experiment: load data, SASRec, model and tokenizer; warm start; save under `workdir`; evaluate
  greedy rollouts on the first `eval.num_windows` windows of `eval.split`. Returns the summary it also saves."""
  validate(config)
  settings = warm_start_config(config)
  dataset = load_dataset(config.dataset, config.data_root or None, allow_download=config.allow_download)
  full_sasrec, peer = sasrec_experiment.train_or_load_peer(
    sasrec_experiment.peer_config(
      config.dataset,
      workdir=config.sasrec_workdir,
      data_root=config.data_root,
      allow_download=config.allow_download,
      progress=settings.progress,
      max_epochs=config.sasrec_max_epochs,
    ),
    dataset,
    config.sasrec_seed,
    num_folds=config.sasrec_folds,
    fold_seed=config.sasrec_fold_seed,
  )
  model, tokenizer = load_model_and_tokenizer(config)
  result = warm_start_agents(model, tokenizer, dataset, peer, settings)
  history = result.train.history
  tail = history[-min(len(history), 20) :]
  summary: dict[str, Any] = {
    'dataset': dataset.name,
    'model': config.model,
    'train_base': settings.train_base,
    'dialogues': len(result.episodes),
    'agent_messages': len(result.examples),
    'scripted_dialogue_metrics': result.dialogue_metrics,
    'steps': len(history),
    'first_loss': history[0]['loss'],
    'final_loss_mean_last_20': float(np.mean([h['loss'] for h in tail])),
    'train_seconds': round(result.train.seconds, 1),
    'update_step_traces': result.train.traces,
  }
  if config.eval.num_windows:
    count = min(config.eval.num_windows, len(dataset.split(config.eval.split)))
    metrics, _ = evaluate_dialogues(
      model,
      tokenizer,
      dataset,
      full_sasrec,
      range(count),
      split=config.eval.split,
      rollout=settings.rollout,
      recommender_max_new_tokens=result.max_new_tokens(RECOMMENDER, config.eval.token_margin),
      user_max_new_tokens=result.max_new_tokens(USER, config.eval.token_margin),
      buckets=settings.buckets,
      seed=settings.seed,
    )
    summary['eval'] = {'split': config.eval.split, 'windows': count, **metrics}
  save_warm_start(
    model, config.workdir, save_base=settings.train_base, metadata={'config': config.to_dict(), 'summary': summary}
  )
  return summary
