"""The peer's top-1 hit rate per split, in-sample and out-of-fold on the training windows (METHOD.md section 2):

  python -m experiments.peer_report --config=configs/warm_start_smollm2.py:lastfm [--train_windows=2000] [--output=FILE]

It reads the SASRec fields of any agentic config (`experiments.train`'s or `experiments.warm_start`'s): the
dataset, `sasrec_workdir`, `sasrec_seed`, `sasrec_max_epochs`, `sasrec_folds`, `sasrec_fold_seed`, the training
window pool and the rollouts' candidate seed, and trains the full and fold models there first if they are missing (the log says which).
"""

import json
import pathlib
import time

from absl import flags
from ml_collections import config_flags

from coars_jax import configlib
from coars_jax.data import load_dataset
from coars_jax.recsys import experiment
from experiments import cli

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'An agentic config (configs/<dataset>_smollm2.py, configs/warm_start_*.py).', lock_config=True
)
_TRAIN_WINDOWS = flags.DEFINE_integer('train_windows', 2000, 'Training windows scored (a seeded sample; 0 = all).')
_OUTPUT = flags.DEFINE_string('output', None, 'Also write the rates as JSON here.')


def main(argv):
  del argv
  config = _CONFIG.value
  configlib.require_peer_fields(config)
  configlib.require(config.sasrec_folds >= 2, 'sasrec_folds', 'an int >= 2 (cross-fitting on)', config.sasrec_folds)
  start = time.perf_counter()
  dataset = load_dataset(config.dataset, config.data_root or None, allow_download=config.allow_download)
  full, peer = experiment.train_or_load_peer(
    experiment.peer_config(
      config.dataset,
      workdir=config.sasrec_workdir,
      data_root=config.data_root,
      allow_download=config.allow_download,
      max_epochs=config.sasrec_max_epochs,
    ),
    dataset,
    config.sasrec_seed,
    num_folds=config.sasrec_folds,
    fold_seed=config.sasrec_fold_seed,
  )
  # The training experiment's configs hold the pool and the candidate seed at the top level and in `rollout`, the
  # warm start's in its `warm_start` group.
  candidate_seed = config.rollout.candidate_seed if 'rollout' in config else config.warm_start.candidate_seed
  pool = config.train_pool if 'train_pool' in config else config.warm_start.train_pool
  rates = experiment.peer_hit_rates(
    dataset, full, peer, candidate_seed=candidate_seed, train_windows=_TRAIN_WINDOWS.value, pool=pool
  )
  row = {
    'dataset': dataset.name,
    'sasrec_seed': config.sasrec_seed,
    'sasrec_folds': config.sasrec_folds,
    'sasrec_max_epochs': config.sasrec_max_epochs,
    'candidate_seed': candidate_seed,
    **rates,
    'gap_out_of_fold_vs_val': rates['train_out_of_fold'] - rates['val'],
    'seconds': round(time.perf_counter() - start, 1),
  }
  every = rates.get('train_out_of_fold_all_windows')
  print(
    f'{dataset.name}: peer top-1 hit rate on training windows ({pool}, {rates["train_windows_scored"]} scored, '
    f'K = {config.sasrec_folds}): in-sample {rates["train_in_sample"]:.3f}, out-of-fold '
    f'{rates["train_out_of_fold"]:.3f}'
    + ('' if every is None else f' (all windows: {every:.3f})')
    + f'; val {rates["val"]:.3f}, test {rates["test"]:.3f}; out-of-fold minus val '
    f'{rates["train_out_of_fold"] - rates["val"]:+.3f}'
  )
  print(json.dumps(row))
  if _OUTPUT.value:
    path = pathlib.Path(_OUTPUT.value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=2) + '\n')


if __name__ == '__main__':
  cli.run(main, required=('config',), quiet=False)
