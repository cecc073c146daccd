"""Trains (or loads) SASRec for every training seed of a config: `python -m experiments.train_sasrec --config=...`."""

import json

from ml_collections import config_flags

from coars_jax.recsys import experiment
from experiments import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A configs/sasrec_<dataset>.py file.', lock_config=True)


def main(argv):
  del argv
  config = _CONFIG.value
  experiment.validate(config)
  dataset = experiment.load_configured_dataset(config)
  for seed in config.train_seeds:
    _, meta = experiment.train_or_load(config, dataset, seed)
    print(
      json.dumps(
        {
          k: meta[k]
          for k in ('dataset', 'seed', 'best_epoch', 'best_val', 'epochs_run', 'train_seconds', 'peak_rss_mib')
        }
      )
    )


if __name__ == '__main__':
  cli.run(main, required=('config',))
