"""One CoARS iteration with the cheap-iteration switches on and off, in one process:
`python -m experiments.bench_train [--config=configs/lastfm_smollm2.py] [--windows=16] [--output=FILE]`.

The config is a training config; its warm start is loaded (or trained into `warm_start.folder` if absent). Each
phase plays one rollout of the same `--windows` training windows from the same seed and the same adapters, then
updates from it, in this order (the peak RSS of a process only grows, so the lighter phase goes first):
  on:  the config as it is: rollouts with prefix reuse, the adapters of the warm start (or `lora.layers` when it
       attaches fresh ones; BUILD_NOTES Part 8 measured a warm start on the top third), the teacher on d + y against
       the student's cache, rematerialised layers, `rl.rows_per_microbatch` rows per microbatch;
  off: the switches off: every prompt prefilled whole, adapters on every layer (the config's adapters, plus B = 0
       adapters on the other layers, so both phases start from the same function), the teacher as a second pass
       over x + d, no remat, and `--off_rows_per_microbatch` rows per microbatch (the setting that fit before).
Each update is timed twice: the first call (it compiles) and a second call of the compiled step on the same
arrays. Reported per phase: wall time per stage, tokens forwarded per loss row (student and teacher, as padded and
as real tokens), layers backpropagated, the peak RSS; and the forward-only scoring passes of the on phase against
the rollout (`training.iteration_timing.scoring_seconds`). The JSON goes to --output (default results/bench/).
"""

import copy
import gc
import json
import os
import pathlib
import platform
import resource
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from coars_jax.models.lora import extend_lora
from coars_jax.training import iteration_timing
from coars_jax.pipeline import experiment
from experiments import outputs
from experiments import cli

_CONFIG = config_flags.DEFINE_config_file(
  'config', 'configs/lastfm_smollm2.py', 'A training config.', lock_config=False
)
_WINDOWS = flags.DEFINE_integer('windows', 16, 'Training windows (episodes, one rollout each) of the iteration.')
_OFF_ROWS = flags.DEFINE_integer('off_rows_per_microbatch', 2, 'Rows per microbatch of the off phase.')
_PHASES = flags.DEFINE_list('phases', ['on', 'off'], 'Which phases to run, in order.')
_RETIME = flags.DEFINE_list('retime', ['on', 'off'], 'Phases whose update is timed a second time, compiled.')
_OUTPUT = flags.DEFINE_string('output', None, 'The JSON file (default results/bench/train_<dataset>.json).')


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def tokens_per_row(batch: dict, rows: int) -> dict[str, float]:
  """Padded and real tokens each loss row forwards: the student's x + y, the teacher's x + d + y or d + y."""

  def flat(key):
    value = np.asarray(batch[key])
    return value.reshape((-1,) + value.shape[2:])[:rows]

  completion = flat('completion_mask')
  out = {
    'student_padded': flat('prompt_mask').shape[1] + completion.shape[1],
    'student_real': float((flat('prompt_mask') != 0).sum(1).mean() + (completion != 0).sum(1).mean()),
  }
  key = 'teacher_suffix_mask' if 'teacher_suffix_mask' in batch else 'teacher_prompt_mask'
  if key in batch:
    out['teacher_padded'] = flat(key).shape[1] + completion.shape[1]
    out['teacher_real'] = float((flat(key) != 0).sum(1).mean() + (completion != 0).sum(1).mean())
  return out


def retime_update(trainer, batch) -> float:
  """Seconds of a second call of the compiled update step on the same arrays (the state it leaves is discarded
  by the benchmark)."""
  config = trainer.config
  start = time.perf_counter()
  lora, opt_state, metrics = trainer._step(
    trainer.lora,
    trainer.frozen,
    trainer.opt_state,
    batch,
    np.float32(config.episodes_per_iteration),
    trainer.adapter_update_mask,
    np.float32(config.learning_rate),
  )
  jax.block_until_ready(metrics)
  trainer.lora, trainer.opt_state = lora, opt_state
  return time.perf_counter() - start


def run_phase(name, config, parts, model) -> dict:
  trainer = experiment.make_trainer(config, parts, model)
  print(f'[{name}] rollout of {config.rl.windows_per_iteration} windows...', flush=True)
  played = trainer.play()
  prefill = dict(trainer.backend.prefill_tokens)
  rollout = {
    'seconds': played.seconds,
    'episodes': len(played.episodes),
    'turns': int(played.trajectory.num_turns.sum()),
    'generated_tokens': int(played.trajectory.completion_mask.sum()),
    'prompt_tokens_prefilled_per_episode': prefill['prefilled'] / len(played.episodes),
    'prompt_tokens_reused_per_episode': prefill['reused'] / len(played.episodes),
    'hit_at_1': float(np.mean([e.turns[0].hit for e in played.episodes])),
  }
  print(f'[{name}] {json.dumps(rollout)}\n[{name}] update...', flush=True)
  metrics = trainer.learn(played)
  batch, rows = trainer.last_batch, int(metrics['update/loss_rows'])
  row = {
    'phase': name,
    'rollout': rollout,
    'prefix_reuse': config.rl.prefix_reuse,
    'lora_layers': model.lora_config.layers,
    'layers_backpropagated': model.config.num_layers - model.lowest_adapted_layer,
    'teacher_reuses_student_cache': config.rl.teacher_reuses_student_cache,
    'remat': config.rl.remat,
    'rows_per_microbatch': config.rl.rows_per_microbatch,
    'loss_rows': rows,
    'microbatches_run': int(metrics.get('update/microbatches', 0)),
    'host_seconds': metrics['time/scoring_seconds'],
    'update_seconds_first_call': metrics['time/update_seconds'],
    'loss': metrics.get('loss/total'),
    'grad_norm': metrics.get('update/grad_norm'),
    'tokens_per_loss_row': tokens_per_row(batch, rows),
  }
  row['update_seconds_compiled'] = retime_update(trainer, batch) if name in _RETIME.value else None
  row['peak_rss_gib_so_far'] = peak_rss_gib()
  if name == 'on':
    row['scoring'] = iteration_timing.scoring_seconds(trainer, batch, repeats=1)
  print(json.dumps(row, indent=1, default=float), flush=True)
  return row


def main(argv):
  del argv
  config = _CONFIG.value
  config.rl.windows_per_iteration = _WINDOWS.value
  config.rl.rollouts_per_window = 1
  experiment.validate(config)
  load = time.perf_counter()
  parts = experiment.load_components(config)
  model, origin = experiment.prepare_agents(config, parts, pathlib.Path(config.workdir).absolute())
  load = time.perf_counter() - load
  start_adapters = jax.tree.map(np.array, nnx.state(model, nnx.LoRAParam))

  phases = []
  for name in _PHASES.value:
    nnx.update(model, jax.tree.map(lambda x: jax.numpy.asarray(np.array(x)), start_adapters))
    phase_config = copy.deepcopy(config)
    # This benchmark splits the one-row-per-turn update (Part 8); experiments.bench_costs measures the packed one.
    phase_config.rl.packed_update = False
    if name == 'off':
      phase_config.rl.prefix_reuse = False
      phase_config.rl.teacher_reuses_student_cache = False
      phase_config.rl.remat = False
      phase_config.rl.rows_per_microbatch = _OFF_ROWS.value
      if model.lora_config.layers != 'all':
        extend_lora(model, 'all', rngs=nnx.Rngs(0))
    elif name != 'on':
      raise app.UsageError(f'--phases: expected on and/or off, found {name!r}')
    phases.append(run_phase(name, phase_config, parts, model))
    gc.collect()

  result = {
    'config': config.workdir,
    'dataset': config.dataset,
    'model': config.model,
    'start': origin['stage'],
    'windows': _WINDOWS.value,
    'max_turns': config.rollout.max_turns,
    'load_seconds': load,
    'phases': phases,
    'machine': f'{platform.node()} {jax.devices()[0].platform} '
    f'x{jax.device_count()}, {len(os.sched_getaffinity(0))} cores',
  }
  by_name = {p['phase']: p for p in phases}

  def iteration_seconds(p, kind):
    return p['rollout']['seconds'] + p['host_seconds'] + p[f'update_seconds_{kind}']

  if {'on', 'off'} <= set(by_name):
    on, off = by_name['on'], by_name['off']
    for kind in ('compiled', 'first_call'):
      if off[f'update_seconds_{kind}'] is not None and on[f'update_seconds_{kind}'] is not None:
        result[f'iteration_speedup_{kind}'] = iteration_seconds(off, kind) / iteration_seconds(on, kind)
        result[f'update_speedup_{kind}'] = off[f'update_seconds_{kind}'] / on[f'update_seconds_{kind}']
    result['rollout_speedup'] = off['rollout']['seconds'] / on['rollout']['seconds']
    result['prefilled_tokens_ratio'] = (
      on['rollout']['prompt_tokens_prefilled_per_episode'] / off['rollout']['prompt_tokens_prefilled_per_episode']
    )
    result['teacher_tokens_ratio'] = (
      on['tokens_per_loss_row']['teacher_padded'] / off['tokens_per_loss_row']['teacher_padded']
    )
  if 'on' in by_name:
    scoring = by_name['on']['scoring']
    result['scoring_over_rollout'] = (
      scoring['student_scoring_seconds'] + scoring.get('teacher_scoring_seconds', 0)
    ) / by_name['on']['rollout']['seconds']
  output = _OUTPUT.value or f'results/bench/train_{config.dataset}.json'
  outputs.write_json(output, result)
  print(
    '\n| phase | rollout s | prefilled tok/episode | layers backprop | rows/micro | update s (1st call) | '
    'update s (compiled) | student tok/row | teacher tok/row | peak RSS GiB |'
  )
  print('|---|---|---|---|---|---|---|---|---|---|')
  for p in phases:
    t, r = p['tokens_per_loss_row'], p['rollout']
    print(
      f'| {p["phase"]} | {r["seconds"]:.1f} | {r["prompt_tokens_prefilled_per_episode"]:.0f} | '
      f'{p["layers_backpropagated"]} | {p["rows_per_microbatch"]} | {p["update_seconds_first_call"]:.1f} | '
      f'{p["update_seconds_compiled"] or float("nan"):.1f} | {t["student_padded"]} | '
      f'{t.get("teacher_padded", 0)} | '
      f'{p["peak_rss_gib_so_far"]:.1f} |'
    )
  print(
    '\n'
    + ', '.join(
      f'{k} {v:.2f}'
      for k, v in result.items()
      if k.endswith(('speedup', 'speedup_compiled', 'speedup_first_call', 'ratio', 'over_rollout'))
    )
  )
  print(f'Wrote {pathlib.Path(output).absolute()}')


if __name__ == '__main__':
  cli.run(main)
