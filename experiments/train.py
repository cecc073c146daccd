"""RL training of both agents, then the test rows: `python -m experiments.train --config=configs/lastfm_tiny.py`.

The config's argument picks the method (`configs/lastfm_tiny.py:outcome_rl`; default coars); override any field
as `--config.rl.iterations=2`. Writes `<workdir>/results.json` (the 'before' and 'after' rows), metrics.jsonl,
TensorBoard logs, Orbax checkpoints, and the final and best adapters as folders that
`python -m experiments.evaluate --config=configs/eval_tiny.py:<dataset> --checkpoint=<workdir>/final` reads.
`--config.resume=True` continues from the latest checkpoint. zero_shot and reflexion are evaluated only.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from coars_jax.eval import agentic
from coars_jax.eval.experiment import summary_line
from coars_jax.parallel import distributed
from coars_jax.training import experiment

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A configs/<dataset>_<model>.py[:method] file.',
                                          lock_config=True)


def main(argv):
  del argv
  config = _CONFIG.value
  # Multi-host runs (config.distributed.enabled) join the other hosts before anything touches a device.
  distributed.initialize(config.get('distributed'))
  if not distributed.is_primary():
    # Every process computes the same run; process 0 alone reports it, the others only their errors.
    logging.set_verbosity(logging.ERROR)
  rows = experiment.run(config)
  if not distributed.is_primary():
    return
  for row in rows:
    print(f'[{row["stage"]}] {summary_line(row)}')
  if not any(row['stage'] == 'after' for row in rows):
    reason = f'stop_after={config.stop_after}' if config.stop_after else 'SIGTERM'
    print(f'\nStopped before the last iteration ({reason}) after writing a checkpoint; continue with '
          f'--config.resume=True')
    return
  print()
  print(agentic.format_markdown(rows))
  print(f'\nRows written to {config.workdir}/{experiment.RESULTS_FILE}')


if __name__ == '__main__':
  # Orbax and JAX log every read and write at INFO; pass --verbosity=0 to see them.
  flags.FLAGS.set_default('verbosity', -1)
  flags.mark_flags_as_required(['config'])
  app.run(main)
