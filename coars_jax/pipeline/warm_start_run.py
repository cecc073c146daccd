"""The warm start alone, `python -m experiments.warm_start --config=configs/warm_start_*.py`: the dataset and the
SASRec peer (`recsys.experiment.train_or_load_peer`, trained first when its checkpoint is absent) are loaded here,
then `training.warm_start.train_and_evaluate` trains, saves and evaluates the agents with them. The config is
`training.warm_start.default_config`'s.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from coars_jax.data import Dataset, load_dataset
from coars_jax.recsys import experiment as sasrec_experiment
from coars_jax.recsys.sasrec import SASRec
from coars_jax.training import warm_start as warm_start_lib


def train_or_load_peer(config: ml_collections.ConfigDict, dataset: Dataset, *, progress: bool) -> tuple[SASRec, Any]:
  """(the SASRec of every training window, the peer of the scripted training dialogues): the latter serves each
  training window from the fold model that never saw its user (`sasrec_folds` > 0), else the full SASRec."""
  return sasrec_experiment.train_or_load_peer(
    sasrec_experiment.run_peer_config(config, progress=progress),
    dataset,
    config.sasrec_seed,
    num_folds=config.sasrec_folds,
    fold_seed=config.sasrec_fold_seed,
  )


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The whole experiment: load data and SASRec, then warm start, save under `workdir` and evaluate greedy rollouts
  (`training.warm_start.train_and_evaluate`). Returns the summary it also saves."""
  warm_start_lib.validate(config)  # before any data is read
  settings = warm_start_lib.warm_start_config(config)
  dataset = load_dataset(config.dataset, config.data_root or None, allow_download=config.allow_download)
  full_sasrec, peer = train_or_load_peer(config, dataset, progress=settings.progress)
  return warm_start_lib.train_and_evaluate(config, dataset, peer=peer, eval_peer=full_sasrec)
