"""What a run tells its user at default verbosity: what it trains or reuses, where, why and about how long. One
line each on stderr (stdout stays for results), from the primary process only."""

from __future__ import annotations

import sys


def announce(message: str) -> None:
  """Prints `message` as one line on stderr (process 0 of a multi-host run only)."""
  import jax  # Imported here: announcing before JAX is configured must not initialise it.

  if jax.process_index() == 0:
    print(f'[coars] {message}', file=sys.stderr, flush=True)


def about(seconds: float) -> str:
  """A rough duration: '~40 s', '~12 min', '~1.5 h'."""
  if seconds < 90:
    return f'~{seconds:.0f} s'
  if seconds < 5400:
    return f'~{seconds / 60:.0f} min'
  return f'~{seconds / 3600:.1f} h'
