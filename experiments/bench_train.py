"""Time per RL iteration, split into rollout, scoring and update:
`python -m experiments.bench_train --config=configs/lastfm_smollm2.py [--iterations=3] [--output=FILE]`.

The config is a training config (any method). Its warm start is loaded when `warm_start.folder` holds one;
otherwise the base gets fresh adapters (B = 0) and nothing is trained beforehand (`--allow_warm_start_training`
trains it instead). One untimed iteration compiles; each timed iteration then re-scores the rows its update used,
student and teacher, in forward-only jitted passes (`coars_jax.training.benchmark`). Prints a table and the issue's
ratio scoring / rollout (target <= 0.5), and writes the JSON to --output.
"""

import pathlib

from absl import app, flags
from ml_collections import config_flags

from coars_jax.training import benchmark
from coars_jax.training import experiment
from coars_jax.training import warm_start as warm_start_lib
from experiments import outputs

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A training config (configs/<dataset>_<model>.py).',
                                          lock_config=False)
_ITERATIONS = flags.DEFINE_integer('iterations', 3, 'Timed RL iterations after the warm-up one.')
_REPEATS = flags.DEFINE_integer('repeats', 2, 'Timed calls of each scoring pass; the fastest counts.')
_TRAIN_WARM_START = flags.DEFINE_bool('allow_warm_start_training', False, 'Train the warm start when its folder '
                                      'holds none (otherwise start from fresh adapters).')
_OUTPUT = flags.DEFINE_string('output', None, 'Write the result as JSON to this file.')


def main(argv):
  del argv
  config = _CONFIG.value
  experiment.validate(config)
  folder = pathlib.Path(config.warm_start.folder or '/nonexistent')
  if config.warm_start.enabled and not (folder / warm_start_lib.META_FILE).is_file() and not _TRAIN_WARM_START.value:
    print(f'No warm start in {folder}: timing fresh adapters on the base (--allow_warm_start_training trains it)')
    config.warm_start.enabled = False
  parts = experiment.load_components(config)
  workdir = pathlib.Path(config.workdir).absolute()
  model, origin = experiment.prepare_agents(config, parts, workdir)
  trainer = experiment.make_trainer(config, parts, model)
  result = benchmark.bench_iterations(trainer, iterations=_ITERATIONS.value, repeats=_REPEATS.value)
  result.update({'config': str(_CONFIG.value.get('workdir')), 'dataset': config.dataset, 'model': config.model,
                 'method': experiment.row_label(config), 'start': origin['stage'],
                 'windows_per_iteration': config.rl.windows_per_iteration, 'max_turns': config.rollout.max_turns})
  print('| iteration | rollout s | student scoring s | teacher scoring s | update s | scoring / rollout |')
  print('|---|---|---|---|---|---|')
  for row in result['iterations']:
    print(f'| {row["iteration"]} | {row["rollout_seconds"]:.2f} | {row.get("student_scoring_seconds", 0):.2f} | '
          f'{row.get("teacher_scoring_seconds", 0):.2f} | {row["update_seconds"]:.2f} | '
          f'{row["scoring_over_rollout"]:.2f} |')
  ratio = result['summary']['median_scoring_over_rollout']
  print(f'\nMedian scoring / rollout: {ratio:.2f} (target <= 0.5: {"met" if ratio <= 0.5 else "not met"})')
  if _OUTPUT.value:
    outputs.write_json(_OUTPUT.value, result)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
