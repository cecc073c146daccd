"""The run's orchestration, above data, recsys, agents, training and eval: the code that composes them into one
run follows the data here, so that no layer below imports a layer beside it.

- `run_config` / `run_validation`: a run's config (`configs/<dataset>_<model>.py`), its defaults and checks;
  `presets` the scale-out configs of `configs/presets/`.
- `run_components`: the dataset, SASRec and its cross-fitted peers (`recsys`), the backbone, and the agents a run
  starts from (the SFT warm start of `training.warm_start`, loaded or trained).
- `run_evaluation`: a run's greedy val and test evaluations (`eval`).
- `experiment`: the whole run (`python -m experiments.train`): the above, then RL (`training.rl`).
- `stages`: what a run would do (`experiments.train --dry_run`); `table`: the results table, a grid of runs.
- `warm_start_run`: the warm start alone (`python -m experiments.warm_start`), with its SASRec peer.

`coars_jax.training` never imports this package (`tests/test_layering.py`).
"""
