"""Presets: each builds a valid config whose parameter count matches the published model size."""

import pytest

from coars_jax.models import PRESETS, get_preset

# Published sizes (model cards): parameters in millions, and the tolerance of how they are rounded there.
PUBLISHED_MILLIONS = {
  'smollm2_135m': (135, 1),
  'qwen2p5_0p5b': (494, 1),
  'qwen2p5_1p5b': (1540, 5),
  'qwen2p5_7b': (7610, 10),
  'qwen3_0p6b': (600, 10),
  'qwen3_1p7b': (1700, 30),
  'qwen3_8b': (8200, 20),
  'llama3_8b': (8030, 10),
}


@pytest.mark.parametrize('name', sorted(PUBLISHED_MILLIONS))
def test_parameter_count_matches_published_size(name):
  published, tolerance = PUBLISHED_MILLIONS[name]
  assert abs(PRESETS[name]().num_params() / 1e6 - published) <= tolerance


def test_tiny_is_a_few_million_llama_parameters():
  config = get_preset('tiny')
  assert config.architecture == 'llama' and config.vocab_size == 8192
  assert 1e6 < config.num_params() < 10e6
  assert get_preset('tiny', vocab_size=500).vocab_size == 500


def test_family_flags():
  assert get_preset('qwen2p5_0p5b').qkv_bias and not get_preset('qwen2p5_0p5b').qk_norm
  assert get_preset('qwen3_0p6b').qk_norm and not get_preset('qwen3_0p6b').qkv_bias
  assert get_preset('llama3_8b').rope_scaling.kind == 'llama3'
  assert get_preset('qwen3_8b').tie_word_embeddings is False


def test_unknown_preset_lists_choices():
  with pytest.raises(KeyError, match='qwen3_0p6b'):
    get_preset('qwen4')
