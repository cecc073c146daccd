"""DecoderConfig: validation, parsing HF config.json in both transformers 4 and 5 spellings, round trip."""

import json

import pytest

from coars_jax.models import DecoderConfig, RopeScaling

LLAMA31_V4_STYLE = {
  'model_type': 'llama',
  'vocab_size': 128256,
  'hidden_size': 4096,
  'intermediate_size': 14336,
  'num_hidden_layers': 32,
  'num_attention_heads': 32,
  'num_key_value_heads': 8,
  'hidden_act': 'silu',
  'rms_norm_eps': 1e-5,
  'rope_theta': 500000.0,
  'max_position_embeddings': 131072,
  'tie_word_embeddings': False,
  'rope_scaling': {
    'factor': 8.0,
    'low_freq_factor': 1.0,
    'high_freq_factor': 4.0,
    'original_max_position_embeddings': 8192,
    'rope_type': 'llama3',
  },
  'bos_token_id': 128000,
  'eos_token_id': [128001, 128008, 128009],
  'torch_dtype': 'bfloat16',
}


def test_parses_transformers4_config_with_llama3_rope(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps(LLAMA31_V4_STYLE))
  config = DecoderConfig.from_hf(tmp_path)
  assert config.rope_theta == 500000.0
  assert config.rope_scaling == RopeScaling(
    kind='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
  )
  assert config.head_dim == 128 and config.num_kv_heads == 8
  assert config.eos_token_ids == (128001, 128008, 128009)
  assert config.param_dtype == 'bfloat16' and not config.qkv_bias and not config.qk_norm


def test_parses_transformers5_rope_parameters_and_family_flags():
  qwen2 = DecoderConfig.from_hf(
    {
      **LLAMA31_V4_STYLE,
      'model_type': 'qwen2',
      'rope_scaling': None,
      'rope_parameters': {'rope_type': 'default', 'rope_theta': 1e6},
    }
  )
  assert qwen2.rope_theta == 1e6 and qwen2.rope_scaling is None
  assert qwen2.qkv_bias and not qwen2.out_bias and not qwen2.qk_norm
  qwen3 = DecoderConfig.from_hf({**LLAMA31_V4_STYLE, 'model_type': 'qwen3', 'head_dim': 96})
  assert qwen3.qk_norm and qwen3.head_dim == 96


def test_reads_a_transformers_config_object():
  transformers = pytest.importorskip('transformers', reason='needs transformers')
  hf = transformers.Qwen3Config(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    tie_word_embeddings=True,
  )
  config = DecoderConfig.from_hf(hf, compute_dtype='bfloat16')
  assert (config.architecture, config.head_dim, config.tie_word_embeddings) == ('qwen3', 16, True)
  assert config.compute_dtype == 'bfloat16'


def test_hf_dict_round_trip():
  config = DecoderConfig.from_hf(LLAMA31_V4_STYLE)
  assert DecoderConfig.from_hf(config.to_hf_dict()) == config


@pytest.mark.parametrize(
  'change, message',
  [
    ({'model_type': 'mistral'}, "model_type 'mistral' is not supported"),
    ({'hidden_act': 'gelu'}, "hidden_act must be 'silu'"),
    ({'use_sliding_window': True}, 'sliding-window'),
    ({'rope_scaling': {'rope_type': 'yarn', 'factor': 4.0}}, "rope type 'yarn' is not supported"),
    ({'num_key_value_heads': 5}, 'num_kv_heads: must divide num_heads=32'),
  ],
)
def test_unsupported_configs_fail_with_the_field_name(change, message):
  with pytest.raises(ValueError, match=message):
    DecoderConfig.from_hf({**LLAMA31_V4_STYLE, **change})


def test_validation_names_the_field():
  with pytest.raises(ValueError, match='DecoderConfig.param_dtype'):
    DecoderConfig(
      vocab_size=8, embed_dim=8, mlp_dim=8, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=4, param_dtype='float16'
    )
  with pytest.raises(ValueError, match='DecoderConfig.head_dim'):
    DecoderConfig(vocab_size=8, embed_dim=8, mlp_dim=8, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=3)
  with pytest.raises(FileNotFoundError, match='no config.json'):
    DecoderConfig.from_hf('/nonexistent/folder')
