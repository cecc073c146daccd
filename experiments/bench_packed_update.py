"""Where one packed update microbatch of SmolLM2-135M spends its seconds, with the teacher rows' block-sparse
attention on and off in the same process (issue 21):
`python -m experiments.bench_packed_update [--rows=3] [--row_length=1280] [--teacher_length=2816] [--segments=15]
[--dialogues_per_row=1] [--completion_length=128] [--nodense] [--output=results/bench/packed_update_smollm2.json]`.

The defaults are the research CoARS iteration's microbatch (BUILD_NOTES Part 11: 3 dialogue rows of 1,280 slots, 3
teacher rows of about 2,800, 5 turns per dialogue), on synthetic tokens (`bench_packed_memory.synthetic_rows`: turn
k's teacher segment reads the first k/5 of its dialogue). Timed, each compiled first and then run twice (the faster
run kept): the student forward alone; student and teacher forward (`sampling.packed.packed_log_probs`); and the
gradient of `coars.coars_objective` (lambda_SD 0.1, remat), the update step's work per microbatch. The baseline is
`sampling.packed.BLOCK_SPARSE_TEACHER = False` (the dense [Lt, Ls + Lt] softmax) in the same run; then the teacher's
block-sparse attention alone, then with `BLOCK_SPARSE_STUDENT = True` as well (the student's causal attention over
its own dialogue's blocks, with the custom gradient; both are the defaults). `--nodense` skips the dense baseline.
The pilot's rows (BUILD_NOTES Part 13): `--rows=1 --row_length=2048 --teacher_length=5120 --segments=10
--dialogues_per_row=2`.
"""

import json
import os
import pathlib
import platform
import time

import jax
from absl import flags
from flax import nnx

from coars_jax.sampling import packed as packed_lib
from experiments import bench_packed_memory, cli

flags.FLAGS.set_default('row_length', 1280)
flags.FLAGS.set_default('teacher_length', 2816)
flags.FLAGS.set_default('rows', 3)
flags.FLAGS.set_default('segments', 15)
_DENSE = flags.DEFINE_bool('dense', True, 'Also time the dense-teacher baseline (about 12 of the 16 minutes here).')
_OUTPUT = flags.DEFINE_string('output', 'results/bench/packed_update_smollm2.json', 'The JSON file.')


def timed(function, *args) -> dict[str, float]:
  started = time.perf_counter()
  compiled = jax.jit(function).lower(*args).compile()
  compile_s = time.perf_counter() - started
  runs = []
  for _ in range(2):
    started = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    runs.append(time.perf_counter() - started)
  return {'compile_s': round(compile_s, 2), 'run_s': round(min(runs), 2), 'runs_s': [round(r, 2) for r in runs]}


def main(argv):
  del argv
  graphdef, lora, frozen, batch = bench_packed_memory.smollm2_microbatch()
  loss = bench_packed_memory.coars_loss(graphdef)

  def scores(lora, frozen, batch, teacher):
    merged = nnx.merge(graphdef, lora, frozen)
    return packed_lib.packed_log_probs(merged, batch, teacher=teacher, chunk_size=32, adapter=batch['row_adapter'])

  load = os.getloadavg()[0]
  results = {
    'shapes': {
      name: int(flags.FLAGS[name].value)
      for name in ('rows', 'row_length', 'teacher_length', 'segments', 'completion_length', 'dialogues_per_row')
    },
    'load_average_before': round(load, 2),
    'machine': {'cpus': os.cpu_count(), 'platform': platform.platform(), 'device': str(jax.devices()[0])},
    'phases': {},
  }
  results['phases']['student_forward'] = timed(lambda *a: scores(*a, teacher=False)[0], lora, frozen, batch)
  print(f'student forward: {results["phases"]["student_forward"]}', flush=True)
  packed_lib.BLOCK_SPARSE_STUDENT = False  # the baselines: the student's dense softmax
  for sparse in (False, True) if _DENSE.value else (True,):
    packed_lib.BLOCK_SPARSE_TEACHER = sparse
    name = 'block_sparse' if sparse else 'dense'
    results['phases'][f'student_teacher_forward_{name}'] = timed(
      lambda *a: scores(*a, teacher=True), lora, frozen, batch
    )
    results['phases'][f'gradient_{name}'] = timed(jax.grad(loss), lora, frozen, batch)
    print(f'{name}: {results["phases"][f"student_teacher_forward_{name}"]} {results["phases"][f"gradient_{name}"]}')
  packed_lib.BLOCK_SPARSE_STUDENT = True  # and the student's pass too, with its custom gradient
  results['phases']['student_forward_block_sparse'] = timed(
    lambda *a: scores(*a, teacher=False)[0], lora, frozen, batch
  )
  results['phases']['gradient_block_sparse_student'] = timed(jax.grad(loss), lora, frozen, batch)
  print(f'student block-sparse too: {results["phases"]["gradient_block_sparse_student"]}', flush=True)
  phases = results['phases']
  results['student_gradient_speedup'] = round(
    phases['gradient_block_sparse']['run_s'] / phases['gradient_block_sparse_student']['run_s'], 2
  )
  if _DENSE.value:
    results['gradient_speedup'] = round(phases['gradient_dense']['run_s'] / phases['gradient_block_sparse']['run_s'], 2)
  results['load_average_after'] = round(os.getloadavg()[0], 2)
  path = pathlib.Path(_OUTPUT.value)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(results, indent=2) + '\n')
  print(
    f'gradient per microbatch: dense teacher {phases.get("gradient_dense", {}).get("run_s", "-")} s, block-sparse '
    f'teacher {phases["gradient_block_sparse"]["run_s"]} s, block-sparse student too '
    f'{phases["gradient_block_sparse_student"]["run_s"]} s; wrote {path}'
  )


if __name__ == '__main__':
  cli.run(main)
