"""The device mesh of a run and the simplest `NamedSharding`s its jitted steps name explicitly.

A mesh is built from a config mapping of axis name to size over the axes 'data' (batch rows), 'fsdp' (batch rows
and parameter shards) and 'tensor' (heads, MLP and vocabulary shards). `{'data': -1}` (every device of the run, all
hosts' together, on one data axis) is the default; an axis the config leaves out has size 1 and is simply absent
from the mesh, which the logical-axis rules (`parallel.rules`, `parallel.sharding`) treat exactly like a size-1
axis. Axes are always laid out in the order data, fsdp, tensor, so 'tensor' groups neighbouring devices, where its
frequent collectives are cheapest.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'
FSDP_AXIS = 'fsdp'
TENSOR_AXIS = 'tensor'
KNOWN_AXES = (DATA_AXIS, FSDP_AXIS, TENSOR_AXIS)


def validate_mesh_shape(shape: Mapping[str, int], num_devices: int, field: str = 'mesh') -> dict[str, int]:
  """The mesh shape, in the order of `KNOWN_AXES`, with a -1 entry resolved to the remaining devices; raises
  naming `field` when the axes are unknown, malformed, or do not multiply to `num_devices`."""
  shape = dict(shape)
  unknown = sorted(set(shape) - set(KNOWN_AXES))
  if unknown or not shape:
    raise ValueError(f'{field}: axes must be a non-empty subset of {KNOWN_AXES}, found {sorted(shape)}')
  for name, size in shape.items():
    if isinstance(size, bool) or not isinstance(size, int) or not (size == -1 or size >= 1):
      raise ValueError(f'{field}.{name}: expected a positive int or -1 (all remaining devices), found {size!r}')
  free = [name for name, size in shape.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f'{field}: at most one axis may be -1, found {free}')
  fixed = math.prod(size for size in shape.values() if size != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(
        f'{field}: the fixed axes use {fixed} devices, which does not divide the {num_devices} devices present'
      )
    shape[free[0]] = num_devices // fixed
  if math.prod(shape.values()) != num_devices:
    raise ValueError(f'{field}: axes {shape} use {math.prod(shape.values())} devices but {num_devices} are present')
  return {name: shape[name] for name in KNOWN_AXES if name in shape}


def mesh_shape_from_config(config) -> dict[str, int]:
  """A `ConfigDict` / mapping of axis sizes as a plain dict."""
  return {str(name): config[name] for name in config.keys()} if hasattr(config, 'keys') else dict(config)


def make_mesh(shape: Mapping[str, int] | None = None, devices=None) -> Mesh:
  """A `jax.sharding.Mesh` over `devices` (default: every device of the run, `jax.devices()`, which spans all
  processes of a multi-host run) with the given axis sizes, axes ordered data, fsdp, tensor whatever the order of
  `shape`. On CPU and GPU `jax.devices()` lists each process's devices together, so the minor axes (tensor, then
  fsdp) stay within a host wherever they fit and only the major ones cross the slower links between hosts."""
  devices = list(jax.devices() if devices is None else devices)
  resolved = validate_mesh_shape({DATA_AXIS: -1} if shape is None else shape, len(devices))
  grid = np.asarray(devices, dtype=object).reshape(tuple(resolved.values()))
  return Mesh(grid, tuple(resolved))


def axis_size(mesh: Mesh, name: str) -> int:
  """The size of mesh axis `name`; 1 for an axis the mesh does not have."""
  return dict(mesh.shape).get(name, 1)


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (scalars, small tables)."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int, row_axis: int = 0) -> NamedSharding:
  """Rows (dimension `row_axis` of an `ndim`-dimensional array) split over the 'data' axis (whole when the mesh
  has none), the rest whole. `sharding.Partitioning.batch` splits rows by the rules instead (over data and fsdp by
  default, falling back where the row count does not divide)."""
  if not 0 <= row_axis < ndim:
    raise ValueError(f'batch_sharding: row_axis {row_axis} is outside an array of rank {ndim}')
  spec = [None] * ndim
  spec[row_axis] = DATA_AXIS if DATA_AXIS in mesh.axis_names else None
  return NamedSharding(mesh, PartitionSpec(*spec))
