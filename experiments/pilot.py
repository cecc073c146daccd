"""The recipe pilot of a results table, on val windows only:
`python -m experiments.pilot --config=configs/table_smollm2.py:lastfm_study [--arms=base,constrained] [--hours=H]`.

Each arm of the table's `pilot.arms` (arm name -> experiment fields) runs the first `pilot.iterations` RL iterations of
the `pilot.row` cell's seed 0 (the table's budget, learning-rate schedule and warm start), in
`<runs_root>/<dataset>/pilot/<arm>`, with a greedy val evaluation before RL and after its last pilot iteration. No
test window is read. Writes `<results_root>/pilot/<dataset>_<row>.json` and prints, per arm: val Hit@1 and ValidRatio
before and after, the rollouts' Hit@1 and ValidRatio, the mean reward per agent, the mean |A| and the seconds per
iteration. Stopped (Ctrl-C, SIGTERM, `--hours`), an arm keeps its checkpoint and the same command continues it; a
finished arm is read back, not rerun.
"""

import json
import pathlib
import signal
import time

from absl import app, flags
from ml_collections import config_flags

from coars_jax.pipeline import table as table_lib
from coars_jax.training.metrics import METRICS_FILE
from experiments import cli

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'A configs/table_*.py file with pilot arms.', lock_config=True
)
_ARMS = flags.DEFINE_list('arms', [], 'Arms to run, in this order (default: every arm of pilot.arms).')
_DATASET = flags.DEFINE_string('dataset', '', "The dataset (default: the table's first).")
_HOURS = flags.DEFINE_float(
  'hours', 0.0, 'Stop the arm in flight (with a checkpoint) after this many hours; 0 = no limit.'
)

# What the summary keeps of each iteration's metrics line (`training.rl`), by its name there.
ROLLOUT_KEYS = (
  'rollout/hit_at_1',
  'rollout/valid_ratio',
  'rollout/user_valid_ratio',
  'rollout/average_turns',
  'reward/recommender',
  'reward/user',
  'advantage/abs_mean_recommender',
  'advantage/abs_mean_user',
  'loss/total',
  'update/learning_rate',
  'time/rollout_seconds',
  'time/scoring_seconds',
  'time/update_seconds',
)
VAL_KEYS = ('val/hit_at_1', 'val/valid_ratio', 'val/user_valid_ratio', 'val/average_turns')


def arm_overrides(table, arm: str, workdir: pathlib.Path, done: int = 0) -> dict:
  """The experiment fields of `arm`'s run: its own fields, its workdir, and a stop with a val evaluation after the
  pilot's iterations (`stop_after` counts this invocation's iterations, so an arm resumed after `done` of them runs
  the rest only)."""
  fields = table.pilot.arms[arm]
  fields = fields.to_dict() if hasattr(fields, 'to_dict') else dict(fields)
  iterations = int(table.pilot.iterations)
  return {
    **fields,
    'workdir': str(workdir),
    'stop_after': iterations - done,
    'eval': {**fields.get('eval', {}), 'every': iterations},
  }


def read_lines(workdir: pathlib.Path) -> list[dict]:
  path = workdir / METRICS_FILE
  if not path.is_file():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(arm: str, fields: dict, lines: list[dict], iterations: int) -> dict:
  """One arm's summary from its metrics lines: val before (iteration 0) and after (the pilot's last iteration), and
  each RL iteration's rollout, reward, credit and time metrics."""
  by_step = {}
  for line in lines:
    by_step.setdefault(int(line.get('iteration', -1)), {}).update(line)
  steps = [step for step in sorted(by_step) if 1 <= step <= iterations]
  return {
    'arm': arm,
    'fields': fields,
    'iterations_done': len(steps),
    'val_before': {key: by_step.get(0, {}).get(key) for key in VAL_KEYS},
    'val_after': {key: by_step.get(iterations, {}).get(key) for key in VAL_KEYS},
    'iterations': [{'iteration': step, **{key: by_step[step].get(key) for key in ROLLOUT_KEYS}} for step in steps],
  }


def _mean(values) -> float | None:
  values = [value for value in values if value is not None]
  return sum(values) / len(values) if values else None


def _cell(value, digits: int = 3) -> str:
  return '-' if value is None else f'{value:.{digits}f}'


def print_summary(summaries: list[dict]) -> None:
  print(
    f'\n{"arm":<18} {"iters":>5} {"val hit":>15} {"val valid":>15} {"roll hit":>8} {"roll valid":>10} '
    f'{"R_rec":>7} {"R_user":>7} {"|A| rec":>8} {"s/iter":>7}'
  )
  for summary in summaries:
    rows = summary['iterations']
    before, after = summary['val_before'], summary['val_after']
    seconds = _mean(
      sum(row[key] or 0 for key in ('time/rollout_seconds', 'time/scoring_seconds', 'time/update_seconds'))
      if row['time/rollout_seconds']
      else None
      for row in rows
    )
    print(
      f'{summary["arm"]:<18} {summary["iterations_done"]:>5} '
      f'{_cell(before["val/hit_at_1"])} -> {_cell(after["val/hit_at_1"])} '
      f'{_cell(before["val/valid_ratio"])} -> {_cell(after["val/valid_ratio"])} '
      f'{_cell(_mean(r["rollout/hit_at_1"] for r in rows)):>8} {_cell(_mean(r["rollout/valid_ratio"] for r in rows)):>10} '
      f'{_cell(_mean(r["reward/recommender"] for r in rows)):>7} {_cell(_mean(r["reward/user"] for r in rows)):>7} '
      f'{_cell(_mean(r["advantage/abs_mean_recommender"] for r in rows)):>8} {_cell(seconds, 0):>7}'
    )


def run_pilot(table, arms, dataset: str, *, components=None) -> tuple[list[dict], pathlib.Path]:
  """Runs (or continues, or reads back) each arm in `arms`; returns their summaries and the summary file.
  `components` builds a run's parts from its config (default: loads them by name, as `table.run_cell`)."""
  row = table.pilot.row
  cell = table_lib.Cell(dataset, row, 0)
  iterations = int(table.pilot.iterations)
  root = table_lib.absolute_path(table.runs_root) / dataset / 'pilot'
  output = table_lib.absolute_path(table.results_root) / 'pilot' / f'{dataset}_{row}.json'
  output.parent.mkdir(parents=True, exist_ok=True)
  kept = json.loads(output.read_text()) if output.is_file() else {'arms': {}}
  summaries = []
  for number, arm in enumerate(arms, 1):
    workdir = root / arm
    done = len(
      {int(line['iteration']) for line in read_lines(workdir) if 1 <= int(line.get('iteration', -1)) <= iterations}
    )
    overrides = arm_overrides(table, arm, workdir, done)
    fields = {k: v for k, v in overrides.items() if k not in ('workdir', 'stop_after', 'eval')}
    if done < iterations:
      print(
        f'\n[{number}/{len(arms)}] pilot arm {arm}: {fields or "the table recipe"} ({done} of {iterations} done)',
        flush=True,
      )
      start = time.perf_counter()
      table_lib.run_cell(table, cell, components=components, overrides=overrides)
      print(f'arm {arm}: {time.perf_counter() - start:.0f} s in this invocation', flush=True)
    summary = summarize(arm, fields, read_lines(workdir), iterations)
    summaries.append(summary)
    kept['arms'][arm] = summary
    kept.update({'table': table.name, 'dataset': dataset, 'row': row, 'pilot_iterations': iterations})
    output.write_text(json.dumps(kept, indent=2, default=str))
    if summary['iterations_done'] < iterations:
      print(f'arm {arm} stopped after {summary["iterations_done"]} of {iterations} iterations; rerun to continue')
      break
  return summaries, output


def main(argv):
  del argv
  table = _CONFIG.value
  table_lib.validate_table(table)
  dataset = _DATASET.value or table.datasets[0]
  if dataset not in table.datasets:
    raise app.UsageError(f"--dataset={dataset!r} is not one of the table's datasets {tuple(table.datasets)}")
  arms = _ARMS.value or list(table.pilot.arms)
  unknown = [arm for arm in arms if arm not in table.pilot.arms]
  if unknown:
    raise app.UsageError(f'--arms: {unknown} not in pilot.arms {list(table.pilot.arms)}')
  if _HOURS.value:
    # SIGALRM becomes the SIGTERM the runs already handle: the arm in flight checkpoints and returns.
    signal.signal(signal.SIGALRM, lambda *_: signal.raise_signal(signal.SIGTERM))
    signal.alarm(max(1, int(_HOURS.value * 3600)))
  summaries, output = run_pilot(table, arms, dataset)
  signal.alarm(0)
  print_summary(summaries)
  print(f'\n-> {output}')


if __name__ == '__main__':
  cli.run(main, required=('config',))
