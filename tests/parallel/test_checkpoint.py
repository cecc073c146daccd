"""Sharded Orbax checkpoints: saved on one mesh, restored onto another with the target shardings."""

import jax
import numpy as np
import pytest

from coars_jax import parallel
from tests.parallel.conftest import run_on_eight_devices


def test_adapters_and_optimizer_saved_on_8x1x1_restore_onto_2x2x2_and_a_trainer_runs_there(tmp_path):
  result = run_on_eight_devices('checkpoint', str(tmp_path))
  assert result['leaves'] == 4 * 7 * 2 * 3 + 1  # a and b of 28 projections: adapters, Adam mu and nu; the count
  assert result['max_diff'] == 0.0 and result['shardings_match']
  assert result['source_mesh'] == {'data': 8, 'fsdp': 1, 'tensor': 1} and result['source_spec'] == []
  assert result['restored_mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert result['gate_lora_a']['spec'] == [None, 'fsdp'] and result['gate_lora_a']['shard_shape'] == [2, 128, 4]
  # An RLTrainer on (2,2,2) runs an iteration (rollout, judge scoring, update) and keeps the base, the adapters and
  # the Adam moments where the rules say; its model points at the placed base (no second copy).
  trainer = result['trainer']
  iteration = trainer['iteration']
  assert iteration['update/skipped'] is False and iteration['update/loss_rows'] > 0
  assert np.isfinite(iteration['loss/total']) and np.isfinite(iteration['update/grad_norm'])
  assert trainer['gate_kernel']['spec'] == ['fsdp', 'tensor'] and trainer['gate_kernel']['shard_shape'] == [16, 32]
  assert trainer['gate_lora_a']['spec'] == trainer['gate_lora_a_adam_mu']['spec'] == [None, 'fsdp']
  assert trainer['model_shares_placed_kernel']


def test_round_trip_on_one_device_and_relative_paths(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  mesh = parallel.make_mesh()
  tree = {'a': np.arange(6, dtype=np.float32).reshape(2, 3), 'b': {'c': np.int32(4) * np.ones((), np.int32)}}
  folder = parallel.save_sharded('saved', tree)
  assert folder.is_absolute() and folder.is_dir()
  whole = parallel.replicated(mesh)
  restored = parallel.restore_sharded('saved', tree, {'a': whole, 'b': {'c': whole}})
  np.testing.assert_array_equal(restored['a'], tree['a'])
  assert isinstance(restored['a'], jax.Array) and restored['a'].sharding == whole and int(restored['b']['c']) == 4
  with pytest.raises(FileNotFoundError, match='restore_sharded: no checkpoint folder at .*missing'):
    parallel.restore_sharded('missing', tree, {'a': whole, 'b': {'c': whole}})
