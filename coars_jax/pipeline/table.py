"""The results table (project issue 15): a grid of cells, one per (dataset, row, seed), each an ordinary
`pipeline.experiment.run` in its own workdir, run in order, skipped when its row file exists and resumed from its
latest checkpoint when an earlier invocation was stopped.

A table config (`configs/table_*.py`) names:
- `base` ('smollm2' -> `experiment.smollm2_config`, 'default' -> `experiment.default_config`) and `model`;
- `datasets` and `rows`: 'reference' (SASRec, popularity and random on the same test lists, one file), the
  evaluated rows 'zero_shot' (the bare base, under the output grammars when `zero_shot_constrained`), 'reflexion'
  and 'warm_start', and the RL rows 'outcome_rl', 'judge_rl', 'coars' and 'coars-<ablation>';
- the seeds: `main_seeds` for the main RL rows, `ablation_seeds[dataset]` for the ablations; rows that train
  nothing get one (a greedy evaluation of a fixed model gives the same row under any seed);
- `overrides`: fields set on every cell's experiment config (the shared RL budget, the test windows, ...);
- `runs_root` (workdirs, checkpoints, the one warm start per dataset) and `results_root` (row files, metrics,
  `grid.json`), both relative to the working directory unless absolute.

Every RL row starts from the same warm start (`<runs_root>/<dataset>/warm_start_sft`, trained by the first cell that
needs it) and has the same budget; RL cells skip the 'before' evaluation (`eval.before=False`), because the
'warm_start' cell is that row on the same windows and the report pairs every row with it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import pathlib
import shutil
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections

from coars_jax import configlib
from coars_jax.eval.table_report import GRID_FILE
from coars_jax.data import DATASETS
from coars_jax.pipeline import experiment
from coars_jax.training.metrics import METRICS_FILE

REFERENCE = 'reference'
EVALUATED_ROWS = ('zero_shot', 'reflexion', 'warm_start')
MAIN_RL_ROWS = ('outcome_rl', 'judge_rl', 'coars')
ABLATION_ROWS = tuple(f'coars{experiment.ABLATION_SEPARATOR}{name}' for name in experiment.ABLATIONS)
ALL_ROWS = (REFERENCE, *EVALUATED_ROWS, *MAIN_RL_ROWS, *ABLATION_ROWS)
CELL_STATE_FILE = 'table_cell.json'  # in a cell's workdir: wall seconds spent over earlier invocations


def row_kind(row: str) -> str:
  """'reference', 'eval' (trains nothing) or 'rl'."""
  if row == REFERENCE:
    return 'reference'
  if row in EVALUATED_ROWS:
    return 'eval'
  if row in MAIN_RL_ROWS or row in ABLATION_ROWS:
    return 'rl'
  raise ValueError(f'unknown table row {row!r}; expected one of {ALL_ROWS}')


@dataclasses.dataclass(frozen=True, order=True)
class Cell:
  """One run of the grid."""

  dataset: str
  row: str
  seed: int

  @property
  def name(self) -> str:
    return f'{self.dataset}/{self.row}/seed_{self.seed}'

  @property
  def kind(self) -> str:
    return row_kind(self.row)


def table_defaults() -> ml_collections.ConfigDict:
  """The fields of a table config, with their defaults."""
  return ml_collections.ConfigDict(
    {
      'name': 'table',
      'base': 'smollm2',  # smollm2 | default: which experiment config every cell starts from
      'model': 'smollm2-135m',  # the backbone (base='default' only; smollm2 fixes it)
      'datasets': ('lastfm', 'movielens', 'instruments'),
      'rows': ALL_ROWS,
      'main_seeds': 3,  # RL training seeds of outcome_rl, judge_rl and coars
      'ablation_seeds': {'lastfm': 3, 'movielens': 1, 'instruments': 1},  # per dataset, for coars-<ablation>
      'row_seeds': {},  # per RL row, a seed count that replaces main_seeds / ablation_seeds for that row
      'zero_shot_constrained': True,  # the zero-shot row decodes under the output grammars (+grammar)
      'runs_root': 'runs/table',
      'results_root': 'results/table',
      'overrides': {},  # nested like the experiment config; applied to every cell
      'compilation_cache': '',  # a folder for JAX's persistent compilation cache ('' = off)
      # The recipe pilot (`experiments.pilot`): the first `iterations` of `row`'s seed-0 cell under each arm (arm name
      # -> experiment fields, nested like `overrides`), judged on val windows only.
      'pilot': {'row': 'coars', 'iterations': 4, 'arms': {'base': {}}},
    }
  )


def validate_table(table: ml_collections.ConfigDict) -> None:
  """Fails on the first bad field, naming it."""
  bare, defaults = table.copy_and_resolve_references(), table_defaults()
  # Free-form mappings (their keys are rows and experiment fields, checked below), not fields of the table.
  with bare.unlocked():
    del bare['overrides']
    if 'row_seeds' in bare:
      del bare['row_seeds']
    if 'pilot' in bare:
      del bare['pilot']['arms']
  with defaults.unlocked():
    del defaults['overrides']
    del defaults['row_seeds']
    del defaults['pilot']['arms']
  configlib.check_keys(bare, defaults)
  configlib.require(table.base in ('smollm2', 'default'), 'base', "'smollm2' or 'default'", table.base)
  for dataset in table.datasets:
    configlib.require(dataset in DATASETS, 'datasets', f'names from {DATASETS}', dataset)
  for row in table.rows:
    configlib.require(row in ALL_ROWS, 'rows', f'names from {ALL_ROWS}', row)
  configlib.require_int_field(table, 'main_seeds', 1)
  for dataset in table.datasets:
    count = table.ablation_seeds.get(dataset, 1)
    configlib.require(isinstance(count, int) and count >= 1, f'ablation_seeds.{dataset}', 'an int >= 1', count)
  for row, count in table.get('row_seeds', {}).items():
    configlib.require(row in MAIN_RL_ROWS + ABLATION_ROWS, f'row_seeds.{row}', f'an RL row of {ALL_ROWS}', row)
    configlib.require(isinstance(count, int) and count >= 1, f'row_seeds.{row}', 'an int >= 1', count)
  for field in ('runs_root', 'results_root'):
    configlib.require_folder(field, table[field])
  # Every cell's experiment config must be valid (overrides name real fields with valid values) before any runs.
  for cell in {cell.kind: cell for cell in reversed(grid(table))}.values():
    experiment.validate(cell_config(table, cell))
  configlib.require(table.pilot.row in MAIN_RL_ROWS + ABLATION_ROWS, 'pilot.row', 'an RL row', table.pilot.row)
  configlib.require_int_field(table, 'pilot.iterations', 1)
  for arm, fields in table.pilot.arms.items():
    config = cell_config(table, Cell(table.datasets[0], table.pilot.row, 0))
    _merge(
      config, fields.to_dict() if isinstance(fields, ml_collections.ConfigDict) else dict(fields), f'pilot.arms.{arm}.'
    )
    experiment.validate(config)


def seeds_for(table: ml_collections.ConfigDict, dataset: str, row: str) -> tuple[int, ...]:
  kind = row_kind(row)
  if kind != 'rl':
    return (0,)
  count = table.main_seeds if row in MAIN_RL_ROWS else table.ablation_seeds.get(dataset, 1)
  count = table.get('row_seeds', {}).get(row, count)
  return tuple(range(count))


def grid(table: ml_collections.ConfigDict) -> list[Cell]:
  """Every cell, dataset by dataset; within a dataset seed 0 of every row first (in row order: the reference and
  evaluations come first, so the warm start is trained by its own row and every later cell loads it), then seed 1
  of the rows that have one, and so on, so that a partly run table has every row before any row has its seeds."""
  cells = []
  for dataset in table.datasets:
    mine = [Cell(dataset, row, seed) for row in table.rows for seed in seeds_for(table, dataset, row)]
    cells += sorted(mine, key=lambda c: (c.seed, list(table.rows).index(c.row)))
  return cells


def select(cells: Sequence[Cell], only: Sequence[str]) -> list[Cell]:
  """The cells whose name matches one of the `only` patterns (fnmatch over 'dataset/row/seed_k'; a pattern without
  '/' matches the row name, one with a single '/' dataset/row). Empty `only` keeps every cell; a pattern that matches
  nothing is an error, so a typo does not silently run nothing."""
  if not only:
    return list(cells)
  kept = []
  for pattern in only:
    parts = pattern.count('/')
    full = {0: f'*/{pattern}/*', 1: f'{pattern}/*'}.get(parts, pattern)
    matched = [cell for cell in cells if fnmatch.fnmatchcase(cell.name, full)]
    if not matched:
      raise ValueError(
        f'--only={pattern!r} matches no cell; cells look like {cells[0].name!r}'
        if cells
        else f'--only={pattern!r}: the grid is empty'
      )
    kept += [cell for cell in matched if cell not in kept]
  return sorted(kept, key=cells.index)


def _merge(config: ml_collections.ConfigDict, overrides: Mapping[str, Any], prefix: str = 'overrides.') -> None:
  for key, value in overrides.items():
    if key not in config:
      raise configlib.ConfigError(f'Table field {prefix}{key}: not a field of the experiment config')
    if isinstance(value, Mapping) and isinstance(config[key], ml_collections.ConfigDict):
      _merge(config[key], value, f'{prefix}{key}.')
    else:
      config[key] = value


def absolute_path(path: str) -> pathlib.Path:
  return pathlib.Path(path).expanduser().absolute()


def cell_config(table: ml_collections.ConfigDict, cell: Cell) -> ml_collections.ConfigDict:
  """The experiment config of `cell` (see the module docstring)."""
  if cell.kind == 'reference':
    method = 'zero_shot'
  else:
    method = 'zero_shot' if cell.row in ('zero_shot', 'warm_start') else cell.row
  if table.base == 'smollm2':
    config = experiment.smollm2_config(cell.dataset, method)
  else:
    config = experiment.default_config(cell.dataset, table.model, method)
  _merge(
    config,
    table.overrides.to_dict() if isinstance(table.overrides, ml_collections.ConfigDict) else dict(table.overrides),
  )
  root = absolute_path(table.runs_root) / cell.dataset
  config.workdir = str(root / cell.row / f'seed_{cell.seed}')
  config.warm_start.folder = str(root / 'warm_start_sft')  # the row 'warm_start' has its own workdir
  if cell.row == 'zero_shot':
    config.warm_start.enabled = False
    config.eval.constrained = bool(table.zero_shot_constrained)
  if cell.row == 'warm_start':
    config.warm_start.enabled = True
    config.label = 'warm_start'
  if cell.kind == 'rl':
    config.warm_start.enabled = True
    config.eval.before = False  # the warm_start cell is that row, on the same windows
  config.eval.zero_shot = False
  config.rl.seed = int(cell.seed)
  config.resume = True  # `run_cell` turns it off while the workdir holds no checkpoint
  return config


def results_file(table: ml_collections.ConfigDict, cell: Cell) -> pathlib.Path:
  return absolute_path(table.results_root) / cell.dataset / f'{cell.row}__seed_{cell.seed}.json'


def device_label() -> dict[str, Any]:
  """What a row ran on: the JAX platform, device kind and count, and the host's CPU count."""
  device = jax.devices()[0]
  return {
    'platform': device.platform,
    'device_kind': device.device_kind,
    'device_count': jax.device_count(),
    'host_cpus': os.cpu_count(),
    'label': f'{device.platform}: {jax.device_count()} x {device.device_kind} ({os.cpu_count()} host cpus)',
  }


# --- the reference rows ------------------------------------------------------------------------------------------


def reference_cell_rows(config: ml_collections.ConfigDict, components: experiment.Components) -> list[dict]:
  """SASRec (the peer), popularity and random on the test windows the agentic rows play, with each window's hit:
  the same candidate lists (`rollout.candidate_seed`) and windows (`eval.test_windows`)."""
  from coars_jax.eval import reference  # Imported here: the evaluation-only path of a table does not need it.

  rows = reference.window_rows(
    components.dataset, components.sasrec, int(config.rollout.candidate_seed), limit=int(config.eval.test_windows)
  )
  for row in rows:
    row.update({'sasrec_seed': int(config.sasrec_seed), 'train_seed': 0})
  return rows


# --- running -----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CellResult:
  cell: Cell
  finished: bool
  seconds: float


def _cell_rows(table, cell: Cell, config, components) -> list[dict] | None:
  """Runs `cell`; its rows, or None when it stopped before its last iteration (stop_after or SIGTERM)."""
  if cell.kind == 'reference':
    return reference_cell_rows(config, components)
  rows = experiment.run(config, components=components)
  after = [row for row in rows if row.get('stage') == 'after']
  return after or None


def run_cell(
  table: ml_collections.ConfigDict,
  cell: Cell,
  *,
  components: Callable[[ml_collections.ConfigDict], experiment.Components] | None = None,
  overrides: Mapping[str, Any] | None = None,
) -> CellResult:
  """Runs one cell (resuming its checkpoint when one exists) and, when it finishes, writes its row file with the
  device, the budget and the cell's wall time summed over invocations, plus a copy of its metrics.jsonl for the
  learning curves. `components` builds the run's parts from its config (default: loads them by name)."""
  config = cell_config(table, cell)
  if overrides:
    _merge(config, overrides)
  workdir = pathlib.Path(config.workdir)
  # Resume when an earlier invocation left a checkpoint (a first run has none to resume, and needs no warning).
  checkpoints = workdir / experiment.CHECKPOINT_DIR
  config.resume = checkpoints.is_dir() and any(checkpoints.iterdir())
  workdir.mkdir(parents=True, exist_ok=True)
  state_path = workdir / CELL_STATE_FILE
  spent = json.loads(state_path.read_text())['seconds'] if state_path.is_file() else 0.0
  start = time.perf_counter()
  parts = (components or experiment.load_components)(config)
  rows = _cell_rows(table, cell, config, parts)
  seconds = spent + time.perf_counter() - start
  state_path.write_text(json.dumps({'seconds': seconds}))
  if rows is None:
    return CellResult(cell, False, seconds)
  device = device_label()
  for row in rows:
    row.update(
      {
        'table': table.name,
        'cell': cell.name,
        'row': cell.row,
        'train_seed': cell.seed,
        'device': device['label'],
        'platform': device['platform'],
        'cell_wall_seconds': round(seconds, 1),
      }
    )
  path = results_file(table, cell)
  path.parent.mkdir(parents=True, exist_ok=True)
  metrics = workdir / METRICS_FILE
  if metrics.is_file():
    shutil.copyfile(metrics, path.with_suffix('.metrics.jsonl'))
    (path.with_suffix('.config.json')).write_text((workdir / experiment.CONFIG_FILE).read_text())
  tmp = path.with_suffix('.json.tmp')
  tmp.write_text(json.dumps(rows, indent=2, default=str))
  tmp.replace(path)  # written last: its presence is what marks the cell done
  return CellResult(cell, True, seconds)


def write_grid(table: ml_collections.ConfigDict, cells: Sequence[Cell]) -> pathlib.Path:
  """`<results_root>/grid.json`: the table's cells and the shared budget, so the report can list what is missing."""
  sample = next((cell_config(table, c) for c in cells if c.kind == 'rl'), None)
  budget = (
    None
    if sample is None
    else {
      'iterations': sample.rl.iterations,
      'windows_per_iteration': sample.rl.windows_per_iteration,
      'rollouts_per_window': sample.rl.rollouts_per_window,
      'episodes': sample.rl.iterations * sample.rl.windows_per_iteration * sample.rl.rollouts_per_window,
    }
  )
  path = absolute_path(table.results_root) / GRID_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  model = cell_config(table, cells[0]).model if cells else table.model
  path.write_text(
    json.dumps(
      {'table': table.name, 'model': model, 'budget': budget, 'cells': [dataclasses.asdict(c) for c in cells]}, indent=2
    )
  )
  return path


# --- progress ----------------------------------------------------------------------------------------------------


def finished_seconds(table: ml_collections.ConfigDict, cells: Sequence[Cell]) -> dict[Cell, float]:
  """The wall time of every finished cell, read from its row file."""
  out = {}
  for cell in cells:
    path = results_file(table, cell)
    if path.is_file():
      rows = json.loads(path.read_text())
      out[cell] = float(rows[0].get('cell_wall_seconds', 0.0)) if rows else 0.0
  return out


def estimate(cell: Cell, done: Mapping[Cell, float]) -> float | None:
  """Seconds `cell` should take: the mean of finished cells of its kind on its dataset, else of its kind on any
  dataset; None before any such cell has finished."""
  same = [s for c, s in done.items() if c.kind == cell.kind and c.dataset == cell.dataset]
  same = same or [s for c, s in done.items() if c.kind == cell.kind]
  return sum(same) / len(same) if same else None


def format_seconds(seconds: float | None) -> str:
  if seconds is None:
    return '?'
  if seconds < 90:
    return f'{seconds:.0f} s'
  if seconds < 5400:
    return f'{seconds / 60:.0f} min'
  return f'{seconds / 3600:.1f} h'


def eta_line(todo: Sequence[Cell], done: Mapping[Cell, float]) -> str:
  """The remaining time over `todo`, with how many cells have no estimate yet."""
  known = [estimate(c, done) for c in todo]
  unknown = sum(e is None for e in known)
  total = sum(e for e in known if e is not None)
  if not todo:
    return 'nothing left to run'
  if unknown == len(todo):
    return f'{len(todo)} cell(s) to run, not timed yet (an estimate follows the first finished cell of each kind)'
  line = f'{len(todo)} cell(s) to run, about {format_seconds(total)}'
  return line + (f' plus {unknown} cell(s) of a kind not timed yet' if unknown else '')
