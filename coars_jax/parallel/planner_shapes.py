"""The shapes the memory planner (`parallel.planner`) reads: the mesh a run is planned for (`MeshShape`), the
(shape, logical axes) of every base parameter of a decoder (`base_arrays`), and the run's memory-relevant shapes,
its adapter stacks included (`Workload`). Arithmetic on config values only; nothing here touches a device.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

from coars_jax import configlib
from coars_jax.models.config import DecoderConfig
from coars_jax.models.lora import TARGET_MODULES

MESH_AXES = ('data', 'fsdp', 'tensor')
NUM_AGENTS = 2  # the recommender's and the user's adapters, stacked in one array per projection


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
