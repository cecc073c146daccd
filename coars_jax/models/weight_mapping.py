"""The declarative table between HF transformers tensor names and `Decoder` parameter paths, and the two
directions of conversion it drives: HF tensors -> a `Decoder`, and a `Decoder` -> HF tensors.

Each `WeightRule` says: a tensor named like `hf_name` (with `{layer}` for the layer index), stored by HF
with shape `hf_shape`, becomes the parameter at `model_path` after an optional transpose (HF Linear weights
are [out, in]) and a reshape to `model_shape` (our kernels keep heads and head_dim as separate axes).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coars_jax.models.config import DecoderConfig
from coars_jax.models.decoder import Decoder

# Tensors some checkpoints carry that hold no learned weights of ours: old Llama exports saved the RoPE table.
IGNORED_HF_TENSORS = (re.compile(r'model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq'),)

LAYER = '{layer}'


@dataclasses.dataclass(frozen=True)
class WeightRule:
  hf_name: str
  model_path: str
  hf_shape: tuple[int, ...]
  transpose: bool
  model_shape: tuple[int, ...]

  @functools.cached_property
  def pattern(self) -> re.Pattern[str]:
    return re.compile(re.escape(self.hf_name).replace(re.escape(LAYER), r'(?P<layer>\d+)') + r'\Z')

  @property
  def per_layer(self) -> bool:
    return LAYER in self.hf_name

  def to_model(self, tensor: jax.Array | np.ndarray, dtype: jnp.dtype) -> jax.Array:
    array = jnp.asarray(tensor)
    if self.transpose:
      array = array.T
    return array.reshape(self.model_shape).astype(dtype)

  def to_hf(self, param: jax.Array) -> jax.Array:
    if self.transpose:
      return param.reshape(self.hf_shape[::-1]).T
    return param.reshape(self.hf_shape)


def hf_weight_rules(config: DecoderConfig) -> tuple[WeightRule, ...]:
  """The rules for `config`: only tensors this architecture actually has (biases, q/k norms, lm_head)."""
  E, F, V = config.embed_dim, config.mlp_dim, config.vocab_size
  H, K, D = config.num_heads, config.num_kv_heads, config.head_dim
  attn, mlp = 'model.layers.{layer}.self_attn', 'model.layers.{layer}.mlp'
  our_attn, our_mlp = 'layers.{layer}.attention', 'layers.{layer}.mlp'

  def linear(hf: str, ours: str, out_dim: int, in_dim: int, model_shape: tuple[int, ...]) -> WeightRule:
    return WeightRule(f'{hf}.weight', f'{ours}.kernel', (out_dim, in_dim), True, model_shape)

  def vector(hf: str, ours: str, shape: tuple[int, ...]) -> WeightRule:
    return WeightRule(hf, ours, (int(np.prod(shape)),), False, shape)

  rules = [
    WeightRule('model.embed_tokens.weight', 'token_embedding.embedding', (V, E), False, (V, E)),
    vector('model.norm.weight', 'final_norm.scale', (E,)),
    vector('model.layers.{layer}.input_layernorm.weight', 'layers.{layer}.attention_norm.scale', (E,)),
    vector('model.layers.{layer}.post_attention_layernorm.weight', 'layers.{layer}.mlp_norm.scale', (E,)),
    linear(f'{attn}.q_proj', f'{our_attn}.q_proj', H * D, E, (E, H, D)),
    linear(f'{attn}.k_proj', f'{our_attn}.k_proj', K * D, E, (E, K, D)),
    linear(f'{attn}.v_proj', f'{our_attn}.v_proj', K * D, E, (E, K, D)),
    linear(f'{attn}.o_proj', f'{our_attn}.o_proj', E, H * D, (H, D, E)),
    linear(f'{mlp}.gate_proj', f'{our_mlp}.gate_proj', F, E, (E, F)),
    linear(f'{mlp}.up_proj', f'{our_mlp}.up_proj', F, E, (E, F)),
    linear(f'{mlp}.down_proj', f'{our_mlp}.down_proj', E, F, (F, E)),
  ]
  if config.qkv_bias:
    rules += [
      vector(f'{attn}.q_proj.bias', f'{our_attn}.q_proj.bias', (H, D)),
      vector(f'{attn}.k_proj.bias', f'{our_attn}.k_proj.bias', (K, D)),
      vector(f'{attn}.v_proj.bias', f'{our_attn}.v_proj.bias', (K, D)),
    ]
  if config.out_bias:
    rules.append(vector(f'{attn}.o_proj.bias', f'{our_attn}.o_proj.bias', (E,)))
  if config.mlp_bias:
    rules += [
      vector(f'{mlp}.gate_proj.bias', f'{our_mlp}.gate_proj.bias', (F,)),
      vector(f'{mlp}.up_proj.bias', f'{our_mlp}.up_proj.bias', (F,)),
      vector(f'{mlp}.down_proj.bias', f'{our_mlp}.down_proj.bias', (E,)),
    ]
  if config.qk_norm:
    rules += [
      vector(f'{attn}.q_norm.weight', f'{our_attn}.q_norm.scale', (D,)),
      vector(f'{attn}.k_norm.weight', f'{our_attn}.k_norm.scale', (D,)),
    ]
  if not config.tie_word_embeddings:
    rules.append(linear('lm_head', 'lm_head', V, E, (E, V)))
  return tuple(rules)


@dataclasses.dataclass(frozen=True)
class HFTensor:
  """One tensor of a checkpoint: its shape known up front, its values read only when `load` is called."""

  name: str
  shape: tuple[int, ...]
  load: Callable[[], jax.Array | np.ndarray]
  source: str  # the file it lives in, for error messages


def model_from_hf_tensors(config: DecoderConfig, tensors: Iterable[HFTensor], origin: str) -> Decoder:
  """Builds a `Decoder` whose parameters are exactly `tensors`; every parameter must be covered once."""
  rules = hf_weight_rules(config)
  graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
  abstract = dict(nnx.to_flat_state(abstract_state))
  filled: dict[tuple, jax.Array] = {}
  for tensor in tensors:
    if any(pattern.match(tensor.name) for pattern in IGNORED_HF_TENSORS):
      continue
    if config.tie_word_embeddings and tensor.name == 'lm_head.weight':
      continue  # some tied checkpoints store the shared matrix twice; HF ignores the copy as well
    rule, layer = _match_rule(rules, tensor, config)
    path = _model_path(rule, layer)
    if tensor.shape != rule.hf_shape:
      raise ValueError(
        f'{tensor.source}: tensor {tensor.name!r} has shape {tensor.shape}, expected '
        f'{rule.hf_shape} from the config (embed_dim={config.embed_dim}, '
        f'heads={config.num_heads}, '
        f'kv_heads={config.num_kv_heads}, head_dim={config.head_dim}, mlp_dim={config.mlp_dim}, '
        f'vocab_size={config.vocab_size})'
      )
    if path in filled:
      raise ValueError(f'{tensor.source}: tensor {tensor.name!r} appears twice in {origin}')
    filled[path] = rule.to_model(tensor.load(), abstract[path].get_value().dtype)

  missing = [path for path in abstract if path not in filled]
  if missing:
    expected = sorted(_hf_name(rule, layer) for rule, layer, path in _all_entries(rules, config) if path in missing)
    raise ValueError(
      f'{origin}: {len(missing)} tensors the config needs are missing, e.g. {expected[:6]}'
      f'{" ..." if len(expected) > 6 else ""}'
    )
  state = nnx.from_flat_state([(path, variable.replace(filled[path])) for path, variable in abstract.items()])
  return nnx.merge(graphdef, state)


def hf_tensors_from_model(model: Decoder, dtype: jnp.dtype | None = None) -> dict[str, jax.Array]:
  """The model's parameters under their HF names and HF shapes, cast to `dtype` (default: as stored)."""
  config = model.config
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  tensors = {}
  for rule, layer, path in _all_entries(hf_weight_rules(config), config):
    value = rule.to_hf(params[path].get_value())
    tensors[_hf_name(rule, layer)] = value.astype(dtype) if dtype is not None else value
  if len(tensors) != len(params):
    unexported = set(params) - {path for _, _, path in _all_entries(hf_weight_rules(config), config)}
    raise ValueError(f'hf_tensors_from_model: parameters {sorted(unexported)} have no HF name')
  return tensors


def _match_rule(
  rules: tuple[WeightRule, ...], tensor: HFTensor, config: DecoderConfig
) -> tuple[WeightRule, int | None]:
  for rule in rules:
    found = rule.pattern.match(tensor.name)
    if found is None:
      continue
    layer = int(found['layer']) if rule.per_layer else None
    if layer is not None and layer >= config.num_layers:
      raise ValueError(
        f'{tensor.source}: tensor {tensor.name!r} is for layer {layer}, but the config has '
        f'num_layers={config.num_layers}'
      )
    return rule, layer
  raise ValueError(
    f'{tensor.source}: tensor {tensor.name!r} matches no weight rule for architecture {config.architecture!r} '
    f'(qkv_bias={config.qkv_bias}, out_bias={config.out_bias}, mlp_bias={config.mlp_bias}, '
    f'qk_norm={config.qk_norm}, tie_word_embeddings={config.tie_word_embeddings}); known names: '
    f'{[rule.hf_name for rule in rules]}'
  )


def _model_path(rule: WeightRule, layer: int | None) -> tuple:
  path = rule.model_path.replace(LAYER, str(layer)) if layer is not None else rule.model_path
  return tuple(int(part) if part.isdigit() else part for part in path.split('.'))


def _hf_name(rule: WeightRule, layer: int | None) -> str:
  return rule.hf_name.replace(LAYER, str(layer)) if layer is not None else rule.hf_name


def _all_entries(rules: tuple[WeightRule, ...], config: DecoderConfig):
  for rule in rules:
    for layer in range(config.num_layers) if rule.per_layer else (None,):
      yield rule, layer, _model_path(rule, layer)


def tensors_from_mapping(arrays: Mapping[str, np.ndarray | jax.Array], source: str) -> list[HFTensor]:
  """Wraps in-memory arrays (e.g. dequantized GGUF tensors) as `HFTensor`s."""
  return [HFTensor(name, tuple(array.shape), (lambda array=array: array), source) for name, array in arrays.items()]
