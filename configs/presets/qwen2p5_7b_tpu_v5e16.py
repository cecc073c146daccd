"""RL of both agents on Qwen2.5-7B-Instruct on a Cloud TPU v5e-16 slice (4 hosts x 4 chips, 16 GiB HBM each), bf16:
weights sharded over fsdp x tensor (4 x 4), batch rows over fsdp, heads and the MLP width over tensor.

Every host runs the same command; `distributed.enabled` makes each process call `jax.distributed.initialize()`
first, which finds the coordinator and the process ids from the TPU metadata (or from COARS_COORDINATOR_ADDRESS,
COARS_NUM_PROCESSES, COARS_PROCESS_ID when set). With the repository and the checkpoint at the same path on every
host (and a workdir all hosts can write, e.g. a shared disk), from your workstation:

  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command='cd ~/coars_jax && \
      .venv/bin/python -m experiments.train --config=configs/presets/qwen2p5_7b_tpu_v5e16.py \
      --config.model=/models/Qwen2.5-7B-Instruct --config.workdir=/mnt/shared/runs/qwen7b_v5e16'

after installing on every host: `gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all
--command='git clone <repo> ~/coars_jax && cd ~/coars_jax && python3 -m venv .venv && .venv/bin/pip install -e .[tpu]'`.

16 GiB per chip: the update step materialises each layer's attention (no remat or fused attention yet), so prompts
are capped at 1024 tokens and a longer prompt or teacher prompt x + d is refused at run time naming the bucket. A
v4-32 slice (16 chips, 32 GiB each) takes the full buckets: --config.plan.device=tpu-v4
--config.prompt_buckets='(256,512,1024,2048)'. Plan: `python -m experiments.plan_memory --config=<this file>`.
"""

from coars_jax.pipeline.presets import PROMPT_BUCKETS, pretrained_config


def get_config(method: str = 'coars'):
  config = pretrained_config(
    model='/models/Qwen2.5-7B-Instruct',
    model_shape='qwen2p5_7b',
    method=method,
    mesh={'data': 1, 'fsdp': 4, 'tensor': 4},
    device='tpu-v5e',
    num_devices=16,
    rows_per_microbatch=4,
    generation_rows=32,
    multi_host=True,
  )
  config.prompt_buckets = tuple(size for size in PROMPT_BUCKETS if size <= 1024)
  return config
