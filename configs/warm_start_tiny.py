"""SFT warm start of the random `tiny` preset: the unit tests' fast path (`tests/test_end_to_end.py`: this warm
start, then `configs/eval_tiny.py`), not a research recipe (the research model's is `configs/warm_start_smollm2.py`).

`python -m experiments.warm_start --config=configs/warm_start_tiny.py:movielens` (the argument picks the dataset
and the workdirs; lastfm by default). The tiny base is a random initialisation, so `train_base` is on: with a
frozen random base (and its frozen, tied embedding as the output projection) rank-8 adapters would have to build
the whole protocol alone.
"""

from coars_jax.training.warm_start import default_config


def get_config(dataset: str = 'lastfm'):
  config = default_config(dataset)
  config.model = 'tiny'
  config.workdir = f'runs/warm_start_tiny_{dataset}'
  config.warm_start.train_base = True
  # The hint names SASRec's best candidate not yet recommended, and the scripted recommender follows SASRec's
  # ranking, so every scripted Item line copies a title the prompt shows: a copy task a 4-layer model can learn.
  config.warm_start.show_hint = True
  config.warm_start.num_dialogues = 256
  config.warm_start.steps = 400
  config.warm_start.batch_size = 8
  config.warm_start.learning_rate = 1e-3
  config.eval.num_windows = 32
  return config
