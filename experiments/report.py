"""The results report: `python -m experiments.report [--tables=GLOB ...] [--rows=GLOB ...] [--runs=GLOB ...]
[--output=results/README.md]`.

Reads the results tables (`experiments.run_table`'s folders: rows, grid and curves; each gets its sections with
paired intervals and "What holds"), then other row files (reference tables, agentic evaluations, training runs'
results.json) and training run folders (metrics.jsonl), and writes the markdown per dataset with PNG learning
curves beside it. Cells and rows that were not run are listed as missing; nothing is filled in. The preamble file's
text opens the report.
"""

import glob
import pathlib

from absl import app, flags

from coars_jax.eval import report, table_report
from experiments import cli

_TABLES = flags.DEFINE_multi_string('tables', ['results/table_*'], 'Glob(s) of results-table folders.')
_ROWS = flags.DEFINE_multi_string(
  'rows',
  [
    'results/reference/*.json',
    'results/agentic/*.json',
    'results/train/*.json',
    'runs/train_*/results.json',
    'runs/demo_cpu/*/results.json',
  ],
  "Glob(s) of JSON row files (results/ and the training runs' and the demo's results.json).",
)
_RUNS = flags.DEFINE_multi_string(
  'runs', ['runs/train_*', 'runs/demo_cpu/*'], 'Glob(s) of training run folders (for the curves).'
)
_OUTPUT = flags.DEFINE_string('output', 'results/README.md', 'The markdown file to write; PNGs go beside it.')
_MODEL = flags.DEFINE_string('model', '', "Only this model's agentic rows in \"Other rows\" ('' = every model).")
_PREAMBLE = flags.DEFINE_string(
  'preamble', 'results/PREAMBLE.md', "A markdown file whose text opens the report ('' = none)."
)


def build(*, tables=None, rows=None, runs=None, output=None, model=None, preamble=None) -> pathlib.Path:
  """Rebuilds the report; every argument defaults to its flag's default (run_table calls it without flags)."""

  def value(given, flag):
    return given if given is not None else (flag.value if flags.FLAGS.is_parsed() else flag.default)

  table_dirs = sorted({p for pattern in value(tables, _TABLES) for p in glob.glob(pattern) if pathlib.Path(p).is_dir()})
  row_files = sorted({p for pattern in value(rows, _ROWS) for p in glob.glob(pattern)})
  run_dirs = sorted({p for pattern in value(runs, _RUNS) for p in glob.glob(pattern)})
  if not table_dirs and not row_files:
    raise app.UsageError(
      f'no results table matches {value(tables, _TABLES)} and no row file matches {value(rows, _ROWS)}'
    )
  preamble_path = value(preamble, _PREAMBLE)
  text = (
    pathlib.Path(preamble_path).read_text(encoding='utf-8')
    if preamble_path and pathlib.Path(preamble_path).is_file()
    else ''
  )
  output = report.write_report(
    report.read_rows(row_files),
    report.read_curves(run_dirs),
    value(output, _OUTPUT),
    model=value(model, _MODEL),
    preamble=text,
    tables=[table_report.read_table(d) for d in table_dirs],
  )
  print(
    f'Wrote {output.absolute()} from {len(table_dirs)} table(s), {len(row_files)} row files and {len(run_dirs)} '
    f'run folders'
  )
  return output


def main(argv):
  del argv
  build()


def entry():
  """The `coars-report` console script (setup.py)."""
  cli.run(main)


if __name__ == '__main__':
  entry()
