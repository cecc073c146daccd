"""RL of both agents on Qwen2.5-1.5B-Instruct, one 80 GB GPU (H100 / A100-80GB), bf16:

  XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 python -m experiments.train --config=configs/presets/qwen2p5_1p5b_1gpu.py \
      --config.model=/path/to/Qwen2.5-1.5B-Instruct

`model` is a local HF checkpoint folder (config.json, tokenizer, safetensors); the path below is a placeholder.
The memory plan (`python -m experiments.plan_memory --config=configs/presets/qwen2p5_1p5b_1gpu.py`) is checked
against plan.device; the argument picks the method as in `configs/lastfm_smollm2.py`.
"""

from coars_jax.pipeline.presets import pretrained_config


def get_config(method: str = 'coars'):
  return pretrained_config(
    model='/models/Qwen2.5-1.5B-Instruct',
    model_shape='qwen2p5_1p5b',
    method=method,
    mesh={'data': -1, 'fsdp': 1, 'tensor': 1},
    device='h100-80gb',
    num_devices=1,
    rows_per_microbatch=2,
    generation_rows=16,
  )
