"""RL of both agents with the `tiny` preset on Instruments:
`python -m experiments.train --config=configs/instruments_tiny.py`.

The argument picks the method: coars (default), outcome_rl, judge_rl, zero_shot or reflexion, e.g.
`--config=configs/instruments_tiny.py:judge_rl`. Every method starts from the same SFT warm start,
`runs/warm_start_tiny_instruments` (the folder `configs/warm_start_tiny.py:instruments` writes; trained there with
the settings of `coars_jax.training.experiment.tiny_config` if absent), and the RL methods share one budget (rl.iterations x rl.windows_per_iteration x
rl.rollouts_per_window). Ablations of coars: --config.rl.lambda_sd=0, --config.rl.train_user_agent=False,
--config.rl.reward=outcome --config.rl.train_user_agent=False (give each its own --config.workdir).
"""

from coars_jax.training.experiment import tiny_config


def get_config(method: str = 'coars'):
  return tiny_config('instruments', method)
