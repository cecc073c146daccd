"""Named `DecoderConfig`s: a tiny Llama-style model for CPU demos and tests, and the published
hyperparameters of the checkpoints this project fine-tunes. Configs only; weights come from local
folders (`load_hf_checkpoint`) or GGUF files (`load_gguf`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from coars_jax.models.config import DecoderConfig, RopeScaling

_QWEN2_TOKENS = dict(bos_token_id=151643, eos_token_ids=(151645,), pad_token_id=151643)  # Instruct: <|im_end|>
_QWEN3_TOKENS = dict(bos_token_id=151643, eos_token_ids=(151645,), pad_token_id=151643)


def tiny(vocab_size: int = 8192) -> DecoderConfig:
  """About 5M parameters (tied embeddings); vocab_size is set by the tokenizer trained for the demo."""
  return DecoderConfig(
    architecture='llama',
    vocab_size=vocab_size,
    embed_dim=256,
    mlp_dim=768,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=10_000.0,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
  )


def smollm2_135m() -> DecoderConfig:
  """HuggingFaceTB/SmolLM2-135M-Instruct."""
  return DecoderConfig(
    architecture='llama',
    vocab_size=49152,
    embed_dim=576,
    mlp_dim=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=100_000.0,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_ids=(2,),
    pad_token_id=2,
  )


def qwen2p5_0p5b() -> DecoderConfig:
  """Qwen/Qwen2.5-0.5B-Instruct."""
  return DecoderConfig(
    architecture='qwen2',
    vocab_size=151936,
    embed_dim=896,
    mlp_dim=4864,
    num_layers=24,
    num_heads=14,
    num_kv_heads=2,
    head_dim=64,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    max_position_embeddings=32768,
    qkv_bias=True,
    tie_word_embeddings=True,
    **_QWEN2_TOKENS,
  )


def qwen2p5_1p5b() -> DecoderConfig:
  """Qwen/Qwen2.5-1.5B-Instruct."""
  return DecoderConfig(
    architecture='qwen2',
    vocab_size=151936,
    embed_dim=1536,
    mlp_dim=8960,
    num_layers=28,
    num_heads=12,
    num_kv_heads=2,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    max_position_embeddings=32768,
    qkv_bias=True,
    tie_word_embeddings=True,
    **_QWEN2_TOKENS,
  )


def qwen2p5_7b() -> DecoderConfig:
  """Qwen/Qwen2.5-7B-Instruct."""
  return DecoderConfig(
    architecture='qwen2',
    vocab_size=152064,
    embed_dim=3584,
    mlp_dim=18944,
    num_layers=28,
    num_heads=28,
    num_kv_heads=4,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    max_position_embeddings=32768,
    qkv_bias=True,
    tie_word_embeddings=False,
    **_QWEN2_TOKENS,
  )


def qwen3_0p6b() -> DecoderConfig:
  """Qwen/Qwen3-0.6B."""
  return DecoderConfig(
    architecture='qwen3',
    vocab_size=151936,
    embed_dim=1024,
    mlp_dim=3072,
    num_layers=28,
    num_heads=16,
    num_kv_heads=8,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    max_position_embeddings=40960,
    qk_norm=True,
    tie_word_embeddings=True,
    **_QWEN3_TOKENS,
  )


def qwen3_1p7b() -> DecoderConfig:
  """Qwen/Qwen3-1.7B."""
  return DecoderConfig(
    architecture='qwen3',
    vocab_size=151936,
    embed_dim=2048,
    mlp_dim=6144,
    num_layers=28,
    num_heads=16,
    num_kv_heads=8,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    max_position_embeddings=40960,
    qk_norm=True,
    tie_word_embeddings=True,
    **_QWEN3_TOKENS,
  )


def qwen3_8b() -> DecoderConfig:
  """Qwen/Qwen3-8B."""
  return DecoderConfig(
    architecture='qwen3',
    vocab_size=151936,
    embed_dim=4096,
    mlp_dim=12288,
    num_layers=36,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    max_position_embeddings=40960,
    qk_norm=True,
    tie_word_embeddings=False,
    **_QWEN3_TOKENS,
  )


def llama3_8b() -> DecoderConfig:
  """meta-llama/Llama-3.1-8B-Instruct (Llama 3.1: llama3 rope scaling to a 128k context)."""
  return DecoderConfig(
    architecture='llama',
    vocab_size=128256,
    embed_dim=4096,
    mlp_dim=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rms_norm_eps=1e-5,
    rope_theta=500_000.0,
    rope_scaling=RopeScaling(
      kind='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    ),
    max_position_embeddings=131072,
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_ids=(128001, 128008, 128009),
  )


PRESETS: dict[str, Callable[[], DecoderConfig]] = {
  'tiny': tiny,
  'smollm2_135m': smollm2_135m,
  'qwen2p5_0p5b': qwen2p5_0p5b,
  'qwen2p5_1p5b': qwen2p5_1p5b,
  'qwen2p5_7b': qwen2p5_7b,
  'qwen3_0p6b': qwen3_0p6b,
  'qwen3_1p7b': qwen3_1p7b,
  'qwen3_8b': qwen3_8b,
  'llama3_8b': llama3_8b,
}


def get_preset(name: str, **overrides: Any) -> DecoderConfig:
  """The preset `name` with `overrides` applied, e.g. get_preset("qwen3_0p6b", param_dtype="bfloat16")."""
  if name not in PRESETS:
    raise KeyError(f'unknown decoder preset {name!r}; expected one of {sorted(PRESETS)}')
  return PRESETS[name]().replace(**overrides)
