"""The decoder-only LLM backbone: config, Flax NNX model, KV cache, HF safetensors and GGUF weights, presets."""

from coars_jax.models.config import DecoderConfig, RopeScaling
from coars_jax.models.decoder import Decoder
from coars_jax.models.gguf_checkpoint import config_from_gguf, load_gguf, smollm2_gguf_path
from coars_jax.models.hf_checkpoint import load_hf_checkpoint, save_hf_checkpoint
from coars_jax.models.kv_cache import KVCache, init_cache
from coars_jax.models.logical_axes import AXIS_NAMES
from coars_jax.models.presets import PRESETS, get_preset
from coars_jax.models.weight_mapping import WeightRule, hf_weight_rules

__all__ = [
    "AXIS_NAMES",
    "Decoder",
    "DecoderConfig",
    "KVCache",
    "PRESETS",
    "RopeScaling",
    "WeightRule",
    "config_from_gguf",
    "get_preset",
    "hf_weight_rules",
    "init_cache",
    "load_gguf",
    "load_hf_checkpoint",
    "save_hf_checkpoint",
    "smollm2_gguf_path",
]
