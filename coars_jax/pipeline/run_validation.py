"""`validate`: a run's config is checked field by field before any data, weights or devices are touched, failing on
the first bad field with its name; and the folders a run writes, which must not overlap.
"""

from __future__ import annotations


import jax
import ml_collections

from coars_jax import configlib
from coars_jax.models import backbone
from coars_jax.data import DATASETS
from coars_jax.eval.user_f1 import BATCHINGS
from coars_jax.models import tokenizer as tokenizer_lib
from coars_jax.parallel import distributed, planner
from coars_jax.parallel.mesh import mesh_shape_from_config, validate_mesh_shape

from coars_jax.pipeline.run_config import (
  METHODS,
  METHOD_FIELDS,
  RUN_OUTPUTS,
  WARM_START_DIR,
  buckets,
  default_config,
  lora_config,
  reflexion_config,
  rl_config,
  rollout_config,
  sharding_rules,
  warm_start_config,
)


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
    config.eval.user_f1.batching in BATCHINGS,
    'eval.user_f1.batching',
    f'one of {BATCHINGS}',
    config.eval.user_f1.batching,
  )
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
  configlib.require_sampling_fields(config)
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
