"""RL of both agents on Qwen2.5-7B-Instruct, one 80 GB GPU (H100 / A100-80GB), bf16:

  XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 python -m experiments.train --config=configs/presets/qwen2p5_7b_1gpu.py \
      --config.model=/path/to/Qwen2.5-7B-Instruct

The bf16 base takes 14.2 GiB. The update step keeps every layer's attention for the backward pass (no remat or
fused attention yet): at 2048 + 128 tokens about 62 GiB per row for this model, at 1024 + 128 about 21 GiB. So
prompts are capped at 1024 tokens here, and a longer prompt or teacher prompt x + d is refused at run time, naming
the bucket. On a 141 GB H200 the full buckets fit one row per microbatch: --config.plan.device=h200-141gb
--config.prompt_buckets='(256,512,1024,2048)' --config.rl.rows_per_microbatch=1.
Plan: `python -m experiments.plan_memory --config=<this file>`.
"""

from coars_jax.pipeline.presets import PROMPT_BUCKETS, pretrained_config


def get_config(method: str = 'coars'):
  config = pretrained_config(
    model='/models/Qwen2.5-7B-Instruct',
    model_shape='qwen2p5_7b',
    method=method,
    mesh={'data': -1, 'fsdp': 1, 'tensor': 1},
    device='h100-80gb',
    num_devices=1,
    rows_per_microbatch=2,
    generation_rows=16,
  )
  config.prompt_buckets = tuple(size for size in PROMPT_BUCKETS if size <= 1024)
  return config
