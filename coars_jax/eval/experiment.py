"""The agentic evaluation experiment behind `python -m experiments.evaluate --config=configs/eval_*.py`: load the
dataset, SASRec (the peer: hint, p_t, q_t), a backbone and optionally a checkpoint with the two agents' adapters;
play the configured windows once per sampling seed (plain episodes, or the Reflexion memory baseline); add the
user-agent F1; return one JSON row per seed with the keys of `agentic.ROW_KEYS`.

A config is an `ml_collections.ConfigDict` from `default_config`; `validate` checks it before any data is read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from typing import Any

import ml_collections

from coars_jax import configlib
from coars_jax.models import backbone
from coars_jax.agents.episodes import AGENTS, LLMBackend, LLMBackendConfig, RolloutConfig
from coars_jax.agents.reflexion import ReflexionConfig
from coars_jax.agents.trajectory import to_jsonl
from coars_jax.data import DATASETS, load_dataset
from coars_jax.data.user_sim import UserSimSet, user_sim_set
from coars_jax.eval.agentic import AgenticEvalConfig, evaluate_agentic
from coars_jax.eval.user_f1 import BATCHINGS, UserF1Config
from coars_jax.models import peft_adapters
from coars_jax.models import tokenizer as tokenizer_lib
from coars_jax.recsys import experiment as sasrec_experiment
from coars_jax.sampling import LengthBuckets, SamplingParams

# Methods whose play differs; any other method name is a label for the table (e.g. 'warm_start', 'coars').
REFLEXION = 'reflexion'


def default_config(dataset: str = 'lastfm') -> ml_collections.ConfigDict:
  """Defaults for `configs/eval_*.py`; each field documents what it controls."""
  reflexion, rollout = ReflexionConfig(), RolloutConfig()
  return ml_collections.ConfigDict(
    {
      'dataset': dataset,  # lastfm | movielens | instruments
      'data_root': '',  # '' -> $COARS_DATA_DIR -> the per-user cache folder
      'allow_download': True,  # fetch missing public originals (checksum-verified) when the network allows
      'model': 'tiny',  # backbone: 'tiny', 'smollm2-135m', or an HF checkpoint folder
      'tokenizer_vocab_size': tokenizer_lib.DEFAULT_VOCAB_SIZE,  # the tiny tokenizer's size (model='tiny' only)
      'model_seed': 0,  # the tiny model's random initialisation (without a checkpoint)
      'checkpoint': '',  # a folder with both agents' adapters (warm start or RL); '' runs the base model
      'method': 'zero_shot',  # the row's label; 'reflexion' plays the memory baseline
      'model_label': '',  # the row's model name; '' derives it from `model`
      'sasrec_workdir': f'runs/sasrec_{dataset}',  # SASRec checkpoints (trained there if absent)
      'sasrec_seed': 0,  # which SASRec training seed is the peer
      'sasrec_max_epochs': 0,  # the epoch cap it was (or is) trained with; reuse needs the same (0 = the default's)
      'split': 'test',  # val | test
      'num_windows': 0,  # the first this many windows of the split; 0 plays them all
      'batch_size': 32,  # episodes per batched generation
      'seeds': (0,),  # sampling seeds, one row each (with greedy decoding the rows repeat the same episodes)
      'rollout': {
        'max_turns': rollout.max_turns,  # T_u
        'candidate_seed': rollout.candidate_seed,  # the seed of the candidate lists C
        'show_hint': rollout.show_hint,  # SASRec's top candidate in the recommender's prompt
        'show_peer_opinion': rollout.show_peer_opinion,  # p_t in the user's prompt
      },
      'sampling': {
        'temperature': 0.0,  # 0 = greedy
        'top_k': 0,  # 0 = off
        'top_p': 1.0,
      },
      'constrained': False,  # decode Item:/Action: under the output grammar (ValidRatio 1 by construction)
      'recommender_max_new_tokens': 96,
      'user_max_new_tokens': 64,
      'prompt_buckets': LengthBuckets().prompt,
      'completion_buckets': LengthBuckets().completion,
      'reflexion': {
        'num_prior_episodes': reflexion.num_prior_episodes,  # P earlier episodes of the same user
        'max_reflections': 0,  # 0 shows every earlier reflection
        'show_to_user': reflexion.show_to_user,
      },
      'user_f1': {
        'enabled': True,  # the user-agent F1 on METHOD.md section 6's user-simulation set
        'num_users': 0,  # the first this many users of the set; 0 judges them all
        'batch_size': 64,  # judgements per generation call
        'batching': 'shared_prefix',  # how judgements share calls (UserF1Config.batching)
      },
      'trajectories': '',  # write every counted episode as JSON lines here ('' writes none)
      'backend': {  # who plays the agents: 'local' (the model above) or 'openai' (any chat-completions endpoint)
        'kind': 'local',
        'base_url': '',  # openai: the API root, e.g. http://127.0.0.1:8000/v1 (experiments.serve)
        'recommender_model': '',  # openai: the model name of each agent at the endpoint
        'user_model': '',
        'api_key_env': '',  # openai: the environment variable holding the key ('' sends none)
        'timeout': 60.0,  # seconds per request
        'max_retries': 4,  # retries of transient failures (429, 5xx, network), with exponential back-off
        'concurrency': 4,  # requests in flight at once
        'cache_dir': 'runs/api_cache',  # responses keyed by the request: a rerun costs nothing ('' = off)
        'price_per_1k_prompt_tokens': 0.0,  # USD, for the row's cost
        'price_per_1k_completion_tokens': 0.0,
      },
      'progress': True,
    }
  )


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails on the first bad field, naming it; runs before any data or weights are read."""
  configlib.check_keys(config, default_config(config.get('dataset', 'lastfm')))
  configlib.require(config.dataset in DATASETS, 'dataset', f'one of {DATASETS}', config.dataset)
  configlib.require(
    isinstance(config.model, str) and backbone.is_known(config.model),
    'model',
    f'one of {sorted(backbone.ALIASES)} or an existing HF checkpoint folder',
    config.model,
  )
  configlib.require(
    config.checkpoint == '' or pathlib.Path(config.checkpoint).is_dir(),
    'checkpoint',
    "'' or an existing checkpoint folder",
    config.checkpoint,
  )
  configlib.require(
    isinstance(config.method, str) and config.method.strip() != '', 'method', 'a non-empty name', config.method
  )
  configlib.require(config.split in ('val', 'test'), 'split', "'val' or 'test'", config.split)
  for field, least in (
    ('num_windows', 0),
    ('batch_size', 1),
    ('sasrec_seed', 0),
    ('sasrec_max_epochs', 0),
    ('recommender_max_new_tokens', 1),
    ('user_max_new_tokens', 1),
    ('rollout.max_turns', 1),
    ('rollout.candidate_seed', 0),
    ('reflexion.num_prior_episodes', 0),
    ('reflexion.max_reflections', 0),
    ('user_f1.num_users', 0),
    ('user_f1.batch_size', 1),
    ('sampling.top_k', 0),
  ):
    configlib.require_int_field(config, field, least)
  configlib.require_int_list(config.seeds, 'seeds')
  configlib.require(
    config.user_f1.batching in BATCHINGS, 'user_f1.batching', f'one of {BATCHINGS}', config.user_f1.batching
  )
  configlib.require(isinstance(config.constrained, bool), 'constrained', 'a bool', config.constrained)
  configlib.require_sampling_fields(config)
  try:
    _rollout(config), _backend_config(config), _reflexion(config)
  except (TypeError, ValueError) as error:
    raise configlib.ConfigError(f'Config groups rollout / sampling / buckets / reflexion: {error}') from error
  configlib.require(
    config.backend.kind in ('local', 'openai'), 'backend.kind', "'local' or 'openai'", config.backend.kind
  )
  if config.backend.kind == 'openai':
    configlib.require(
      not config.constrained,
      'constrained',
      "False with backend.kind='openai' (an API cannot decode under the project's grammars)",
      config.constrained,
    )
    configlib.require(
      not config.checkpoint,
      'checkpoint',
      "'' with backend.kind='openai' (serve the checkpoint with experiments.serve and point backend.base_url at it)",
      config.checkpoint,
    )
    try:
      _openai_config(config)
    except ValueError as error:
      raise configlib.ConfigError(f"Config group 'backend': {error}") from error


def _openai_config(config):
  from coars_jax.agents.openai_api import OpenAIConfig  # Imported here: only API evaluations need it.

  b = config.backend
  return OpenAIConfig(
    base_url=b.base_url,
    models={'recommender': b.recommender_model, 'user': b.user_model},
    api_key_env=b.api_key_env,
    max_tokens={'recommender': config.recommender_max_new_tokens, 'user': config.user_max_new_tokens},
    temperature=float(config.sampling.temperature),
    top_p=float(config.sampling.top_p),
    timeout=float(b.timeout),
    max_retries=b.max_retries,
    concurrency=b.concurrency,
    cache_dir=b.cache_dir,
    price_per_1k_prompt_tokens=float(b.price_per_1k_prompt_tokens),
    price_per_1k_completion_tokens=float(b.price_per_1k_completion_tokens),
  )


def _rollout(config) -> RolloutConfig:
  return RolloutConfig(**config.rollout.to_dict())


def _reflexion(config) -> ReflexionConfig | None:
  if config.method != REFLEXION:
    return None
  fields = config.reflexion.to_dict()
  fields['max_reflections'] = fields['max_reflections'] or None
  return ReflexionConfig(**fields)


def _backend_config(config) -> LLMBackendConfig:
  sampling = config.sampling
  params = SamplingParams(
    temperature=float(sampling.temperature), top_k=int(sampling.top_k) or None, top_p=float(sampling.top_p)
  )
  return LLMBackendConfig(
    recommender_max_new_tokens=config.recommender_max_new_tokens,
    user_max_new_tokens=config.user_max_new_tokens,
    sampling=params,
    constrained=bool(config.constrained),
    buckets=LengthBuckets(
      prompt=tuple(int(n) for n in config.prompt_buckets), completion=tuple(int(n) for n in config.completion_buckets)
    ),
    merge_adapters=True,  # the checkpoint stays fixed while it is evaluated
  )


def load_agents(config: ml_collections.ConfigDict):
  """(model, tokenizer, adapters): the backbone, with the checkpoint's adapters when one is configured (a warm-start
  or RL export, or a folder of PEFT LoRA folders, one per agent); `adapters`
  maps each agent to its adapter name, or is None for the base model (zero-shot agents)."""
  from coars_jax.training.warm_start import load_warm_start  # the checkpoint format; imported late (no cycle)

  spec = backbone.BackboneSpec.from_config(config)
  if not config.checkpoint:
    if spec.canonical == backbone.TINY:
      logging.warning(
        'Evaluating the tiny preset at its random initialisation (no checkpoint): its agents do not '
        'speak the protocol; pass --config.checkpoint=<warm start folder>.'
      )
    model, tokenizer = backbone.load_backbone(spec)
    return model, tokenizer, None
  folders = peft_adapters.peft_export_folders(config.checkpoint, AGENTS)
  if folders is not None:  # one PEFT folder per agent (experiments.export_adapters, or trained elsewhere)
    model, tokenizer = backbone.load_backbone(spec)
    peft_adapters.load_peft_adapters(model, folders)
    return model, tokenizer, {agent: agent for agent in AGENTS}
  meta = (
    json.loads((pathlib.Path(config.checkpoint) / 'warm_start.json').read_text())
    if (pathlib.Path(config.checkpoint) / 'warm_start.json').is_file()
    else None
  )
  if meta is None:
    raise FileNotFoundError(
      f'checkpoint {config.checkpoint} holds no warm_start.json; expected a folder written by '
      f"experiments.warm_start (or the RL trainer's export)"
    )
  base, tokenizer = backbone.load_backbone(spec, with_weights=not meta['base_saved'])
  model, _ = load_warm_start(config.checkpoint, base)
  if len(tokenizer) > model.config.vocab_size:
    raise ValueError(
      f"the checkpoint's model has vocab_size {model.config.vocab_size} but the tokenizer of "
      f'{config.model!r} has {len(tokenizer)} tokens; evaluate with the backbone it was trained on'
    )
  missing = [agent for agent in AGENTS if agent not in model.adapter_names]
  if missing:
    raise ValueError(f'checkpoint {config.checkpoint} has adapters {model.adapter_names}; missing {missing}')
  return model, tokenizer, {agent: agent for agent in AGENTS}


def model_label(config) -> str:
  if config.model_label:
    return config.model_label
  if config.backend.kind == 'openai':
    models = dict.fromkeys((config.backend.recommender_model, config.backend.user_model))
    return 'api:' + '+'.join(models)
  return backbone.BackboneSpec(name=config.model).label


def _user_sim(config, dataset) -> UserSimSet | None:
  if not config.user_f1.enabled:
    return None
  sim = user_sim_set(dataset, config.data_root or None, allow_download=config.allow_download)
  if config.user_f1.num_users:
    sim = dataclasses.replace(sim, cases=sim.cases[: config.user_f1.num_users])
  return sim


def run(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """Plays the configured evaluation once per seed; returns the rows (also written where the config says)."""
  validate(config)
  if config.checkpoint and config.method == 'zero_shot':
    logging.warning(
      "Rows are labelled by config.method ('zero_shot') although adapters come from %s; name the method, e.g. "
      '--config=configs/eval_smollm2.py:%s,warm_start',
      config.checkpoint,
      config.dataset,
    )
  dataset = load_dataset(config.dataset, config.data_root or None, allow_download=config.allow_download)
  # Val and test windows: the SASRec trained on every training window (no cross-fitting needed).
  sasrec, _ = sasrec_experiment.train_or_load(
    sasrec_experiment.run_peer_config(config, progress=config.progress),
    dataset,
    config.sasrec_seed,
  )
  start = time.perf_counter()
  if config.backend.kind == 'openai':
    from coars_jax.agents.openai_api import OpenAIBackend

    backend = OpenAIBackend(_openai_config(config))
  else:
    model, tokenizer, adapters = load_agents(config)
    backend = LLMBackend(model, tokenizer, adapters=adapters, config=_backend_config(config))
  load_seconds = time.perf_counter() - start
  count = len(dataset.split(config.split))
  indices = tuple(range(min(config.num_windows, count) if config.num_windows else count))
  eval_config = AgenticEvalConfig(
    split=config.split,
    window_indices=indices,
    batch_size=config.batch_size,
    rollout=_rollout(config),
    reflexion=_reflexion(config),
    user_f1=UserF1Config(batch_size=config.user_f1.batch_size, batching=config.user_f1.batching),
    progress=config.progress,
  )
  sim = _user_sim(config, dataset)
  rows, all_episodes = [], []
  for seed in config.seeds:
    result = evaluate_agentic(
      dataset,
      backend,
      peer=sasrec,
      method=config.method,
      model=model_label(config),
      seed=seed,
      config=eval_config,
      user_sim=sim,
    )
    row = dict(result.row)
    row.update(
      {
        'checkpoint': config.checkpoint or None,
        'windows_of_split': count,
        'user_f1_users': None if sim is None else len(sim.cases),
        'load_seconds': round(load_seconds, 1),
        'temperature': float(config.sampling.temperature),
        'sasrec_seed': config.sasrec_seed,
        'constrained': bool(config.constrained),
        'backend': config.backend.kind,
      }
    )
    if config.backend.kind == 'openai':
      # Cumulative over the seeds so far: requests sent, cache hits, tokens and cost as the endpoint reported them.
      row.update({'backend_url': config.backend.base_url, **{f'api_{k}': v for k, v in backend.usage.items()}})
    rows.append(row)
    all_episodes += list(result.episodes)
  if config.trajectories:
    path = pathlib.Path(config.trajectories)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_jsonl(all_episodes, path)
  return rows


def summary_line(row: dict) -> str:
  """One line per row for logs: Hit@1 (with its paired difference from a reference row when the row has one),
  ValidRatio, turns, and the user agent's F1 beside its precision, recall and score AUC."""
  line = f'{row["dataset"]} {row["method"]} {row["model"]} seed {row["seed"]}: Hit@1 {row["hit@1"]:.4f}'
  for key, value in row.items():
    if key.startswith('hit@1_vs_') and isinstance(value, dict):
      line += (
        f' ({value["diff"]:+.3f} vs {key[len("hit@1_vs_") :]}, 95% CI [{value["low"]:+.3f}, {value["high"]:+.3f}])'
      )
  line += f', ValidRatio {row["valid_ratio"]:.4f}, avg turns {row["avg_turns"]:.2f}'
  if row.get('user_f1') is None:
    line += ', user F1 —'
  else:
    auc = row.get('user_auc')
    line += (
      f', user F1 {row["user_f1"]:.3f} (P {row["user_precision"]:.3f}, R {row["user_recall"]:.3f}, AUC '
      f'{"—" if auc is None else f"{auc:.3f}"})'
    )
  return line + f' ({row["num_windows"]} windows, {row["wall_seconds"]:.0f} s)'
