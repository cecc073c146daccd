"""RoPE: inverse frequencies equal transformers' for every supported scaling; rotations are relative."""

import jax.numpy as jnp
import numpy as np
import pytest

from coars_jax.models import DecoderConfig, RopeScaling
from coars_jax.models.rope import apply_rope, inverse_frequencies

BASE = DecoderConfig(
  vocab_size=8,
  embed_dim=64,
  mlp_dim=8,
  num_layers=1,
  num_heads=2,
  num_kv_heads=1,
  head_dim=32,
  rope_theta=500000.0,
  max_position_embeddings=1024,
)
SCALINGS = {
  'default': None,
  'linear': RopeScaling(kind='linear', factor=4.0),
  'llama3': RopeScaling(
    kind='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
  ),
}


@pytest.mark.parametrize('name', sorted(SCALINGS))
def test_inverse_frequencies_match_transformers(name):
  pytest.importorskip('torch', reason='the reference frequencies come from transformers (torch)')
  transformers = pytest.importorskip('transformers', reason='needs transformers')
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  config = BASE.replace(rope_scaling=SCALINGS[name])
  hf_config = transformers.LlamaConfig(
    **{k: v for k, v in config.to_hf_dict().items() if k not in ('architectures', 'model_type', 'dtype')}
  )
  if name == 'default':
    expected = 1.0 / (500000.0 ** (np.arange(0, 32, 2, dtype=np.float32) / 32))
  else:
    expected = ROPE_INIT_FUNCTIONS[name](hf_config, 'cpu')[0].numpy()
  ours = inverse_frequencies(config)
  np.testing.assert_allclose(ours, expected, rtol=1e-6)
  if name != 'default':
    assert not np.allclose(ours, inverse_frequencies(BASE))  # the scaling changed something


def test_rotation_depends_only_on_relative_position():
  rng = np.random.default_rng(0)
  query, key = (jnp.asarray(rng.normal(size=(1, 1, 1, 32)), jnp.float32) for _ in range(2))
  inv_freq = inverse_frequencies(BASE)

  def score(query_position, key_position):
    rotated_query = apply_rope(query, jnp.asarray([[query_position]]), inv_freq)
    rotated_key = apply_rope(key, jnp.asarray([[key_position]]), inv_freq)
    return float(jnp.sum(rotated_query * rotated_key))

  assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)
  assert score(7, 3) != pytest.approx(score(7, 5), abs=1e-3)
  rotated = apply_rope(query, jnp.asarray([[33]]), inv_freq)
  assert float(jnp.linalg.norm(rotated)) == pytest.approx(float(jnp.linalg.norm(query)), rel=1e-5)
