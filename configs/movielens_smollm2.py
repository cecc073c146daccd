"""The research model on MovieLens: both agents as LoRA adapters on the frozen SmolLM2-135M-Instruct GGUF.

`python -m experiments.train --config=configs/movielens_smollm2.py[:method]`. The argument picks the method: coars
(default), outcome_rl, judge_rl, zero_shot or reflexion, or an ablation of coars that changes one field
(`experiment.ABLATIONS`): coars-outcome_reward, coars-no_sd, coars-rec_only, coars-constant_d or
coars-d_without_samples, e.g. `--config=configs/movielens_smollm2.py:coars-no_sd` (each gets its own default workdir
and row label). Every method starts from the warm start of `configs/warm_start_smollm2.py:movielens`
(`runs/warm_start_smollm2_movielens`, trained there if absent), and the RL methods share one budget (rl.iterations x
rl.windows_per_iteration x rl.rollouts_per_window); the settings are `coars_jax.pipeline.experiment.smollm2_config`.
"""

from coars_jax.pipeline.experiment import smollm2_config


def get_config(method: str = 'coars'):
  return smollm2_config('movielens', method)
