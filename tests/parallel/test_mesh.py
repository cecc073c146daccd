"""Mesh shapes from config: the three axes, their canonical order, -1, and errors that name the field."""

import jax
import pytest

from coars_jax.parallel import mesh as mesh_lib


def test_mesh_shape_resolves_minus_one_and_orders_axes_data_fsdp_tensor():
  assert mesh_lib.validate_mesh_shape({'tensor': 2, 'data': -1}, 8) == {'data': 4, 'tensor': 2}
  assert list(mesh_lib.validate_mesh_shape({'tensor': 2, 'fsdp': 2, 'data': 2}, 8)) == ['data', 'fsdp', 'tensor']
  assert mesh_lib.validate_mesh_shape({'data': -1}, 1) == {'data': 1}


@pytest.mark.parametrize(
  'shape, message',
  [
    ({'model': 2}, r"mesh: axes must be a non-empty subset of \('data', 'fsdp', 'tensor'\), found \['model'\]"),
    ({'data': 2, 'tensor': 2}, r"mesh: axes \{'data': 2, 'tensor': 2\} use 4 devices but 8 are present"),
    ({'data': -1, 'fsdp': -1}, r"mesh: at most one axis may be -1, found \['data', 'fsdp'\]"),
    ({'fsdp': 3, 'data': -1}, r'mesh: the fixed axes use 3 devices, which does not divide the 8 devices present'),
    ({'tensor': 0}, r'mesh.tensor: expected a positive int or -1'),
  ],
)
def test_bad_mesh_shapes_name_the_field(shape, message):
  with pytest.raises(ValueError, match=message):
    mesh_lib.validate_mesh_shape(shape, 8)


def test_make_mesh_keeps_the_configured_axes_and_absent_axes_have_size_one():
  default = mesh_lib.make_mesh()
  assert default.axis_names == ('data',) and mesh_lib.axis_size(default, 'data') == jax.device_count()
  assert mesh_lib.axis_size(default, 'tensor') == mesh_lib.axis_size(default, 'fsdp') == 1
  full = mesh_lib.make_mesh({'tensor': 1, 'fsdp': 1, 'data': -1})
  assert full.axis_names == ('data', 'fsdp', 'tensor')
  tensor_only = mesh_lib.make_mesh({'tensor': -1})
  # No 'data' axis: rows are then kept whole instead of naming an axis the mesh lacks.
  assert mesh_lib.batch_sharding(tensor_only, 2).spec == jax.sharding.PartitionSpec(None, None)
