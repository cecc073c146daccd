"""The results table: `python -m experiments.report [--rows=GLOB ...] [--runs=GLOB ...] [--output=results/README.md]`.

Reads row files (reference tables, agentic evaluations, training runs' results.json) and training run folders
(metrics.jsonl), and writes the markdown table per dataset with PNG learning curves beside it. Rows that were
not run are listed as such; nothing is filled in.
"""

import glob
import pathlib

from absl import app, flags

from coars_jax.eval import report

_ROWS = flags.DEFINE_multi_string(
    'rows', ['results/reference/*.json', 'results/agentic/*.json', 'results/train/*.json'],
    'Glob(s) of JSON row files.')
_RUNS = flags.DEFINE_multi_string('runs', ['runs/train_*'], 'Glob(s) of training run folders (for the curves).')
_OUTPUT = flags.DEFINE_string('output', 'results/README.md', 'The markdown file to write; PNGs go beside it.')
_MODEL = flags.DEFINE_string('model', 'tiny', 'Which model\'s agentic rows the table shows.')
_PREAMBLE = flags.DEFINE_string('preamble', '', 'A markdown file whose text opens the report (budgets, caveats).')


def main(argv):
  del argv
  row_files = sorted({path for pattern in _ROWS.value for path in glob.glob(pattern)})
  if not row_files:
    raise app.UsageError(f'no row files match {_ROWS.value}')
  rows = report.read_rows(row_files)
  run_dirs = sorted({path for pattern in _RUNS.value for path in glob.glob(pattern)})
  runs = report.read_curves(run_dirs)
  preamble = pathlib.Path(_PREAMBLE.value).read_text(encoding='utf-8') if _PREAMBLE.value else ''
  output = report.write_report(rows, runs, _OUTPUT.value, model=_MODEL.value, preamble=preamble)
  print(output.read_text(encoding='utf-8'))
  print(f'Wrote {output} from {len(row_files)} row files and {len(runs)} run folders')


if __name__ == '__main__':
  app.run(main)
