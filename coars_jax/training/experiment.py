"""The training experiment behind `python -m experiments.train --config=configs/<dataset>_<model>.py[:method]`:
SASRec (trained or loaded) -> the agents (the SFT warm start, trained or loaded; or fresh adapters on the base)
-> RL iterations (`rl.RLTrainer`) with periodic greedy val evaluation, Orbax checkpoints and
metrics -> a greedy test evaluation with the user-agent F1, written as rows to `<workdir>/results.json`.

Methods (`METHODS`): 'zero_shot' and 'reflexion' train nothing and are evaluated only; 'outcome_rl', 'judge_rl'
and 'coars' run the same RL loop with the same budget (iterations x windows x rollouts) and differ only in the
reward, lambda_SD and which adapters learn, fields `validate` checks against the method. A checkpoint holds the
adapters, the optimizer state, the RNG key and the data position, so `resume=True` continues exactly as if the
run had never stopped; the final and best (by val Hit@1) adapters are also exported in the warm-start folder
format that `experiments.evaluate --checkpoint=` reads.

Preemption: SIGTERM stops the run at its next safe point (between generation calls, or after the update in flight)
with a checkpoint, and `run` returns normally. A checkpoint is sealed by a manifest of its files' sizes and sha256
once Orbax has committed it; a resume restores the newest checkpoint that verifies and sets the others aside under
`<workdir>/checkpoints_rejected`, so a SIGKILL at any moment, a truncated file or a full disk costs at most the
iterations since the last good checkpoint, never a wrong resume.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import shutil
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from flax import nnx

from coars_jax import configlib
from coars_jax.announce import about, announce
from coars_jax.agents import backbone
from coars_jax.agents.episodes import AGENTS, LLMBackend, LLMBackendConfig, RolloutConfig, episode_metrics
from coars_jax.agents.reflexion import ReflexionConfig
from coars_jax.data import DATASETS, Dataset, load_dataset
from coars_jax.data.user_sim import UserSimSet, user_sim_set
from coars_jax.eval.agentic import AgenticEvalConfig, evaluate_agentic, play_windows
from coars_jax.eval.metrics import paired_bootstrap
from coars_jax.eval.user_f1 import UserF1Config
from coars_jax.models import peft_adapters
from coars_jax.models import tokenizer as tokenizer_lib
from coars_jax.models.decoder import Decoder
from coars_jax.models.lora import BASE_PARAMS, LoRAConfig, add_lora
from coars_jax.parallel import distributed, planner
from coars_jax.parallel.mesh import make_mesh, mesh_shape_from_config, validate_mesh_shape
from coars_jax.parallel.rules import DEFAULT_RULES, make_rules
from coars_jax.recsys import experiment as sasrec_experiment
from coars_jax.recsys.sasrec import SASRec
from coars_jax.sampling import GREEDY, LengthBuckets, SamplingParams
from coars_jax.training import credit_sample, faults, rl
from coars_jax.training import warm_start as warm_start_lib

# Checkpoints and preemption live in their own modules; their names stay importable from here.
from coars_jax.training.checkpointing import (
  BEST_METRIC,  # noqa: F401
  CHECKPOINT_DIR,  # noqa: F401
  MANIFEST_FILE,  # noqa: F401
  REJECTED_DIR,  # noqa: F401
  CheckpointError,  # noqa: F401
  checkpoint_manager,  # noqa: F401
  checkpoint_problem,  # noqa: F401
  export_adapters,  # noqa: F401
  read_checkpoint,  # noqa: F401
  restore_checkpoint,  # noqa: F401
  restore_latest,  # noqa: F401
  save_checkpoint,  # noqa: F401
  seal_checkpoint,  # noqa: F401
  step_folder,  # noqa: F401
)
from coars_jax.training.metrics import METRICS_FILE, TENSORBOARD_DIR, MetricsWriter, json_value
from coars_jax.training.preemption import Preempted, PreemptionGuard, guarded_iteration  # noqa: F401

METHODS = ('zero_shot', 'reflexion', 'outcome_rl', 'judge_rl', 'coars')
TRAINED_METHODS = ('outcome_rl', 'judge_rl', 'coars')
# The fields a baseline method fixes: (rl.reward, rl.lambda_sd, rl.train_user_agent).
METHOD_FIELDS = {'outcome_rl': ('outcome', 0.0, False), 'judge_rl': ('judge', 0.0, False)}
# The ablations of coars (METHOD.md section 8 and issue 13), as data: each sets exactly ONE field of the coars
# config (dotted name -> value), so that its row differs from CoARS's by that one thing. Picked by the config
# files' argument as 'coars-<name>' (`parse_method`); the rows are labelled the same way (`row_label`).
ABLATIONS = {
  'outcome_reward': {'rl.reward': 'outcome'},  # terminal 2 hit_T - 1 instead of Eq. 7-8, both agents, SD kept
  'no_sd': {'rl.lambda_sd': 0.0},  # without self-distillation
  'rec_only': {'rl.train_user_agent': False},  # without co-evolution: the recommender alone learns
  'constant_d': {'rl.gamma': 1.0},  # D_t = 1 on every turn instead of gamma^(t-1)
  'd_without_samples': {'rl.reference_omits_samples': True},  # d without the sampled items and reactions
}
ABLATION_SEPARATOR = '-'
# Warm-start fields that other groups own: the protocol (rollout), the adapters (lora), the buckets and the bar.
_WARM_START_SHARED = (
  'max_turns',
  'candidate_seed',
  'show_hint',
  'lora_rank',
  'lora_alpha',
  'lora_layers',
  'buckets',
  'progress',
  'train_pool',
)
RESULTS_FILE, BEFORE_FILE, CONFIG_FILE, ZERO_SHOT_FILE = 'results.json', 'before.json', 'config.json', 'zero_shot.json'
WARM_START_DIR, FINAL_DIR, BEST_DIR, EVAL_RESUME_DIR = 'warm_start', 'final', 'best', 'eval_resume'
# What a run writes under its workdir; each must stay inside it (`run_paths`).
RUN_OUTPUTS = (
  CONFIG_FILE,
  RESULTS_FILE,
  BEFORE_FILE,
  ZERO_SHOT_FILE,
  CHECKPOINT_DIR,
  REJECTED_DIR,
  WARM_START_DIR,
  FINAL_DIR,
  BEST_DIR,
  METRICS_FILE,
  TENSORBOARD_DIR,
  credit_sample.TRAJECTORY_DIR,
  EVAL_RESUME_DIR,
)


# --- config ------------------------------------------------------------------------------------------------------


def default_config(dataset: str = 'lastfm', model: str = 'tiny', method: str = 'coars') -> ml_collections.ConfigDict:
  """Defaults for `configs/<dataset>_<model>.py`; every field names what it stands for (paper symbols where there
  is one). `method` also sets the fields that method fixes (`METHOD_FIELDS`); 'coars-<ablation>' (`ABLATIONS`,
  e.g. 'coars-no_sd') is coars with that ablation's one field set (`with_ablation`)."""
  base, ablations = parse_method(method)
  rl_defaults, rollout, reflexion = rl.RLConfig(), RolloutConfig(), ReflexionConfig()
  ws = warm_start_lib.WarmStartConfig()
  config = ml_collections.ConfigDict(
    {
      'dataset': dataset,  # lastfm | movielens | instruments
      'data_root': '',  # '' -> $COARS_DATA_DIR -> the per-user cache folder
      'allow_download': True,  # fetch missing public originals (checksum-verified) when the network allows
      'workdir': f'runs/train_{model}_{dataset}_{method}',  # results.json, metrics.jsonl, checkpoints/, final/, best/
      'model': model,  # the shared base LLM: 'tiny', 'smollm2-135m', or an HF checkpoint folder
      'tokenizer_vocab_size': tokenizer_lib.DEFAULT_VOCAB_SIZE,  # the tiny tokenizer's size (model='tiny' only)
      'model_seed': 0,  # the tiny model's random initialisation
      'peft_adapters': '',  # a folder with a PEFT LoRA folder per agent to start from, in place of a warm start
      'sasrec_workdir': f'runs/sasrec_{dataset}',  # the peer's checkpoints (trained there if absent)
      'sasrec_seed': 0,  # which SASRec training seed gives the hint, p_t, q_t and the ranks in d
      'sasrec_max_epochs': 0,  # cap on SASRec's epochs when it is trained here (0 = its own default, early-stopped)
      'sasrec_folds': 5,  # K user folds: training windows get an out-of-fold SASRec (0 = the full one, an oracle)
      'sasrec_fold_seed': 0,  # the permutation that deals training users into folds
      'train_pool': 'all',  # training windows the warm start and RL draw from: all | last_per_user (data.TRAIN_POOLS)
      'method': base,  # zero_shot | reflexion | outcome_rl | judge_rl | coars
      'label': '',  # the rows' method name; '' = the method, with ablation suffixes for coars
      'resume': False,  # continue from the latest checkpoint in workdir (same data order and RNG)
      'stop_after': 0,  # stop this invocation after this many iterations (0 = run to rl.iterations); resume later
      'progress': True,  # tqdm bars
      'mesh': {'data': -1, 'fsdp': 1, 'tensor': 1},  # device mesh axes -> sizes; -1 = every remaining device
      # Logical axis -> the mesh axes that split it, comma-separated ('' = kept whole); parallel.DEFAULT_RULES.
      # E.g. --config.sharding_rules.vocab='' keeps the vocabulary whole.
      'sharding_rules': {name: ','.join(axes) for name, axes in DEFAULT_RULES},
      'plan': planner.plan_defaults(),  # the device the run is sized for (experiments.plan_memory)
      'distributed': distributed.distributed_defaults(),  # multi-host start-up (jax.distributed.initialize)
      'lora': {
        'rank': 8,  # r of both agents' adapters
        'alpha': 16.0,  # LoRA alpha (delta scaled by alpha / r)
        'seed': 0,  # the adapters' initialisation (when no warm start attaches them)
        # Layers with adapters: all | top_half | top_third | top:N | A-B | i,j,k. The backward pass stops at the
        # lowest adapted layer, so the top third backpropagates a third of the model.
        'layers': 'all',
      },
      'warm_start': {
        'enabled': model == backbone.TINY,  # SFT warm start before RL (the random tiny base needs it)
        'folder': '',  # where it lives: loaded if complete, else trained there ('' = <workdir>/warm_start)
        **{f.name: getattr(ws, f.name) for f in dataclasses.fields(ws) if f.name not in _WARM_START_SHARED},
      },
      'rollout': {
        'max_turns': rollout.max_turns,  # T_u
        'candidate_seed': rollout.candidate_seed,  # the seed of the candidate lists C
        'show_hint': rollout.show_hint,  # SASRec's top candidate in x_rec_t
        'show_peer_opinion': rollout.show_peer_opinion,  # p_t in x_user_t
      },
      'sampling': {  # the rollout policy's distribution (evaluation is greedy)
        'temperature': 1.0,
        'top_k': 0,  # 0 = off
        'top_p': 1.0,
      },
      'recommender_max_new_tokens': rl_defaults.recommender_max_new_tokens,  # budget of m_rec_t
      'user_max_new_tokens': rl_defaults.user_max_new_tokens,  # budget of m_user_t
      'prompt_buckets': LengthBuckets().prompt,  # x_t, x_t + d and judge prompts are left-padded to these
      'completion_buckets': LengthBuckets().completion,  # y_t is right-padded to these
      'rl': {
        'iterations': rl_defaults.iterations,  # RL iterations, one update of both adapters each
        'windows_per_iteration': rl_defaults.windows_per_iteration,  # users u per iteration
        'rollouts_per_window': rl_defaults.rollouts_per_window,  # G episodes per window
        'group_baseline': rl_defaults.group_baseline,  # R_t minus the mean R over the G rollouts (off in paper)
        'reward': rl_defaults.reward,  # interaction (Eq. 7-8) | outcome (hit_T) | judge (2p - 1)
        # R_user of the user's own invalid message, instead of Eq. 8 (METHOD.md section 2; <= 0: never pays)
        'invalid_user_reward': rl_defaults.invalid_user_reward,
        'lambda_sd': rl_defaults.lambda_sd,  # lambda_SD of Eq. 11-12; 0 = without self-distillation
        # d without each turn's sampled item and reaction (ground truth and verdicts only): nothing to copy
        'reference_omits_samples': rl_defaults.reference_omits_samples,
        'train_user_agent': rl_defaults.train_user_agent,  # co-evolution: also update pi_user's adapter
        'gamma': rl_defaults.gamma,  # D_t = gamma^(t-1) of Eq. 7
        'alpha': rl_defaults.alpha,  # alpha of Eq. 8
        'advantage_clip': rl_defaults.advantage_clip,  # the clip of A_{t,n} in Eq. 10
        'outcome_assign': rl_defaults.outcome_assign,  # final | episode: which rec turns get a terminal R
        'outcome_signed': rl_defaults.outcome_signed,  # terminal hit reward 2 hit_T - 1 (True) or hit_T
        'kl_coef': rl_defaults.kl_coef,  # beta of a k3 KL penalty towards the base (0 = off, as in the paper)
        'constrained': rl_defaults.constrained,  # rollouts under the output grammars, scored under them too
        'ppo_epochs': rl_defaults.ppo_epochs,  # updates per rollout (1 = on-policy, as in the paper)
        'ppo_epsilon': rl_defaults.ppo_epsilon,  # PPO ratio clip eps (0 = off); needed for ppo_epochs > 1
        'rows_per_microbatch': rl_defaults.rows_per_microbatch,  # R segments per microbatch of the update
        'score_chunk_size': rl_defaults.score_chunk_size,  # completion positions per vocab projection
        'learning_rate': rl_defaults.learning_rate,  # peak AdamW step size
        'warmup_iterations': rl_defaults.warmup_iterations,  # linear warm-up, then cosine decay
        'final_learning_rate_fraction': rl_defaults.final_learning_rate_fraction,  # end of the cosine decay
        'weight_decay': rl_defaults.weight_decay,  # AdamW decoupled weight decay
        'max_grad_norm': rl_defaults.max_grad_norm,  # global gradient-norm clip
        'max_consecutive_nonfinite': rl_defaults.max_consecutive_nonfinite,  # skipped updates before stopping
        'judge_answers': rl_defaults.judge_answers,  # (yes, no) completions the judge's p compares
        'seed': rl_defaults.seed,  # window order and rollout sampling seeds
        # The teacher scores d + y only, reading x's shared prefix from the student pass's keys and values (same A;
        # False = a second pass over the whole x + d)
        'teacher_reuses_student_cache': rl_defaults.teacher_reuses_student_cache,
        'remat': rl_defaults.remat,  # rematerialise each layer in the backward pass (less memory, one more forward)
        'prefix_reuse': rl_defaults.prefix_reuse,  # rollouts prefill only what a prompt adds to the previous turn's
      },
      'eval': {
        'every': 10,  # greedy val evaluation every this many iterations (0 = none); also before RL
        'val_windows': 32,  # the first this many val windows (0 = all)
        'test_windows': 0,  # the first this many test windows for the before / after rows (0 = all)
        'batch_size': 32,  # episodes per batched generation
        'zero_shot': False,  # also a test row of the bare base (adapters off) before the warm start, as a reference
        'zero_shot_constrained': False,  # decode that row under the output grammars (labelled zero_shot+grammar)
        'constrained': False,  # decode the run's own test rows under the output grammars (rows get '+grammar')
        # Evaluate the starting agents on the test windows before RL (the 'before' row). A results table turns it
        # off and pairs every RL row with its own warm-start row over the same windows instead.
        'before': True,
        # At every val evaluation and the last iteration, this many of the iteration's rollout episodes go to
        # <workdir>/trajectories/iteration_<k>.jsonl with the token credit A on every token (experiments.view)
        'trajectory_sample': 1,
        'user_f1': {
          'enabled': True,  # the user-agent F1 on the test rows (METHOD.md section 6)
          'num_users': 0,  # the first this many users of the user-simulation set (0 = all)
          'batch_size': 64,  # judgements per generation call
          # p_t (the full SASRec's top item of the case) in each judgement's prompt, as in the dialogues the
          # user agent trains on; the bar's setting
          'peer_opinion': True,
          'also_without_peer': True,  # with peer_opinion, a second pass without p_t (keys prefixed no_peer_)
        },
      },
      'reflexion': {  # method='reflexion' only
        'num_prior_episodes': reflexion.num_prior_episodes,  # P earlier episodes of the same user
        'max_reflections': 0,  # 0 shows every earlier reflection
        'show_to_user': reflexion.show_to_user,
      },
      'checkpoint': {
        'every': 10,  # save every this many iterations (and at every val evaluation, the stop and the end)
        'keep': 3,  # keep the latest this many, plus the best by val Hit@1
      },
    }
  )
  if base in METHOD_FIELDS:
    config.rl.reward, config.rl.lambda_sd, config.rl.train_user_agent = METHOD_FIELDS[base]
  for name in ablations:
    config = with_ablation(config, name)
  return config


def parse_method(method: str) -> tuple[str, tuple[str, ...]]:
  """'coars-no_sd' -> ('coars', ('no_sd',)); a plain method -> (method, ()). Ablations apply to coars only."""
  base, *ablations = str(method).split(ABLATION_SEPARATOR)
  if ablations and base != 'coars':
    raise ValueError(f'method {method!r}: ablations ({ABLATION_SEPARATOR!r}-suffixes) apply to coars only')
  for name in ablations:
    if name not in ABLATIONS:
      raise ValueError(f'method {method!r}: unknown ablation {name!r}; expected one of {tuple(ABLATIONS)}')
  return base, tuple(ablations)


def with_ablation(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """A copy of the coars `config` with ablation `name`'s one field set (`ABLATIONS`); `row_label` names it."""
  if name not in ABLATIONS:
    raise ValueError(f'unknown ablation {name!r}; expected one of {tuple(ABLATIONS)}')
  if config.method != 'coars':
    raise ValueError(f"ablation {name!r} applies to method='coars', found method={config.method!r}")
  config = config.copy_and_resolve_references()
  for field, value in ABLATIONS[name].items():
    group, _, leaf = field.rpartition('.')
    (config.get(group) if group else config)[leaf] = value
  return config


def smollm2_config(dataset: str, method: str = 'coars') -> ml_collections.ConfigDict:
  """The research configs `configs/<dataset>_smollm2.py`: both agents are LoRA adapters on the frozen
  SmolLM2-135M-Instruct GGUF, every method starts from the warm start `configs/warm_start_smollm2.py:<dataset>`
  writes (`warm_start.SMOLLM2_WARM_START`; trained there if absent), SASRec's moving hint is on, training windows
  get out-of-fold peers, and the RL methods share one budget sized for 2 CPU cores."""
  config = default_config(dataset, 'smollm2-135m', method or 'coars')
  config.update(warm_start_lib.SMOLLM2_SASREC)
  config.update(warm_start_lib.SMOLLM2_BUCKETS)
  config.train_pool = warm_start_lib.SMOLLM2_TRAIN_POOL
  config.warm_start.enabled = True
  config.warm_start.folder = f'runs/warm_start_smollm2_{dataset}'
  config.warm_start.update(warm_start_lib.SMOLLM2_WARM_START)
  config.rollout.show_hint = True
  config.rl.iterations = 20
  config.rl.windows_per_iteration = 8
  config.rl.warmup_iterations = 2
  # Adapters stay on every layer: with them on the top third only (lora.layers='top_third', a third of the
  # backward pass), the demo's 24-step warm start left the recommender at ValidRatio 0.0 on 8 test windows, against
  # 0.81 on every layer (BUILD_NOTES Part 8). With the teacher on d + y and the scanned remat, 8 rows of ~1,000
  # tokens fit one microbatch (XLA temporaries 4.0 GiB).
  config.rl.rows_per_microbatch = 8
  config.rl.learning_rate = 1e-4
  config.eval.every = 5
  config.eval.val_windows = 16
  config.eval.test_windows = 0  # every test window
  config.eval.batch_size = 16
  config.eval.user_f1.batch_size = 40
  config.reflexion.num_prior_episodes = 1
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails on the first bad field, naming it; runs before any data, weights or devices are touched."""
  defaults = default_config(str(config.get('dataset', 'lastfm')), str(config.get('model', 'tiny')))
  configlib.check_keys(config, defaults)
  configlib.check_types(config, defaults)
  configlib.require(config.dataset in DATASETS, 'dataset', f'one of {DATASETS}', config.dataset)
  configlib.require(config.method in METHODS, 'method', f'one of {METHODS}', config.method)
  configlib.require(
    isinstance(config.model, str) and backbone.is_known(config.model),
    'model',
    f'one of {sorted(backbone.ALIASES)} or an existing HF checkpoint folder',
    config.model,
  )
  _validate_folders(config)
  configlib.require(isinstance(config.label, str), 'label', 'a string', config.label)
  configlib.require_peer_fields(config)
  least_vocab = len(tokenizer_lib.RESERVED_TOKENS) + tokenizer_lib.NUM_BYTE_PIECES + 1
  configlib.require_int_field(config, 'tokenizer_vocab_size', least_vocab)
  for name in ('prompt_buckets', 'completion_buckets'):
    configlib.require_int_list(config[name], name, 1)
  try:
    buckets(config)
  except (TypeError, ValueError) as error:
    raise configlib.ConfigError(f'Config fields prompt_buckets / completion_buckets: {error}') from error
  for name in (
    'resume',
    'progress',
    'allow_download',
    'warm_start.enabled',
    'eval.user_f1.enabled',
    'eval.zero_shot',
    'eval.zero_shot_constrained',
    'eval.constrained',
    'eval.before',
    'eval.user_f1.peer_opinion',
    'eval.user_f1.also_without_peer',
  ):
    value = config
    for part in name.split('.'):
      value = value[part]
    configlib.require(isinstance(value, bool), name, 'a bool', value)
  configlib.require(
    isinstance(config.warm_start.folder, str), 'warm_start.folder', "a folder path or ''", config.warm_start.folder
  )
  for field, least in (
    ('stop_after', 0),
    ('model_seed', 0),
    ('lora.rank', 1),
    ('lora.seed', 0),
    ('rollout.max_turns', 1),
    ('rollout.candidate_seed', 0),
    ('recommender_max_new_tokens', 1),
    ('user_max_new_tokens', 1),
    ('eval.every', 0),
    ('eval.val_windows', 0),
    ('eval.trajectory_sample', 0),
    ('eval.test_windows', 0),
    ('eval.batch_size', 1),
    ('eval.user_f1.num_users', 0),
    ('eval.user_f1.batch_size', 1),
    ('checkpoint.every', 1),
    ('checkpoint.keep', 1),
    ('reflexion.num_prior_episodes', 0),
    ('reflexion.max_reflections', 0),
    ('sampling.top_k', 0),
  ):
    configlib.require_int_field(config, field, least)
  temperature, top_p = config.sampling.temperature, config.sampling.top_p
  configlib.require(
    isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature >= 0,
    'sampling.temperature',
    'a number >= 0',
    temperature,
  )
  configlib.require(isinstance(top_p, (int, float)) and 0 < top_p <= 1, 'sampling.top_p', 'a number in (0, 1]', top_p)
  try:
    # The mesh spans every process of a multi-host run (distributed.initialize has run by now).
    validate_mesh_shape(mesh_shape_from_config(config.mesh), jax.device_count())
  except ValueError as error:
    raise configlib.ConfigError(f'Config field {"mesh"!r}: {error}') from error
  planner.validate_fields(config)
  distributed.validate_fields(config)
  try:
    sharding_rules(config)
  except (TypeError, ValueError) as error:
    raise configlib.ConfigError(f"Config field 'sharding_rules': {error}") from error
  if config.method in METHOD_FIELDS:
    for field, expected in zip(('reward', 'lambda_sd', 'train_user_agent'), METHOD_FIELDS[config.method]):
      found = config.rl[field]
      same = found is expected if isinstance(expected, bool) else (found == expected and not isinstance(found, bool))
      configlib.require(
        same, f'rl.{field}', f'{expected!r} for method={config.method!r} (that baseline fixes it)', found
      )
  if config.method == 'coars':
    configlib.require(
      config.rl.reward in ('interaction', 'outcome'),
      'rl.reward',
      "'interaction' or 'outcome' (the ablation without the interaction reward) for method='coars'",
      config.rl.reward,
    )
  for group, build in (
    ('rl', rl_config),
    ('rollout', rollout_config),
    ('lora', lora_config),
    ('warm_start', warm_start_config),
    ('reflexion', reflexion_config),
  ):
    try:
      build(config)
    except (TypeError, ValueError) as error:
      raise configlib.ConfigError(f'Config group {group!r}: {error}') from error


def _validate_folders(config) -> None:
  """The folders a run writes: `workdir` (every output under a fixed name, see `RUN_OUTPUTS`), and the two shared
  artifacts named by full paths, `sasrec_workdir` and `warm_start.folder`; neither of those may be the workdir,
  lie inside one of its outputs, or (the warm start, whose save replaces a `base` subfolder) hold the workdir."""
  workdir = configlib.require_folder('workdir', config.workdir)
  sasrec = configlib.require_folder('sasrec_workdir', config.sasrec_workdir)
  warm = configlib.require_folder('warm_start.folder', config.warm_start.folder, allow_empty=True)
  configlib.require_folder('peft_adapters', config.peft_adapters, allow_empty=True)
  configlib.require(
    not (config.peft_adapters and config.warm_start.enabled),
    'peft_adapters',
    "'' while warm_start.enabled (start from one or the other)",
    config.peft_adapters,
  )
  configlib.require(
    isinstance(config.data_root, str) and '\x00' not in config.data_root,
    'data_root',
    "a folder path or ''",
    config.data_root,
  )
  outputs = {workdir / name: f'the run output <workdir>/{name}' for name in RUN_OUTPUTS if name != WARM_START_DIR}
  for field, path in (('sasrec_workdir', sasrec), ('warm_start.folder', warm)):
    if path is None:
      continue
    clash = (
      'the workdir'
      if path == workdir
      else next((what for place, what in outputs.items() if path == place or place in path.parents), None)
    )
    configlib.require(clash is None, field, "a folder apart from the run's own outputs", f'{path} ({clash})')
  if warm is not None:
    configlib.require(
      warm not in workdir.parents, 'warm_start.folder', 'a folder that does not hold the workdir', str(warm)
    )


def run_paths(workdir: pathlib.Path) -> dict[str, pathlib.Path]:
  """The run's outputs under `workdir`, each checked to resolve inside it: a symlink that leads elsewhere is
  refused, so nothing a run writes lands outside its workdir."""
  root = workdir.resolve()
  paths = {}
  for name in RUN_OUTPUTS:
    path = workdir / name
    if root not in path.resolve().parents:
      raise ValueError(
        f'{path} resolves to {path.resolve()}, outside the workdir {root}; a run writes only inside '
        f'its workdir (put the whole workdir on the other disk instead of linking part of it)'
      )
    paths[name] = path
  return paths


def buckets(config) -> LengthBuckets:
  return LengthBuckets(
    prompt=tuple(int(n) for n in config.prompt_buckets), completion=tuple(int(n) for n in config.completion_buckets)
  )


def sampling_params(config) -> SamplingParams:
  return SamplingParams(
    temperature=float(config.sampling.temperature),
    top_k=int(config.sampling.top_k) or None,
    top_p=float(config.sampling.top_p),
  )


def sharding_rules(config):
  """The config's logical-axis rules (`parallel.make_rules`): each entry's comma-separated mesh axes."""
  return make_rules(
    {name: tuple(axis for axis in str(axes).split(',') if axis) or None for name, axes in config.sharding_rules.items()}
  )


def rl_config(config) -> rl.RLConfig:
  fields = config.rl.to_dict()
  fields['judge_answers'] = tuple(fields['judge_answers'])
  if fields['score_chunk_size'] == 0:
    fields['score_chunk_size'] = None
  return rl.RLConfig(
    **fields,
    sampling=sampling_params(config),
    buckets=buckets(config),
    train_pool=config.train_pool,
    recommender_max_new_tokens=config.recommender_max_new_tokens,
    user_max_new_tokens=config.user_max_new_tokens,
  )


def rollout_config(config) -> RolloutConfig:
  return RolloutConfig(**config.rollout.to_dict())


def lora_config(config) -> LoRAConfig:
  return LoRAConfig(rank=config.lora.rank, alpha=float(config.lora.alpha), layers=config.lora.layers)


def warm_start_config(config) -> warm_start_lib.WarmStartConfig:
  fields = {k: v for k, v in config.warm_start.to_dict().items() if k not in ('enabled', 'folder')}
  return warm_start_lib.WarmStartConfig(
    **fields,
    max_turns=config.rollout.max_turns,
    candidate_seed=config.rollout.candidate_seed,
    show_hint=config.rollout.show_hint,
    lora_rank=config.lora.rank,
    lora_alpha=float(config.lora.alpha),
    lora_layers=config.lora.layers,
    train_pool=config.train_pool,
    buckets=buckets(config),
    progress=config.progress,
  )


def reflexion_config(config) -> ReflexionConfig:
  fields = config.reflexion.to_dict()
  fields['max_reflections'] = fields['max_reflections'] or None
  return ReflexionConfig(**fields)


def row_label(config) -> str:
  """The rows' method name: `label`, else the method, with the ablations of coars (`ABLATIONS`) whose field the
  config sets spelled out, e.g. 'coars-no_sd'."""
  if config.label:
    return config.label
  if config.method != 'coars':
    return config.method

  def value(field):
    group, _, leaf = field.rpartition('.')
    return (config.get(group) if group else config)[leaf]

  suffixes = [
    name for name, fields in ABLATIONS.items() if all(value(field) == wanted for field, wanted in fields.items())
  ]
  return ABLATION_SEPARATOR.join(['coars'] + suffixes)


# --- the pieces of a run -----------------------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True, eq=False)
class Components:
  """What `run` would otherwise load by name: for tests and notebooks that bring their own.

  Attributes:
    dataset: the windows and titles.
    sasrec: the SASRec trained on every training window: the peer of val and test windows.
    model: the base decoder (adapters are attached, or a warm start run, as the config says).
    tokenizer: its tokenizer.
    user_sim: the F1 set (None: built from the dataset when the config asks for the F1).
    model_label: the rows' model name.
    save_base: whether exported folders carry the base weights (True when the base cannot be rebuilt by name).
  """

  dataset: Dataset
  sasrec: SASRec
  model: Decoder
  tokenizer: Any
  user_sim: UserSimSet | None = None
  model_label: str = 'custom'
  save_base: bool = True
  train_peer: Any = None  # the peer of training windows (`recsys.CrossFittedPeer`); None = `sasrec`

  @property
  def peer(self):
    """The peer of every split: cross-fitted on training windows when `train_peer` is, else `sasrec`."""
    return self.sasrec if self.train_peer is None else self.train_peer


def load_components(config) -> Components:
  """The dataset, SASRec and its cross-fitted fold models (`recsys.experiment.train_or_load_peer`) and the
  backbone named by the config."""
  dataset = load_dataset(config.dataset, config.data_root or None, allow_download=config.allow_download)
  sasrec, peer = sasrec_experiment.train_or_load_peer(
    sasrec_experiment.peer_config(
      config.dataset,
      workdir=config.sasrec_workdir,
      data_root=config.data_root,
      allow_download=config.allow_download,
      progress=config.progress,
      max_epochs=config.sasrec_max_epochs,
    ),
    dataset,
    config.sasrec_seed,
    num_folds=config.sasrec_folds,
    fold_seed=config.sasrec_fold_seed,
  )
  spec = backbone.BackboneSpec(
    name=config.model,
    data_root=config.data_root or None,
    allow_download=config.allow_download,
    tiny_vocab_size=config.tokenizer_vocab_size,
    seed=config.model_seed,
  )
  model, tokenizer = backbone.load_backbone(spec)
  return Components(
    dataset=dataset,
    sasrec=sasrec,
    model=model,
    tokenizer=tokenizer,
    model_label=spec.label,
    save_base=spec.canonical == backbone.TINY,
    train_peer=peer,
  )


# SmolLM2's SFT cost per row on the 2-core CPU (the table's 48-step warm start of batch 1: 9.5 min, BUILD_NOTES Part 9).
SFT_SECONDS_PER_ROW = 12.0


def warm_start_key(settings: warm_start_lib.WarmStartConfig) -> dict[str, Any]:
  """Everything that shapes a warm start's result (its whole config but the progress bar), as JSON values: a
  saved warm start is reused only under the same key."""
  fields = json.loads(json.dumps(dataclasses.asdict(settings), default=str))
  fields.pop('progress', None)
  return fields


def prepare_agents(config, parts: Components, workdir: pathlib.Path) -> tuple[Decoder, dict[str, Any]]:
  """The model the run starts from, and what it is: the warm start (loaded from `warm_start.folder`, default
  `<workdir>/warm_start`, when that folder holds a complete one, else trained and saved there; every method's
  config can point at the same folder so all of them start from one warm start), or the base with fresh adapters
  (B = 0: the agents start as the base model). Zero-shot and Reflexion without a warm start keep the bare base."""
  model = parts.model
  if config.peft_adapters:
    folders = peft_adapters.peft_export_folders(config.peft_adapters, AGENTS)
    if folders is None:
      raise configlib.ConfigError(
        f"Config field 'peft_adapters': {config.peft_adapters} holds no PEFT folder per agent {list(AGENTS)}"
      )
    peft_adapters.load_peft_adapters(model, folders, lora_config=lora_config(config), rngs=nnx.Rngs(config.lora.seed))
    return model, {'stage': 'peft', 'folder': str(pathlib.Path(config.peft_adapters).absolute())}
  if config.warm_start.enabled:
    folder = pathlib.Path(config.warm_start.folder or workdir / WARM_START_DIR).absolute()
    settings = warm_start_config(config)
    key = warm_start_key(settings)
    meta_path = folder / warm_start_lib.META_FILE
    if meta_path.is_file():
      stored = json.loads(meta_path.read_text()).get('settings')
      if stored is not None and stored != key:
        changed = sorted(name for name in set(stored) | set(key) if stored.get(name) != key.get(name))
        raise configlib.ConfigError(
          f"Config field 'warm_start.folder': {folder} holds a warm start trained with other settings (they "
          f'differ in {", ".join(changed)}); point warm_start.folder elsewhere or delete that folder to retrain'
        )
      model, meta = warm_start_lib.load_warm_start(folder, model)
      announce(
        f'Reusing the warm start in {folder}'
        + (' (trained with the same settings)' if stored else ' (saved before settings were recorded; not checked)')
      )
      return model, {'stage': 'warm_start', 'folder': str(folder), 'base_saved': bool(meta['base_saved'])}
    announce(
      f'Training the warm start into {folder}: none there yet; {settings.steps} SFT steps of batch '
      f'{settings.batch_size} on {settings.num_dialogues + settings.shuffled_dialogues} scripted dialogues, '
      f'{about(settings.steps * SFT_SECONDS_PER_ROW * settings.batch_size)} for SmolLM2 on 2 CPU cores'
    )
    result = warm_start_lib.warm_start_agents(model, parts.tokenizer, parts.dataset, parts.peer, settings)
    history = result.train.history
    summary = {
      'steps': len(history),
      'first_loss': history[0]['loss'],
      'final_loss': history[-1]['loss'],
      'train_seconds': round(result.train.seconds, 1),
      'dialogue_metrics': result.dialogue_metrics,
    }
    warm_start_lib.save_warm_start(
      model,
      folder,
      save_base=settings.train_base,
      metadata={'config': config.warm_start.to_dict(), 'settings': key, 'summary': summary},
    )
    return model, {'stage': 'warm_start', 'folder': str(folder), 'base_saved': settings.train_base, 'summary': summary}
  if config.method in TRAINED_METHODS and not model.adapter_names:
    add_lora(model, lora_config(config), list(AGENTS), rngs=nnx.Rngs(config.lora.seed))
  return model, {'stage': 'zero_shot', 'base_saved': False}


def greedy_backend(
  model: Decoder, tokenizer, config, guard: 'PreemptionGuard | None' = None, *, constrained: bool = False
) -> LLMBackend:
  """The evaluation backend (under the output grammars when `constrained`); with `guard`, a SIGTERM makes its
  next generation call raise `Preempted`."""
  adapters = {agent: agent for agent in AGENTS} if model.adapter_names else None
  # Multi-host, the trainer has placed the model's arrays over every process's devices, which only the sharded
  # programs take; a single-process run keeps the unsharded programs it always ran.
  mesh = make_mesh(mesh_shape_from_config(config.mesh)) if jax.process_count() > 1 else None
  backend = LLMBackend(
    model,
    tokenizer,
    adapters=adapters,
    config=LLMBackendConfig(
      recommender_max_new_tokens=config.recommender_max_new_tokens,
      user_max_new_tokens=config.user_max_new_tokens,
      sampling=GREEDY,
      buckets=buckets(config),
      constrained=constrained,
    ),
    mesh=mesh,
  )
  return backend if guard is None else guard.watch(backend)


def _first(count: int, total: int) -> tuple[int, ...]:
  return tuple(range(min(count, total) if count else total))


def evaluate_rows(
  config,
  parts: Components,
  model: Decoder,
  *,
  method: str,
  stage: str,
  user_sim: UserSimSet | None,
  guard: 'PreemptionGuard | None' = None,
  constrained: bool | None = None,
) -> dict[str, Any]:
  """A greedy test row (`eval.agentic.evaluate_agentic`, with the user-agent F1 when configured), decoded under
  the output grammars when `constrained` (None: `eval.constrained`)."""
  if constrained is None:
    constrained = bool(config.eval.constrained)
  total = len(parts.dataset.split('test'))
  # Finished batches are kept here until the row is complete, so a killed evaluation resumes after its last batch.
  resume_dir = pathlib.Path(config.workdir).absolute() / EVAL_RESUME_DIR
  eval_config = AgenticEvalConfig(
    split='test',
    window_indices=_first(config.eval.test_windows, total),
    batch_size=config.eval.batch_size,
    rollout=rollout_config(config),
    reflexion=reflexion_config(config) if config.method == 'reflexion' else None,
    user_f1=UserF1Config(batch_size=config.eval.user_f1.batch_size, show_peer_opinion=config.eval.user_f1.peer_opinion),
    user_f1_both_peer_settings=config.eval.user_f1.peer_opinion and config.eval.user_f1.also_without_peer,
    progress=config.progress,
    resume_dir=str(resume_dir),
    resume_key=evaluation_key(config, model, stage, method, constrained),
  )
  result = evaluate_agentic(
    parts.dataset,
    greedy_backend(model, parts.tokenizer, config, guard, constrained=constrained),
    peer=parts.sasrec,
    method=method,
    model=parts.model_label,
    seed=0,
    config=eval_config,
    user_sim=user_sim,
  )
  shutil.rmtree(resume_dir, ignore_errors=True)  # the row is complete: nothing left to resume
  row = dict(result.row)
  # `seed` is the evaluation's (greedy, so moot); `train_seed` tells the report which training run this is.
  row.update(
    {
      'stage': stage,
      'constrained': constrained,
      'windows_of_split': total,
      'train_seed': int(config.rl.seed),
      'user_f1_users': None if user_sim is None else len(user_sim.cases),
    }
  )
  return row


def evaluation_key(config, model: Decoder, stage: str, method: str, constrained: bool) -> str:
  """What a kept evaluation batch was played with: the agents' weights (the base's and the adapters' sums of
  |w|), the stage and method, and every setting that shapes the episodes or the F1. A batch kept under another key
  is never read."""
  adapters = sum(
    float(np.abs(np.asarray(leaf, np.float64)).sum()) for leaf in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
  )
  settings = {
    name: config[name].to_dict() if hasattr(config[name], 'to_dict') else config[name]
    for name in (
      'dataset',
      'model',
      'rollout',
      'recommender_max_new_tokens',
      'user_max_new_tokens',
      'prompt_buckets',
      'completion_buckets',
      'sasrec_workdir',
      'sasrec_seed',
      'sasrec_max_epochs',
      'eval',
    )
  }
  return json.dumps(
    {
      'stage': stage,
      'method': method,
      'constrained': bool(constrained),
      'base': repr(base_fingerprint(model)),
      'adapters': repr(adapters),
      'settings': settings,
    },
    sort_keys=True,
    default=str,
  )


def evaluate_val(
  config, parts: Components, model: Decoder, *, guard: 'PreemptionGuard | None' = None, iteration: int = 0
) -> dict[str, float]:
  """Greedy Hit@1, ValidRatio and average turns on the first `eval.val_windows` val windows (after RL iteration
  `iteration`, which only fault injection reads)."""
  indices = _first(config.eval.val_windows, len(parts.dataset.split('val')))
  backend = greedy_backend(model, parts.tokenizer, config, guard)
  faults.instrument_eval(backend, iteration)
  episodes = play_windows(
    parts.dataset,
    backend,
    peer=parts.sasrec,
    split='val',
    window_indices=indices,
    rollout=rollout_config(config),
    batch_size=config.eval.batch_size,
    seed=0,
  )
  metrics = episode_metrics(episodes)
  return {
    'val/hit_at_1': metrics['hit_at_1'],
    'val/valid_ratio': metrics['valid_ratio'],
    'val/average_turns': metrics['average_turns'],
    'val/user_valid_ratio': metrics['user_valid_ratio'],
  }


def row_metrics(row: dict[str, Any]) -> dict[str, Any]:
  """A test row's metrics as metrics.jsonl / TensorBoard names."""
  return {
    f'test/{key.replace("@", "_at_")}': row.get(key)
    for key in ('hit@1', 'valid_ratio', 'avg_turns', 'user_f1', 'click_rate')
  }


def base_fingerprint(model: Decoder) -> float:
  """The sum of |w| over the frozen base weights: a resume refuses a checkpoint trained on another base."""
  return float(
    sum(np.abs(np.asarray(leaf, np.float64)).sum() for leaf in jax.tree.leaves(nnx.state(model, BASE_PARAMS)))
  )


def _user_sim(config, parts: Components) -> UserSimSet | None:
  if not config.eval.user_f1.enabled:
    return None
  sim = parts.user_sim or user_sim_set(parts.dataset, config.data_root or None, allow_download=config.allow_download)
  if config.eval.user_f1.num_users:
    sim = dataclasses.replace(sim, cases=sim.cases[: config.eval.user_f1.num_users])
  return sim


def with_paired_differences(rows: list[dict], *, reference: dict) -> list[dict]:
  """`rows`, each but `reference` with `hit@1_vs_<reference stage>`: its Hit@1 difference from `reference` over the
  same windows and the paired bootstrap 95% interval (`eval.metrics.paired_bootstrap`)."""
  name = f'hit@1_vs_{reference.get("stage", "reference")}'
  for row in rows:
    if row is not reference and row.get('window_indices') == reference.get('window_indices') is not None:
      row[name] = paired_bootstrap(row['window_hits'], reference['window_hits'])
  return rows


def _zero_shot_rows(config, parts: Components, workdir: pathlib.Path, user_sim: UserSimSet | None) -> list[dict]:
  """[the bare base's test row] when `eval.zero_shot` is on and the base has no adapters yet (read back from
  `<workdir>/zero_shot.json` when an earlier invocation wrote it), else []."""
  if not config.eval.zero_shot or config.method == 'zero_shot' or parts.model.adapter_names:
    return []
  path = workdir / ZERO_SHOT_FILE
  if path.is_file():
    return [json.loads(path.read_text())]
  constrained = config.eval.zero_shot_constrained
  row = evaluate_rows(
    config,
    parts,
    parts.model,
    method='zero_shot+grammar' if constrained else 'zero_shot',
    stage='zero_shot',
    user_sim=user_sim,
    constrained=constrained,
  )
  _write_json(path, row)
  return [row]


def _write_json(path: pathlib.Path, value: Any) -> None:
  """Writes `path` atomically, from the primary process only (the others hold the same value)."""
  if not distributed.is_primary():
    return
  tmp = path.with_suffix(path.suffix + '.tmp')
  tmp.write_text(json.dumps(value, indent=2, default=str))
  tmp.replace(path)


# --- the run -----------------------------------------------------------------------------------------------------


def make_trainer(config, parts: Components, model: Decoder) -> rl.RLTrainer:
  return rl.RLTrainer(
    model,
    parts.tokenizer,
    parts.dataset,
    parts.peer,
    rl_config(config),
    rollout=rollout_config(config),
    mesh=make_mesh(mesh_shape_from_config(config.mesh)),
    rules=sharding_rules(config),
  )


def run(config: ml_collections.ConfigDict, *, components: Components | None = None) -> list[dict[str, Any]]:
  """The whole experiment (see the module docstring); returns the rows it also writes to results.json (only the
  'before' row, or none, when it stops early: `stop_after` or SIGTERM)."""
  validate(config)
  if config.plan.device or config.plan.device_memory_gib:
    planner.check(config)  # refuses a run that cannot fit, before any weights are read
  workdir = pathlib.Path(config.workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  run_paths(workdir)
  _write_json(workdir / CONFIG_FILE, config.to_dict())
  parts = components or load_components(config)
  user_sim = _user_sim(config, parts)
  zero_shot = _zero_shot_rows(config, parts, workdir, user_sim)
  model, origin = prepare_agents(config, parts, workdir)
  label = row_label(config)
  save_base = parts.save_base or bool(origin.get('base_saved'))

  if config.method not in TRAINED_METHODS:
    row = evaluate_rows(config, parts, model, method=label, stage='after', user_sim=user_sim)
    row['start'] = origin['stage']
    _write_json(workdir / RESULTS_FILE, zero_shot + [row])
    return zero_shot + [row]

  trainer = make_trainer(config, parts, model)
  faults.instrument_trainer(trainer)
  settings = trainer.config
  budget = {
    'iterations': settings.iterations,
    'windows_per_iteration': settings.windows_per_iteration,
    'rollouts_per_window': settings.rollouts_per_window,
    'episodes': settings.iterations * settings.episodes_per_iteration,
  }
  progress: dict[str, Any] = {
    'best_val_hit_at_1': None,
    'best_iteration': None,
    'base_fingerprint': base_fingerprint(model),
  }
  with checkpoint_manager(workdir, config.checkpoint.keep) as manager, PreemptionGuard() as guard:
    guard.watch(trainer.backend)
    if manager.all_steps() and not config.resume:
      raise FileExistsError(
        f'{workdir / CHECKPOINT_DIR} already holds checkpoints (latest: iteration '
        f'{manager.latest_step()}); pass --config.resume=True to continue that run, or choose '
        f'another --config.workdir'
      )
    meta = restore_latest(manager, trainer) if config.resume else None
    resumed = meta is not None
    if config.resume and not resumed:
      # A first run of a config that always resumes (the demo, the table's cells) has nothing to say here.
      announce(f'No checkpoint to resume in {workdir / CHECKPOINT_DIR}; starting from iteration 0')
    pending = None
    if resumed:
      if not np.isclose(meta['base_fingerprint'], progress['base_fingerprint'], rtol=1e-12, atol=0):
        raise ValueError(
          f'the base model differs from the one the checkpoint in {workdir} was trained on (its '
          f'warm start {origin.get("folder")} or backbone changed); resuming would mix two runs'
        )
      progress = {k: meta[k] for k in progress}
      pending = meta.get('pending_record')
      announce(f'Resumed {workdir} at iteration {trainer.state.iteration}')
    saved = trainer.state.iteration if resumed else None  # the step of the newest checkpoint
    # A pending record's line is written again when its evaluation finishes, so an earlier copy is dropped.
    keep_up_to = None if not resumed else trainer.state.iteration - (pending is not None)

    with MetricsWriter(workdir, keep_up_to=keep_up_to) as writer:
      before_path = workdir / BEFORE_FILE
      if resumed:
        if not before_path.is_file():
          raise FileNotFoundError(
            f'{before_path} is missing: it holds the row of the agents this run started '
            f'from, written before its first checkpoint; restore it or start a new workdir'
          )
        before = json.loads(before_path.read_text())
      else:
        try:
          if config.eval.before:
            before = evaluate_rows(
              config, parts, model, method=origin['stage'], stage='before', user_sim=user_sim, guard=guard
            )
            start_record = row_metrics(before)
          else:
            before = {'dataset': config.dataset, 'method': origin['stage'], 'stage': 'before', 'evaluated': False}
            start_record = {}
          _write_json(before_path, before)
          if config.eval.every:
            start_record.update(evaluate_val(config, parts, model, guard=guard))
            progress.update(best_val_hit_at_1=start_record['val/hit_at_1'], best_iteration=0)
            export_adapters(
              model, workdir / BEST_DIR, save_base=save_base, metadata={'method': label, 'iteration': 0, **start_record}
            )
        except Preempted:
          logging.warning('Stopped on SIGTERM before the first RL iteration; nothing to resume from')
          return []
        writer.write(0, start_record)
      first = trainer.state.iteration
      last = settings.iterations if not config.stop_after else min(settings.iterations, first + config.stop_after)

      def conclude(metrics: dict[str, Any]) -> None:
        """The rest of an iteration: its val evaluation (when due), the best export, its metrics line, then its
        checkpoint. The line comes first: a kill between the two replays the iteration from an older checkpoint,
        which drops the line, while the other order would lose it."""
        nonlocal saved
        number = trainer.state.iteration
        val_hit = None
        if config.eval.every and (number % config.eval.every == 0 or number == settings.iterations):
          start = time.perf_counter()
          try:
            val = evaluate_val(config, parts, model, guard=guard, iteration=number)
          except Preempted:
            if saved != number:
              save_checkpoint(manager, trainer, progress, None, pending_record=json_value(metrics))
              saved = number
            raise
          metrics.update(val, **{'time/eval_seconds': time.perf_counter() - start})
          val_hit = val['val/hit_at_1']
          if progress['best_val_hit_at_1'] is None or val_hit > progress['best_val_hit_at_1']:
            progress.update(best_val_hit_at_1=val_hit, best_iteration=number)
            export_adapters(
              model, workdir / BEST_DIR, save_base=save_base, metadata={'method': label, 'iteration': number, **val}
            )
        if trainer.last_credit_sample and distributed.is_primary():
          credit_sample.write_sample(workdir, number, trainer.last_credit_sample)
        writer.write(number, metrics)
        faults.point('metrics', number)
        due = val_hit is not None or number % config.checkpoint.every == 0 or number == last or guard.requested
        if due and saved != number:
          save_checkpoint(manager, trainer, progress, val_hit)
          saved = number

      if first < last:
        announce(
          f'Training {label} (RL iterations {first + 1} to {last} of {settings.iterations}, '
          f'{settings.windows_per_iteration} windows x {settings.rollouts_per_window} rollouts each) into '
          f'{workdir}: '
          + ('resumed from its checkpoint' if resumed else 'a new run')
          + '; SmolLM2 on 2 CPU cores takes about 20 min per iteration of 16 episodes (BUILD_NOTES Part 9), '
          'the bar shows the ETA'
        )
      bar = tqdm.tqdm(
        total=settings.iterations,
        initial=first,
        desc=f'RL {label}',
        disable=not (config.progress and distributed.is_primary()),
        dynamic_ncols=True,
      )
      try:
        if pending is not None:
          conclude(pending)
        while trainer.state.iteration < last and not guard.requested:
          upcoming = trainer.state.iteration + 1
          evaluated = bool(config.eval.every) and upcoming % config.eval.every == 0
          trainer.credit_episodes = config.eval.trajectory_sample if evaluated or upcoming == settings.iterations else 0
          metrics = guarded_iteration(trainer)
          conclude(metrics)
          bar.update(1)
          bar.set_postfix(
            loss=f'{metrics.get("loss/total", float("nan")):.3f}',
            hit=f'{metrics["rollout/hit_at_1"]:.2f}',
            valid=f'{metrics["rollout/valid_ratio"]:.2f}',
          )
      except Preempted:
        pass
      finally:
        bar.close()

      if guard.requested:
        if saved != trainer.state.iteration:
          save_checkpoint(manager, trainer, progress, None)
        logging.warning(
          'Stopped on SIGTERM after RL iteration %d of %d with a checkpoint; resume with --config.resume=True',
          trainer.state.iteration,
          settings.iterations,
        )
        return zero_shot + [before]
      if trainer.state.iteration < settings.iterations:
        logging.info(
          'Stopped after iteration %d of %d (stop_after=%d); resume with --config.resume=True',
          trainer.state.iteration,
          settings.iterations,
          config.stop_after,
        )
        return zero_shot + [before]
      try:
        export_adapters(
          model,
          workdir / FINAL_DIR,
          save_base=save_base,
          metadata={'method': label, 'iteration': trainer.state.iteration, 'budget': budget},
        )
        after = evaluate_rows(config, parts, model, method=label, stage='after', user_sim=user_sim, guard=guard)
      except Preempted:
        logging.warning(
          'Stopped on SIGTERM during the final test evaluation; the last checkpoint holds every '
          'iteration, resume with --config.resume=True to evaluate'
        )
        return zero_shot + [before]
      after.update(
        {
          'checkpoint': str(workdir / FINAL_DIR),
          'best_checkpoint': str(workdir / BEST_DIR),
          **{f'rl_{k}': v for k, v in budget.items()},
          **{k: v for k, v in progress.items() if k != 'base_fingerprint'},
        }
      )
      writer.write(trainer.state.iteration, {'stage': 'after', **row_metrics(after)})
  rows = zero_shot + [before, after]
  if before.get('window_hits') is not None:
    rows = with_paired_differences(rows, reference=before)
  _write_json(workdir / RESULTS_FILE, rows)
  return rows
