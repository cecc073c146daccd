"""Device meshes and the shardings the jitted steps are compiled with (see `mesh`)."""

from coars_jax.parallel.mesh import (DATA_AXIS, batch_sharding, make_mesh, mesh_shape_from_config, replicated,
                                     validate_mesh_shape)

__all__ = ['DATA_AXIS', 'batch_sharding', 'make_mesh', 'mesh_shape_from_config', 'replicated',
           'validate_mesh_shape']
