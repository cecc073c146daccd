"""RL of both agents with the `tiny` preset on LastFM:
`python -m experiments.train --config=configs/lastfm_tiny.py`.

The argument picks the method: coars (default), outcome_rl, judge_rl, zero_shot or reflexion, e.g.
`--config=configs/lastfm_tiny.py:judge_rl`. Every method starts from the same SFT warm start,
`runs/warm_start_tiny_lastfm` (the folder `configs/warm_start_tiny.py:lastfm` writes; trained there with
the settings below if absent), and the RL methods share one budget (rl.iterations x rl.windows_per_iteration x
rl.rollouts_per_window). Ablations of coars: --config.rl.lambda_sd=0, --config.rl.train_user_agent=False,
--config.rl.reward=outcome --config.rl.train_user_agent=False (give each its own --config.workdir).
"""

from coars_jax.training.experiment import default_config


def get_config(method: str = 'coars'):
  config = default_config('lastfm', 'tiny', method or 'coars')
  # The tiny base is a random initialisation: the warm start also trains it (see configs/warm_start_tiny.py).
  config.warm_start.enabled = True
  config.warm_start.folder = 'runs/warm_start_tiny_lastfm'
  config.warm_start.train_base = True
  config.warm_start.num_dialogues = 256  # as configs/warm_start_tiny.py
  config.warm_start.steps = 400
  config.rollout.show_hint = True  # the tiny agents are trained and evaluated with SASRec's moving hint
  config.warm_start.batch_size = 8
  config.warm_start.learning_rate = 1e-3
  config.rl.iterations = 200
  config.rl.windows_per_iteration = 16
  config.rl.learning_rate = 1e-4
  config.eval.every = 20
  config.eval.val_windows = 32
  config.eval.batch_size = 64
  config.eval.user_f1.batch_size = 256
  return config
