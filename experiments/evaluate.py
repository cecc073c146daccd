"""Evaluation tables: `python -m experiments.evaluate --config=... [--checkpoint=DIR] [--output=FILE]`.

Two kinds of config:
- `configs/eval_*.py` (an agentic evaluation, `coars_jax.eval.experiment`): plays the two agents on val or test
  windows, zero-shot or from a checkpoint's adapters (`--checkpoint` overrides `config.checkpoint`), or as the
  Reflexion memory baseline (`method='reflexion'`), and reports Hit@1, ValidRatio, average turns and user-agent F1.
- `configs/sasrec_*.py` (the reference rows): trains SASRec for each training seed unless its checkpoint exists,
  and reports random, popularity and SASRec.

Both print a markdown table and write the rows as JSON to --output.
"""

import json
import pathlib

from absl import app, flags
from ml_collections import config_flags

from coars_jax.data import load_dataset
from coars_jax.eval import agentic, reference
from coars_jax.eval import experiment as agentic_experiment
from coars_jax.recsys import experiment
from experiments import cli

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'A configs/eval_*.py or configs/sasrec_*.py file.', lock_config=True
)
_CHECKPOINT = flags.DEFINE_string(
  'checkpoint', None, "Agentic configs: a folder with both agents' adapters (overrides config.checkpoint)."
)
_OUTPUT = flags.DEFINE_string('output', None, 'Write the rows as JSON to this file.')
_DRY_RUN = flags.DEFINE_bool(
  'dry_run',
  False,
  'Print the resolved config and what would be trained (SASRec) or reused, then exit without evaluating.',
)


def _write(rows, path):
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(rows, indent=2))
  print(f'\nWrote {len(rows)} rows to {path.absolute()}')


def agentic_main(config):
  if _CHECKPOINT.value is not None:
    with config.unlocked():
      config.checkpoint = _CHECKPOINT.value
  rows = agentic_experiment.run(config)
  for row in rows:
    print(agentic_experiment.summary_line(row))
  print(
    f'\n## {rows[0]["dataset"]}, {config.split} split, {rows[0]["num_windows"]} of '
    f'{rows[0]["windows_of_split"]} windows\n'
  )
  print(agentic.format_markdown(rows))
  return rows


def reference_main(config):
  if _CHECKPOINT.value is not None:
    raise app.UsageError('--checkpoint applies to agentic configs (configs/eval_*.py), not to SASRec configs')
  experiment.validate(config)
  dataset = experiment.load_configured_dataset(config)
  models = {seed: experiment.train_or_load(config, dataset, seed)[0] for seed in config.train_seeds}
  rows = reference.reference_rows(dataset, models, config.candidate_seeds, config.split)
  print(
    f'\n## Reference table: {dataset.name}, {config.split} split, {len(dataset.split(config.split))} windows, '
    f'{len(config.candidate_seeds)} candidate seeds\n'
  )
  print(reference.format_markdown(rows))
  if dataset.name == 'lastfm' and config.split == 'test':
    prior = reference.afl_prior_hit_at_1(config.data_root or None, allow_download=config.allow_download)
    print(f"\nAFL's shipped SASRec top-1 picks (prior_lastfm/SASRec.csv, their candidate lists): Hit@1 = {prior:.3f}")
  return rows


def dry_run(config) -> None:
  """The resolved config, then each SASRec the evaluation needs (cached or to train, with the folder and why) and
  the agents it would play."""
  agentic = 'method' in config
  if agentic and _CHECKPOINT.value is not None:
    with config.unlocked():
      config.checkpoint = _CHECKPOINT.value
  (agentic_experiment.validate if agentic else experiment.validate)(config)
  print('Resolved config:')
  print(config.to_json_best_effort(indent=2, sort_keys=True))
  dataset = load_dataset(config.dataset, config.data_root or None, allow_download=False)
  if agentic:
    peer = experiment.peer_config(
      config.dataset, workdir=config.sasrec_workdir, data_root=config.data_root, max_epochs=config.sasrec_max_epochs
    )
    seeds = (config.sasrec_seed,)
  else:
    peer, seeds = config, tuple(config.train_seeds)
  print('\nStages:')
  for seed in seeds:
    reusable, why = experiment.checkpoint_status(peer, dataset, seed)
    print(
      f'  SASRec seed {seed}: {"cached" if reusable else "to train"} '
      f'({experiment.checkpoint_folder(peer, seed)}: {why})'
    )
  if agentic:
    agents = (
      f'the API at {config.backend.base_url}'
      if config.backend.kind == 'openai'
      else f'adapters from {config.checkpoint}'
      if config.checkpoint
      else f'the bare {config.model} base'
    )
    print(
      f'  {config.method} row: to run, {agents}, {config.num_windows or len(dataset.split(config.split))} '
      f'{config.split} windows x seeds {tuple(config.seeds)}'
    )
  else:
    print(f'  reference rows: to run, {len(config.candidate_seeds)} candidate seeds')


def main(argv):
  del argv
  config = _CONFIG.value
  if _DRY_RUN.value:
    dry_run(config)
    return
  rows = agentic_main(config) if 'method' in config else reference_main(config)
  if _OUTPUT.value:
    _write(rows, _OUTPUT.value)


def entry():
  """The `coars-evaluate` console script (setup.py)."""
  cli.run(main, required=('config',))


if __name__ == '__main__':
  entry()
