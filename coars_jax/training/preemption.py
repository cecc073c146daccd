"""SIGTERM handling for long runs: `PreemptionGuard` turns the first SIGTERM into a stop at the next safe point
(the next generation call, or after the update in flight), and `guarded_iteration` rolls an interrupted rollout
back so the checkpoint written next resumes exactly."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
from typing import Any

import numpy as np

from coars_jax.training import rl


class Preempted(Exception):
  """Raised at a safe point after SIGTERM, to leave a long phase (a rollout, an evaluation) early."""


class PreemptionGuard:
  """SIGTERM handling for a run (a context manager; in the main thread only, where Python delivers signals).

  The first SIGTERM only sets `requested`: the run stops at its next safe point, which is the next generation call
  of a rollout or an evaluation (`watch`) or the end of the update in flight, checkpoints and returns. A second
  SIGTERM ends the process at once, as SIGTERM would without the guard; the last checkpoint still resumes exactly.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._installed = False

  def __enter__(self) -> 'PreemptionGuard':
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._installed = True
    return self

  def __exit__(self, *exc) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
      self._installed = False

  def _handle(self, signum, frame) -> None:
    del frame
    if self.requested:
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    self.requested = True
    logging.warning('SIGTERM: stopping at the next safe point with a checkpoint; send it again to stop at once')

  def check(self) -> None:
    if self.requested:
      raise Preempted()

  def watch(self, backend):
    """Makes `backend.generate` raise `Preempted` once SIGTERM has arrived; returns `backend`."""
    generate = backend.generate

    def guarded(*args, **kwargs):
      self.check()
      return generate(*args, **kwargs)

    backend.generate = guarded
    return backend


def guarded_iteration(trainer: rl.RLTrainer) -> dict[str, Any]:
  """`trainer.iteration()`; when SIGTERM cuts its rollout short, the trainer is put back as it was before and
  `Preempted` propagates. A rollout changes nothing but the RNG key; the update comes after it."""
  state = dataclasses.replace(trainer.state, rng=np.array(trainer.state.rng, copy=True))
  lora, opt_state = trainer.lora, trainer.opt_state
  try:
    return trainer.iteration()
  except Preempted:
    if trainer.lora is not lora or trainer.opt_state is not opt_state:
      raise RuntimeError('SIGTERM interrupted an RL iteration after its update; its state cannot be rolled back')
    trainer.state = state
    raise
