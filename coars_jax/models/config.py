"""`DecoderConfig`: the hyperparameters of one decoder-only LLM (Llama / SmolLM2, Qwen2 / Qwen2.5, Qwen3),
validated on construction, read from a transformers `config.json` (or config object) and written back to one."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any, Literal

import jax.numpy as jnp

Architecture = Literal['llama', 'qwen2', 'qwen3']
ARCHITECTURES: tuple[str, ...] = ('llama', 'qwen2', 'qwen3')
HF_ARCHITECTURE_CLASS = {'llama': 'LlamaForCausalLM', 'qwen2': 'Qwen2ForCausalLM', 'qwen3': 'Qwen3ForCausalLM'}
DTYPES: tuple[str, ...] = ('float32', 'bfloat16')
ROPE_SCALING_KINDS: tuple[str, ...] = ('linear', 'llama3')


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
  """How rotary frequencies are rescaled for long context.

  kind: "linear" divides every inverse frequency by `factor`; "llama3" (Llama 3.1) divides only the
    low frequencies by `factor` and blends the band between `low_freq_factor` and `high_freq_factor`.
  original_max_position_embeddings: context length of pre-training; used by "llama3" only.
  """

  kind: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.kind not in ROPE_SCALING_KINDS:
      raise ValueError(f'RopeScaling.kind: expected one of {ROPE_SCALING_KINDS}, found {self.kind!r}')
    if self.factor <= 0:
      raise ValueError(f'RopeScaling.factor: expected > 0, found {self.factor}')
    if self.kind == 'llama3' and not self.high_freq_factor > self.low_freq_factor > 0:
      raise ValueError(
        'RopeScaling: llama3 scaling needs high_freq_factor > low_freq_factor > 0, found '
        f'high_freq_factor={self.high_freq_factor}, low_freq_factor={self.low_freq_factor}'
      )


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
  """Hyperparameters of a pre-norm, SwiGLU, RMSNorm, RoPE decoder with grouped-query attention.

  architecture: which HF family the weights follow ("llama", "qwen2", "qwen3"); decides export names.
  vocab_size: V, rows of the token embedding and columns of the logits.
  embed_dim: d_model (HF `hidden_size`).
  mlp_dim: width of the SwiGLU hidden layer (HF `intermediate_size`).
  num_layers, num_heads, num_kv_heads, head_dim: depth; query heads H; key/value heads K (H % K == 0); D.
  rope_theta: RoPE base wavelength; rope_scaling: None for plain RoPE, else a `RopeScaling`.
  qkv_bias / out_bias / mlp_bias: whether q,k,v / o / gate,up,down projections carry a bias
    (Qwen2 has qkv_bias only; Llama's `attention_bias` sets both qkv_bias and out_bias).
  qk_norm: RMSNorm over head_dim on queries and keys before RoPE (Qwen3).
  tie_word_embeddings: logits reuse the token embedding instead of a separate lm_head.
  param_dtype: dtype parameters are stored in; compute_dtype: dtype of activations and matmuls.
    Norms, softmax and RoPE rotations always run in float32.
  """

  architecture: str = 'llama'
  vocab_size: int
  embed_dim: int
  mlp_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10_000.0
  rope_scaling: RopeScaling | None = None
  max_position_embeddings: int = 4096
  qkv_bias: bool = False
  out_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  tie_word_embeddings: bool = False
  param_dtype: str = 'float32'
  compute_dtype: str = 'float32'
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None

  def __post_init__(self):
    if self.architecture not in ARCHITECTURES:
      raise ValueError(f'DecoderConfig.architecture: expected one of {ARCHITECTURES}, found {self.architecture!r}')
    for name in (
      'vocab_size',
      'embed_dim',
      'mlp_dim',
      'num_layers',
      'num_heads',
      'num_kv_heads',
      'head_dim',
      'max_position_embeddings',
    ):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f'DecoderConfig.{name}: expected a positive int, found {value!r}')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f'DecoderConfig.num_kv_heads: must divide num_heads={self.num_heads} for grouped-query attention, '
        f'found {self.num_kv_heads}'
      )
    if self.head_dim % 2:
      raise ValueError(f'DecoderConfig.head_dim: RoPE rotates pairs, so it must be even; found {self.head_dim}')
    if not self.rms_norm_eps > 0:
      raise ValueError(f'DecoderConfig.rms_norm_eps: expected > 0, found {self.rms_norm_eps}')
    if not self.rope_theta > 0:
      raise ValueError(f'DecoderConfig.rope_theta: expected > 0, found {self.rope_theta}')
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
      raise ValueError(
        f'DecoderConfig.rope_scaling: expected None or RopeScaling, found {type(self.rope_scaling).__name__}'
      )
    for name in ('param_dtype', 'compute_dtype'):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f'DecoderConfig.{name}: expected one of {DTYPES}, found {getattr(self, name)!r}')
    if not isinstance(self.eos_token_ids, tuple):
      raise ValueError(f'DecoderConfig.eos_token_ids: expected a tuple of ints, found {self.eos_token_ids!r}')
    for name in ('bos_token_id', 'pad_token_id'):
      token = getattr(self, name)
      if token is not None and not 0 <= token < self.vocab_size:
        raise ValueError(f'DecoderConfig.{name}: expected None or in [0, {self.vocab_size}), found {token}')
    for token in self.eos_token_ids:
      if not 0 <= token < self.vocab_size:
        raise ValueError(f'DecoderConfig.eos_token_ids: {token} is outside [0, {self.vocab_size})')

  @property
  def jnp_param_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  @property
  def jnp_compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.compute_dtype)

  def replace(self, **changes: Any) -> DecoderConfig:
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Number of scalar parameters of the model this config builds."""
    attention = self.embed_dim * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    if self.qkv_bias:
      attention += self.head_dim * (self.num_heads + 2 * self.num_kv_heads)
    if self.out_bias:
      attention += self.embed_dim
    if self.qk_norm:
      attention += 2 * self.head_dim
    mlp = 3 * self.embed_dim * self.mlp_dim + (2 * self.mlp_dim + self.embed_dim if self.mlp_bias else 0)
    per_layer = attention + mlp + 2 * self.embed_dim
    embeddings = self.vocab_size * self.embed_dim * (1 if self.tie_word_embeddings else 2)
    return self.num_layers * per_layer + embeddings + self.embed_dim

  @classmethod
  def from_hf(cls, source: str | os.PathLike | Mapping[str, Any] | Any, **overrides: Any) -> DecoderConfig:
    """Builds a config from a HF checkpoint folder (its config.json), a config.json path, a dict, or a
    `transformers.PretrainedConfig`. `overrides` (e.g. param_dtype="bfloat16") replace parsed fields."""
    hf, origin = _read_hf_config(source)
    return cls(**{**_parse_hf_config(hf, origin), **overrides})

  def to_hf_dict(self) -> dict[str, Any]:
    """The config.json contents transformers needs to rebuild this architecture."""
    rope_parameters: dict[str, Any] = {'rope_type': 'default', 'rope_theta': self.rope_theta}
    if self.rope_scaling is not None:
      rope_parameters = {
        'rope_type': self.rope_scaling.kind,
        'rope_theta': self.rope_theta,
        'factor': self.rope_scaling.factor,
      }
      if self.rope_scaling.kind == 'llama3':
        rope_parameters.update(
          low_freq_factor=self.rope_scaling.low_freq_factor,
          high_freq_factor=self.rope_scaling.high_freq_factor,
          original_max_position_embeddings=self.rope_scaling.original_max_position_embeddings,
        )
    eos: int | list[int] | None = None
    if len(self.eos_token_ids) == 1:
      eos = self.eos_token_ids[0]
    elif self.eos_token_ids:
      eos = list(self.eos_token_ids)
    hf: dict[str, Any] = {
      'architectures': [HF_ARCHITECTURE_CLASS[self.architecture]],
      'model_type': self.architecture,
      'vocab_size': self.vocab_size,
      'hidden_size': self.embed_dim,
      'intermediate_size': self.mlp_dim,
      'num_hidden_layers': self.num_layers,
      'num_attention_heads': self.num_heads,
      'num_key_value_heads': self.num_kv_heads,
      'head_dim': self.head_dim,
      'hidden_act': 'silu',
      'rms_norm_eps': self.rms_norm_eps,
      'max_position_embeddings': self.max_position_embeddings,
      'rope_theta': self.rope_theta,
      'rope_parameters': rope_parameters,
      'tie_word_embeddings': self.tie_word_embeddings,
      'bos_token_id': self.bos_token_id,
      'eos_token_id': eos,
      'pad_token_id': self.pad_token_id,
      'dtype': self.param_dtype,
    }
    if self.architecture == 'llama':
      hf.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
    elif self.architecture == 'qwen3':
      hf.update(attention_bias=self.qkv_bias, use_sliding_window=False)
    else:
      hf.update(use_sliding_window=False)
    return hf


def _read_hf_config(source: Any) -> tuple[dict[str, Any], str]:
  if isinstance(source, (str, os.PathLike)):
    path = os.fspath(source)
    if os.path.isdir(path):
      path = os.path.join(path, 'config.json')
    if not os.path.isfile(path):
      raise FileNotFoundError(f'DecoderConfig.from_hf: no config.json at {path}')
    with open(path) as handle:
      return json.load(handle), path
  if isinstance(source, Mapping):
    return dict(source), '<dict>'
  if hasattr(source, 'to_dict'):
    return source.to_dict(), f'<{type(source).__name__}>'
  raise TypeError(
    f'DecoderConfig.from_hf: expected a folder, a config.json path, a dict or a transformers config; '
    f'found {type(source).__name__}'
  )


def _parse_hf_config(hf: dict[str, Any], origin: str) -> dict[str, Any]:
  def field(name: str, default: Any = KeyError) -> Any:
    if name in hf and hf[name] is not None:
      return hf[name]
    if default is KeyError:
      raise ValueError(f'{origin}: required field {name!r} is missing')
    return default

  architecture = field('model_type')
  if architecture not in ARCHITECTURES:
    raise ValueError(f'{origin}: model_type {architecture!r} is not supported; expected one of {ARCHITECTURES}')
  if field('hidden_act', 'silu') != 'silu':
    raise ValueError(f"{origin}: hidden_act must be 'silu' (SwiGLU), found {hf['hidden_act']!r}")
  if field('use_sliding_window', False) or 'sliding_attention' in (field('layer_types', None) or ()):
    raise ValueError(f'{origin}: sliding-window attention is not supported (use_sliding_window / layer_types)')
  num_heads = field('num_attention_heads')
  embed_dim = field('hidden_size')
  eos = field('eos_token_id', None)
  eos_token_ids = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
  attention_bias = bool(field('attention_bias', False))
  if architecture == 'qwen2':
    qkv_bias, out_bias = True, False
  else:
    qkv_bias, out_bias = attention_bias, attention_bias
  dtype = field('dtype', None) or field('torch_dtype', None)
  dtype = dtype if dtype in DTYPES else 'float32'
  return dict(
    architecture=architecture,
    vocab_size=field('vocab_size'),
    embed_dim=embed_dim,
    mlp_dim=field('intermediate_size'),
    num_layers=field('num_hidden_layers'),
    num_heads=num_heads,
    num_kv_heads=field('num_key_value_heads', num_heads),
    head_dim=field('head_dim', embed_dim // num_heads),
    rms_norm_eps=float(field('rms_norm_eps', 1e-6)),
    rope_theta=float(_rope_theta(hf)),
    rope_scaling=_rope_scaling(hf, origin),
    max_position_embeddings=field('max_position_embeddings', 4096),
    qkv_bias=qkv_bias,
    out_bias=out_bias,
    mlp_bias=bool(field('mlp_bias', False)) if architecture == 'llama' else False,
    qk_norm=architecture == 'qwen3',
    tie_word_embeddings=bool(field('tie_word_embeddings', False)),
    param_dtype=dtype,
    compute_dtype=dtype,
    bos_token_id=field('bos_token_id', None),
    eos_token_ids=eos_token_ids,
    pad_token_id=field('pad_token_id', None),
  )


def _rope_dict(hf: dict[str, Any]) -> dict[str, Any]:
  # transformers >= 5 writes `rope_parameters`; older configs write `rope_scaling` next to `rope_theta`.
  return dict(hf.get('rope_parameters') or hf.get('rope_scaling') or {})


def _rope_theta(hf: dict[str, Any]) -> float:
  return _rope_dict(hf).get('rope_theta') or hf.get('rope_theta') or 10_000.0


def _rope_scaling(hf: dict[str, Any], origin: str) -> RopeScaling | None:
  rope = _rope_dict(hf)
  kind = rope.get('rope_type', rope.get('type', 'default'))
  if rope.get('partial_rotary_factor', 1.0) != 1.0:
    raise ValueError(f'{origin}: partial_rotary_factor={rope["partial_rotary_factor"]} is not supported (need 1.0)')
  if kind == 'default':
    return None
  if kind == 'linear':
    return RopeScaling(kind='linear', factor=float(rope['factor']))
  if kind == 'llama3':
    return RopeScaling(
      kind='llama3',
      factor=float(rope['factor']),
      low_freq_factor=float(rope['low_freq_factor']),
      high_freq_factor=float(rope['high_freq_factor']),
      original_max_position_embeddings=int(
        rope.get('original_max_position_embeddings') or hf.get('max_position_embeddings')
      ),
    )
  raise ValueError(f"{origin}: rope type {kind!r} is not supported; expected 'default' or one of {ROPE_SCALING_KINDS}")
