"""Peak memory and time of one SmolLM2 RL update step on synthetic rows, with the cheap-update switches on or off:
`python -m experiments.bench_memory [--rows=8] [--prompt_length=1024] [--switches=on|off] [--output=FILE]`.

One process per measurement (a process's peak RSS only grows). The step holds `--rows` rows in ONE microbatch, each
a `--prompt_length`-token prompt x, a `--completion_length`-token completion y and a teacher prompt x + d of twice
the prompt (on: read as d of `--prompt_length` tokens against the student's cache). `on` = adapters on the top third
of the layers, the teacher on d + y, rematerialised layers; `off` = adapters on every layer, the teacher as a second
pass over x + d, no remat. Prints the peak RSS before and after the step (the model and compile included) and the
seconds of the first (compiling) and a second call.
"""

import json
import platform
import resource

import jax
from absl import app, flags

from coars_jax.agents import backbone
from coars_jax.agents.protocol import AGENTS
from coars_jax.models.lora import LoRAConfig, add_lora
from coars_jax.parallel import benchmark
from coars_jax.parallel.mesh import make_mesh
from experiments import outputs

_ROWS = flags.DEFINE_integer('rows', 8, 'Rows in the one microbatch.')
_PROMPT = flags.DEFINE_integer('prompt_length', 1024, 'Tokens of each prompt x (and of the suffix d).')
_COMPLETION = flags.DEFINE_integer('completion_length', 128, 'Tokens of each completion y.')
_SWITCHES = flags.DEFINE_enum('switches', 'on', ['on', 'off'], 'The cheap-update switches.')
_OUTPUT = flags.DEFINE_string('output', None, 'Write the result as JSON here.')


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def main(argv):
  del argv
  on = _SWITCHES.value == 'on'
  model, _ = backbone.load_backbone(backbone.BackboneSpec(name=backbone.SMOLLM2))
  add_lora(model, LoRAConfig(rank=8, alpha=16.0, layers='top_third' if on else 'all'), AGENTS,
           rngs=__import__('flax').nnx.Rngs(0))
  shape = benchmark.StepShape(microbatches=1, rows=_ROWS.value, prompt_length=_PROMPT.value,
                              completion_length=_COMPLETION.value)
  trainer = benchmark.make_trainer(model, make_mesh(), shape, teacher_reuses_student_cache=on, remat=on)
  before = peak_rss_gib()
  timing = benchmark.time_update_step(trainer, shape, repeats=1)
  result = {'switches': _SWITCHES.value, 'rows': _ROWS.value, 'prompt_length': _PROMPT.value,
            'completion_length': _COMPLETION.value, 'lora_layers': model.lora_config.layers,
            'layers_backpropagated': model.config.num_layers - model.lowest_adapted_layer,
            'peak_rss_gib_before_step': before, 'peak_rss_gib': peak_rss_gib(), **timing,
            'machine': f'{platform.node()} {jax.devices()[0].platform}'}
  print(json.dumps(result, indent=1))
  if _OUTPUT.value:
    outputs.write_json(_OUTPUT.value, result)


if __name__ == '__main__':
  app.run(main)
