"""The memory planner: per-device bytes of a training run (base weights, both agents' LoRA adapters, Adam state,
gradients, the rollout's KV cache and prefill, the update step's activations) from its config by arithmetic alone,
so that a run which cannot fit the named device is refused before any weights are read or any memory allocated.
It assumes this project's sharding (`parallel.rules.DEFAULT_RULES`): weights, adapters and Adam moments split by
their logical names (embed over fsdp; heads, kv heads, the MLP width and the vocabulary over tensor), batch rows
over data x fsdp, activations' heads and MLP width over tensor. The rollout and the update never overlap,
so the peak is what stays resident (weights, adapters, optimizer state) plus the larger of the two phases;
`ActivationFormula` gives the activation terms and how they were calibrated.

The planner lives in three modules, re-exported here (import from this one): `planner_shapes` (the inputs:
`MeshShape`, `base_arrays`, `Workload`), `planner_estimate` (the arithmetic: `sharded_bytes`, `ActivationFormula`,
`Plan`, `plan_memory`, and the `DEVICES` it checks against) and this module, which owns the config side: the `plan`
group's fields (`plan_defaults`, `validate_fields`) and the plan of a training config (`workload`, `plan_config`,
`check`, `summary`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import ml_collections

from coars_jax import configlib
from coars_jax.models.config import DTYPES, DecoderConfig
from coars_jax.models.presets import PRESETS, get_preset
from coars_jax.parallel.planner_estimate import (
  DEFAULT_USABLE_FRACTION,
  DEVICES,
  GIB,
  WEIGHT_AXES,
  ActivationFormula,
  Component,
  Plan,
  plan_memory,
  sharded_bytes,
)
from coars_jax.parallel.planner_shapes import MESH_AXES, NUM_AGENTS, MeshShape, Workload, base_arrays
from coars_jax.sampling.buckets import bucket_length

__all__ = [
  'DEFAULT_USABLE_FRACTION',
  'DEVICES',
  'GIB',
  'MESH_AXES',
  'NUM_AGENTS',
  'WEIGHT_AXES',
  'ActivationFormula',
  'Component',
  'MemoryPlanError',
  'MeshShape',
  'Plan',
  'Workload',
  'base_arrays',
  'check',
  'model_config',
  'plan_config',
  'plan_defaults',
  'plan_memory',
  'planned_devices',
  'sharded_bytes',
  'summary',
  'validate_fields',
  'workload',
]


class MemoryPlanError(ValueError):
  """The config's run does not fit the named device's memory."""


# --- config fields -----------------------------------------------------------------------------------------------


def plan_defaults() -> ml_collections.ConfigDict:
  """The `plan` group of the training config: which device a run is sized for, read only by the planner."""
  return ml_collections.ConfigDict(
    {
      'device': '',  # a name from planner.DEVICES ('h100-80gb', 'tpu-v5e', ...) or '' (no memory check)
      'device_memory_gib': 0.0,  # GiB of one device; 0 = the named device's (DEVICES)
      'usable_fraction': DEFAULT_USABLE_FRACTION,  # share of that memory the plan may fill
      'num_devices': 0,  # devices of the whole run (every host), to resolve a -1 mesh axis; 0 = jax.device_count()
      'model_shape': '',  # presets.py name giving the shapes when `model` is a folder absent on this machine
      'model_dtype': '',  # param and compute dtype assumed with model_shape ('' = the preset's own)
    }
  )


def validate_fields(config: ml_collections.ConfigDict) -> None:
  """Checks the `plan` group, naming the bad field; arithmetic only, no devices touched."""
  plan = config.plan
  configlib.require(
    plan.device == '' or plan.device in DEVICES, 'plan.device', f"'' or one of {sorted(DEVICES)}", plan.device
  )
  memory = plan.device_memory_gib
  configlib.require(
    isinstance(memory, (int, float)) and not isinstance(memory, bool) and memory >= 0,
    'plan.device_memory_gib',
    "a number >= 0 (0 = the named device's memory)",
    memory,
  )
  fraction = plan.usable_fraction
  configlib.require(
    isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction <= 1,
    'plan.usable_fraction',
    'a number in (0, 1]',
    fraction,
  )
  configlib.require_int_field(config, 'plan.num_devices', 0)
  configlib.require(
    plan.model_shape == '' or plan.model_shape in PRESETS,
    'plan.model_shape',
    f"'' or one of {sorted(PRESETS)}",
    plan.model_shape,
  )
  configlib.require(
    plan.model_dtype == '' or plan.model_dtype in DTYPES, 'plan.model_dtype', f"'' or one of {DTYPES}", plan.model_dtype
  )


# --- from a training config --------------------------------------------------------------------------------------


def model_config(config: ml_collections.ConfigDict) -> DecoderConfig:
  """The decoder the run will load, from names and config.json files alone (no weights are read)."""
  from coars_jax.models import backbone  # it reads data for the tiny tokenizer; only configs naming a backbone need it

  plan, name = config.plan, config.model
  if name in backbone.ALIASES:
    canonical = backbone.ALIASES[name]
    if canonical == backbone.TINY:
      return get_preset('tiny', vocab_size=config.tokenizer_vocab_size)
    return get_preset(canonical.replace('-', '_'))
  if os.path.isfile(os.path.join(name, 'config.json')):
    return DecoderConfig.from_hf(name)
  if plan.model_shape:
    dtype = {'param_dtype': plan.model_dtype, 'compute_dtype': plan.model_dtype} if plan.model_dtype else {}
    return get_preset(plan.model_shape, **dtype)
  raise configlib.ConfigError(
    f"Config field 'model': {name!r} has no config.json on this machine; set "
    f'plan.model_shape to one of {sorted(PRESETS)} to plan without the checkpoint'
  )


def workload(config: ml_collections.ConfigDict) -> Workload:
  """The memory-relevant shapes of a `pipeline.experiment` config."""
  budget = max(config.recommender_max_new_tokens, config.user_max_new_tokens)
  episodes = config.rl.windows_per_iteration * config.rl.rollouts_per_window
  rollout_rows = max(
    episodes, config.eval.batch_size, config.eval.user_f1.batch_size if config.eval.user_f1.enabled else 0
  )
  return Workload(
    model=model_config(config),
    lora_rank=config.lora.rank,
    rollout_rows=rollout_rows,
    prompt_length=max(config.prompt_buckets),
    completion_length=bucket_length(budget, sorted(config.completion_buckets), 'completion_buckets'),
    microbatch_rows=config.rl.rows_per_microbatch,
    score_chunk_size=config.rl.score_chunk_size or None,
  )


def planned_devices(config: ml_collections.ConfigDict) -> int:
  """plan.num_devices, else the mesh's size when it has no -1 axis, else every device of this process's run."""
  if config.plan.num_devices:
    return config.plan.num_devices
  sizes = [size for size in config.mesh.values()]
  if -1 not in sizes:
    return math.prod(sizes)
  import jax  # asked only here: counting devices starts the backend, but allocates nothing

  return jax.device_count()


def plan_config(config: ml_collections.ConfigDict) -> Plan:
  validate_fields(config)
  mesh = MeshShape.resolve(dict(config.mesh), planned_devices(config))
  return plan_memory(
    workload(config),
    mesh,
    device=config.plan.device,
    device_memory_gib=float(config.plan.device_memory_gib),
    usable_fraction=float(config.plan.usable_fraction),
  )


def check(config: ml_collections.ConfigDict) -> Plan:
  """The plan of `config`; raises `MemoryPlanError` when it does not fit the named device."""
  plan = plan_config(config)
  if not plan.fits:
    raise MemoryPlanError(plan.refusal())
  return plan


def summary(plan: Plan) -> dict[str, Any]:
  """The plan as JSON-ready numbers (GiB)."""
  return {
    'mesh': dataclasses.asdict(plan.mesh),
    'device': plan.device,
    'device_memory_gib': plan.device_memory_bytes / GIB,
    'usable_gib': plan.usable_bytes / GIB,
    'peak_gib': plan.peak_bytes / GIB,
    'fits': plan.fits,
    'components_gib': {c.name: c.num_bytes / GIB for c in plan.components},
  }
