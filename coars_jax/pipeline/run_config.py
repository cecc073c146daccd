"""The run's config (`configs/<dataset>_<model>.py`): the methods and their ablations as data, the defaults
every field starts from, the SmolLM2 research settings, and the typed configs each part of a run is built from
(`rl_config`, `rollout_config`, `warm_start_config`, ...). `run_validation.validate` checks a config before
anything is loaded.
"""

from __future__ import annotations

import dataclasses
import pathlib

import ml_collections

from coars_jax.models import backbone
from coars_jax.agents.episodes import RolloutConfig
from coars_jax.agents.reflexion import ReflexionConfig
from coars_jax.models import tokenizer as tokenizer_lib
from coars_jax.models.lora import LoRAConfig
from coars_jax.parallel import distributed, planner
from coars_jax.parallel.rules import DEFAULT_RULES, make_rules
from coars_jax.sampling import LengthBuckets, SamplingParams
from coars_jax.training import credit_sample, rl
from coars_jax.training import warm_start as warm_start_lib

from coars_jax.training.checkpointing import (
  CHECKPOINT_DIR,
  REJECTED_DIR,
)
from coars_jax.training.metrics import METRICS_FILE, TENSORBOARD_DIR


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
          # how judgements share calls (eval.user_f1.UserF1Config.batching): 'shared_prefix' reads each user's
          # history once per decode step for all its items; 'rounds' and 'flat' are the older layouts
          'batching': 'shared_prefix',
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
  writes (`training.warm_start.SMOLLM2_WARM_START`; trained there if absent), SASRec's moving hint is on, training
  windows get out-of-fold peers, and the RL methods share one budget sized for 2 CPU cores."""
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
