"""What `experiments.train` would do, without doing it (`--dry_run`): each stage of a run, marked cached (its
output exists and is reused), done (for RL: how many iterations the latest checkpoint holds) or to run, with the
folder and the reason. Reads only configs, metadata files and the dataset (for its item count)."""

from __future__ import annotations

import json
import pathlib
from typing import NamedTuple

import ml_collections

from coars_jax.data import load_dataset
from coars_jax.recsys import experiment as sasrec_experiment
from coars_jax.recsys.crossfit import FoldSpec
from coars_jax.pipeline import experiment
from coars_jax.training import warm_start as warm_start_lib


class Stage(NamedTuple):
  name: str
  status: str  # 'cached' | 'to run' | 'done k of N' | 'conflict'
  detail: str


def plan(config: ml_collections.ConfigDict) -> list[Stage]:
  """The stages of `experiment.run(config)` in order, with their status."""
  experiment.validate(config)
  workdir = pathlib.Path(config.workdir).absolute()
  dataset = load_dataset(config.dataset, config.data_root or None, allow_download=False)
  peer = sasrec_experiment.run_peer_config(config, progress=False)
  stages = []
  folds = [None] + [
    FoldSpec(num_folds=config.sasrec_folds, fold=k, seed=config.sasrec_fold_seed) for k in range(config.sasrec_folds)
  ]
  for fold in folds:
    reusable, why = sasrec_experiment.checkpoint_status(peer, dataset, config.sasrec_seed, fold)
    name = 'SASRec (full)' if fold is None else f'SASRec ({fold.tag.replace("_", " ")})'
    folder = sasrec_experiment.checkpoint_folder(peer, config.sasrec_seed, fold)
    stages.append(Stage(name, 'cached' if reusable else 'to run', f'{folder}: {why}'))
  if config.eval.zero_shot and config.method != 'zero_shot':
    path = workdir / experiment.ZERO_SHOT_FILE
    stages.append(Stage('zero-shot test row', 'cached' if path.is_file() else 'to run', str(path)))
  if config.warm_start.enabled:
    folder = pathlib.Path(config.warm_start.folder or workdir / experiment.WARM_START_DIR).absolute()
    meta_path = folder / warm_start_lib.META_FILE
    if not meta_path.is_file():
      stages.append(Stage('warm start', 'to run', f'{folder}: none there yet ({config.warm_start.steps} SFT steps)'))
    else:
      stored = json.loads(meta_path.read_text()).get('settings')
      key = experiment.warm_start_key(experiment.warm_start_config(config))
      if stored is not None and stored != key:
        stages.append(
          Stage(
            'warm start', 'conflict', f'{folder} was trained with other settings; the run would stop with a ConfigError'
          )
        )
      else:
        stages.append(Stage('warm start', 'cached', str(folder)))
  results = workdir / experiment.RESULTS_FILE
  if config.method not in experiment.TRAINED_METHODS:
    stages.append(
      Stage(f'{experiment.row_label(config)} test row', 'cached' if results.is_file() else 'to run', str(results))
    )
    return stages
  before = workdir / experiment.BEFORE_FILE
  stages.append(
    Stage(
      'test row before RL' if config.eval.before else 'start record (no test row: eval.before off)',
      'cached' if before.is_file() else 'to run',
      str(before),
    )
  )
  checkpoints = workdir / experiment.CHECKPOINT_DIR
  steps = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) if checkpoints.is_dir() else []
  total = config.rl.iterations
  done = steps[-1] if steps else 0
  status = 'to run' if not done else ('cached' if done >= total else f'done {done} of {total}')
  resume = '' if not done or config.resume else ' (pass --config.resume=True to continue it)'
  stages.append(
    Stage(
      f'RL: {total} iterations of {config.rl.windows_per_iteration} windows x {config.rl.rollouts_per_window} rollouts',
      status,
      f'{checkpoints}{resume}',
    )
  )
  stages.append(Stage('test row after RL', 'cached' if results.is_file() else 'to run', str(results)))
  return stages


def format_plan(config: ml_collections.ConfigDict, stages: list[Stage]) -> str:
  width = max(len(s.name) for s in stages)
  lines = ['Resolved config:', config.to_json_best_effort(indent=2, sort_keys=True), '', 'Stages:']
  lines += [f'  {s.name:<{width}}  {s.status:<12}  {s.detail}' for s in stages]
  return '\n'.join(lines)
