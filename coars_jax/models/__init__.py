"""The decoder-only LLM backbone: config, Flax NNX model, KV cache, HF safetensors and GGUF weights, presets,
and LoRA adapters (several named adapters on one frozen base) with their own Orbax checkpoints and PEFT folders."""

from coars_jax.models.adapter_checkpoint import load_adapters, save_adapters
from coars_jax.models.config import DecoderConfig, RopeScaling
from coars_jax.models.decoder import Decoder
from coars_jax.models.gguf_checkpoint import config_from_gguf, load_gguf, smollm2_gguf_path
from coars_jax.models.hf_checkpoint import load_hf_checkpoint, save_hf_checkpoint
from coars_jax.models.kv_cache import KVCache, init_cache
from coars_jax.models.logical_axes import AXIS_NAMES
from coars_jax.models.lora import ADAPTERS_OFF, BASE_PARAMS, LoRAConfig, add_lora, adapter_index, merge_lora
from coars_jax.models.peft_adapters import PeftAdapterError, load_peft_adapters, save_peft_adapters
from coars_jax.models.presets import PRESETS, get_preset
from coars_jax.models.weight_mapping import WeightRule, hf_weight_rules

__all__ = [
  'ADAPTERS_OFF',
  'AXIS_NAMES',
  'BASE_PARAMS',
  'Decoder',
  'DecoderConfig',
  'KVCache',
  'LoRAConfig',
  'PeftAdapterError',
  'PRESETS',
  'RopeScaling',
  'WeightRule',
  'adapter_index',
  'add_lora',
  'config_from_gguf',
  'get_preset',
  'hf_weight_rules',
  'init_cache',
  'load_adapters',
  'load_gguf',
  'load_hf_checkpoint',
  'load_peft_adapters',
  'merge_lora',
  'save_adapters',
  'save_hf_checkpoint',
  'save_peft_adapters',
  'smollm2_gguf_path',
]
