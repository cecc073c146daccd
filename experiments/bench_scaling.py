"""Scaling of the RL update step: `python -m experiments.bench_scaling --output=scaling.json`.

On 8 CPU devices (this script asks XLA for 8 host devices before JAX starts) it times the `tiny` preset's update
step on each (data, fsdp, tensor) mesh of --meshes and counts its compilations; a mesh the installed sharding code
cannot build or run is reported with its error. On a GPU (or with --accelerator=on) it also measures, for random
weights of --accelerator_preset's shape in bf16, the update step's MFU against a measured bf16 matmul rate and the
decode step's bandwidth utilisation against a measured device copy (`coars_jax.training.scaling_benchmark`).
"""

import os

_FAKE_DEVICES = '--xla_force_host_platform_device_count=8'
if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {_FAKE_DEVICES}'.strip()

import dataclasses  # noqa: E402

import jax  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402

from coars_jax.recsys import SASRec, SASRecConfig  # noqa: E402
from coars_jax.training import scaling_benchmark  # noqa: E402
from experiments import outputs  # noqa: E402
from experiments import cli

_MESHES = flags.DEFINE_list('meshes', ['8x1x1', '2x4x1', '2x2x2', '1x1x8'], 'data x fsdp x tensor meshes to time.')
_PRESET = flags.DEFINE_string('preset', 'tiny', 'Decoder preset of the CPU mesh sweep.')
_ROWS = flags.DEFINE_integer('rows', 8, 'R, rows per microbatch (a multiple of data x fsdp).')
_MICROBATCHES = flags.DEFINE_integer('microbatches', 2, 'K, microbatches per update step.')
_PROMPT = flags.DEFINE_integer('prompt_length', 64, 'Student and teacher prompt tokens per row.')
_COMPLETION = flags.DEFINE_integer('completion_length', 16, 'Completion tokens per row.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed calls per measurement; the fastest counts.')
_ACCELERATOR = flags.DEFINE_enum(
  'accelerator', 'auto', ['auto', 'on', 'off'], 'MFU and decode bandwidth on the default device: auto = only on a GPU.'
)
_ACCELERATOR_PRESET = flags.DEFINE_string('accelerator_preset', 'qwen2p5_1p5b', 'Shape of the accelerator check.')
_ACCELERATOR_ROWS = flags.DEFINE_integer('accelerator_rows', 4, 'R of the accelerator update step (K = 1).')
_ACCELERATOR_PROMPT = flags.DEFINE_integer('accelerator_prompt_length', 512, 'Its prompt tokens (completion 128).')
_OUTPUT = flags.DEFINE_string('output', None, 'Write the results as JSON to this file.')


def micro_sasrec(dataset) -> SASRec:
  """The trainer's peer: an untrained micro SASRec (the update step never consults it)."""
  config = SASRecConfig(num_items=dataset.num_items, hidden=16, num_heads=2, num_blocks=1, dropout=0.0)
  return SASRec(config, rngs=nnx.Rngs(0))


def main(argv):
  del argv
  cpus = jax.devices('cpu')
  meshes = [tuple(int(size) for size in text.split('x')) for text in _MESHES.value]
  shape = scaling_benchmark.StepShape(
    microbatches=_MICROBATCHES.value, rows=_ROWS.value, prompt_length=_PROMPT.value, completion_length=_COMPLETION.value
  )
  result = {
    'backend': jax.default_backend(),
    'cpu_devices': len(cpus),
    'preset': _PRESET.value,
    'step_shape': dataclasses.asdict(shape),
    'meshes': [],
  }
  if len(cpus) < 8:
    print(
      f'bench_scaling: only {len(cpus)} CPU devices (JAX started before XLA_FLAGS was set?); the mesh sweep needs 8'
    )
  else:
    result['meshes'] = scaling_benchmark.mesh_sweep(
      meshes, make_peer=micro_sasrec, preset=_PRESET.value, shape=shape, repeats=_REPEATS.value, devices=cpus[:8]
    )
    print(f'{"mesh (data, fsdp, tensor)":<28}{"s / step":>10}{"first call s":>14}{"traces":>8}{"compiles":>10}')
    for entry in result['meshes']:
      label = str(tuple(entry['mesh'].values()))
      if 'error' in entry:
        print(f'{label:<28}{entry["error"]}')
        continue
      print(
        f'{label:<28}{entry["seconds_per_step"]:>10.3f}{entry["first_call_seconds"]:>14.2f}'
        f'{entry["step_traces_warm_up"]:>4} +{entry["step_traces_timed"]:<3}'
        f'{entry["backend_compiles_warm_up"]:>5} +{entry["backend_compiles_timed"]}'
      )
  if _ACCELERATOR.value == 'on' or (_ACCELERATOR.value == 'auto' and jax.default_backend() == 'gpu'):
    accelerator_shape = scaling_benchmark.StepShape(
      microbatches=1, rows=_ACCELERATOR_ROWS.value, prompt_length=_ACCELERATOR_PROMPT.value, completion_length=128
    )
    result['accelerator'] = scaling_benchmark.accelerator_efficiency(
      _ACCELERATOR_PRESET.value, make_peer=micro_sasrec, shape=accelerator_shape
    )
    update, decode = result['accelerator']['update_step'], result['accelerator']['decode']
    print(
      f'\n{result["accelerator"]["device"]} {_ACCELERATOR_PRESET.value} bf16: update step '
      f'{update["seconds_per_step"]:.3f} s, MFU {update["mfu_vs_measured_bf16_matmul"]:.1%} of the measured '
      f'bf16 matmul rate; decode step {decode["seconds_per_step"] * 1e3:.2f} ms, '
      f'{decode["bandwidth_utilisation"]:.1%} of the measured copy bandwidth'
    )
  if _OUTPUT.value:
    outputs.write_json(_OUTPUT.value, result)


if __name__ == '__main__':
  cli.run(main)
