"""Logical axis names for the decoder's parameters and activations, and the two helpers that attach them:
`logical_param` (parameter metadata read later by sharding rules) and `constrain` (an activation sharding
constraint that is a no-op unless a mesh and logical-axis rules are both active)."""

from __future__ import annotations

import jax
from flax import nnx
from flax.core import spmd as flax_spmd
from flax.core import meta as flax_meta

BATCH = 'batch'
LENGTH = 'length'
EMBED = 'embed'
HEADS = 'heads'
KV_HEADS = 'kv_heads'
HEAD_DIM = 'head_dim'
MLP = 'mlp'
VOCAB = 'vocab'
ADAPTER = 'adapter'  # the leading axis that stacks the named LoRA adapters
LORA_RANK = 'lora_rank'  # the LoRA rank axis r
AXIS_NAMES: tuple[str, ...] = (BATCH, LENGTH, EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB, ADAPTER, LORA_RANK)

LogicalAxes = tuple[str | None, ...]


def sharding_active() -> bool:
  """True inside `jax.set_mesh(mesh)` together with `nnx.logical_axis_rules(rules)`."""
  return flax_meta.global_mesh_defined() and bool(flax_spmd.get_logical_axis_rules())


def logical_param(value: jax.Array, axes: LogicalAxes) -> nnx.Param:
  """A parameter annotated with one logical name per dimension (`out_sharding` metadata, read by
  `nnx.get_partition_spec` under rules). When sharding is active the value is also placed by the rules now.

  Flax's own eager sharding is kept off: it would take names the rules omit for mesh axes and fail.
  """
  if len(axes) != value.ndim:
    raise ValueError(f'logical_param: {len(axes)} axis names {axes} for an array of shape {value.shape}')
  return nnx.Param(constrain(value, axes), out_sharding=tuple(axes), eager_sharding=False)


def mesh_axes(axes: LogicalAxes) -> jax.sharding.PartitionSpec:
  """The active rules applied to logical `axes`; a name the rules do not mention stays replicated."""
  rules: dict[str, object] = {}
  for logical, mesh_axis in flax_spmd.get_logical_axis_rules():
    rules.setdefault(logical, mesh_axis)  # first rule wins, as in flax
  return jax.sharding.PartitionSpec(*(rules.get(name) if name is not None else None for name in axes))


def constrain(activation: jax.Array, axes: LogicalAxes) -> jax.Array:
  """Applies `with_sharding_constraint` for the logical `axes` when sharding is active; otherwise identity."""
  if not sharding_active():
    return activation
  return jax.lax.with_sharding_constraint(activation, mesh_axes(axes))
