"""A tiny random decoder with two LoRA adapters (recommender 0, user 1) whose B matrices are random, so that
adapters change the scores and gradients reach both A and B."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coars_jax.models import Decoder, LoRAConfig, add_lora, get_preset
from coars_jax.models.lora import adapted_linears

VOCAB = 64
PAD = 0
ADAPTER_NAMES = ('recommender', 'user')


def tiny_model(seed: int = 0) -> Decoder:
  config = get_preset(
    'tiny',
    vocab_size=VOCAB,
    embed_dim=32,
    mlp_dim=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    pad_token_id=PAD,
  )
  model = add_lora(
    Decoder(config, rngs=nnx.Rngs(seed)), LoRAConfig(rank=4, alpha=8.0), ADAPTER_NAMES, rngs=nnx.Rngs(seed + 1)
  )
  # numpy draws: a jax.random call per projection shape would compile one small program each.
  rng = np.random.default_rng(seed + 2)
  for _, linear in adapted_linears(model):
    b = linear.lora.b.get_value()
    linear.lora.b.set_value(jnp.asarray(0.3 * rng.standard_normal(b.shape), b.dtype))
  return model


@pytest.fixture(scope='session')
def shared_model() -> Decoder:
  """Built once per session (eager initialisation compiles many small programs); tests that update parameters
  take `nnx.clone` of it."""
  return tiny_model()
