"""Per-device memory of a training config, before anything is allocated:
`python -m experiments.plan_memory --config=configs/presets/qwen2p5_7b_1gpu.py [--config.plan.device=tpu-v5e]`.

Prints the plan of `coars_jax.parallel.planner` (base weights, adapters, optimizer state, KV cache, activations,
divided over the mesh) and exits non-zero, naming the biggest component and the device's memory, when the run
does not fit `plan.device` (or `plan.device_memory_gib`). The checkpoint folder need not exist here: the shapes
then come from `plan.model_shape`. `--output=FILE` also writes the plan as JSON.
"""

import json
import pathlib
import sys

from absl import flags
from ml_collections import config_flags

from coars_jax import configlib
from coars_jax.parallel import planner
from coars_jax.pipeline import experiment
from experiments import cli

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'A training config file (configs/presets/*.py, ...).', lock_config=True
)
_OUTPUT = flags.DEFINE_string('output', None, 'Also write the plan as JSON to this file.')


def main(argv):
  del argv
  config = _CONFIG.value
  configlib.check_keys(config, experiment.default_config(config.dataset, config.model))
  plan = planner.plan_config(config)
  print(plan.table())
  if _OUTPUT.value:
    path = pathlib.Path(_OUTPUT.value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(planner.summary(plan), indent=2))
  if not plan.fits:
    sys.exit(f'plan_memory: refused: {plan.refusal()}')


def entry():
  """The `coars-plan-memory` console script (setup.py)."""
  cli.run(main, required=('config',))


if __name__ == '__main__':
  entry()
