"""The report of a results table (`pipeline.table`, project issue 15): per device platform and dataset, every row
with Hit@1 over seeds, its paired bootstrap 95% interval against the warm start and against outcome-reward RL
over the same test windows, ValidRatio, turns, user F1 with precision and recall, the RL budget and the wall time;
learning curves (one line per method, seeds as thin lines); the cells still missing; and "What holds", claim by
claim, written from those intervals alone.

Seeds and pairing: a row with several seeds is paired through its per-window hit rate (the mean over its seeds of
each window's hit), the reference likewise, and the windows are resampled (`eval.metrics.paired_bootstrap`). The
user-F1 comparison resamples users from per-user counts averaged over seeds (`paired_bootstrap_f1`). Rows from
different platforms are never compared with each other.
"""

from __future__ import annotations

import collections
import json
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from coars_jax.eval import metrics, report

# Row name -> label, in table order.
ROWS = collections.OrderedDict(
  [
    ('random', 'Random'),
    ('popularity', 'Popularity'),
    ('sasrec', 'SASRec (the peer)'),
    ('zero_shot', 'Zero-shot'),
    ('reflexion', 'Reflexion memory'),
    ('warm_start', 'Warm start (SFT)'),
    ('outcome_rl', 'Outcome-reward RL'),
    ('judge_rl', 'Judge-reward RL'),
    ('coars', 'CoARS'),
    ('coars-no_sd', 'CoARS w/o self-distillation'),
    ('coars-outcome_reward', 'CoARS w/ outcome reward'),
    ('coars-rec_only', 'CoARS, recommender alone'),
    ('coars-constant_d', 'CoARS, constant D_t'),
    ('coars-d_without_samples', 'CoARS, d without samples'),
  ]
)
COMPARED_WITH = ('warm_start', 'outcome_rl')
GRID_FILE = 'grid.json'  # a table's cells and budget, beside its row files (`pipeline.table.write_grid`)
# (claim, row, reference row, metric): "What holds".
CLAIMS = (
  ('CoARS beats outcome-reward RL on Hit@1', 'coars', 'outcome_rl', 'hit'),
  ('CoARS beats memory-based agents (Reflexion) on Hit@1', 'coars', 'reflexion', 'hit'),
  ('Self-distillation adds (CoARS vs lambda_SD = 0)', 'coars', 'coars-no_sd', 'hit'),
  ('The interaction reward adds (CoARS vs the outcome reward)', 'coars', 'coars-outcome_reward', 'hit'),
  ('Co-evolving the user adds (CoARS vs the recommender alone)', 'coars', 'coars-rec_only', 'hit'),
  ("The user agent's F1 improves (CoARS vs the warm start)", 'coars', 'warm_start', 'f1'),
)


def read_table(root: str | pathlib.Path) -> dict[str, Any]:
  """A table's results folder: its grid (`grid.json`, or None), its rows (each with `row` and `platform`), and its
  learning curves (the metrics copied beside each RL row file)."""
  root = pathlib.Path(root)
  grid_path = root / GRID_FILE
  grid = json.loads(grid_path.read_text()) if grid_path.is_file() else None
  rows, curves = [], []
  for path in sorted(root.glob('*/*__seed_*.json')):
    if path.name.endswith(('.config.json',)):
      continue
    found = json.loads(path.read_text())
    for row in found:
      rows.append(
        {**row, 'row': row.get('row') if row.get('row') != 'reference' else row['method'], 'source': str(path)}
      )
    metrics_path = path.with_suffix('.metrics.jsonl')
    if metrics_path.is_file():
      first = found[0]
      curves.append(
        {
          'dataset': first['dataset'],
          'method': first.get('row'),
          'seed': int(first.get('train_seed', 0)),
          'platform': first.get('platform', 'cpu'),
          'points': report.curve_points(metrics_path),
        }
      )
  return {'root': str(root), 'grid': grid, 'rows': rows, 'curves': curves}


def _by_row(rows: Sequence[Mapping[str, Any]]) -> 'collections.OrderedDict[str, list]':
  grouped = collections.defaultdict(list)
  for row in rows:
    grouped[row['row']].append(row)
  order = list(ROWS)
  return collections.OrderedDict(
    sorted(grouped.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0]))
  )


def window_rates(rows: Sequence[Mapping[str, Any]]) -> tuple[tuple[int, ...], np.ndarray] | None:
  """(window indices, the per-window hit rate over the seeds) of one row's seeds; None when they lack per-window
  hits or disagree on the windows."""
  if not rows or any(r.get('window_hits') is None for r in rows):
    return None
  windows = tuple(rows[0]['window_indices'])
  if any(tuple(r['window_indices']) != windows for r in rows):
    return None
  return windows, np.mean([np.asarray(r['window_hits'], np.float64) for r in rows], axis=0)


def case_counts(rows: Sequence[Mapping[str, Any]]) -> np.ndarray | None:
  """[users, 3] user-F1 counts averaged over the seeds; None when a seed lacks them or the users differ."""
  found = [r.get('user_f1_cases') for r in rows]
  if not found or any(f is None for f in found) or len({len(f) for f in found}) != 1:
    return None
  return np.mean([np.asarray(f, np.float64) for f in found], axis=0)


def compare(rows: Sequence[Mapping], reference: Sequence[Mapping], metric: str = 'hit') -> dict[str, float] | None:
  """The paired difference of `rows` from `reference` (Hit@1 over windows, or user F1 over users) with its 95%
  interval; None when either side is missing or they were not measured on the same windows or users."""
  if metric == 'hit':
    mine, theirs = window_rates(rows), window_rates(reference)
    if mine is None or theirs is None or mine[0] != theirs[0]:
      return None
    return metrics.paired_bootstrap(mine[1], theirs[1])
  mine, theirs = case_counts(rows), case_counts(reference)
  if mine is None or theirs is None or mine.shape != theirs.shape:
    return None
  return metrics.paired_bootstrap_f1(mine, theirs)


def _interval(found: Mapping[str, float] | None) -> str:
  if found is None:
    return '–'
  return f'{found["diff"]:+.3f} [{found["low"]:+.3f}, {found["high"]:+.3f}]'


def _cell(rows: Sequence[Mapping], key: str, digits: int = 3) -> str:
  return report.Cell(tuple(float(r[key]) for r in rows if r.get(key) is not None)).format(digits)


def _wall(rows: Sequence[Mapping]) -> str:
  seconds = [float(r['cell_wall_seconds']) for r in rows if r.get('cell_wall_seconds') is not None]
  if not seconds:
    return '–'
  mean = float(np.mean(seconds))
  return f'{mean / 3600:.1f} h' if mean >= 5400 else f'{mean / 60:.0f} min'


def format_rows(by_row: Mapping[str, Sequence[Mapping]]) -> str:
  """The markdown table of one (platform, dataset)."""
  lines = [
    '| Method | Seeds | Hit@1 | vs warm start (95% CI) | vs outcome RL (95% CI) | ValidRatio | Turns | '
    'User F1 (P / R) | RL episodes | Test windows | Wall time |',
    '|' + '---|' * 11,
  ]
  for name, rows in by_row.items():
    f1 = _cell(rows, 'user_f1')
    if f1 != '–':
      f1 += f' ({_cell(rows, "user_precision", 2)} / {_cell(rows, "user_recall", 2)})'
    versus = [
      _interval(compare(rows, by_row[other])) if other in by_row and other != name else '–' for other in COMPARED_WITH
    ]
    budget = sorted({r.get('rl_episodes') for r in rows if r.get('rl_episodes')})
    windows = sorted({f'{r.get("num_windows")} of {r.get("windows_of_split")}' for r in rows})
    lines.append(
      f'| {ROWS.get(name, name)}{" + grammar" if rows[0].get("constrained") else ""} | {len(rows)} | '
      f'{_cell(rows, "hit@1")} | {versus[0]} | {versus[1]} | {_cell(rows, "valid_ratio")} | '
      f'{_cell(rows, "avg_turns", 2)} | {f1} | {", ".join(map(str, budget)) or "–"} | '
      f'{", ".join(windows)} | {_wall(rows)} |'
    )
  return '\n'.join(lines)


def verdict(found: Mapping[str, float] | None, missing: Sequence[str]) -> str:
  """A claim's verdict from its interval: supported only when the whole 95% interval is above 0."""
  if missing:
    return f'not tested: no rows for {", ".join(missing)}'
  if found is None:
    return 'not tested: the rows were not measured on the same windows or users'
  text = f'{found["diff"]:+.3f}, 95% CI [{found["low"]:+.3f}, {found["high"]:+.3f}]'
  if found['low'] > 0:
    return f'**supported** ({text})'
  if found['high'] < 0:
    return f'**contradicted**: the difference is below 0 ({text})'
  return f'**not supported**: the interval includes 0 ({text})'


def what_holds(by_row: Mapping[str, Sequence[Mapping]]) -> list[str]:
  lines = []
  for claim, row, reference, metric in CLAIMS:
    missing = [ROWS[name] for name in (row, reference) if name not in by_row]
    found = None if missing else compare(by_row[row], by_row[reference], metric)
    lines.append(f'- {claim}: {verdict(found, missing)}.')
  return lines


def missing_cells(grid: Mapping[str, Any] | None, rows: Sequence[Mapping], dataset: str) -> list[str]:
  """The grid's cells of `dataset` with no row file."""
  if not grid:
    return []
  present = {r.get('cell') for r in rows}
  return [
    f'{c["row"]}/seed_{c["seed"]}'
    for c in grid['cells']
    if c['dataset'] == dataset and f'{c["dataset"]}/{c["row"]}/seed_{c["seed"]}' not in present
  ]


def table_sections(table: Mapping[str, Any], output_dir: str | pathlib.Path) -> list[str]:
  """The markdown of one table: per platform and dataset, the rows, "What holds", the curves and what is missing."""
  grid, rows = table['grid'], table['rows']
  name = grid['table'] if grid else pathlib.Path(table['root']).name
  parts = [f'## Table `{name}`', '']
  if grid and grid.get('budget'):
    budget = grid['budget']
    parts += [
      f'Every RL row: {budget["iterations"]} iterations x {budget["windows_per_iteration"]} windows x '
      f'{budget["rollouts_per_window"]} rollouts = {budget["episodes"]} episodes, from the same warm start.',
      '',
    ]
  platforms = sorted({r.get('platform', 'cpu') for r in rows}) or ['cpu']
  datasets = [
    d
    for d in report.DATASET_ORDER
    if any(c['dataset'] == d for c in (grid or {}).get('cells', [])) or any(r['dataset'] == d for r in rows)
  ]
  for platform in platforms:
    mine = [r for r in rows if r.get('platform', 'cpu') == platform]
    devices = sorted({r.get('device', platform) for r in mine})
    for dataset in datasets:
      here = [r for r in mine if r['dataset'] == dataset]
      parts += [f'### {dataset}, on {platform}', '']
      if devices:
        parts += [f'Device: {"; ".join(devices)}.', '']
      by_row = _by_row(here)
      if by_row:
        parts += [
          format_rows(by_row),
          '',
          '**What holds** (each claim: the paired 95% interval of the difference; '
          '"not supported" where it includes 0):',
          '',
          *what_holds(by_row),
          '',
        ]
      missing = missing_cells(grid, here, dataset)
      if missing:
        parts += [f'Missing ({len(missing)} cells, not estimated): {", ".join(missing)}.', '']
      curves = [c for c in table['curves'] if c['dataset'] == dataset and c['platform'] == platform]
      png = report.plot_curves(curves, dataset, pathlib.Path(output_dir) / f'{name}_{platform}_{dataset}_curves.png')
      if png is not None:
        parts += [f'![{dataset} learning curves on {platform}]({png.name})', '']
  return parts


def committed_headline(root: str | pathlib.Path) -> str:
  """The headline of a committed table (its rows per dataset and "What holds"), labelled as committed results with
  the path they come from; `make demo` prints it after its own rows so a reader sees the evidence beside them."""
  root = pathlib.Path(root)
  if not root.is_dir():
    return f'Committed results: none yet at {root}.'
  table = read_table(root)
  name = table['grid']['table'] if table['grid'] else root.name
  parts = [f'Committed results of table `{name}` (from {root.absolute()}, not what this command just ran):']
  rows = table['rows']
  if not rows:
    return parts[0] + ' no finished cell yet.'
  for dataset in report.DATASET_ORDER:
    here = [r for r in rows if r['dataset'] == dataset]
    if not here:
      continue
    by_row = _by_row(here)
    missing = missing_cells(table['grid'], here, dataset)
    parts += [
      '',
      f'{dataset}: {len(here)} row file(s), {len(missing)} cell(s) still missing',
      '',
      format_rows(by_row),
      '',
      'What holds:',
    ] + what_holds(by_row)
  return '\n'.join(parts)
