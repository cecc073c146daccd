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
  stats.update({'user_sim_users': len(sim), 'user_sim_users_left_out': sim.users_left_out,
                'user_sim_items': sum(len(c.items) for c in sim.cases)})
  print(json.dumps(stats, indent=2) if _JSON.value else data.format_description(stats))


def entry():
  """The `coars-describe-data` console script (setup.py)."""
  cli.run(main)


if __name__ == '__main__':
  entry()
