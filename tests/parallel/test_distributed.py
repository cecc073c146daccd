"""Multi-host start-up settings (config first, then the environment, else left to JAX's own detection) and the
helpers in one process; `test_multihost` runs them across two processes."""

import jax.numpy as jnp
import numpy as np

from coars_jax.parallel import distributed


def settings(**overrides):
  config = distributed.distributed_defaults()
  config.update(overrides)
  return config


def test_disabled_start_up_calls_nothing():
  assert distributed.initialize_arguments(settings()) is None
  assert distributed.initialize_arguments(None) is None
  assert distributed.initialize(settings()) is False


def test_config_wins_over_the_environment_and_empty_fields_are_detected():
  environ = {
    distributed.ENV_COORDINATOR: '10.0.0.1:1234',
    distributed.ENV_NUM_PROCESSES: '4',
    distributed.ENV_PROCESS_ID: '3',
  }
  assert distributed.initialize_arguments(settings(enabled=True), environ) == {
    'coordinator_address': '10.0.0.1:1234',
    'num_processes': 4,
    'process_id': 3,
  }
  assert distributed.initialize_arguments(settings(enabled=True, num_processes=2, process_id=0), environ) == {
    'coordinator_address': '10.0.0.1:1234',
    'num_processes': 2,
    'process_id': 0,
  }
  # On a TPU pod nothing is set: jax.distributed.initialize() reads the slice's metadata itself.
  assert distributed.initialize_arguments(settings(enabled=True), {}) == {}


def test_one_process_is_the_primary_and_fetch_is_a_host_copy():
  assert distributed.is_primary()
  distributed.barrier('alone')  # returns at once: no other process to wait for
  fetched = distributed.fetch({'array': jnp.arange(3), 'scalars': [np.float32(2.0)]})
  assert isinstance(fetched['array'], np.ndarray) and isinstance(fetched['scalars'][0], np.ndarray)
  np.testing.assert_array_equal(fetched['array'], [0, 1, 2])
