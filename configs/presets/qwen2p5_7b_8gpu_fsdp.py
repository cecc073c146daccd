"""RL of both agents on Qwen2.5-7B-Instruct, eight 80 GB GPUs of one host, bf16: weights sharded over fsdp x tensor
(2 x 4), batch rows over fsdp, heads and the MLP width over tensor:

  XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 python -m experiments.train --config=configs/presets/qwen2p5_7b_8gpu_fsdp.py \
      --config.model=/path/to/Qwen2.5-7B-Instruct

The tensor axis is there for the update step: it keeps every layer's attention over 2048 + 128 tokens (no remat or
fused attention yet), about 62 GiB per row for this model on one device; splitting the 28 heads four ways brings
that to 18 GiB (4 kv heads allow tensor <= 4). rows_per_microbatch is a multiple of data x fsdp.
Plan: `python -m experiments.plan_memory --config=<this file>`.
"""

from coars_jax.pipeline.presets import pretrained_config


def get_config(method: str = 'coars'):
  return pretrained_config(
    model='/models/Qwen2.5-7B-Instruct',
    model_shape='qwen2p5_7b',
    method=method,
    mesh={'data': 1, 'fsdp': -1, 'tensor': 4},
    device='h100-80gb',
    num_devices=8,
    rows_per_microbatch=4,
    generation_rows=32,
  )
