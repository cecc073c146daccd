"""SFT warm start of both agents: `python -m experiments.warm_start --config=configs/warm_start_smollm2.py`.

Trains SASRec first if its checkpoint is absent, saves the adapters (and the base, when trained) under the
config's workdir, then prints greedy ValidRatio / Hit@1 / average turns on the first few val windows.
"""

import json

from ml_collections import config_flags

from coars_jax.pipeline import warm_start_run
from experiments import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A configs/warm_start_*.py file.', lock_config=True)


def main(argv):
  del argv
  print(json.dumps(warm_start_run.run(_CONFIG.value), indent=2))


if __name__ == '__main__':
  cli.run(main, required=('config',))
