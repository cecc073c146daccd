"""One micro training run in a process of its own, for the fault tests (`test_faults.py`, `fault_suite.py`):
`python -m tests.training.fault_worker <workdir> [--resume]`. `COARS_FAULT` (`training.faults`) picks where the
process fails; the run is the synthetic-data, micro-decoder run of `test_train_experiment.micro_config`."""

import argparse
import json

from coars_jax.pipeline import experiment as ex
from tests.training.test_train_experiment import components, micro_config


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('workdir')
  parser.add_argument('--resume', action='store_true')
  args = parser.parse_args()
  rows = ex.run(micro_config(args.workdir, resume=args.resume), components=components())
  print(json.dumps({'stages': [row['stage'] for row in rows]}))


if __name__ == '__main__':
  main()
