"""Reading a `jax.profiler` trace of the CPU backend back: the XLA op kinds that took longest (`top_ops`), summed over
the backend's worker threads, with the executor's and loops' wrapper events left out. Used by the benchmarks'
`--profile` flags (`bench_decode_step`, `bench_lora_gradient`).

A note on reading the totals: in the update traces read so far, while one worker thread records a large matrix
product the other records nothing, although such a product runs about twice as fast on 2 threads as on 1; so an op
split across threads seems to be recorded once, for its wall time (an observation, not documented behaviour).
"""

import collections
import pathlib
import re

import jax

# Trace events that wrap others (the executor, while loops, thread-pool waits): left out of the op totals.
WRAPPERS = re.compile(r'^(ThunkExecutor|while|end: |SlinkyThreadPool)')


def top_ops(trace_dir: pathlib.Path, count: int = 8) -> list[tuple[str, float, int]]:
  """(op kind, milliseconds, events) of the `count` longest XLA op kinds in a trace, summed over worker threads."""
  path = next(pathlib.Path(trace_dir).glob('**/*.xplane.pb'))
  total, events = collections.Counter(), collections.Counter()
  for plane in jax.profiler.ProfileData.from_file(str(path)).planes:
    for line in plane.lines:
      if 'Eigen' not in line.name:  # the XLA CPU worker threads
        continue
      for event in line.events:
        if WRAPPERS.match(event.name):
          continue
        kind = re.sub(r'\.\d+$', '', event.name)
        total[kind] += event.duration_ns / 1e6
        events[kind] += 1
  return [(kind, ms, events[kind]) for kind, ms in total.most_common(count)]
