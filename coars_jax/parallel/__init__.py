"""Device meshes (data, fsdp, tensor), the logical-axis rules that map the model's axis names onto them, the
shardings of parameters, adapters, optimizer state, KV caches and batches, sharded Orbax checkpoints, and what a
multi-host run needs besides (start-up, the primary process, gathering global arrays to the host)."""

from coars_jax.parallel.checkpoint import restore_sharded, save_sharded
from coars_jax.parallel.distributed import barrier, fetch, is_primary
from coars_jax.parallel.mesh import (
  DATA_AXIS,
  FSDP_AXIS,
  KNOWN_AXES,
  TENSOR_AXIS,
  axis_size,
  batch_sharding,
  make_mesh,
  mesh_shape_from_config,
  replicated,
  validate_mesh_shape,
)
from coars_jax.parallel.rules import DEFAULT_RULES, Rules, make_rules, validate_rules
from coars_jax.parallel.sharding import Partitioning, activation_scope, place, shard_model, sharded_jit

__all__ = [
  'DATA_AXIS',
  'DEFAULT_RULES',
  'FSDP_AXIS',
  'KNOWN_AXES',
  'Partitioning',
  'Rules',
  'TENSOR_AXIS',
  'activation_scope',
  'axis_size',
  'barrier',
  'batch_sharding',
  'fetch',
  'is_primary',
  'make_mesh',
  'make_rules',
  'mesh_shape_from_config',
  'place',
  'replicated',
  'restore_sharded',
  'save_sharded',
  'shard_model',
  'sharded_jit',
  'validate_mesh_shape',
  'validate_rules',
]
