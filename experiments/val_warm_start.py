"""Greedy val metrics of a warm-start folder on the LastFM study's first 16 val windows, exactly as the pilot's
`val_before` (the study's CoARS cell config): `PYTHONPATH=. python experiments/val_warm_start.py <folder>
<item_loss_weight it was trained with>`. No test window is read. BUILD_NOTES Part 11 has what it gave."""

import json
import pathlib
import sys

from coars_jax.pipeline import experiment, table as table_lib
import configs.table_smollm2 as t


def main():
  study = t.lastfm_study()
  config = table_lib.cell_config(study, table_lib.Cell('lastfm', 'coars', 0))
  config.warm_start.folder = str(pathlib.Path(sys.argv[1]).absolute())
  config.warm_start.item_loss_weight = float(sys.argv[2])
  config.workdir = '/tmp/coars_val_warm_start'
  parts = experiment.load_components(config)
  model, origin = experiment.prepare_agents(config, parts, pathlib.Path(config.workdir))
  print(json.dumps({'folder': sys.argv[1], **experiment.evaluate_val(config, parts, model)}))


if __name__ == '__main__':
  main()
