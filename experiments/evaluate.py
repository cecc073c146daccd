"""Reference table (random, popularity, SASRec): `python -m experiments.evaluate --config=configs/sasrec_lastfm.py`.

Trains SASRec for each training seed unless its checkpoint exists, prints the table as markdown, and writes
the rows as JSON to --output.
"""

import json
import pathlib

from absl import app, flags
from ml_collections import config_flags

from coars_jax.eval import reference
from coars_jax.recsys import experiment

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A configs/sasrec_<dataset>.py file.', lock_config=True)
_OUTPUT = flags.DEFINE_string('output', None, 'Write the rows as JSON to this file.')


def main(argv):
  del argv
  config = _CONFIG.value
  experiment.validate(config)
  dataset = experiment.load_configured_dataset(config)
  models = {seed: experiment.train_or_load(config, dataset, seed)[0] for seed in config.train_seeds}
  rows = reference.reference_rows(dataset, models, config.candidate_seeds, config.split)
  print(f'\n## Reference table: {dataset.name}, {config.split} split, {len(dataset.split(config.split))} windows, '
        f'{len(config.candidate_seeds)} candidate seeds\n')
  print(reference.format_markdown(rows))
  if dataset.name == 'lastfm' and config.split == 'test':
    prior = reference.afl_prior_hit_at_1(config.data_root or None, allow_download=config.allow_download)
    print(f'\nAFL\'s shipped SASRec top-1 picks (prior_lastfm/SASRec.csv, their candidate lists): '
          f'Hit@1 = {prior:.3f}')
  if _OUTPUT.value:
    path = pathlib.Path(_OUTPUT.value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2))
    print(f'\nWrote {len(rows)} rows to {path}')


if __name__ == '__main__':
  # Orbax and JAX log every read and write at INFO; pass --verbosity=0 to see them.
  flags.FLAGS.set_default('verbosity', -1)
  flags.mark_flags_as_required(['config'])
  app.run(main)
