"""Multi-host start-up settings: config first, then the environment, else left to JAX's own detection."""

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
  environ = {distributed.ENV_COORDINATOR: '10.0.0.1:1234', distributed.ENV_NUM_PROCESSES: '4',
             distributed.ENV_PROCESS_ID: '3'}
  assert distributed.initialize_arguments(settings(enabled=True), environ) == {
      'coordinator_address': '10.0.0.1:1234', 'num_processes': 4, 'process_id': 3}
  assert distributed.initialize_arguments(settings(enabled=True, num_processes=2, process_id=0), environ) == {
      'coordinator_address': '10.0.0.1:1234', 'num_processes': 2, 'process_id': 0}
  # On a TPU pod nothing is set: jax.distributed.initialize() reads the slice's metadata itself.
  assert distributed.initialize_arguments(settings(enabled=True), {}) == {}
