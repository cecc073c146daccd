"""The device mesh of a run and the `NamedSharding`s its jitted steps name explicitly.

A mesh is built from a config mapping of axis name to size (`{'data': -1}`: every local device on one data axis,
the default). Batches are split along the 'data' axis on their row dimension; parameters, optimizer state and
metrics are replicated. Steps take these shardings as `in_shardings` / `out_shardings`, so adding a model axis
later (fsdp, tensor) means adding a mesh axis and the parameter rules here, not touching the steps.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'
KNOWN_AXES = (DATA_AXIS,)


def validate_mesh_shape(shape: Mapping[str, int], num_devices: int, field: str = 'mesh') -> dict[str, int]:
  """The mesh shape with a -1 entry resolved to the remaining devices; raises naming `field` when the axes are
  unknown, malformed, or do not multiply to `num_devices`."""
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
      raise ValueError(f'{field}: the fixed axes use {fixed} devices, which does not divide the {num_devices} '
                       f'devices present')
    shape[free[0]] = num_devices // fixed
  if math.prod(shape.values()) != num_devices:
    raise ValueError(f'{field}: axes {shape} use {math.prod(shape.values())} devices but {num_devices} are present')
  return shape


def mesh_shape_from_config(config) -> dict[str, int]:
  """A `ConfigDict` / mapping of axis sizes as a plain dict."""
  return {str(name): config[name] for name in config.keys()} if hasattr(config, 'keys') else dict(config)


def make_mesh(shape: Mapping[str, int] | None = None, devices=None) -> Mesh:
  """A `jax.sharding.Mesh` over `devices` (default: all local devices) with the given axis sizes."""
  devices = list(jax.local_devices() if devices is None else devices)
  resolved = validate_mesh_shape({DATA_AXIS: -1} if shape is None else shape, len(devices))
  grid = np.asarray(devices, dtype=object).reshape(tuple(resolved.values()))
  return Mesh(grid, tuple(resolved))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (parameters, optimizer state, scalars)."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int, row_axis: int = 0) -> NamedSharding:
  """Rows (dimension `row_axis` of an `ndim`-dimensional array) split over the 'data' axis, the rest whole."""
  if not 0 <= row_axis < ndim:
    raise ValueError(f'batch_sharding: row_axis {row_axis} is outside an array of rank {ndim}')
  spec = [None] * ndim
  spec[row_axis] = DATA_AXIS
  return NamedSharding(mesh, PartitionSpec(*spec))
