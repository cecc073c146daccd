"""The results table: `python -m experiments.run_table --config=configs/table_smollm2.py [--only=coars,lastfm/*]`.

Runs every cell of the grid (dataset x row x seed, `coars_jax.pipeline.table`) whose row file is missing, in order,
resuming a cell from its latest checkpoint when an earlier invocation was stopped; a finished cell is skipped.
Stop it at any time (Ctrl-C, SIGTERM, `--hours`): an RL cell stops at its next safe point with a checkpoint, and
the next invocation continues it. Prints each cell's estimate and the remaining total, then rebuilds the report
(`experiments.report`) from what exists. `--dry_run` lists the cells with their status and exits.
"""

import pathlib
import signal
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from coars_jax import compilation_cache
from coars_jax.pipeline import table as table_lib
from experiments import report
from experiments import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A configs/table_*.py file.', lock_config=True)
_ONLY = flags.DEFINE_list(
  'only',
  [],
  'Cells to run: row names (coars), dataset/row (lastfm/coars-*) or full '
  'cell names (lastfm/coars/seed_1); fnmatch patterns. Default: every cell.',
)
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'List the cells, their status and estimates, and exit.')
_HOURS = flags.DEFINE_float(
  'hours',
  0.0,
  'Start no cell after this many hours, and stop the one in flight at the '
  'deadline (with a checkpoint when it is an RL cell); 0 = no limit.',
)
_REPORT = flags.DEFINE_bool('report', True, "Rebuild the report from the table's rows at the end.")


def _status(table, cell, done) -> str:
  if cell in done:
    return f'done ({table_lib.format_seconds(done[cell])})'
  started = (pathlib.Path(table_lib.cell_config(table, cell).workdir) / table_lib.CELL_STATE_FILE).is_file()
  estimate = table_lib.format_seconds(table_lib.estimate(cell, done))
  return ('started, will resume' if started else 'to run') + f' (est. {estimate})'


def main(argv):
  del argv
  table = _CONFIG.value
  table_lib.validate_table(table)
  if table.compilation_cache:  # a folder of the table's own in place of the default one `cli.run` turned on
    compilation_cache.enable(table_lib.absolute_path(table.compilation_cache))
  cells = table_lib.grid(table)
  try:
    chosen = table_lib.select(cells, _ONLY.value)
  except ValueError as error:
    raise app.UsageError(str(error))
  done = table_lib.finished_seconds(table, cells)
  todo = [cell for cell in chosen if cell not in done]
  print(
    f'Table {table.name}: {len(cells)} cells, {len(done)} done; selected {len(chosen)}, '
    f'{table_lib.eta_line(todo, done)}',
    flush=True,
  )
  if _DRY_RUN.value:
    for cell in chosen:
      print(f'  {cell.name:<40} {cell.kind:<9} {_status(table, cell, done)}')
    return
  table_lib.write_grid(table, cells)
  if _HOURS.value:
    # SIGALRM becomes the SIGTERM the runs already handle: the RL cell in flight checkpoints and returns.
    signal.signal(signal.SIGALRM, lambda *_: signal.raise_signal(signal.SIGTERM))
    signal.alarm(max(1, int(_HOURS.value * 3600)))
  start = time.perf_counter()
  stopped = False
  for number, cell in enumerate(todo, 1):
    if _HOURS.value and time.perf_counter() - start > _HOURS.value * 3600:
      stopped = True
      break
    print(
      f'\n[{number}/{len(todo)}] {cell.name} ({cell.kind}), est. '
      f'{table_lib.format_seconds(table_lib.estimate(cell, done))}; after it: '
      f'{table_lib.eta_line(todo[number:], done)}',
      flush=True,
    )
    result = table_lib.run_cell(table, cell)
    if not result.finished:
      print(
        f'{cell.name} stopped after {table_lib.format_seconds(result.seconds)} with a checkpoint; rerun the same '
        f'command to continue it',
        flush=True,
      )
      stopped = True
      break
    done[cell] = result.seconds
    print(
      f'{cell.name} done in {table_lib.format_seconds(result.seconds)} -> {table_lib.results_file(table, cell)}',
      flush=True,
    )
  signal.alarm(0)
  if _REPORT.value:
    root = table_lib.absolute_path(table.results_root)
    report.build(tables=[str(root)], rows=[], runs=[], output=str(root / 'README.md'), preamble='')
  left = [cell for cell in chosen if cell not in done]
  print(
    f'\n{len(chosen) - len(left)} of {len(chosen)} selected cells done'
    + (f'; {len(left)} left: rerun the same command to continue' if left else '')
  )
  if stopped:
    sys.exit(0)


def entry():
  """The `coars-run-table` console script (setup.py)."""
  cli.run(main, required=('config',))


if __name__ == '__main__':
  entry()
