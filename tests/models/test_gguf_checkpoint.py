"""GGUF loading: the q/k un-permutation, the config from metadata, and SmolLM2-135M-Instruct's logits
against transformers' own GGUF loader."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from coars_jax.models import config_from_gguf, get_preset, load_gguf, smollm2_gguf_path
from coars_jax.models.gguf_checkpoint import unpermute_rotary_rows


def _llama_cpp_permute(weight, num_heads):
  """The permutation llama.cpp's converter applies, written from its description, to invert in the test."""
  rows = weight.shape[0]
  return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def test_unpermute_inverts_llama_cpp_permutation():
  weight = np.arange(3 * 8 * 5, dtype=np.float32).reshape(24, 5)
  permuted = _llama_cpp_permute(weight, num_heads=3)
  assert not np.array_equal(permuted, weight)
  np.testing.assert_array_equal(unpermute_rotary_rows(permuted, num_heads=3), weight)


@pytest.fixture(scope='module')
def gguf_path():
  pytest.importorskip('gguf', reason='GGUF loading needs the gguf package (pip install gguf)')
  try:
    return smollm2_gguf_path()
  except FileNotFoundError as error:
    pytest.skip(f'SmolLM2 GGUF not available: {error}')


def test_config_from_metadata_matches_preset(gguf_path):
  config = config_from_gguf(gguf_path)
  # GGUF stores eps as float32; everything else equals the published preset.
  assert config.rms_norm_eps == pytest.approx(1e-5, rel=1e-6)
  assert config.replace(rms_norm_eps=1e-5) == get_preset('smollm2_135m')


# In the default suite on purpose: issue 3 requires the SmolLM2 GGUF parity to be green in CI (about 30 s).
def test_smollm2_logits_match_transformers_gguf_loader(gguf_path, tmp_path):
  torch = pytest.importorskip('torch', reason="the reference is transformers' GGUF loader (torch)")
  transformers = pytest.importorskip('transformers', reason='needs transformers')
  pytest.importorskip('accelerate', reason='transformers needs accelerate to load GGUF files')
  os.symlink(gguf_path, tmp_path / 'model.gguf')
  reference = transformers.AutoModelForCausalLM.from_pretrained(
    tmp_path, gguf_file='model.gguf', dtype=torch.float32
  ).eval()
  model = load_gguf(gguf_path)

  # Dequantized weights are the same arrays: compare a q (permuted in GGUF), a k and the embedding.
  layer = reference.model.layers[3].self_attn
  np.testing.assert_array_equal(
    np.asarray(model.layers[3].attention.q_proj.kernel[...]).reshape(576, 576), layer.q_proj.weight.detach().numpy().T
  )
  np.testing.assert_array_equal(
    np.asarray(model.layers[3].attention.k_proj.kernel[...]).reshape(576, 192), layer.k_proj.weight.detach().numpy().T
  )
  np.testing.assert_array_equal(
    np.asarray(model.token_embedding.embedding[...]), reference.model.embed_tokens.weight.detach().numpy()
  )

  tokens = np.array([[1, 504, 3458, 282, 4649, 314, 253, 1789, 30, 2]], np.int64)
  with torch.no_grad():
    expected = reference(torch.tensor(tokens)).logits.numpy()
  logits, _ = model(jnp.asarray(tokens, jnp.int32), jnp.arange(tokens.shape[1], dtype=jnp.int32)[None])
  # Same weights; only float32 summation order differs over 30 layers (logits reach ~30 in magnitude).
  np.testing.assert_allclose(np.asarray(logits), expected, atol=2e-4, rtol=1e-5)
  assert (np.asarray(logits).argmax(-1) == expected.argmax(-1)).all()
