"""The SASRec experiment as a library call: config defaults and checks, train-or-load per training seed.

Checkpoints go to `<workdir>/seed_<k>`; a complete checkpoint is loaded instead of retraining unless the
config says `retrain`. The config also fixes the candidate seeds, so a rerun reproduces every number.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import ml_collections
import numpy as np

from coars_jax import configlib
from coars_jax.announce import about, announce
from coars_jax.data import DATASETS, Dataset, candidate_list, load_dataset
from coars_jax.recsys import checkpoint
from coars_jax.recsys.crossfit import CrossFittedPeer, FoldSpec, held_out_dataset, top1_hit_rate, user_folds
from coars_jax.recsys.sasrec import SASRec, SASRecConfig
from coars_jax.recsys.training import SASRecTrainConfig, train_sasrec

SPLITS = ('val', 'test')


def default_config(dataset: str = 'lastfm') -> ml_collections.ConfigDict:
  """Defaults for `configs/sasrec_<dataset>.py`; each field documents what it controls."""
  model = SASRecConfig(num_items=1)
  train = SASRecTrainConfig()
  return ml_collections.ConfigDict(
    {
      'dataset': dataset,  # lastfm | movielens | instruments
      'data_root': '',  # '' -> $COARS_DATA_DIR -> the per-user cache folder
      'allow_download': True,  # fetch missing public originals (checksum-verified) when the network allows
      'workdir': f'runs/sasrec_{dataset}',  # checkpoints, one folder per training seed
      'split': 'test',  # the split the reference table reports
      'train_seeds': (0, 1, 2),  # SASRec training seeds; one table row per seed and method
      'candidate_seeds': tuple(range(10)),  # each row is the mean over these candidate-list seeds
      'retrain': False,  # ignore existing checkpoints
      'progress': True,  # tqdm bars
      'sasrec': {
        f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name not in ('num_items', 'max_len')
      },
      'train': {
        **{f.name: getattr(train, f.name) for f in dataclasses.fields(train)},
        'val_candidate_seeds': tuple(train.val_candidate_seeds),
      },
    }
  )


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
  fields['val_candidate_seeds'] = configlib.require_int_list(fields['val_candidate_seeds'], 'train.val_candidate_seeds')
  return SASRecTrainConfig(**fields)


def workdir(config: ml_collections.ConfigDict) -> pathlib.Path:
  return pathlib.Path(config.workdir).expanduser().absolute()


def load_configured_dataset(config: ml_collections.ConfigDict) -> Dataset:
  return load_dataset(config.dataset, config.data_root or None, allow_download=config.allow_download)


def peer_config(
  dataset: str,
  *,
  workdir: str,
  data_root: str = '',
  allow_download: bool = True,
  progress: bool = True,
  max_epochs: int = 0,
) -> ml_collections.ConfigDict:
  """The SASRec config behind an agentic run's peer: the defaults, with the run's data root, checkpoint folder,
  progress bars and an optional cap on the epochs (0 = the default's own, early-stopped)."""
  config = default_config(dataset)
  config.update({'data_root': data_root, 'allow_download': allow_download, 'workdir': workdir, 'progress': progress})
  if max_epochs:
    config.train.max_epochs = max_epochs
  return config


def run_peer_config(run: ml_collections.ConfigDict, *, progress: bool) -> ml_collections.ConfigDict:
  """`peer_config` from an agentic run's config (its `dataset`, `sasrec_workdir`, `data_root`, `allow_download`
  and `sasrec_max_epochs`): the one reading of those fields that every command building a run's peer shares."""
  return peer_config(
    run.dataset,
    workdir=run.sasrec_workdir,
    data_root=run.data_root,
    allow_download=run.allow_download,
    progress=progress,
    max_epochs=run.sasrec_max_epochs,
  )


# SASRec's training cost per window and epoch on the project's 2-core CPU, for the announced estimate: 6 LastFM
# SASRecs of up to 20 epochs on about 40,000-50,800 windows took 25 minutes under load (BUILD_NOTES Part 7), an
# upper bound; early stopping usually ends sooner.
SECONDS_PER_WINDOW_EPOCH = 2.5e-4


def checkpoint_status(
  config: ml_collections.ConfigDict, dataset: Dataset, seed: int, fold: FoldSpec | None = None
) -> tuple[bool, str]:
  """(whether `train_or_load` would reuse the checkpoint, why not): a checkpoint is reused only when it was
  trained with the same dataset, model config, whole training config and fold, and `retrain` is off."""
  folder = checkpoint_folder(config, seed, fold)
  if not checkpoint.is_complete(folder):
    return False, 'no checkpoint there yet'
  if config.retrain:
    return False, 'retrain is on'
  meta = json.loads((folder / checkpoint.META_FILE).read_text())
  expected = (
    dataset.name,
    dataclasses.asdict(model_config(config, dataset.num_items)),
    json.loads(json.dumps(config.train.to_dict())),
    None if fold is None else dataclasses.asdict(fold),
  )
  found = (meta.get('dataset'), meta.get('model_config'), meta.get('train_config'), meta.get('fold'))
  if found != expected:
    return False, 'the checkpoint there was trained with another dataset, model, training config or fold'
  return True, 'same data, model and training config'


def train_or_load(
  config: ml_collections.ConfigDict, dataset: Dataset, seed: int, fold: FoldSpec | None = None
) -> tuple[SASRec, dict]:
  """The SASRec of training seed `seed` (trained on every training window, or with `fold`, on all but that fold's
  users): loaded from its checkpoint when that was trained with the same dataset, model, training config and fold,
  else trained and saved (announced, with the folder, either way)."""
  folder = checkpoint_folder(config, seed, fold)
  train_settings = json.loads(json.dumps(config.train.to_dict()))
  fold_settings = None if fold is None else dataclasses.asdict(fold)
  what = f'SASRec {dataset.name} seed {seed}' + ('' if fold is None else f' ({fold.tag.replace("_", " ")})')
  reusable, why = checkpoint_status(config, dataset, seed, fold)
  if reusable:
    model, meta = checkpoint.load_sasrec(folder)
    announce(f'Reusing {what} from {folder} (trained with the same data, model and training config)')
    return model, meta
  train_data = dataset if fold is None else held_out_dataset(dataset, fold)
  windows = len(train_data.split('train'))
  announce(
    f'Training {what} on {windows} training windows (at most {config.train.max_epochs} epochs) into {folder}: '
    f'{why}; {about(windows * config.train.max_epochs * SECONDS_PER_WINDOW_EPOCH)} on 2 CPU cores at most'
  )
  result = train_sasrec(
    train_data, model_config(config, dataset.num_items), train_config(config), seed=seed, progress=config.progress
  )
  meta = {
    'dataset': dataset.name,
    'seed': seed,
    'fold': fold_settings,
    'best_epoch': result.best_epoch,
    'best_val': result.best_val,
    'epochs_run': result.epochs_run,
    'train_seconds': round(result.seconds, 1),
    'peak_rss_mib': round(result.peak_rss_mib, 1),
    'train_config': train_settings,
    'train_windows': len(train_data.split('train')),
    'val_history': result.history,
  }
  checkpoint.save_sasrec(folder, result.model, meta)
  return result.model, {'model_config': dataclasses.asdict(result.model.config), **meta}


def checkpoint_folder(config: ml_collections.ConfigDict, seed: int, fold: FoldSpec | None = None) -> pathlib.Path:
  """`<workdir>/seed_<k>` for the full model, `<workdir>/seed_<k>_<fold tag>` for a fold's."""
  return workdir(config) / (f'seed_{seed}' if fold is None else f'seed_{seed}_{fold.tag}')


def train_or_load_peer(
  config: ml_collections.ConfigDict, dataset: Dataset, seed: int, *, num_folds: int, fold_seed: int = 0
) -> tuple[SASRec, SASRec | CrossFittedPeer]:
  """(the full SASRec, the peer of the training windows): with `num_folds` >= 2 a `CrossFittedPeer` of that many
  out-of-fold models (METHOD.md section 2), with 0 the full model itself (its training windows' signals are then an
  oracle; for tests and for the ablation that measures the leak)."""
  full, _ = train_or_load(config, dataset, seed)
  if num_folds == 0:
    return full, full
  if num_folds < 2:
    raise ValueError(f'num_folds must be 0 (no cross-fitting) or >= 2, found {num_folds}')
  specs = [FoldSpec(num_folds=num_folds, fold=k, seed=fold_seed) for k in range(num_folds)]
  models = [train_or_load(config, dataset, seed, spec)[0] for spec in specs]
  folds = user_folds(dataset.split('train').users, num_folds, fold_seed)
  return full, CrossFittedPeer(full, models, folds)


def peer_hit_rates(
  dataset: Dataset,
  full: SASRec,
  peer: SASRec | CrossFittedPeer,
  *,
  candidate_seed: int = 0,
  train_windows: int = 0,
  pool: str = 'all',
  seed: int = 0,
) -> dict[str, float | int | str]:
  """The peer's top-1 hit rate (the share of windows whose target is its top candidate) per split, on the
  rollouts' candidate lists (`data.candidate_list` with `candidate_seed`):

  - `train_in_sample`: the full SASRec on training windows of `pool` (`WindowSplit.pool`), which it trained on
    (the oracle cross-fitting removes);
  - `train_out_of_fold`: `peer` on the same windows (each served by a SASRec that never saw its user);
  - `train_out_of_fold_all_windows`: the same on windows drawn from every training window, when `pool` is another;
  - `val`, `test`: the full SASRec, as every agentic run uses it there.

  `train_windows` > 0 scores a seeded sample of that many windows of a pool (0 = all of them)."""
  train = dataset.split('train')

  def sample(pool_name):
    windows = train.pool(pool_name)
    if train_windows and train_windows < len(windows):
      windows = np.sort(np.random.default_rng([seed, 0x9EE4]).choice(windows, size=train_windows, replace=False))
    return windows

  def lists(split, rows):
    candidates = np.stack([candidate_list(dataset, split, int(i), candidate_seed) for i in rows])
    return candidates, dataset.split(split).targets[rows]

  indices = sample(pool)
  train_candidates, train_targets = lists('train', indices)
  rates: dict[str, float | int | str] = {
    'train_pool': pool,
    'train_in_sample': top1_hit_rate(full, dataset, 'train', train_candidates, train_targets, indices),
    'train_out_of_fold': top1_hit_rate(peer, dataset, 'train', train_candidates, train_targets, indices),
    'train_windows_scored': int(len(indices)),
  }
  if pool != 'all':
    every = sample('all')
    rates['train_out_of_fold_all_windows'] = top1_hit_rate(peer, dataset, 'train', *lists('train', every), every)
  for split in SPLITS:
    rows = np.arange(len(dataset.split(split)))
    rates[split] = top1_hit_rate(full, dataset, split, *lists(split, rows))
  return rates
