"""Counting compilations, to check that length buckets keep a run from recompiling: `count_trace` is a
Python side effect placed at the top of each jitted function of this package, so it runs once per trace
(once per new shape or static setting), and `count_backend_compiles` counts every XLA compilation in the
process through jax's monitoring events, jitted or eager."""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Iterator

from jax import monitoring

# jax records this event once per XLA backend compilation (jax/_src/dispatch.py BACKEND_COMPILE_EVENT).
BACKEND_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'

_lock = threading.Lock()
_trace_counts: collections.Counter[str] = collections.Counter()


def count_trace(name: str) -> None:
  """Counts one trace of the jitted function `name`; call it from inside the traced Python body."""
  with _lock:
    _trace_counts[name] += 1


def trace_counts() -> dict[str, int]:
  """How many times each jitted function of this package has been traced so far in this process."""
  with _lock:
    return dict(_trace_counts)


def total_traces(counts: dict[str, int] | None = None) -> int:
  return sum((trace_counts() if counts is None else counts).values())


class BackendCompileCount:
  """The XLA compilations seen while a `count_backend_compiles` block was open: how many, and the seconds
  they took."""

  def __init__(self):
    self.count = 0
    self.seconds = 0.0

  def _listener(self, event: str, duration_secs: float, **kwargs) -> None:
    del kwargs
    if event == BACKEND_COMPILE_EVENT:
      self.count += 1
      self.seconds += duration_secs


@contextlib.contextmanager
def count_backend_compiles() -> Iterator[BackendCompileCount]:
  """`with count_backend_compiles() as compiles: ...` then `compiles.count` and `compiles.seconds`."""
  counter = BackendCompileCount()
  monitoring.register_event_duration_secs_listener(counter._listener)
  try:
    yield counter
  finally:
    monitoring.unregister_event_duration_listener(counter._listener)
