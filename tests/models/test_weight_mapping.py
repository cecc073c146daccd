"""The HF <-> Decoder weight table: exact round trip, and errors that name the tensor and what was expected."""

import numpy as np
import pytest
from flax import nnx

from coars_jax.models import Decoder, DecoderConfig, hf_weight_rules
from coars_jax.models.weight_mapping import hf_tensors_from_model, model_from_hf_tensors, tensors_from_mapping

CONFIG = DecoderConfig(
  architecture='llama',
  vocab_size=32,
  embed_dim=16,
  mlp_dim=24,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=4,
  qkv_bias=True,
  out_bias=True,
  mlp_bias=True,
)


@pytest.fixture(scope='module')
def hf_tensors():
  return {name: np.asarray(value) for name, value in hf_tensors_from_model(Decoder(CONFIG, rngs=nnx.Rngs(3))).items()}


def test_hf_names_and_shapes(hf_tensors):
  assert hf_tensors['model.layers.1.self_attn.q_proj.weight'].shape == (16, 16)  # [H*D, E]
  assert hf_tensors['model.layers.0.self_attn.k_proj.weight'].shape == (8, 16)  # [K*D, E]
  assert hf_tensors['model.layers.0.self_attn.o_proj.bias'].shape == (16,)
  assert hf_tensors['model.layers.0.mlp.down_proj.weight'].shape == (16, 24)  # [E, F]
  assert hf_tensors['lm_head.weight'].shape == (32, 16)
  per_layer = sum(rule.per_layer for rule in hf_weight_rules(CONFIG))
  assert len(hf_tensors) == per_layer * 2 + len(hf_weight_rules(CONFIG)) - per_layer


def test_round_trip_is_exact(hf_tensors):
  model = model_from_hf_tensors(CONFIG, tensors_from_mapping(hf_tensors, 'memory'), origin='memory')
  again = {name: np.asarray(value) for name, value in hf_tensors_from_model(model).items()}
  assert again.keys() == hf_tensors.keys()
  for name in hf_tensors:
    np.testing.assert_array_equal(again[name], hf_tensors[name], err_msg=name)


def test_q_proj_layout_is_heads_then_head_dim(hf_tensors):
  """HF row h*D + d of q_proj is head h, dim d in our [E, H, D] kernel."""
  model = model_from_hf_tensors(CONFIG, tensors_from_mapping(hf_tensors, 'memory'), origin='memory')
  kernel = np.asarray(model.layers[0].attention.q_proj.kernel[...])
  hf = hf_tensors['model.layers.0.self_attn.q_proj.weight']
  np.testing.assert_array_equal(kernel[:, 2, 3], hf[2 * 4 + 3])


def test_unknown_tensor_is_named(hf_tensors):
  extra = {**hf_tensors, 'model.layers.0.self_attn.rotary_proj.weight': np.zeros((2, 2), np.float32)}
  with pytest.raises(ValueError, match="rotary_proj.weight' matches no weight rule"):
    model_from_hf_tensors(CONFIG, tensors_from_mapping(extra, 'ckpt.safetensors'), origin='ckpt')


def test_missing_tensor_is_named(hf_tensors):
  partial = {k: v for k, v in hf_tensors.items() if k != 'model.layers.1.mlp.up_proj.weight'}
  with pytest.raises(ValueError, match=r"missing, e.g. \['model.layers.1.mlp.up_proj.weight'\]"):
    model_from_hf_tensors(CONFIG, tensors_from_mapping(partial, 'ckpt.safetensors'), origin='ckpt')


def test_wrong_shape_and_extra_layer_are_named(hf_tensors):
  wrong = {**hf_tensors, 'model.embed_tokens.weight': np.zeros((31, 16), np.float32)}
  with pytest.raises(ValueError, match=r'shape \(31, 16\), expected \(32, 16\)'):
    model_from_hf_tensors(CONFIG, tensors_from_mapping(wrong, 'ckpt.safetensors'), origin='ckpt')
  deeper = {**hf_tensors, 'model.layers.2.input_layernorm.weight': np.ones((16,), np.float32)}
  with pytest.raises(ValueError, match='layer 2, but the config has num_layers=2'):
    model_from_hf_tensors(CONFIG, tensors_from_mapping(deeper, 'ckpt.safetensors'), origin='ckpt')
