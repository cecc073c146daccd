"""Multi-host start-up: `initialize` calls `jax.distributed.initialize` once per process, before anything touches
a device, with settings from the config's `distributed` group or, where a field is left empty, from the
environment (COARS_COORDINATOR_ADDRESS, COARS_NUM_PROCESSES, COARS_PROCESS_ID), and otherwise from what JAX detects
itself on Cloud TPU pods and SLURM clusters, where every host runs the same command with no settings at all."""

from __future__ import annotations

import logging
import os
from typing import Any

import ml_collections

from coars_jax import configlib

ENV_COORDINATOR = 'COARS_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'COARS_NUM_PROCESSES'
ENV_PROCESS_ID = 'COARS_PROCESS_ID'


def distributed_defaults() -> ml_collections.ConfigDict:
  """The `distributed` group of the training config."""
  return ml_collections.ConfigDict({
      'enabled': False,  # call jax.distributed.initialize first (every host of a multi-host run)
      'coordinator_address': '',  # host:port of process 0; '' = $COARS_COORDINATOR_ADDRESS, else JAX's detection
      'num_processes': 0,  # 0 = $COARS_NUM_PROCESSES, else JAX's detection
      'process_id': -1,  # -1 = $COARS_PROCESS_ID, else JAX's detection
  })


def validate_fields(config: ml_collections.ConfigDict) -> None:
  settings = config.distributed
  configlib.require(isinstance(settings.enabled, bool), 'distributed.enabled', 'a bool', settings.enabled)
  configlib.require(isinstance(settings.coordinator_address, str), 'distributed.coordinator_address',
                    "'host:port' or ''", settings.coordinator_address)
  configlib.require_int_field(config, 'distributed.num_processes', 0)
  configlib.require_int_field(config, 'distributed.process_id', -1)


def initialize_arguments(settings: ml_collections.ConfigDict | None,
                         environ: dict[str, str] | None = None) -> dict[str, Any] | None:
  """The keyword arguments `initialize` passes to `jax.distributed.initialize`; None when it is not enabled.
  Arguments left out are detected by JAX (TPU pod metadata, SLURM variables)."""
  if settings is None or not settings.enabled:
    return None
  environ = os.environ if environ is None else environ
  arguments: dict[str, Any] = {}
  address = settings.coordinator_address or environ.get(ENV_COORDINATOR, '')
  if address:
    arguments['coordinator_address'] = address
  processes = settings.num_processes or int(environ.get(ENV_NUM_PROCESSES, 0))
  if processes:
    arguments['num_processes'] = processes
  process_id = settings.process_id if settings.process_id >= 0 else int(environ.get(ENV_PROCESS_ID, -1))
  if process_id >= 0:
    arguments['process_id'] = process_id
  return arguments


def initialize(settings: ml_collections.ConfigDict | None) -> bool:
  """Starts the multi-host runtime when `settings.enabled`; returns whether it did. Call it before any other JAX
  call that touches devices (jax.devices, device_put, jit), as JAX requires."""
  arguments = initialize_arguments(settings)
  if arguments is None:
    return False
  import jax

  jax.distributed.initialize(**arguments)
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
