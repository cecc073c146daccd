"""Prints a dataset's statistics: `python -m experiments.describe_data --dataset=lastfm`."""

import json

from absl import flags

from coars_jax import data
from experiments import cli

_DATASET = flags.DEFINE_enum('dataset', 'lastfm', data.DATASETS, 'Dataset to describe.')
_DATA_ROOT = flags.DEFINE_string('data_root', None, 'Data root; default $COARS_DATA_DIR, then the user cache.')
_JSON = flags.DEFINE_bool('json', False, 'Print JSON instead of a table.')


def main(argv):
  del argv
  dataset = data.load_dataset(_DATASET.value, _DATA_ROOT.value)
  stats = data.describe(dataset)
  sim = data.user_sim_set(dataset, _DATA_ROOT.value)
  # The user-simulation set: its users, its judgements (every item of every case) and its distinct items.
  stats.update(
    {
      'user_sim_users': len(sim),
      'user_sim_users_left_out': sim.users_left_out,
      'user_sim_judgements': sum(len(c.items) for c in sim.cases),
      'user_sim_distinct_items': len({int(i) for c in sim.cases for i in c.items}),
    }
  )
  roots = data.candidate_roots(_DATA_ROOT.value)
  folder = next((root / _DATASET.value for root in roots if (root / _DATASET.value).is_dir()), None)
  stats['data_folder'] = str(folder) if folder is not None else f'(not found under {", ".join(map(str, roots))})'
  if not _JSON.value:
    print(f'Read {_DATASET.value} from {stats["data_folder"]}')
  print(json.dumps(stats, indent=2) if _JSON.value else data.format_description(stats))


def entry():
  """The `coars-describe-data` console script (setup.py)."""
  cli.run(main)


if __name__ == '__main__':
  entry()
