"""Fault injection for the reliability tests: `COARS_FAULT=<phase>:<iteration>[:<action>[:<hit>]]` makes a
training process (`pipeline.experiment.run`) fail at one chosen point, so that a test can prove that a resumed run
ends exactly where an uninterrupted one does. Nothing here runs unless the variable is set.

Phases (where, within RL iteration `iteration`, counting from 1):
  rollout     the `hit`-th sampling call of the rollout (default the first)
  scoring     the rewards, reference and teacher prompts of the rollout
  update      the update step, after it has computed the new adapters and before the trainer keeps them
  eval        the `hit`-th generation call of the greedy val evaluation after the iteration
  metrics     after the iteration's metrics line is written, before its checkpoint
  checkpoint  inside Orbax's save of checkpoint `iteration`, after its files are written, before the commit
  seal        after Orbax's commit of checkpoint `iteration`, before its manifest (`experiment.MANIFEST_FILE`)
  sealed      after checkpoint `iteration`'s manifest is written

Actions: `kill` (default; SIGKILL, nothing is flushed), `term` (SIGTERM: the run stops gracefully at its next
safe point), `enospc` (checkpoint only: the write fails as on a full disk) and `corrupt` (sealed only: the
largest file of the checkpoint's arrays is cut in half and the process is killed, as a disk that lost data later
would leave it).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import os
import pathlib
import signal
from typing import Any, Callable

FAULT_ENV = 'COARS_FAULT'
PHASES = ('rollout', 'scoring', 'update', 'eval', 'metrics', 'checkpoint', 'seal', 'sealed')
ACTIONS = ('kill', 'term', 'enospc', 'corrupt')
_ACTION_PHASES = {'enospc': ('checkpoint',), 'corrupt': ('sealed',)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fault:
  """One injected failure: `action` at the `hit`-th arrival at `phase` of RL iteration `iteration`."""

  phase: str
  iteration: int
  action: str = 'kill'
  hit: int = 1

  def __post_init__(self):
    if self.phase not in PHASES:
      raise ValueError(f'{FAULT_ENV}: phase must be one of {PHASES}, found {self.phase!r}')
    if self.action not in ACTIONS:
      raise ValueError(f'{FAULT_ENV}: action must be one of {ACTIONS}, found {self.action!r}')
    if self.action in _ACTION_PHASES and self.phase not in _ACTION_PHASES[self.action]:
      raise ValueError(
        f'{FAULT_ENV}: action {self.action!r} applies to phase {_ACTION_PHASES[self.action]} '
        f'only, found phase {self.phase!r}'
      )
    for name in ('iteration', 'hit'):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f'{FAULT_ENV}: {name} must be an int >= 1, found {getattr(self, name)!r}')

  def spec(self) -> str:
    """The `COARS_FAULT` value that gives this fault."""
    return f'{self.phase}:{self.iteration}:{self.action}:{self.hit}'


def parse(value: str) -> Fault:
  parts = value.strip().split(':')
  if not 2 <= len(parts) <= 4:
    raise ValueError(f'{FAULT_ENV}={value!r}: expected <phase>:<iteration>[:<action>[:<hit>]], e.g. update:2')
  try:
    numbers = [int(parts[1])] + ([int(parts[3])] if len(parts) == 4 else [])
  except ValueError as error:
    raise ValueError(f'{FAULT_ENV}={value!r}: iteration and hit must be integers') from error
  return Fault(
    phase=parts[0],
    iteration=numbers[0],
    action=parts[2] if len(parts) > 2 else 'kill',
    hit=numbers[1] if len(numbers) > 1 else 1,
  )


@functools.cache
def active() -> Fault | None:
  """The fault `COARS_FAULT` asks for, parsed once per process (None when unset)."""
  value = os.environ.get(FAULT_ENV, '')
  return parse(value) if value else None


_arrivals: dict[tuple[str, int], int] = {}


def _fire(fault: Fault, step_dir: pathlib.Path | None = None) -> None:
  if fault.action == 'term':
    # The run's handler only sets a flag; the process carries on to its next safe point.
    os.kill(os.getpid(), signal.SIGTERM)
    return
  if fault.action == 'enospc':
    raise OSError(errno.ENOSPC, f'No space left on device (injected by {FAULT_ENV}={fault.spec()})')
  if fault.action == 'corrupt' and step_dir is not None:
    arrays = step_dir / 'state' if (step_dir / 'state').is_dir() else step_dir  # Orbax's array item
    largest = max((p for p in arrays.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
    with open(largest, 'r+b') as handle:
      handle.truncate(largest.stat().st_size // 2)
  os.kill(os.getpid(), signal.SIGKILL)


def point(phase: str, iteration: int, step_dir: pathlib.Path | None = None) -> None:
  """Fires the active fault when this is its phase, iteration and hit; a no-op otherwise (and when unset)."""
  fault = active()
  if fault is None or fault.phase != phase or fault.iteration != iteration:
    return
  key = (phase, iteration)
  _arrivals[key] = _arrivals.get(key, 0) + 1
  if _arrivals[key] == fault.hit:
    _fire(fault, step_dir)


def _wrap(owner: Any, name: str, phase: str, iteration: Callable[[], int], *, after: bool = False) -> None:
  """Replaces `owner.name` (an instance attribute shadows the method) with one that passes `point` first, or
  after the call when `after`."""
  original = getattr(owner, name)

  def wrapped(*args, **kwargs):
    if not after:
      point(phase, iteration())
    result = original(*args, **kwargs)
    if after:
      point(phase, iteration())
    return result

  setattr(owner, name, wrapped)


def instrument_trainer(trainer) -> None:
  """Puts the rollout, scoring and update points into an `rl.RLTrainer` (only when a fault is active)."""
  if active() is None:
    return
  current = lambda: trainer.state.iteration + 1  # the iteration in flight; `state` counts finished ones
  _wrap(trainer.backend, 'generate', 'rollout', current)
  _wrap(trainer, '_rewards', 'scoring', current)
  _wrap(trainer, '_step', 'update', current, after=True)


def instrument_eval(backend, iteration: int) -> None:
  """Puts the eval point into the greedy backend of the val evaluation after `iteration`."""
  if active() is not None:
    _wrap(backend, 'generate', 'eval', lambda: iteration)


@functools.cache
def instrument_orbax() -> None:
  """Puts the checkpoint point into Orbax's commit (the rename of the step's temporary folder), once."""
  if active() is None or active().phase != 'checkpoint':
    return
  from orbax.checkpoint._src.path import atomicity  # a private module: only fault tests depend on it

  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self, *args, **kwargs):
    step = pathlib.Path(str(self.get_final())).name
    if step.isdigit():
      point('checkpoint', int(step))
    return await original(self, *args, **kwargs)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize
