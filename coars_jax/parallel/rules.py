"""Logical-axis rules: the table that maps the logical names carried by the decoder's parameters, activations and
KV cache (`models.logical_axes`: batch, length, embed, heads, kv_heads, head_dim, mlp, vocab, adapter, lora_rank) to
the mesh axes (data, fsdp, tensor). Rules are data: a config mapping such as `{'embed': None, 'mlp': 'tensor'}`
overrides the defaults name by name, and is validated before any work starts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from coars_jax.models.logical_axes import (
  ADAPTER,
  AXIS_NAMES,
  BATCH,
  EMBED,
  HEAD_DIM,
  HEADS,
  KV_HEADS,
  LENGTH,
  LORA_RANK,
  MLP,
  VOCAB,
)
from coars_jax.parallel.mesh import DATA_AXIS, FSDP_AXIS, KNOWN_AXES, TENSOR_AXIS

# (logical name, mesh axes it is split over, major to minor); an empty tuple keeps the dimension whole.
Rules = tuple[tuple[str, tuple[str, ...]], ...]

DEFAULT_RULES: Rules = (
  # Rows go over every data-parallel axis; fsdp also shards the parameters, so it splits the batch too.
  (BATCH, (DATA_AXIS, FSDP_AXIS)),
  (LENGTH, ()),
  # Parameters' embed dimension is the one FSDP shards (gathered per layer by XLA when it is used).
  (EMBED, (FSDP_AXIS,)),
  (HEADS, (TENSOR_AXIS,)),
  (KV_HEADS, (TENSOR_AXIS,)),
  (HEAD_DIM, ()),
  (MLP, (TENSOR_AXIS,)),
  (VOCAB, (TENSOR_AXIS,)),
  # The adapter stack and the LoRA rank are small: kept whole, so a row's adapter choice needs no gather.
  (ADAPTER, ()),
  (LORA_RANK, ()),
)


def make_rules(
  table: Mapping[str, str | Sequence[str] | None] | None = None, *, field: str = 'sharding_rules'
) -> Rules:
  """`DEFAULT_RULES` with the entries of `table` (logical name -> a mesh axis, a sequence of them, or None for
  whole) put in their place; raises naming `field` on an unknown logical name or mesh axis."""
  merged = dict(DEFAULT_RULES)
  for name in table.keys() if table is not None else ():
    merged[str(name)] = _mesh_axes(table[name], f'{field}.{name}')
  return validate_rules(tuple(merged.items()), field=field)


def validate_rules(
  rules: Rules | Sequence[tuple[str, str | Sequence[str] | None]], *, field: str = 'sharding_rules'
) -> Rules:
  """`rules` in normal form (every value a tuple of mesh axes), after checking names, axes and duplicates."""
  seen: set[str] = set()
  out = []
  for entry in rules:
    if not isinstance(entry, (tuple, list)) or len(entry) != 2:
      raise ValueError(f'{field}: each rule must be a (logical name, mesh axes) pair, found {entry!r}')
    name, axes = entry
    if name not in AXIS_NAMES:
      raise ValueError(f'{field}: unknown logical axis {name!r}; expected one of {AXIS_NAMES}')
    if name in seen:
      raise ValueError(f'{field}: logical axis {name!r} has more than one rule')
    seen.add(name)
    out.append((name, _mesh_axes(axes, f'{field}.{name}')))
  return tuple(out)


def _mesh_axes(value, field: str) -> tuple[str, ...]:
  if value is None:
    return ()
  axes = (value,) if isinstance(value, str) else tuple(value)
  for axis in axes:
    if axis not in KNOWN_AXES:
      raise ValueError(f'{field}: expected mesh axes from {KNOWN_AXES} or None, found {value!r}')
  if len(set(axes)) != len(axes):
    raise ValueError(f'{field}: a mesh axis may appear once per logical axis, found {value!r}')
  return axes
