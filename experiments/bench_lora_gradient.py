"""The gradient of one packed update microbatch of SmolLM2-135M with LoRA's up-projection differentiated by its own VJP
(`models.lora.up_project`, the default) against plain autodiff of the same contraction (the baseline), alternating in
one process: `python -m experiments.bench_lora_gradient [--rounds=5] [--profile=DIR]
[--output=results/bench/lora_gradient_smollm2.json]`, on the pilot's row shapes by default (BUILD_NOTES Part 13: one
row of 2,048 student slots holding two dialogues, a 5,120-slot teacher row, 10 reply segments of 128).

Each setting is compiled once, then the two run in turn `--rounds` times (minimum and median kept), because this
machine's timings drift by 10% between runs of the same program. `--profile=DIR` traces one more run of each and
prints the XLA op kinds that took longest (summed over the worker threads), so the transposed copies the VJP removes
can be seen (`copy_bitcast_fusion` on [1536, 2048]).
"""

import json
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
from absl import flags

from coars_jax.models import lora as lora_lib
from experiments import bench_packed_memory, cli
from experiments.xla_profile import top_ops

flags.FLAGS.set_default('row_length', 2048)
flags.FLAGS.set_default('teacher_length', 5120)
flags.FLAGS.set_default('rows', 1)
flags.FLAGS.set_default('segments', 10)
flags.FLAGS.set_default('dialogues_per_row', 2)
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Timed runs of each setting, alternating.')
_PROFILE = flags.DEFINE_string('profile', '', 'Trace one more run of each setting into this folder; print top ops.')
_OUTPUT = flags.DEFINE_string('output', 'results/bench/lora_gradient_smollm2.json', 'The JSON file ("" = none).')

SETTINGS = {'autodiff': False, 'custom_vjp': True}  # `models.lora.UP_PROJECT_VJP`


def main(argv):
  del argv
  graphdef, lora, frozen, batch = bench_packed_memory.smollm2_microbatch()
  loss = bench_packed_memory.coars_loss(graphdef)
  load = os.getloadavg()[0]
  compiled, compile_s = {}, {}
  for name, vjp in SETTINGS.items():
    lora_lib.UP_PROJECT_VJP = vjp  # read when the adapters are traced
    started = time.perf_counter()
    compiled[name] = jax.jit(jax.grad(loss)).lower(lora, frozen, batch).compile()
    compile_s[name] = round(time.perf_counter() - started, 2)
  lora_lib.UP_PROJECT_VJP = True
  runs, grads = {name: [] for name in SETTINGS}, {}
  for round_index in range(_ROUNDS.value):
    for name, function in compiled.items():
      started = time.perf_counter()
      grads[name] = jax.block_until_ready(function(lora, frozen, batch))
      runs[name].append(round(time.perf_counter() - started, 2))
      print(f'round {round_index}: {name} {runs[name][-1]} s', flush=True)
  # The two gradients are the same products in another order: equal up to float32 rounding of the largest entry.
  leaves = zip(jax.tree.leaves(grads['custom_vjp']), jax.tree.leaves(grads['autodiff']))
  scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(grads['autodiff']))
  difference = max(float(jnp.max(jnp.abs(a - b))) for a, b in leaves) / scale
  results = {
    'shapes': {
      name: int(flags.FLAGS[name].value)
      for name in ('rows', 'row_length', 'teacher_length', 'segments', 'completion_length', 'dialogues_per_row')
    },
    'load_average_before': round(load, 2),
    'load_average_after': round(os.getloadavg()[0], 2),
    'machine': {'cpus': os.cpu_count(), 'platform': platform.platform(), 'device': str(jax.devices()[0])},
    'compile_s': compile_s,
    'runs_s': runs,
    'min_s': {name: min(values) for name, values in runs.items()},
    'median_s': {name: statistics.median(values) for name, values in runs.items()},
    'max_gradient_difference_over_largest_entry': difference,
  }
  if _PROFILE.value:
    results['top_ops_ms'] = {}
    for name, function in compiled.items():
      trace_dir = pathlib.Path(_PROFILE.value).absolute() / name
      with jax.profiler.trace(str(trace_dir)):
        jax.block_until_ready(function(lora, frozen, batch))
      ops = top_ops(trace_dir, count=10)
      results['top_ops_ms'][name] = {kind: round(ms, 1) for kind, ms, _ in ops}
      print(f'{name}: the longest op kinds, summed over threads')
      for kind, ms, count in ops:
        print(f'  {kind:<36} {ms:9.1f} ms over {count} events')
  if _OUTPUT.value:
    path = pathlib.Path(_OUTPUT.value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + '\n')
    print(f'-> {path}')
  print(
    f'gradient per microbatch: autodiff min {results["min_s"]["autodiff"]} s (median '
    f'{results["median_s"]["autodiff"]}), custom VJP min {results["min_s"]["custom_vjp"]} s (median '
    f'{results["median_s"]["custom_vjp"]}); largest difference {difference:.1e} of the largest entry'
  )


if __name__ == '__main__':
  cli.run(main)
