"""The memory planner: per-device bytes of a training run (base weights, both agents' LoRA adapters, Adam state,
gradients, the rollout's KV cache and prefill, the update step's activations) from its config by arithmetic alone,
so that a run which cannot fit the named device is refused before any weights are read or any memory allocated.
It assumes this project's sharding (`parallel.rules.DEFAULT_RULES`): weights, adapters and Adam moments split by
their logical names (embed over fsdp; heads, kv heads, the MLP width and the vocabulary over tensor), batch rows
over data x fsdp, activations' heads and MLP width over tensor. The rollout and the update never overlap,
so the peak is what stays resident (weights, adapters, optimizer state) plus the larger of the two phases;
`ActivationFormula` gives the activation terms and how they were calibrated.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

import ml_collections

from coars_jax import configlib
from coars_jax.models.config import DTYPES, DecoderConfig
from coars_jax.models.lora import TARGET_MODULES
from coars_jax.models.presets import PRESETS, get_preset
from coars_jax.sampling.buckets import bucket_length

GIB = 2**30
MESH_AXES = ('data', 'fsdp', 'tensor')
NUM_AGENTS = 2  # the recommender's and the user's adapters, stacked in one array per projection
# Memory one device offers, in GiB, as its runtime reports it (nvidia-smi total for GPUs, HBM per chip for TPUs).
DEVICES: dict[str, float] = {
  'h100-80gb': 79.6,
  'h200-141gb': 139.8,
  'a100-40gb': 39.4,
  'a100-80gb': 79.2,
  'l4-24gb': 22.0,
  'tpu-v4': 32.0,
  'tpu-v5e': 16.0,
  'tpu-v5p': 95.0,
  'tpu-v6e': 32.0,
}
# Of that, what a plan may fill: the runtime, XLA's scratch buffers and fragmentation take the rest. On GPUs, JAX
# preallocates 75% unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise; the GPU presets assume it is set to 0.9.
DEFAULT_USABLE_FRACTION = 0.9


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


# --- inputs ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshShape:
  """Devices per mesh axis; an axis the config leaves out has size 1."""

  data: int = 1
  fsdp: int = 1
  tensor: int = 1

  @property
  def num_devices(self) -> int:
    return self.data * self.fsdp * self.tensor

  @property
  def row_shards(self) -> int:
    """Ways batch rows are split: data x fsdp."""
    return self.data * self.fsdp

  @classmethod
  def resolve(cls, shape: Mapping[str, int], num_devices: int, field: str = 'mesh') -> MeshShape:
    """The mesh `shape` (axis -> size, one size may be -1) on `num_devices` devices."""
    shape = {str(name): size for name, size in shape.items()}
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
      raise configlib.ConfigError(f'Config field {field!r}: unknown axes {unknown}; the planner knows {MESH_AXES}')
    free = [name for name, size in shape.items() if size == -1]
    fixed = math.prod(size for size in shape.values() if size != -1)
    if (
      any(isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1) for size in shape.values())
      or len(free) > 1
    ):
      raise configlib.ConfigError(f'Config field {field!r}: expected positive sizes and at most one -1, found {shape}')
    if free:
      if num_devices % fixed:
        raise configlib.ConfigError(
          f'Config field {field!r}: the fixed axes use {fixed} devices, which does not '
          f'divide the {num_devices} devices planned for (plan.num_devices)'
        )
      shape[free[0]] = num_devices // fixed
    elif fixed != num_devices:
      raise configlib.ConfigError(
        f'Config field {field!r}: axes {shape} use {fixed} devices but the plan is for {num_devices} (plan.num_devices)'
      )
    return cls(**{name: shape.get(name, 1) for name in MESH_AXES})


# (shape, logical names) of each projection's input and output, as `models.decoder` builds them.
_PROJECTIONS = {
  'q_proj': lambda c: (((c.embed_dim,), ('embed',)), ((c.num_heads, c.head_dim), ('heads', 'head_dim'))),
  'k_proj': lambda c: (((c.embed_dim,), ('embed',)), ((c.num_kv_heads, c.head_dim), ('kv_heads', 'head_dim'))),
  'v_proj': lambda c: (((c.embed_dim,), ('embed',)), ((c.num_kv_heads, c.head_dim), ('kv_heads', 'head_dim'))),
  'o_proj': lambda c: (((c.num_heads, c.head_dim), ('heads', 'head_dim')), ((c.embed_dim,), ('embed',))),
  'gate_proj': lambda c: (((c.embed_dim,), ('embed',)), ((c.mlp_dim,), ('mlp',))),
  'up_proj': lambda c: (((c.embed_dim,), ('embed',)), ((c.mlp_dim,), ('mlp',))),
  'down_proj': lambda c: (((c.mlp_dim,), ('mlp',)), ((c.embed_dim,), ('embed',))),
}
# The mesh axis each logical name of a weight is split over (`parallel.rules.DEFAULT_RULES`); others stay whole.
WEIGHT_AXES = {'embed': 'fsdp', 'heads': 'tensor', 'kv_heads': 'tensor', 'mlp': 'tensor', 'vocab': 'tensor'}


def base_arrays(cfg: DecoderConfig) -> list[tuple[tuple[int, ...], tuple[str, ...]]]:
  """(shape, logical axes) of every base parameter of the decoder `cfg` builds."""
  layer = []
  for name, (in_dims, out_dims) in ((name, _PROJECTIONS[name](cfg)) for name in TARGET_MODULES):
    layer.append(((*in_dims[0], *out_dims[0]), (*in_dims[1], *out_dims[1])))
    if (
      (cfg.qkv_bias and name in ('q_proj', 'k_proj', 'v_proj'))
      or (cfg.out_bias and name == 'o_proj')
      or (cfg.mlp_bias and name in ('gate_proj', 'up_proj', 'down_proj'))
    ):
      layer.append(out_dims)
  layer += [((cfg.embed_dim,), ('embed',))] * 2 + [((cfg.head_dim,), ('head_dim',))] * (2 if cfg.qk_norm else 0)
  arrays = layer * cfg.num_layers + [
    ((cfg.vocab_size, cfg.embed_dim), ('vocab', 'embed')),
    ((cfg.embed_dim,), ('embed',)),
  ]
  if not cfg.tie_word_embeddings:
    arrays.append(((cfg.embed_dim, cfg.vocab_size), ('embed', 'vocab')))
  return arrays


@dataclasses.dataclass(frozen=True, kw_only=True)
class Workload:
  """The shapes that decide memory.

  model: the decoder's shapes and dtypes.
  lora_rank, lora_targets, lora_dtype, num_adapters: the adapter stacks (r, projections, dtype, agents).
  rollout_rows: the largest generation batch of the run (RL episodes per iteration, or an evaluation batch).
  prompt_length, completion_length: the longest prompt bucket and the completion bucket of the largest budget;
    the KV cache holds prompt + completion slots, and the update step scores rows of the same lengths.
  microbatch_rows: R, rows per microbatch of the update step.
  score_chunk_size: completion positions projected onto the vocabulary at once (None: all).
  remat: plan as if the decoder layers were rematerialised in the backward pass; a what-if for `plan_memory`
    callers, since the Decoder does not remat yet (configs always plan without it).
  """

  model: DecoderConfig
  lora_rank: int
  lora_targets: tuple[str, ...] = TARGET_MODULES
  lora_dtype: str = 'float32'
  num_adapters: int = NUM_AGENTS
  rollout_rows: int
  prompt_length: int
  completion_length: int
  microbatch_rows: int
  score_chunk_size: int | None = 256
  remat: bool = False

  @property
  def sequence_length(self) -> int:
    return self.prompt_length + self.completion_length

  def lora_arrays(self) -> list[tuple[tuple[int, ...], tuple[str, ...]]]:
    """(shape, logical axes) of every adapter array: per targeted projection, A [N, *in, r] and B [N, r, *out]."""
    out = []
    for in_dims, out_dims in (_PROJECTIONS[name](self.model) for name in self.lora_targets):
      out.append(((self.num_adapters, *in_dims[0], self.lora_rank), ('adapter', *in_dims[1], 'lora_rank')))
      out.append(((self.num_adapters, self.lora_rank, *out_dims[0]), ('adapter', 'lora_rank', *out_dims[1])))
    return out * self.model.num_layers

  def lora_params(self) -> int:
    return sum(math.prod(shape) for shape, _ in self.lora_arrays())


# --- the estimate ------------------------------------------------------------------------------------------------


def _itemsize(dtype: str) -> int:
  return {'float32': 4, 'bfloat16': 2}[dtype]


def _split(total: float, ways: int) -> int:
  return int(math.ceil(total / ways))


def sharded_bytes(arrays, itemsize: int, mesh: MeshShape) -> int:
  """Bytes one device holds of `arrays` split by `WEIGHT_AXES`; a dimension the axis does not divide stays whole,
  as `parallel.Partitioning` does."""
  sizes = dataclasses.asdict(mesh)
  total = 0
  for shape, axes in arrays:
    local = 1
    for size, name in zip(shape, axes):
      ways = sizes[WEIGHT_AXES[name]] if name in WEIGHT_AXES else 1
      local *= size // ways if size % ways == 0 else size
    total += local
  return total * itemsize


class ActivationFormula:
  """Bytes the update step holds per device for R_d = ceil(R / (data x fsdp)) rows of S = prompt + completion
  tokens, with c the compute dtype's size and t the tensor axis (E embed, H heads, K kv heads, D head dim, F MLP
  width, N adapters, r rank, T targeted projections, n layers, V vocabulary):

    per token and layer, what the backward pass keeps without remat:
      dense   = c (4E + (4HD + 4KD + 4F) / t + 2TNr) + 8E   norm inputs and outputs (and their float32 copies),
                                                           q, k before and after RoPE, v, attended, gate,
                                                           silu(gate), up, their product, the adapters' rank-r
                                                           projections before and after the row mask
      softmax = (12 + c') H S / t                          three float32 [H, S] tensors per query (scores, masked
                                                           scores, softmax) and the probabilities in the compute
                                                           dtype (c' = c, or 0 when that is float32)
    saved   = R_d S n (dense + softmax), or with remat R_d S n c E (each layer's input only)
    layer   = R_d S (dense + softmax): one layer live in the backward pass (its recomputation under remat)
    logits  = 3 R_d min(chunk, C) V / t x 4: one chunk of float32 logits, log-softmax and cotangent

  The coefficients were fitted to XLA's memory analysis of the compiled gradient of the tiny preset on CPU
  (float32 and bfloat16, 320 to 2112 tokens per row; tests/parallel/test_planner.py keeps the estimate within its
  tolerance). The teacher's stop-gradient forward pass holds one layer at a time and ends before the student's
  backward pass begins, so it adds nothing to the peak.
  """

  @staticmethod
  def per_token_layer(work: Workload, tensor: int) -> float:
    cfg, c = work.model, _itemsize(work.model.compute_dtype)
    hd, kd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    lora = len(work.lora_targets) * work.num_adapters * work.lora_rank
    dense = c * (4 * cfg.embed_dim + 4 * (hd + kd + cfg.mlp_dim) / tensor + 2 * lora) + 8 * cfg.embed_dim
    softmax = (12 + (c if c != 4 else 0)) * cfg.num_heads * work.sequence_length / tensor
    return dense + softmax

  @classmethod
  def bytes(cls, work: Workload, mesh: MeshShape) -> dict[str, int]:
    cfg, c = work.model, _itemsize(work.model.compute_dtype)
    tokens = _split(work.microbatch_rows, mesh.row_shards) * work.sequence_length
    per_layer = cls.per_token_layer(work, mesh.tensor)
    saved_per_token = c * cfg.embed_dim if work.remat else per_layer
    rows = _split(work.microbatch_rows, mesh.row_shards)
    chunk = min(work.score_chunk_size or work.completion_length, work.completion_length)
    return {
      'saved': int(tokens * cfg.num_layers * saved_per_token),
      'layer': int(tokens * per_layer),
      'logits': int(3 * rows * chunk * cfg.vocab_size / mesh.tensor * 4),
    }


@dataclasses.dataclass(frozen=True, kw_only=True)
class Component:
  name: str
  phase: str  # 'resident', 'rollout' or 'update'
  num_bytes: int
  formula: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
  """Per-device bytes of each component, the peak, and the device it is checked against."""

  components: tuple[Component, ...]
  mesh: MeshShape
  device: str
  device_memory_bytes: int  # 0: no device named, nothing to check against
  usable_fraction: float

  def phase_bytes(self, phase: str) -> int:
    return sum(c.num_bytes for c in self.components if c.phase == phase)

  @property
  def peak_bytes(self) -> int:
    return self.phase_bytes('resident') + max(self.phase_bytes('rollout'), self.phase_bytes('update'))

  @property
  def usable_bytes(self) -> int:
    return int(self.device_memory_bytes * self.usable_fraction)

  @property
  def fits(self) -> bool:
    return not self.device_memory_bytes or self.peak_bytes <= self.usable_bytes

  def component(self, name: str) -> Component:
    return next(c for c in self.components if c.name == name)

  def biggest(self) -> Component:
    return max(self.components, key=lambda c: c.num_bytes)

  def table(self) -> str:
    width = max(len(c.name) for c in self.components) + 2
    lines = [
      f'mesh data={self.mesh.data} fsdp={self.mesh.fsdp} tensor={self.mesh.tensor} '
      f'({self.mesh.num_devices} devices); bytes per device',
      f'{"component":<{width}}{"phase":<10}{"GiB":>9}  formula',
      '-' * (width + 60),
    ]
    for c in self.components:
      lines.append(f'{c.name:<{width}}{c.phase:<10}{c.num_bytes / GIB:>9.3f}  {c.formula}')
    lines.append('-' * (width + 60))
    lines.append(f'{"peak = resident + max(rollout, update)":<{width + 10}}{self.peak_bytes / GIB:>9.3f}')
    if self.device_memory_bytes:
      verdict = 'fits' if self.fits else 'DOES NOT FIT'
      lines.append(
        f'{"device " + self.device:<{width + 10}}{self.device_memory_bytes / GIB:>9.3f}  '
        f'usable {self.usable_bytes / GIB:.3f} GiB at {self.usable_fraction:g}: {verdict}'
      )
    return '\n'.join(lines)

  def refusal(self) -> str:
    biggest = self.biggest()
    return (
      f'the run needs {self.peak_bytes / GIB:.2f} GiB per device but {self.device} has '
      f'{self.device_memory_bytes / GIB:.2f} GiB ({self.usable_bytes / GIB:.2f} GiB usable at '
      f'plan.usable_fraction={self.usable_fraction:g}); the biggest component is {biggest.name} '
      f'({biggest.num_bytes / GIB:.2f} GiB, {biggest.phase}). Shard over more fsdp/tensor devices, or lower '
      f'rl.rows_per_microbatch, the prompt buckets or the generation batches.'
    )


def plan_memory(
  work: Workload,
  mesh: MeshShape,
  *,
  device: str = '',
  device_memory_gib: float = 0.0,
  usable_fraction: float = DEFAULT_USABLE_FRACTION,
) -> Plan:
  """The per-device estimate of `work` on `mesh`; checked against `device_memory_gib` (else the named device's)."""
  cfg = work.model
  p, c, lora_size = _itemsize(cfg.param_dtype), _itemsize(cfg.compute_dtype), _itemsize(work.lora_dtype)
  adapters = sharded_bytes(work.lora_arrays(), lora_size, mesh)
  rollout_rows = _split(work.rollout_rows, mesh.row_shards)
  kv_heads = cfg.num_kv_heads // mesh.tensor if cfg.num_kv_heads % mesh.tensor == 0 else cfg.num_kv_heads
  length, prompt = work.sequence_length, work.prompt_length
  cache = 2 * cfg.num_layers * rollout_rows * length * kv_heads * cfg.head_dim * c + rollout_rows * length * 4
  # Prefill: one layer live at a time over P queries and P + C keys, with the same per-token terms as the update.
  prefill = rollout_rows * prompt * ActivationFormula.per_token_layer(work, mesh.tensor)
  act = ActivationFormula.bytes(work, mesh)
  saved = 'R_d S n c E (remat)' if work.remat else 'R_d S n (dense + softmax), see ActivationFormula'
  components = (
    Component(
      name='base weights',
      phase='resident',
      num_bytes=sharded_bytes(base_arrays(cfg), p, mesh),
      formula=f'{cfg.num_params():,} params x {p} B, embed over fsdp, heads/mlp/vocab over tensor',
    ),
    Component(
      name='adapters',
      phase='resident',
      num_bytes=adapters,
      formula=f'{work.lora_params():,} LoRA params ({work.num_adapters} agents, r={work.lora_rank}) x '
      f'{lora_size} B, A and B split like the kernel dims',
    ),
    Component(name='optimizer state', phase='resident', num_bytes=2 * adapters, formula='Adam mu and nu: 2 x adapters'),
    Component(
      name='kv cache',
      phase='rollout',
      num_bytes=int(cache),
      formula=f'2 x {cfg.num_layers} layers x {rollout_rows} rows x {length} slots x {kv_heads} kv heads '
      f'x {cfg.head_dim} x {c} B',
    ),
    Component(
      name='prefill',
      phase='rollout',
      num_bytes=int(prefill),
      formula=f'{rollout_rows} rows x {prompt} tokens x (dense + softmax), one layer',
    ),
    Component(
      name='gradients', phase='update', num_bytes=2 * adapters, formula='accumulator + one microbatch: 2 x adapters'
    ),
    Component(name='saved activations', phase='update', num_bytes=act['saved'], formula=saved),
    Component(
      name='layer in backward',
      phase='update',
      num_bytes=act['layer'],
      formula='R_d S (dense + softmax): one layer in backward',
    ),
    Component(name='logits chunk', phase='update', num_bytes=act['logits'], formula='3 x R_d x chunk x V/t x 4 B'),
  )
  memory = device_memory_gib or DEVICES.get(device, 0.0)
  if device and device not in DEVICES and not device_memory_gib:
    raise ValueError(f'unknown device {device!r}; expected one of {sorted(DEVICES)} or a device_memory_gib')
  return Plan(
    components=components,
    mesh=mesh,
    device=device or f'{memory:g} GiB device',
    device_memory_bytes=int(memory * GIB),
    usable_fraction=usable_fraction,
  )


# --- from a training config --------------------------------------------------------------------------------------


def model_config(config: ml_collections.ConfigDict) -> DecoderConfig:
  """The decoder the run will load, from names and config.json files alone (no weights are read)."""
  from coars_jax.agents import backbone  # the agents package is heavy; only configs naming a backbone need it

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
  """The memory-relevant shapes of a `training.experiment` config."""
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
