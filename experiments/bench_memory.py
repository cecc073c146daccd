"""Peak memory and time of one SmolLM2 RL update step on synthetic rows, with the cheap-update switches on or off:
`python -m experiments.bench_memory [--rows=8] [--prompt_length=1024] [--switches=on|off] [--output=FILE]`.

One process per measurement (a process's peak RSS only grows). The step holds `--rows` rows in ONE microbatch, each
a `--prompt_length`-token prompt x, a `--completion_length`-token completion y and a teacher prompt x + d of twice
the prompt (on: read as d of `--prompt_length` tokens against the student's cache). `on` = adapters on the top third
of the layers, the teacher on d + y, rematerialised layers; `off` = adapters on every layer, the teacher as a second
pass over x + d, no remat. The step is compiled ahead of time, so the printout separates the peak RSS with the model
loaded, after compiling, and after two calls of the compiled step (with their seconds), and gives XLA's own
account of the step's temporary buffers.
"""

import json
import platform
import resource
import time

import jax
import numpy as np
from absl import flags
from flax import nnx

from coars_jax.models import backbone
from coars_jax.agents.protocol import AGENTS
from coars_jax.models.lora import LoRAConfig, add_lora
from coars_jax.recsys import SASRec, SASRecConfig
from coars_jax.training import scaling_benchmark
from coars_jax.parallel.mesh import make_mesh
from experiments import outputs
from experiments import cli

_ROWS = flags.DEFINE_integer('rows', 8, 'Rows in the one microbatch.')
_PROMPT = flags.DEFINE_integer('prompt_length', 1024, 'Tokens of each prompt x (and of the suffix d).')
_COMPLETION = flags.DEFINE_integer('completion_length', 128, 'Tokens of each completion y.')
_SWITCHES = flags.DEFINE_enum('switches', 'on', ['on', 'off'], 'The cheap-update switches.')
_OUTPUT = flags.DEFINE_string('output', None, 'Write the result as JSON here.')


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def micro_sasrec(dataset) -> SASRec:
  """The trainer's peer: an untrained micro SASRec (the update step never consults it)."""
  config = SASRecConfig(num_items=dataset.num_items, hidden=16, num_heads=2, num_blocks=1, dropout=0.0)
  return SASRec(config, rngs=nnx.Rngs(0))


def main(argv):
  del argv
  on = _SWITCHES.value == 'on'
  model, _ = backbone.load_backbone(backbone.BackboneSpec(name=backbone.SMOLLM2))
  add_lora(model, LoRAConfig(rank=8, alpha=16.0, layers='top_third' if on else 'all'), AGENTS, rngs=nnx.Rngs(0))
  shape = scaling_benchmark.StepShape(
    microbatches=1, rows=_ROWS.value, prompt_length=_PROMPT.value, completion_length=_COMPLETION.value
  )
  parts = scaling_benchmark.synthetic_parts(model.config.vocab_size, micro_sasrec)
  trainer = scaling_benchmark.make_trainer(model, make_mesh(), shape, parts, teacher_reuses_student_cache=on, remat=on)
  batch = scaling_benchmark.synthetic_batch(
    shape, model.config.vocab_size, teacher_cache=trainer.settings.teacher_cache
  )
  args = [
    trainer.lora,
    trainer.frozen,
    trainer.opt_state,
    batch,
    np.float32(_ROWS.value),
    trainer.adapter_update_mask,
    np.float32(1e-4),
  ]
  loaded = peak_rss_gib()
  start = time.perf_counter()
  compiled = trainer._step.lower(*args).compile()
  compile_seconds = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  after_compile = peak_rss_gib()
  seconds = []
  for _ in range(2):
    start = time.perf_counter()
    lora, opt_state, metrics = compiled(*args)
    jax.block_until_ready(metrics)
    seconds.append(time.perf_counter() - start)
    args[0], args[2] = lora, opt_state  # both donated
  result = {
    'switches': _SWITCHES.value,
    'rows': _ROWS.value,
    'prompt_length': _PROMPT.value,
    'completion_length': _COMPLETION.value,
    'lora_layers': model.lora_config.layers,
    'layers_backpropagated': model.config.num_layers - model.lowest_adapted_layer,
    'peak_rss_gib_model_loaded': loaded,
    'peak_rss_gib_after_compile': after_compile,
    'peak_rss_gib_after_steps': peak_rss_gib(),
    'compile_seconds': compile_seconds,
    'step_seconds': seconds,
    'loss_finite': bool(np.isfinite(float(metrics['loss']))),
    'xla_temp_gib': getattr(analysis, 'temp_size_in_bytes', 0) / 2**30,
    'xla_argument_gib': getattr(analysis, 'argument_size_in_bytes', 0) / 2**30,
    'machine': f'{platform.node()} {jax.devices()[0].platform}',
  }
  print(json.dumps(result, indent=1))
  if _OUTPUT.value:
    outputs.write_json(_OUTPUT.value, result)


if __name__ == '__main__':
  cli.run(main)
