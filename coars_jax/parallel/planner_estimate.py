"""The planner's estimate (`parallel.planner`): per-device bytes of each component of a run (base weights,
adapters, Adam state, gradients, the rollout's KV cache and prefill, the update step's activations) for a
`Workload` on a `MeshShape`, gathered in a `Plan` with its peak and the device it is checked against
(`plan_memory`). It assumes this project's sharding (`parallel.rules.DEFAULT_RULES`, see `WEIGHT_AXES`);
`ActivationFormula` gives the activation terms and how they were calibrated.
"""

from __future__ import annotations

import dataclasses
import math

from coars_jax.parallel.planner_shapes import MeshShape, Workload, base_arrays

GIB = 2**30
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
# The mesh axis each logical name of a weight is split over (`parallel.rules.DEFAULT_RULES`); others stay whole.
WEIGHT_AXES = {'embed': 'fsdp', 'heads': 'tensor', 'kv_heads': 'tensor', 'mlp': 'tensor', 'vocab': 'tensor'}


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
