"""The SASRec experiment as a library call: config defaults and checks, train-or-load per training seed.

Checkpoints go to `<workdir>/seed_<k>`; a complete checkpoint is loaded instead of retraining unless the
config says `retrain`. The config also fixes the candidate seeds, so a rerun reproduces every number.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import ml_collections

from coars_jax import configlib
from coars_jax.data import DATASETS, Dataset, load_dataset
from coars_jax.recsys import checkpoint
from coars_jax.recsys.sasrec import SASRec, SASRecConfig
from coars_jax.recsys.training import SASRecTrainConfig, train_sasrec

SPLITS = ('val', 'test')


def default_config(dataset: str = 'lastfm') -> ml_collections.ConfigDict:
  """Defaults for `configs/sasrec_<dataset>.py`; each field documents what it controls."""
  model = SASRecConfig(num_items=1)
  train = SASRecTrainConfig()
  return ml_collections.ConfigDict({
      'dataset': dataset,  # lastfm | movielens | instruments
      'data_root': '',  # '' -> $COARS_DATA_DIR -> the per-user cache folder
      'allow_download': True,  # fetch missing public originals (checksum-verified) when the network allows
      'workdir': f'runs/sasrec_{dataset}',  # checkpoints, one folder per training seed
      'split': 'test',  # the split the reference table reports
      'train_seeds': (0, 1, 2),  # SASRec training seeds; one table row per seed and method
      'candidate_seeds': tuple(range(10)),  # each row is the mean over these candidate-list seeds
      'retrain': False,  # ignore existing checkpoints
      'progress': True,  # tqdm bars
      'sasrec': {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
                 if f.name not in ('num_items', 'max_len')},
      'train': {**{f.name: getattr(train, f.name) for f in dataclasses.fields(train)},
                'val_candidate_seeds': tuple(train.val_candidate_seeds)},
  })


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails on the first bad field, naming it; runs before any data is read."""
  configlib.check_keys(config, default_config(config.get('dataset', 'lastfm')))
  configlib.require(config.dataset in DATASETS, 'dataset', f'one of {DATASETS}', config.dataset)
  configlib.require(config.split in SPLITS, 'split', f'one of {SPLITS}', config.split)
  configlib.require_int_list(config.train_seeds, 'train_seeds')
  configlib.require_int_list(config.candidate_seeds, 'candidate_seeds')
  configlib.require(isinstance(config.workdir, str) and config.workdir, 'workdir', 'a folder path', config.workdir)
  try:
    model_config(config, num_items=1)
    train_config(config)
  except (TypeError, ValueError) as e:
    raise configlib.ConfigError(f'Config group sasrec/train: {e}') from e


def model_config(config: ml_collections.ConfigDict, num_items: int) -> SASRecConfig:
  return SASRecConfig(num_items=num_items, **config.sasrec.to_dict())


def train_config(config: ml_collections.ConfigDict) -> SASRecTrainConfig:
  fields = config.train.to_dict()
  fields['val_candidate_seeds'] = configlib.require_int_list(fields['val_candidate_seeds'],
                                                              'train.val_candidate_seeds')
  return SASRecTrainConfig(**fields)


def workdir(config: ml_collections.ConfigDict) -> pathlib.Path:
  return pathlib.Path(config.workdir).expanduser().absolute()


def load_configured_dataset(config: ml_collections.ConfigDict) -> Dataset:
  return load_dataset(config.dataset, config.data_root or None, allow_download=config.allow_download)


def train_or_load(config: ml_collections.ConfigDict, dataset: Dataset, seed: int) -> tuple[SASRec, dict]:
  """The SASRec of training seed `seed`: loaded from its checkpoint, or trained and saved."""
  folder = workdir(config) / f'seed_{seed}'
  if checkpoint.is_complete(folder) and not config.retrain:
    model, meta = checkpoint.load_sasrec(folder)
    expected = dataclasses.asdict(model_config(config, dataset.num_items))
    if meta.get('dataset') == dataset.name and meta['model_config'] == expected:
      logging.info('Loaded SASRec %s seed %d from %s', dataset.name, seed, folder)
      return model, meta
    logging.warning('Checkpoint %s was trained with another dataset or model config; retraining.', folder)
  result = train_sasrec(dataset, model_config(config, dataset.num_items), train_config(config), seed=seed,
                        progress=config.progress)
  meta = {'dataset': dataset.name, 'seed': seed, 'best_epoch': result.best_epoch, 'best_val': result.best_val,
          'epochs_run': result.epochs_run, 'train_seconds': round(result.seconds, 1),
          'peak_rss_mib': round(result.peak_rss_mib, 1), 'train_config': config.train.to_dict(),
          'val_history': result.history}
  checkpoint.save_sasrec(folder, result.model, meta)
  return result.model, {'model_config': dataclasses.asdict(result.model.config), **meta}
