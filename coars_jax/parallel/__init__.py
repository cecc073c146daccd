"""Device meshes (data, fsdp, tensor), the logical-axis rules that map the model's axis names onto them, the
shardings of parameters, adapters, optimizer state, KV caches and batches, and sharded Orbax checkpoints."""

from coars_jax.parallel.checkpoint import restore_sharded, save_sharded
from coars_jax.parallel.mesh import (DATA_AXIS, FSDP_AXIS, KNOWN_AXES, TENSOR_AXIS, axis_size, batch_sharding,
                                     make_mesh, mesh_shape_from_config, replicated, validate_mesh_shape)
from coars_jax.parallel.rules import DEFAULT_RULES, Rules, make_rules, validate_rules
from coars_jax.parallel.sharding import Partitioning, activation_scope, shard_model, sharded_jit

__all__ = ['DATA_AXIS', 'DEFAULT_RULES', 'FSDP_AXIS', 'KNOWN_AXES', 'Partitioning', 'Rules', 'TENSOR_AXIS',
           'activation_scope', 'axis_size', 'batch_sharding', 'make_mesh', 'make_rules', 'mesh_shape_from_config',
           'replicated', 'restore_sharded', 'save_sharded', 'shard_model', 'sharded_jit', 'validate_mesh_shape',
           'validate_rules']
