"""Where one evaluation batch and one CoARS iteration spend their seconds, against the floor of this machine, with
the one-pass switches on and off in the same process (issue 21):
`python -m experiments.bench_costs [--config=configs/lastfm_smollm2.py] [--phases=floor,eval_on,f1,iteration_on,
iteration_off,eval_off] [--output=results/bench/costs_smollm2_lastfm.json]`.

The config is a training config; its warm start is loaded (or trained into `warm_start.folder` when absent).
- floor: the float32 matmul rate at a prefill-shaped product ([512, E] x [E, 3E]) and a 16-row one, the memory copy
  rate; every phase's floor is its real tokens' matmul FLOPs (2 P per token forward, 6 P forward and backward,
  P = the decoder's matmul parameters) at that rate, or for decode the larger of FLOPs and bytes (weights and the
  live cache) per step.
- eval_on / eval_off: one greedy evaluation batch of `--windows` test windows (`agents.rollout_timing.measure_rollouts`:
  one warm-up rollout, then one timed): on = the defaults (append-only prompts read from the kept cache, decode over
  live cache slots); off = every prompt prefilled whole and decode over the whole cache.
- f1: the user-agent F1 of `--f1_users` users with p_t (the evaluation's second half).
- iteration_on / iteration_off: one CoARS iteration of `--iteration_windows` x `--rollouts` episodes from the same
  adapters and seed: on = packed dialogues (one student forward per dialogue), prefix reuse, live-slot decode;
  off = one row per turn, no prefix reuse, whole-cache decode. The update is timed at its first call (compiling)
  and again compiled.
Each phase reports seconds, real and forwarded tokens, and its floor; the JSON keeps everything.
"""

import copy
import dataclasses
import json
import os
import pathlib
import platform
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from ml_collections import config_flags

from coars_jax.agents import rollout_timing
from coars_jax.eval.user_f1 import UserF1Config, evaluate_user_f1
from coars_jax.models import decoder as decoder_lib
from coars_jax.sampling.generation_speed import best_of, decode_step_cost, measure_machine_peaks
from coars_jax.data.user_sim import user_sim_set
from coars_jax.pipeline import experiment
from experiments import cli, outputs

_CONFIG = config_flags.DEFINE_config_file(
  'config', 'configs/lastfm_smollm2.py', 'A training config.', lock_config=False
)
_PHASES = flags.DEFINE_list(
  'phases', ['floor', 'eval_on', 'f1', 'iteration_on', 'iteration_off', 'eval_off'], 'Phases to run, in order.'
)
_WINDOWS = flags.DEFINE_integer('windows', 16, 'Test windows of the evaluation batch.')
_F1_USERS = flags.DEFINE_integer('f1_users', 8, 'Users of the F1 phase.')
_ITERATION_WINDOWS = flags.DEFINE_integer('iteration_windows', 4, 'Training windows of the CoARS iteration.')
_ROLLOUTS = flags.DEFINE_integer('rollouts', 4, 'Rollouts per window of the CoARS iteration.')
_OUTPUT = flags.DEFINE_string('output', None, 'The JSON file (default results/bench/costs_<model>_<dataset>.json).')


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def matmul_params(config) -> float:
  embedding = config.vocab_size * config.embed_dim
  return float(config.num_params() - embedding)


def matmul_rate(rows: int, inner: int, outer: int, repeats: int = 5) -> float:
  rng = np.random.default_rng(0)
  left = jnp.asarray(rng.standard_normal((rows, inner), np.float32))
  right = jnp.asarray(rng.standard_normal((inner, outer), np.float32))
  product = jax.jit(jnp.matmul)
  product(left, right).block_until_ready()
  return 2.0 * rows * inner * outer / best_of(repeats, lambda: product(left, right).block_until_ready())


def floor_phase(model) -> dict:
  config = model.config
  peaks = measure_machine_peaks()
  return {
    'prefill_matmul_flops_per_s': matmul_rate(512, config.embed_dim, 3 * config.embed_dim),
    'rows16_matmul_flops_per_s': matmul_rate(16, config.embed_dim, 3 * config.embed_dim),
    'square_matmul_flops_per_s': peaks.matmul_flops_per_s,
    'copy_bytes_per_s': peaks.copy_bytes_per_s,
    'matmul_params': matmul_params(config),
  }


def eval_phase(name, config, parts, model, start_adapters, floor) -> dict:
  on = name == 'eval_on'
  nnx.update(model, jax.tree.map(lambda x: jnp.asarray(np.array(x)), start_adapters))
  decoder_lib.LIVE_SLOT_DECODE = on
  jax.clear_caches()
  backend = experiment.greedy_backend(model, parts.tokenizer, config)
  backend_config = dataclasses.replace(backend.config, prefix_reuse=on)
  summary, _ = rollout_timing.measure_rollouts(
    model,
    parts.tokenizer,
    parts.dataset,
    parts.sasrec,
    split='test',
    window_indices=range(_WINDOWS.value),
    rollout=experiment.rollout_config(config),
    backend_config=backend_config,
    adapters={agent: agent for agent in model.adapter_names},
    repeats=1,
  )
  decoder_lib.LIVE_SLOT_DECODE = True
  seconds = summary['seconds']
  prefilled = summary['prefill_tokens']['prefilled']
  out = {
    'wall_seconds': summary['wall_seconds'],
    'warmup_seconds': summary['warmup_seconds'],
    'warmup_compiles': summary['warmup_compiles'],
    'episodes': summary['episodes'],
    'turns': summary.get('turns'),
    'metrics': summary['metrics'],
    'seconds': seconds,
    'prompt_tokens': summary['prompt_tokens'],
    'prompt_tokens_prefilled': prefilled,
    'prompt_tokens_reused': summary['prefill_tokens']['reused'],
    'padded_prompt_tokens_prefilled': summary['padded_prompt_tokens'],
    'generated_tokens': summary['generated_tokens'],
    'decode_steps': summary['decode_steps'],
  }
  if floor:
    prefill_floor = 2 * floor['matmul_params'] * prefilled / floor['prefill_matmul_flops_per_s']
    decode_floor = 0.0
    for call in summary['calls']:
      context = call['prompt_tokens'] / max(call['live'], 1) + call['num_steps'] / 2
      flops, bytes_read = decode_step_cost(model.config, call['padded_batch'], int(context))
      decode_floor += max(call['num_steps'] - 1, 0) * max(
        flops / floor['rows16_matmul_flops_per_s'], bytes_read / floor['copy_bytes_per_s']
      )
    out.update(
      prefill_floor_seconds=prefill_floor,
      decode_floor_seconds=decode_floor,
      prefill_share_of_floor=prefill_floor / max(seconds['llm_prefill'], 1e-9),
      decode_share_of_floor=decode_floor / max(seconds['llm_decode'], 1e-9),
    )
  return out


def f1_phase(config, parts, model) -> dict:
  sim = user_sim_set(parts.dataset, config.data_root or None, allow_download=False)
  sim = dataclasses.replace(sim, cases=sim.cases[: _F1_USERS.value])
  backend = experiment.greedy_backend(model, parts.tokenizer, config)
  start = time.perf_counter()
  result = evaluate_user_f1(
    parts.dataset, sim, backend, config=UserF1Config(show_peer_opinion=True), peer=parts.sasrec, seed=0
  )
  seconds = time.perf_counter() - start
  return {
    'users': len(sim.cases),
    'seconds': seconds,
    'judgements': len(result.judgements),
    'prefill_tokens': dict(backend.prefill_tokens),
    'micro_f1': result.scores['micro_f1'],
  }


def iteration_phase(name, config, parts, model, start_adapters, floor) -> dict:
  on = name == 'iteration_on'
  nnx.update(model, jax.tree.map(lambda x: jnp.asarray(np.array(x)), start_adapters))
  phase = copy.deepcopy(config)
  phase.rl.windows_per_iteration = _ITERATION_WINDOWS.value
  phase.rl.rollouts_per_window = _ROLLOUTS.value
  phase.rl.packed_update = on
  phase.rl.prefix_reuse = on
  decoder_lib.LIVE_SLOT_DECODE = on
  jax.clear_caches()
  trainer = experiment.make_trainer(phase, parts, model)
  played = trainer.play()
  metrics = trainer.learn(played)
  batch = trainer.last_batch
  start = time.perf_counter()
  lora, opt_state, step_metrics = trainer._step(
    trainer.lora,
    trainer.frozen,
    trainer.opt_state,
    batch,
    np.float32(phase.rl.windows_per_iteration * phase.rl.rollouts_per_window),
    trainer.adapter_update_mask,
    np.float32(phase.rl.learning_rate),
  )
  jax.block_until_ready(step_metrics)
  compiled = time.perf_counter() - start
  # The step donated the adapters the model pointed at: point it at the new ones (the next phase restores the start).
  trainer.lora, trainer.opt_state = lora, opt_state
  nnx.update(model, lora)
  decoder_lib.LIVE_SLOT_DECODE = True
  if on:
    stats = trainer.last_packing.as_dict()
    student_real, teacher_real = stats['student_real'], stats['teacher_real']
    forwarded = stats['student_forwarded'] + stats['teacher_forwarded']
  else:
    microbatches = int(step_metrics['microbatches'])
    rows = microbatches * phase.rl.rows_per_microbatch
    flat = {k: np.asarray(v).reshape((-1,) + np.asarray(v).shape[2:])[:rows] for k, v in batch.items()}
    student_real = int(flat['prompt_mask'].sum() + flat['completion_mask'].sum())
    teacher_key = 'teacher_suffix_mask' if 'teacher_suffix_mask' in flat else 'teacher_prompt_mask'
    teacher_real = int(flat[teacher_key].sum() + flat['completion_mask'].sum()) if teacher_key in flat else 0
    forwarded = rows * (
      flat['prompt_mask'].shape[1]
      + flat['completion_mask'].shape[1]
      + (flat[teacher_key].shape[1] + flat['completion_mask'].shape[1] if teacher_key in flat else 0)
    )
    stats = {
      'student_real': student_real,
      'teacher_real': teacher_real,
      'forwarded': forwarded,
      'rows': rows,
      'microbatches': microbatches,
      'padding': 1 - (student_real + teacher_real) / max(forwarded, 1),
    }
  out = {
    'rollout_seconds': played.seconds,
    'episodes': len(played.episodes),
    'turns': int(played.trajectory.num_turns.sum()),
    'generated_tokens': int(played.trajectory.completion_mask.sum()),
    'prefill_tokens': dict(trainer.backend.prefill_tokens),
    'host_seconds': metrics['time/scoring_seconds'],
    'update_seconds_first_call': metrics['time/update_seconds'],
    'update_seconds_compiled': compiled,
    'loss_rows': int(metrics['update/loss_rows']),
    'loss': metrics.get('loss/total'),
    'grad_norm': metrics.get('update/grad_norm'),
    'packing': stats,
    'iteration_seconds': played.seconds + metrics['time/scoring_seconds'] + compiled,
    'peak_rss_gib_so_far': peak_rss_gib(),
  }
  if floor:
    update_floor = floor['matmul_params'] * (6 * student_real + 2 * teacher_real) / floor['prefill_matmul_flops_per_s']
    out.update(update_floor_seconds=update_floor, update_share_of_floor=update_floor / compiled)
  return out


def main(argv):
  del argv
  config = _CONFIG.value
  experiment.validate(config)
  begin = time.perf_counter()
  parts = experiment.load_components(config)
  model, origin = experiment.prepare_agents(config, parts, pathlib.Path(config.workdir).absolute())
  start_adapters = jax.tree.map(np.array, nnx.state(model, nnx.LoRAParam))
  result = {
    'config': config.workdir,
    'dataset': config.dataset,
    'model': config.model,
    'start': origin['stage'],
    'load_seconds': time.perf_counter() - begin,
    'load_average_at_start': os.getloadavg(),
    'machine': f'{platform.node()} {jax.devices()[0].platform} x{jax.device_count()}, '
    f'{len(os.sched_getaffinity(0))} cores',
    'phases': {},
  }
  floor = None
  for name in _PHASES.value:
    print(f'[bench_costs] {name} ...', flush=True)
    start = time.perf_counter()
    if name == 'floor':
      floor = result['phases']['floor'] = floor_phase(model)
    elif name in ('eval_on', 'eval_off'):
      result['phases'][name] = eval_phase(name, config, parts, model, start_adapters, floor)
    elif name == 'f1':
      result['phases'][name] = f1_phase(config, parts, model)
    elif name in ('iteration_on', 'iteration_off'):
      result['phases'][name] = iteration_phase(name, config, parts, model, start_adapters, floor)
    else:
      raise ValueError(f'--phases: unknown phase {name!r}')
    result['phases'][name]['phase_wall_seconds'] = time.perf_counter() - start
    result['phases'][name]['load_average'] = os.getloadavg()
    print(json.dumps(result['phases'][name], default=float)[:2000], flush=True)
  phases = result['phases']
  if {'iteration_on', 'iteration_off'} <= set(phases):
    result['iteration_speedup'] = (
      phases['iteration_off']['iteration_seconds'] / phases['iteration_on']['iteration_seconds']
    )
    result['update_speedup_compiled'] = (
      phases['iteration_off']['update_seconds_compiled'] / phases['iteration_on']['update_seconds_compiled']
    )
  if {'eval_on', 'eval_off'} <= set(phases):
    result['eval_speedup'] = phases['eval_off']['wall_seconds'] / phases['eval_on']['wall_seconds']
  result['peak_rss_gib'] = peak_rss_gib()
  output = _OUTPUT.value or f'results/bench/costs_{config.model.replace("-", "")}_{config.dataset}.json'
  outputs.write_json(output, result)
  print(json.dumps({k: v for k, v in result.items() if k != 'phases'}, default=float, indent=1))
  print(f'Wrote {pathlib.Path(output).absolute()}')


if __name__ == '__main__':
  cli.run(main)
