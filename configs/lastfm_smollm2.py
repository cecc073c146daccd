"""RL of both agents on SmolLM2-135M-Instruct (LastFM):
`python -m experiments.train --config=configs/lastfm_smollm2.py`.

No warm start: both agents get fresh LoRA adapters (B = 0, so they start as the zero-shot base) on the frozen GGUF
weights, and only the adapters are trained and exported (the base is reloaded by name). The argument picks the method
as in `configs/lastfm_tiny.py`. On 2 CPU cores a 5-turn SmolLM2 episode costs seconds of CPU per turn, so the
evaluation sets are capped; raise them on an accelerator.
"""

from coars_jax.training.experiment import default_config


def get_config(method: str = 'coars'):
  config = default_config('lastfm', 'smollm2-135m', method or 'coars')
  config.warm_start.enabled = False
  config.lora.rank = 8
  config.lora.alpha = 16.0
  config.rl.iterations = 100
  config.rl.windows_per_iteration = 8
  config.rl.rows_per_microbatch = 8
  config.rl.learning_rate = 1e-4
  config.eval.every = 20
  config.eval.val_windows = 16
  config.eval.test_windows = 32
  config.eval.batch_size = 32
  config.eval.user_f1.num_users = 10
  config.eval.user_f1.batch_size = 50
  config.reflexion.num_prior_episodes = 1
  return config
