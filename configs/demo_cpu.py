"""The CPU demo (`make demo`): SASRec on LastFM with one training seed, then the reference table."""

from coars_jax.recsys.experiment import default_config


def get_config():
  config = default_config('lastfm')
  config.train_seeds = (0,)
  config.workdir = 'runs/demo_cpu'
  return config
