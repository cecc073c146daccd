"""The fault suite behind `make test-faults`: micro training runs (`fault_worker`, each a process of its own) are
failed at seeded random points (`training.faults`: SIGKILL during a rollout, scoring, an update, an evaluation or
a checkpoint write; SIGTERM; a full disk; a checkpoint corrupted after it was written), resumed until they finish,
and compared with an uninterrupted run of the same config.

`python -m tests.training.fault_suite [--scenarios N] [--seed S] [--workdir DIR]` prints one line per run and a
table: faults injected, runs recovered, data lost (a good checkpoint set aside, or a metrics line missing), and
resumed runs that differed (adapters, optimizer state, RNG, metrics lines or rows, timing fields aside). It exits 1
unless every run recovered, nothing was lost and nothing differed.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from coars_jax.pipeline import experiment as ex
from coars_jax.training import faults

REPO = pathlib.Path(__file__).resolve().parents[2]
# Row fields that hold wall times or the run's own paths.
UNCOMPARED_ROW_FIELDS = ('episode_seconds', 'wall_seconds', 'checkpoint', 'best_checkpoint')
# Where faults can land in `fault_worker`'s run (3 iterations, val evaluation after 2 and 3, a checkpoint after
# each): phase -> (iterations, hits, actions). Rollouts and evaluations make 4 generation calls each (2 turns x 2
# agents). A corrupt checkpoint needs an older one to fall back to, so only from iteration 2 on.
FAULT_POINTS = {
  'rollout': ((1, 2, 3), (1, 2, 3, 4), ('kill', 'term')),
  'scoring': ((1, 2, 3), (1,), ('kill', 'term')),
  'update': ((1, 2, 3), (1,), ('kill', 'term')),
  'eval': ((2, 3), (1, 2, 3, 4), ('kill', 'term')),
  'metrics': ((1, 2, 3), (1,), ('kill',)),
  'checkpoint': ((1, 2, 3), (1,), ('kill', 'enospc')),
  'seal': ((1, 2, 3), (1,), ('kill',)),
  'sealed': ((2, 3), (1,), ('corrupt',)),
}


def worker_env(cache_dir: pathlib.Path, fault: str | None) -> dict[str, str]:
  # One persistent compilation cache for every process of the suite: the programs are the same, so only the
  # first process compiles (the cache reuses XLA's output; it does not change what is computed).
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    JAX_COMPILATION_CACHE_DIR=str(cache_dir),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1',
  )
  env.pop(faults.FAULT_ENV, None)
  if fault:
    env[faults.FAULT_ENV] = fault
  return env


@dataclasses.dataclass
class WorkerRun:
  fault: str | None
  returncode: int
  stages: list[str] | None
  stderr: str
  seconds: float

  def fired(self) -> bool:
    """Whether the fault happened: the process was killed, stopped early on SIGTERM, or failed on the full disk."""
    if self.fault is None:
      return False
    action = faults.parse(self.fault).action
    if action in ('kill', 'corrupt'):
      return self.returncode == -signal.SIGKILL
    if action == 'term':
      return self.returncode == 0 and self.stages != ['before', 'after']
    return self.returncode != 0 and 'CheckpointError' in self.stderr and 'No space left' in self.stderr

  def finished(self) -> bool:
    return self.returncode == 0 and self.stages == ['before', 'after']


def run_worker(
  workdir: pathlib.Path, *, resume: bool, fault: str | None, cache_dir: pathlib.Path, timeout: int = 600
) -> WorkerRun:
  command = [sys.executable, '-m', 'tests.training.fault_worker', str(workdir)] + (['--resume'] if resume else [])
  start = time.perf_counter()
  result = subprocess.run(
    command, cwd=REPO, env=worker_env(cache_dir, fault), capture_output=True, text=True, timeout=timeout
  )
  stages = None
  for line in result.stdout.splitlines():
    if line.startswith('{"stages"'):
      stages = json.loads(line)['stages']
  return WorkerRun(
    fault=fault, returncode=result.returncode, stages=stages, stderr=result.stderr, seconds=time.perf_counter() - start
  )


def _flat(tree, prefix: str = '') -> dict[str, np.ndarray]:
  if isinstance(tree, dict):
    out = {}
    for key in sorted(tree, key=str):
      out.update(_flat(tree[key], f'{prefix}/{key}'))
    return out
  return {prefix: np.asarray(tree)}


def _adapters(folder: pathlib.Path) -> dict[str, np.ndarray]:
  from flax import nnx
  from coars_jax.training import warm_start as ws

  model, _ = ws.load_warm_start(folder)
  return _flat(nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))


def digest(workdir: pathlib.Path) -> dict:
  """What must not depend on faults: the metrics lines and rows (timing aside), the final and best adapters, and
  the last checkpoint's arrays and trainer state (its progress too, unless it holds a pending evaluation, which
  a resume completes in memory rather than in that checkpoint)."""
  import orbax.checkpoint as ocp

  metrics = [
    {k: v for k, v in record.items() if not k.startswith('time/')}
    for record in map(json.loads, (workdir / 'metrics.jsonl').read_text().splitlines())
  ]
  rows = [
    {k: v for k, v in row.items() if k not in UNCOMPARED_ROW_FIELDS}
    for row in json.loads((workdir / ex.RESULTS_FILE).read_text())
  ]
  checkpoints = workdir / ex.CHECKPOINT_DIR
  step = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  state = ocp.StandardCheckpointer().restore((checkpoints / str(step) / 'state').absolute())
  meta = json.loads((checkpoints / str(step) / 'meta' / 'metadata').read_text())
  kept_meta = {'trainer': meta['trainer']}
  if 'pending_record' not in meta:
    kept_meta.update({k: v for k, v in meta.items() if k != 'trainer'})
  return {
    'metrics': metrics,
    'rows': rows,
    'step': step,
    'meta': kept_meta,
    'state': _flat(state),
    'final': _adapters(workdir / ex.FINAL_DIR),
    'best': _adapters(workdir / ex.BEST_DIR),
  }


def differences(reference: dict, other: dict) -> list[str]:
  """What differs between two digests, bit for bit."""
  found = []
  for key in ('metrics', 'rows', 'step'):
    if reference[key] != other[key]:
      found.append(key)
  if reference['meta']['trainer'] != other['meta']['trainer']:
    found.append('checkpoint trainer state')
  if len(other['meta']) > 1 and reference['meta'] != other['meta']:
    found.append('checkpoint progress')
  for key in ('state', 'final', 'best'):
    left, right = reference[key], other[key]
    if left.keys() != right.keys() or any(
      left[k].dtype != right[k].dtype or not np.array_equal(left[k], right[k]) for k in left
    ):
      found.append(f'{key} arrays')
  return found


def lost_lines(reference: dict, other: dict) -> int:
  """Metrics lines of the uninterrupted run that the resumed one lacks."""
  iterations = [r['iteration'] for r in other['metrics']]
  missing = 0
  for record in reference['metrics']:
    if record['iteration'] in iterations:
      iterations.remove(record['iteration'])
    else:
      missing += 1
  return missing


def good_checkpoints(workdir: pathlib.Path) -> set[int]:
  """Steps whose checkpoint agrees with its manifest (or is unsealed, which a resume may use)."""
  folder = workdir / ex.CHECKPOINT_DIR
  if not folder.is_dir():
    return set()
  return {int(p.name) for p in folder.iterdir() if p.name.isdigit() and ex.checkpoint_problem(p) in (None, 'unsealed')}


def set_aside(workdir: pathlib.Path) -> set[int]:
  folder = workdir / ex.REJECTED_DIR
  return {int(p.name.split('-')[0]) for p in folder.iterdir() if p.is_dir()} if folder.is_dir() else set()


def fault_kinds(rng: random.Random):
  """(phase, action) pairs without end: every pair of `FAULT_POINTS` once in a shuffled round, round after round,
  so that a suite of a dozen faults or more tries every kind."""
  kinds = [(phase, action) for phase, (_, _, actions) in FAULT_POINTS.items() for action in actions]
  while True:
    rng.shuffle(kinds)
    yield from list(kinds)


def random_faults(rng: random.Random, kinds, count: int) -> list[str]:
  """`count` fault specs of the next kinds at random iterations and hits, distinct, in run order."""
  chosen = set()
  while len(chosen) < count:
    phase, action = next(kinds)
    iterations, hits, _ = FAULT_POINTS[phase]
    chosen.add(faults.Fault(phase=phase, iteration=rng.choice(iterations), action=action, hit=rng.choice(hits)))
  order = {phase: i for i, phase in enumerate(faults.PHASES)}
  return [f.spec() for f in sorted(chosen, key=lambda f: (f.iteration, order[f.phase], f.hit))]


@dataclasses.dataclass
class ScenarioResult:
  faults: list[str]
  fired: list[str]
  recovered: bool
  lost: int
  differed: list[str]
  runs: list[WorkerRun]


def run_scenario(
  workdir: pathlib.Path, specs: list[str], reference: dict, cache_dir: pathlib.Path, log=print
) -> ScenarioResult:
  """Runs `specs` one per process on one workdir (each a resume of the one before), then a clean resume."""
  runs, fired, lost = [], [], 0
  deliberately_bad: set[int] = set()
  for index, spec in enumerate(specs + [None]):
    before_good, before_aside = good_checkpoints(workdir), set_aside(workdir)
    run = run_worker(workdir, resume=index > 0, fault=spec, cache_dir=cache_dir)
    runs.append(run)
    newly_aside = set_aside(workdir) - before_aside
    wrongly = (newly_aside & before_good) - deliberately_bad
    lost += len(wrongly)
    if run.fired():
      fired.append(spec)
      fault = faults.parse(spec)
      if fault.action == 'corrupt':
        deliberately_bad.add(fault.iteration)
    state = 'fired' if run.fired() else ('finished' if run.finished() else f'exit {run.returncode}')
    log(
      f'    {spec or "(clean resume)":<24} {state:<10} {run.seconds:6.1f} s'
      + (f'  set aside: {sorted(newly_aside)}' if newly_aside else '')
      + (f'  GOOD CHECKPOINT SET ASIDE: {sorted(wrongly)}' if wrongly else '')
    )
    if not run.fired() and not run.finished():
      log('      ' + run.stderr[-2000:].replace('\n', '\n      '))
  recovered = runs[-1].finished()
  differed = []
  if recovered:
    other = digest(workdir)
    lost += lost_lines(reference, other)
    differed = differences(reference, other)
  return ScenarioResult(faults=specs, fired=fired, recovered=recovered, lost=lost, differed=differed, runs=runs)


def table(results: list[ScenarioResult], seconds: float) -> str:
  injected = sum(len(r.fired) for r in results)
  planned = sum(len(r.faults) for r in results)
  rows = [
    ('faults injected', f'{injected} (of {planned} planned; the rest fell past the run)'),
    ('runs recovered', f'{sum(r.recovered for r in results)} / {len(results)}'),
    ('data lost (must be 0)', str(sum(r.lost for r in results))),
    ('resumed runs that differed (must be 0)', str(sum(bool(r.differed) for r in results))),
    ('wall time', f'{seconds:.0f} s'),
  ]
  width = max(len(name) for name, _ in rows)
  return '\n'.join(f'{name:<{width}}  {value}' for name, value in rows)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--scenarios', type=int, default=8, help='fault chains to run after the reference run')
  parser.add_argument('--seed', type=int, default=0, help='seeds the fault points')
  parser.add_argument('--max-faults', type=int, default=3, help='faults per chain, at most')
  parser.add_argument('--workdir', default='', help='where the runs go (default: a temporary folder)')
  args = parser.parse_args(argv)
  start = time.perf_counter()
  root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix='coars-faults-')).absolute()
  root.mkdir(parents=True, exist_ok=True)
  cache_dir = root / 'jax_cache'
  log = functools.partial(print, flush=True)
  log(f'fault suite: seed {args.seed}, {args.scenarios} scenarios, runs under {root}')
  reference_run = run_worker(root / 'reference', resume=False, fault=None, cache_dir=cache_dir)
  if not reference_run.finished():
    log(reference_run.stderr[-3000:])
    return 1
  reference = digest(root / 'reference')
  log(f'  reference run: {reference_run.seconds:.1f} s')
  rng = random.Random(args.seed)
  kinds = fault_kinds(rng)
  results = []
  for number in range(args.scenarios):
    specs = random_faults(rng, kinds, rng.randint(1, args.max_faults))
    log(f'  scenario {number}: {" -> ".join(specs)}')
    result = run_scenario(root / f'scenario_{number}', specs, reference, cache_dir, log=log)
    if result.differed:
      log(f'    DIFFERS from the uninterrupted run: {result.differed}')
    results.append(result)
  log()
  log(table(results, time.perf_counter() - start))
  ok = all(r.recovered for r in results) and not any(r.lost or r.differed for r in results)
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
