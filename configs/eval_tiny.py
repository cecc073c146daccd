"""The `tiny` preset after its warm start (`configs/warm_start_tiny.py`), evaluated on a dataset's test windows.

`python -m experiments.evaluate --config=configs/eval_tiny.py:lastfm` reads the warm start from
`runs/warm_start_tiny_lastfm`; `--checkpoint=DIR` evaluates another folder (an RL checkpoint's export, say).
"""

from coars_jax.eval.experiment import default_config


def get_config(arg: str = 'lastfm'):
  dataset, _, method = arg.partition(',')
  config = default_config(dataset)
  config.model = 'tiny'
  config.method = method or 'warm_start'
  config.checkpoint = f'runs/warm_start_tiny_{dataset}'
  config.rollout.show_hint = True  # as in configs/warm_start_tiny.py
  config.batch_size = 64
  config.user_f1.batch_size = 256
  return config
