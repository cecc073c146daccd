"""The SmolLM2-135M-Instruct warm start: `python -m experiments.warm_start --config=configs/warm_start_smollm2.py:<dataset>`.

Both agents get LoRA adapters on the frozen GGUF base and learn the protocol by SFT on scripted dialogues built with
out-of-fold peer signals (each training window's hint, p_t and q come from a SASRec that never saw its user):
SASRec-ordered scripts, which are multi-turn with rejections whenever the out-of-fold peer misses, plus scripts in a
random candidate order. The recipe is `coars_jax.training.warm_start.SMOLLM2_WARM_START`, shared with the training
configs `configs/<dataset>_smollm2.py`, whose warm-start folder is this config's workdir.
"""

from coars_jax.training.warm_start import (
  SMOLLM2_BUCKETS,
  SMOLLM2_SASREC,
  SMOLLM2_TRAIN_POOL,
  SMOLLM2_WARM_START,
  default_config,
)


def get_config(dataset: str = 'lastfm'):
  config = default_config(dataset)
  config.model = 'smollm2-135m'
  config.workdir = f'runs/warm_start_smollm2_{dataset}'
  config.update(SMOLLM2_SASREC)
  config.update(SMOLLM2_BUCKETS)
  config.warm_start.update(SMOLLM2_WARM_START)
  config.warm_start.show_hint = True
  config.warm_start.train_pool = SMOLLM2_TRAIN_POOL  # each training user's last window, shaped like val and test
  config.eval.num_windows = 16
  return config
