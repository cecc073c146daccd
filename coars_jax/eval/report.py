"""The results table of project issue 5: rows from every kind of run, grouped per dataset, averaged over seeds,
written as `results/README.md` with PNG learning curves beside it.

Inputs are the JSON row files the entry points write:
- the reference table (`experiments.evaluate --config=configs/sasrec_*.py --output=`): random, popularity, SASRec,
  one row per SASRec training seed;
- agentic evaluations (`experiments.evaluate --config=configs/eval_*.py --output=`);
- training runs (`experiments.train`'s `<workdir>/results.json`: a `before` row, the warm start or zero-shot
  start, and an `after` row), plus each run's `metrics.jsonl` for the curves.

Nothing here fills a gap: a row that was not run is listed under "Not run", and a cell is the mean ± standard
deviation over the seeds that exist, with the number of seeds shown.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import pathlib
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

# Rows in the order of the table; the label is what the table prints.
ROW_LABELS = collections.OrderedDict(
  [
    ('random', 'Random'),
    ('popularity', 'Popularity'),
    ('sasrec', 'SASRec'),
    ('zero_shot', 'Zero-shot'),
    ('warm_start', 'Warm start (SFT)'),
    ('reflexion', 'Reflexion memory'),
    ('outcome_rl', 'Outcome-reward RL'),
    ('judge_rl', 'Judge-reward RL'),
    ('coars', 'CoARS'),
    ('coars-outcome_reward', 'CoARS w/o interaction reward'),
    ('coars-no_sd', 'CoARS w/o self-distillation'),
    ('coars-rec_only', 'CoARS w/o co-evolution'),
  ]
)
# The rows issue 5 asks for on every dataset (zero-shot is extra).
EXPECTED_ROWS = tuple(name for name in ROW_LABELS if name != 'zero_shot')
DATASET_ORDER = ('lastfm', 'movielens', 'instruments')
REFERENCE_METHODS = ('random', 'popularity', 'sasrec')
# Learning-curve series: (metrics.jsonl key, axis label).
CURVES = (
  ('val/hit_at_1', 'val Hit@1 (greedy)'),
  ('rollout/hit_at_1', 'rollout Hit@1 (sampled)'),
  ('reward/recommender', 'mean recommender reward'),
)


def read_rows(paths: Iterable[str | pathlib.Path]) -> list[dict[str, Any]]:
  """Every row of the given JSON files (a list of rows or one row each), with `source` set to its file."""
  rows = []
  for path in sorted({pathlib.Path(p) for p in paths}):
    try:
      value = json.loads(path.read_text(encoding='utf-8'))
    except json.JSONDecodeError as error:
      raise ValueError(f'{path}: not valid JSON ({error}); it is not a row file') from error
    for row in value if isinstance(value, list) else [value]:
      if not isinstance(row, Mapping) or 'dataset' not in row or 'method' not in row:
        raise ValueError(f'{path}: every row needs "dataset" and "method" keys; found {row!r:.200}')
      rows.append({**row, 'source': str(path)})
  return rows


def row_model(row: Mapping[str, Any]) -> str:
  """The row's model; rows decoded under the grammar name theirs '<model>+constrained'."""
  return str(row.get('model', '')).removesuffix('+constrained')


def row_key(row: Mapping[str, Any]) -> str:
  """The table row a result belongs to: its method, with '+grammar' when decoded under the output grammar."""
  return row['method'] + ('+grammar' if row.get('constrained') else '')


def _seed(row: Mapping[str, Any]) -> int:
  return int(row.get('train_seed', row.get('seed', 0)))


@dataclasses.dataclass(frozen=True)
class Cell:
  """One metric of one table row: the per-seed values (one per distinct seed)."""

  values: tuple[float, ...]

  @property
  def mean(self) -> float:
    return float(np.mean(self.values)) if self.values else math.nan

  @property
  def std(self) -> float:
    # The population spread over the seeds that exist (0 for one seed); the seed count is printed beside it.
    return float(np.std(self.values)) if self.values else math.nan

  def format(self, digits: int = 3) -> str:
    if not self.values:
      return '–'
    if len(self.values) == 1:
      return f'{self.mean:.{digits}f}'
    return f'{self.mean:.{digits}f} ± {self.std:.{digits}f}'


def aggregate(
  rows: Sequence[Mapping[str, Any]], dataset: str, model: str | None = None
) -> 'collections.OrderedDict[str, dict[str, Any]]':
  """Per table row of `dataset`: Hit@1, ValidRatio and user F1 cells over seeds, the seeds, and the sources.

  Reference rows (random, popularity, SASRec) have no model; agentic rows are kept only for `model` when given.
  Two rows with the same (row key, seed) are the same result seen twice (e.g. one warm start before several RL
  runs); the later file wins, and they must agree on Hit@1, else the inputs mix different runs and this raises.
  """
  by_key: dict[str, dict[int, Mapping[str, Any]]] = collections.defaultdict(dict)
  for row in rows:
    if row['dataset'] != dataset:
      continue
    if row['method'] not in REFERENCE_METHODS and model is not None and row_model(row) != model:
      continue
    if row.get('evaluated') is False:
      continue  # a 'before' record of a run that did not evaluate its starting agents (eval.before off)
    key, seed = row_key(row), _seed(row)
    earlier = by_key[key].get(seed)
    if earlier is not None and not np.isclose(earlier.get('hit@1', 0.0), row.get('hit@1', 0.0)):
      raise ValueError(
        f'{dataset} {key} seed {seed}: {earlier["source"]} has Hit@1 {earlier.get("hit@1")} but '
        f'{row["source"]} has {row.get("hit@1")}; pass only one run per (method, seed)'
      )
    by_key[key][seed] = row

  def order(key: str) -> tuple[int, str]:
    base = key.split('+')[0]
    return (list(ROW_LABELS).index(base) if base in ROW_LABELS else len(ROW_LABELS), key)

  table = collections.OrderedDict()
  for key in sorted(by_key, key=order):
    seeds = sorted(by_key[key])
    picked = [by_key[key][s] for s in seeds]

    def cell(name: str) -> Cell:
      return Cell(tuple(float(r[name]) for r in picked if r.get(name) is not None))

    table[key] = {
      'hit@1': cell('hit@1'),
      'valid_ratio': cell('valid_ratio'),
      'user_f1': cell('user_f1'),
      'avg_turns': cell('avg_turns'),
      'seeds': seeds,
      'windows': sorted({r.get('num_windows') for r in picked if r.get('num_windows')}),
      'budget': sorted({r.get('rl_episodes') for r in picked if r.get('rl_episodes')}),
      'sources': sorted({r['source'] for r in picked}),
    }
  return table


def label(key: str) -> str:
  base, _, suffix = key.partition('+')
  return ROW_LABELS.get(base, base) + (' + grammar' if suffix else '')


def format_table(table: Mapping[str, Mapping[str, Any]]) -> str:
  """The markdown table of one dataset."""
  lines = [
    '| Method | Hit@1 | ValidRatio | User F1 | Turns | Seeds | Test windows | RL episodes |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for key, cells in table.items():
    windows = ', '.join(str(w) for w in cells['windows']) or 'all'
    budget = ', '.join(str(b) for b in cells['budget']) or '–'
    lines.append(
      f'| {label(key)} | {cells["hit@1"].format()} | {cells["valid_ratio"].format()} | '
      f'{cells["user_f1"].format()} | {cells["avg_turns"].format(2)} | {len(cells["seeds"])} | '
      f'{windows} | {budget} |'
    )
  return '\n'.join(lines)


def missing_rows(table: Mapping[str, Any]) -> list[str]:
  """Issue 5's rows with no result (under either decoding)."""
  present = {key.split('+')[0] for key in table}
  return [label(name) for name in EXPECTED_ROWS if name not in present]


# --- learning curves ---------------------------------------------------------------------------------------------


def curve_points(metrics_path: str | pathlib.Path) -> dict[str, list[tuple[int, float]]]:
  """Per curve key (`CURVES`), the (iteration, value) points a metrics.jsonl logged."""
  points = {key: [] for key, _ in CURVES}
  for line in pathlib.Path(metrics_path).read_text(encoding='utf-8').splitlines():
    if not line.strip():
      continue
    record = json.loads(line)
    for key in points:
      if record.get(key) is not None:
        points[key].append((int(record['iteration']), float(record[key])))
  return points


def read_curves(run_dirs: Iterable[str | pathlib.Path]) -> list[dict[str, Any]]:
  """One entry per training run folder with a metrics.jsonl: dataset, method label, seed, and per curve key the
  (iteration, value) points it logged."""
  runs = []
  for folder in sorted({pathlib.Path(d) for d in run_dirs}):
    metrics_path, config_path = folder / 'metrics.jsonl', folder / 'config.json'
    if not metrics_path.is_file() or not config_path.is_file():
      continue
    config = json.loads(config_path.read_text(encoding='utf-8'))
    results_path = folder / 'results.json'
    method = config.get('label') or config.get('method')
    if results_path.is_file():
      rows = json.loads(results_path.read_text(encoding='utf-8'))
      method = rows[-1].get('method', method)
    points = curve_points(metrics_path)
    runs.append(
      {
        'dataset': config.get('dataset'),
        'method': method,
        'seed': int(config.get('rl', {}).get('seed', 0)),
        'folder': str(folder),
        'points': points,
      }
    )
  return runs


def plot_curves(runs: Sequence[Mapping[str, Any]], dataset: str, path: str | pathlib.Path) -> pathlib.Path | None:
  """A PNG with one panel per curve key; one line per method (mean over its seeds at the iterations all its
  seeds logged), seeds as thin lines. Returns the path, or None when `dataset` has no run with points."""
  mine = [run for run in runs if run['dataset'] == dataset and any(run['points'].values())]
  if not mine:
    return None
  import matplotlib  # Imported here: only the report draws, and the Agg backend needs no display.

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  figure, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.6), squeeze=False)
  methods = sorted(
    {run['method'] for run in mine}, key=lambda m: (list(ROW_LABELS).index(m) if m in ROW_LABELS else 99, m)
  )
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for panel, (key, title) in zip(axes[0], CURVES):
    for index, method in enumerate(methods):
      color = colors[index % len(colors)]
      series = [dict(run['points'][key]) for run in mine if run['method'] == method and run['points'][key]]
      if not series:
        continue
      for points in series:
        steps = sorted(points)
        panel.plot(steps, [points[s] for s in steps], color=color, alpha=0.25, linewidth=0.8)
      common = sorted(set.intersection(*(set(points) for points in series)))
      panel.plot(
        common,
        [np.mean([points[s] for points in series]) for s in common],
        color=color,
        label=f'{label(method)} ({len(series)} seed{"s" if len(series) > 1 else ""})',
        linewidth=1.8,
      )
    panel.set_title(title)
    panel.set_xlabel('RL iteration')
    panel.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  figure.suptitle(f'{dataset}: learning curves')
  figure.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path, dpi=110)
  plt.close(figure)
  return path


# --- the report --------------------------------------------------------------------------------------------------


def write_report(
  rows: Sequence[Mapping[str, Any]],
  runs: Sequence[Mapping[str, Any]],
  output: str | pathlib.Path,
  *,
  model: str = '',
  preamble: str = '',
  tables: Sequence[Mapping[str, Any]] = (),
) -> pathlib.Path:
  """Writes `output` (markdown) and `<dataset>_curves.png` beside it; returns the markdown path. `tables`
  (`eval.table_report.read_table`) come first, each with its own sections."""
  from coars_jax.eval import table_report  # Imported here: it imports this module.

  output = pathlib.Path(output)
  output.parent.mkdir(parents=True, exist_ok=True)
  datasets = [d for d in DATASET_ORDER if any(r['dataset'] == d for r in rows)]
  datasets += sorted({r['dataset'] for r in rows} - set(datasets))
  parts = ['# Results', '', preamble.strip(), ''] if preamble.strip() else ['# Results', '']
  for table in tables:
    parts += table_report.table_sections(table, output.parent)
  if tables and rows:
    parts += ['## Other rows', '']
  if rows:
    parts += [
      'Hit@1 and user-agent F1 are mean ± std over seeds (population std; one seed shows the value alone). '
      '"+ grammar" rows decode under the output grammar, so their ValidRatio is 1 by construction. One table '
      'per dataset and model (the reference rows, which use no LLM, repeat in each).',
      '',
    ]
  for dataset in datasets:
    models = (
      [model]
      if model
      else sorted({row_model(r) for r in rows if r['dataset'] == dataset and r['method'] not in REFERENCE_METHODS})
    ) or [None]
    for name in models:
      table = aggregate(rows, dataset, name)
      parts += [f'## {dataset}' + (f', {name}' if name else ''), '', format_table(table), '']
      missing = missing_rows(table)
      if missing and name == models[-1]:
        parts += [f'Not run: {", ".join(missing)}.', '']
    table = aggregate(rows, dataset, None)
    png = plot_curves(runs, dataset, output.parent / f'{dataset}_curves.png')
    if png is not None:
      parts += [f'![{dataset} learning curves]({png.name})', '']
    sources = sorted({s for cells in table.values() for s in cells['sources']})
    parts += ['<details><summary>Row files</summary>', '', *[f'- `{s}`' for s in sources], '', '</details>', '']
  parts += ['Written by `python -m experiments.report`.', '']
  output.write_text('\n'.join(parts), encoding='utf-8')
  return output
