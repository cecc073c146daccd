"""A tiny random decoder shared by the sampling tests, with its logits sharpened so greedy choices are
decided by wide margins rather than by float rounding."""

import pytest
from flax import nnx

from coars_jax.models import Decoder, get_preset

VOCAB = 61
EOS = 3
PAD = 0
SHARPEN = 10.0


def tiny_config():
  return get_preset(
    'tiny',
    vocab_size=VOCAB,
    embed_dim=32,
    mlp_dim=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    eos_token_ids=(EOS,),
    pad_token_id=PAD,
  )


def sharpened_model(seed: int = 0) -> Decoder:
  model = Decoder(tiny_config(), rngs=nnx.Rngs(seed))
  # Default init gives nearly uniform next-token distributions; a larger output projection spreads the
  # logits. Untied, so the model does not simply predict its last input token again.
  kernel = model.lm_head.kernel
  kernel.set_value(kernel.get_value() * SHARPEN)
  return model


@pytest.fixture(scope='session')
def model():
  return sharpened_model()
