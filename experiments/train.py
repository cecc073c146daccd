"""RL training of both agents, then the test rows: `python -m experiments.train --config=configs/lastfm_smollm2.py`.

The config's argument picks the method (`configs/lastfm_smollm2.py:outcome_rl`; default coars); override any field
as `--config.rl.iterations=2`. Writes `<workdir>/results.json` (the 'before' and 'after' rows), metrics.jsonl,
TensorBoard logs, Orbax checkpoints, and the final and best adapters as folders that
`python -m experiments.evaluate --config=configs/eval_tiny.py:<dataset> --checkpoint=<workdir>/final` reads.
`--config.resume=True` continues from the latest checkpoint. zero_shot and reflexion are evaluated only.
"""

import pathlib

from absl import flags, logging
from ml_collections import config_flags

from coars_jax.eval import agentic
from coars_jax.eval.experiment import summary_line
from coars_jax.parallel import distributed
from coars_jax.pipeline import experiment
from experiments import cli

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'A configs/<dataset>_<model>.py[:method] file.', lock_config=True
)
_DRY_RUN = flags.DEFINE_bool(
  'dry_run',
  False,
  'Print the resolved config and each stage (cached, done or to run), then exit without training anything.',
)
_COMMITTED = flags.DEFINE_string(
  'show_committed',
  '',
  "After the run's own rows, print the headline of this committed results table (make demo: results/table_lastfm_study).",
)


def main(argv):
  del argv
  config = _CONFIG.value
  if _DRY_RUN.value:
    from coars_jax.pipeline import stages

    print(stages.format_plan(config, stages.plan(config)))
    return
  # Multi-host runs (config.distributed.enabled) join the other hosts before anything touches a device.
  distributed.initialize(config.get('distributed'))
  if not distributed.is_primary():
    # Every process computes the same run; process 0 alone reports it, the others only their errors.
    logging.set_verbosity(logging.ERROR)
  rows = experiment.run(config)
  if not distributed.is_primary():
    return
  rows = [row for row in rows if row.get('evaluated', True)]  # eval.before=False leaves an unevaluated 'before'
  for row in rows:
    print(f'[{row["stage"]}] {summary_line(row)}')
  if not any(row['stage'] == 'after' for row in rows):
    reason = f'stop_after={config.stop_after}' if config.stop_after else 'SIGTERM'
    print(
      f'\nStopped before the last iteration ({reason}) after writing a checkpoint in '
      f'{pathlib.Path(config.workdir).absolute()}; continue with '
      f'--config.resume=True'
    )
    return
  reference = next((row for row in rows if row.get('accept_all_f1') is not None), None)
  if reference is not None:
    sasrec_auc, sasrec_f1 = reference.get('sasrec_auc'), reference.get('sasrec_top_half_f1')
    print(
      f'User-F1 references on the same {reference["user_f1_judgements"]} judgements: accept everything F1 '
      f"{reference['accept_all_f1']:.3f}; SASRec's scores AUC "
      f'{"—" if sasrec_auc is None else f"{sasrec_auc:.3f}"}, its top half per user F1 '
      f'{"—" if sasrec_f1 is None else f"{sasrec_f1:.3f}"}'
    )
  print()
  print(agentic.format_markdown(rows))
  workdir = pathlib.Path(config.workdir).absolute()
  print(
    f'\nRows written to {workdir / experiment.RESULTS_FILE}; run folder {workdir} (metrics.jsonl, tensorboard/, '
    f'trajectories/, final/, best/)'
  )
  if _COMMITTED.value:
    from coars_jax.eval import table_report

    print('\n' + table_report.committed_headline(_COMMITTED.value))


def entry():
  """The `coars-train` console script (setup.py)."""
  cli.run(main, required=('config',))


if __name__ == '__main__':
  entry()
