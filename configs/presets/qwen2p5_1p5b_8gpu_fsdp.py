"""RL of both agents on Qwen2.5-1.5B-Instruct, eight 80 GB GPUs of one host, weights and batch rows sharded over
an fsdp axis (ZeRO-3 style), bf16:

  XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 python -m experiments.train --config=configs/presets/qwen2p5_1p5b_8gpu_fsdp.py \
      --config.model=/path/to/Qwen2.5-1.5B-Instruct

fsdp is -1 (every local device), so the same file also runs, smaller, on fewer GPUs; a model this size also fits
pure data parallelism (--config.mesh.data=8 --config.mesh.fsdp=1), which trades memory for less communication.
rows_per_microbatch is a multiple of data x fsdp. Plan: `python -m experiments.plan_memory --config=<this file>`.
"""

from coars_jax.pipeline.presets import pretrained_config


def get_config(method: str = 'coars'):
  return pretrained_config(
    model='/models/Qwen2.5-1.5B-Instruct',
    model_shape='qwen2p5_1p5b',
    method=method,
    mesh={'data': 1, 'fsdp': -1, 'tensor': 1},
    device='h100-80gb',
    num_devices=8,
    rows_per_microbatch=16,
    generation_rows=64,
  )
