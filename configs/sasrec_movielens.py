"""SASRec reference table on movielens: 3 training seeds x 10 candidate seeds on the test windows."""

from coars_jax.recsys.experiment import default_config


def get_config():
  return default_config('movielens')
