"""Multi-host runs: `initialize` calls `jax.distributed.initialize` once per process, before anything touches a
device, with settings from the config's `distributed` group or, where a field is left empty, from the environment
(COARS_COORDINATOR_ADDRESS, COARS_NUM_PROCESSES, COARS_PROCESS_ID), and otherwise from what JAX detects itself on
Cloud TPU pods and SLURM clusters, where every host runs the same command with no settings at all. Every process
then runs the same deterministic program on the same host data; `is_primary` picks the one process that writes
logs and files, and `fetch` brings arrays that span processes back to every host as numpy."""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from coars_jax import configlib

ENV_COORDINATOR = 'COARS_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'COARS_NUM_PROCESSES'
ENV_PROCESS_ID = 'COARS_PROCESS_ID'


def distributed_defaults() -> ml_collections.ConfigDict:
  """The `distributed` group of the training config."""
  return ml_collections.ConfigDict(
    {
      'enabled': False,  # call jax.distributed.initialize first (every host of a multi-host run)
      'coordinator_address': '',  # host:port of process 0; '' = $COARS_COORDINATOR_ADDRESS, else JAX's detection
      'num_processes': 0,  # 0 = $COARS_NUM_PROCESSES, else JAX's detection
      'process_id': -1,  # -1 = $COARS_PROCESS_ID, else JAX's detection
    }
  )


def validate_fields(config: ml_collections.ConfigDict) -> None:
  settings = config.distributed
  configlib.require(isinstance(settings.enabled, bool), 'distributed.enabled', 'a bool', settings.enabled)
  configlib.require(
    isinstance(settings.coordinator_address, str),
    'distributed.coordinator_address',
    "'host:port' or ''",
    settings.coordinator_address,
  )
  configlib.require_int_field(config, 'distributed.num_processes', 0)
  configlib.require_int_field(config, 'distributed.process_id', -1)


def initialize_arguments(
  settings: ml_collections.ConfigDict | None, environ: dict[str, str] | None = None
) -> dict[str, Any] | None:
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
  jax.distributed.initialize(**arguments)
  logging.info(
    'jax.distributed: process %d of %d, %d local / %d global devices',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return True


def is_primary() -> bool:
  """Whether this process writes the run's files (logs, metrics, exports): process 0 only, since every process
  holds the same values and concurrent writers would clobber each other. Collective writes (Orbax checkpoints)
  are the exception: every process must call them."""
  return jax.process_index() == 0


def fetch(tree: Any) -> Any:
  """`tree` with every array as a host numpy array holding its GLOBAL value. An array sharded over devices of
  other processes is all-gathered first, a collective: every process must call `fetch` on the same arrays in the
  same order (they do, running the same program). Single-process, this is `np.asarray` leaf by leaf."""

  def host(leaf):
    if isinstance(leaf, jax.Array) and not (leaf.is_fully_addressable or leaf.is_fully_replicated):
      return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(leaf)

  return jax.tree.map(host, tree)


def barrier(name: str) -> None:
  """Waits until every process has reached the barrier `name` (returns at once in a single-process run), e.g. so
  that no process writes into a folder before the primary has finished clearing it."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
