"""The scale-out training presets of `configs/presets/`: RL of both agents on a pretrained Hugging Face checkpoint
(fresh LoRA adapters, no warm start) sized for a named device and mesh. `pretrained_config` holds what the presets
share; each preset file names the model, the mesh, the device and the microbatch its memory plan allows
(`python -m experiments.plan_memory --config=configs/presets/<name>.py`)."""

from __future__ import annotations

from collections.abc import Mapping

import ml_collections

from coars_jax.pipeline.run_config import default_config

# Prompts (x_t and the teacher's x + d) and completions are padded to these; the largest prompt bucket bounds the KV
# cache and the attention of the update step, which the memory plan counts.
PROMPT_BUCKETS = (256, 512, 1024, 2048)
COMPLETION_BUCKETS = (32, 64, 128)


def pretrained_config(
  *,
  model: str,
  model_shape: str,
  mesh: Mapping[str, int],
  device: str,
  num_devices: int,
  rows_per_microbatch: int,
  generation_rows: int,
  method: str = 'coars',
  dataset: str = 'lastfm',
  multi_host: bool = False,
) -> ml_collections.ConfigDict:
  """A training config on the HF checkpoint folder `model` (bf16 weights and compute, as Qwen2.5's config.json
  says), whose shapes the memory planner takes from the `model_shape` preset when the folder is not on the
  planning machine. `num_devices` is the size of the whole run (every host); `generation_rows` is the batch of
  the evaluation and user-F1 generations, whose prefill is the rollout phase's peak; `multi_host` turns on
  `jax.distributed.initialize` (settings from the environment or JAX's own detection)."""
  config = default_config(dataset, model, method or 'coars')
  config.mesh = dict(mesh)
  config.warm_start.enabled = False  # a pretrained base follows the protocol without SFT
  config.lora.rank = 16
  config.lora.alpha = 32.0
  config.prompt_buckets = PROMPT_BUCKETS
  config.completion_buckets = COMPLETION_BUCKETS
  config.rl.rows_per_microbatch = rows_per_microbatch
  config.rl.score_chunk_size = 128
  config.rl.learning_rate = 5e-5
  config.eval.batch_size = generation_rows
  config.eval.user_f1.batch_size = generation_rows
  config.plan.device = device
  config.plan.num_devices = num_devices
  config.plan.model_shape = model_shape
  config.plan.model_dtype = 'bfloat16'
  config.distributed.enabled = multi_host
  return config
