"""Copy pre-training: the task's rows, its config checks, and that a small random decoder learns to copy."""

import numpy as np
import pytest
from flax import nnx

from coars_jax.models import add_lora
from coars_jax.models.decoder import Decoder
from coars_jax.models.lora import LoRAConfig
from coars_jax.models.presets import get_preset
from coars_jax.training import copy_pretrain as cp
from coars_jax.training import warm_start as ws


def small_decoder(vocab_size=512, seed=0):
  config = get_preset('tiny', vocab_size=vocab_size, embed_dim=64, mlp_dim=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, max_position_embeddings=256)
  return Decoder(config, rngs=nnx.Rngs(seed))


def test_copy_rows_are_seeded_and_in_range():
  rows = cp.copy_rows(np.random.default_rng(3), 4, 10, 264, 300)
  assert rows.shape == (4, 10) and rows.dtype == np.int32
  assert rows.min() >= 264 and rows.max() < 300
  np.testing.assert_array_equal(rows, cp.copy_rows(np.random.default_rng(3), 4, 10, 264, 300))
  with pytest.raises(ValueError, match='low < high'):
    cp.copy_rows(np.random.default_rng(0), 1, 2, 300, 300)


def test_config_checks_name_the_field():
  with pytest.raises(ValueError, match='CopyPretrainConfig.length'):
    cp.CopyPretrainConfig(length=1)
  with pytest.raises(ValueError, match='warmup_steps'):
    cp.CopyPretrainConfig(steps=10, warmup_steps=10)
  with pytest.raises(ValueError, match='train_base'):
    ws.WarmStartConfig(copy_pretrain_steps=100)
  assert ws.WarmStartConfig(copy_pretrain_steps=100, train_base=True).copy_pretrain.steps == 100


def test_refuses_a_model_with_adapters_or_a_too_small_vocab():
  model = small_decoder()
  add_lora(model, LoRAConfig(rank=2, alpha=4.0), ['recommender'], rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='bare base'):
    cp.copy_pretrain(model, cp.CopyPretrainConfig(steps=60, progress=False))
  with pytest.raises(ValueError, match='first_token_id'):
    cp.copy_pretrain(small_decoder(vocab_size=200), cp.CopyPretrainConfig(steps=60, progress=False))


def test_a_random_decoder_learns_to_copy():
  """Before: chance (log V per token). After 250 updates: the repeat is predicted, token by token."""
  model = small_decoder()
  settings = cp.CopyPretrainConfig(steps=250, batch_size=16, length=12, first_token_id=8, learning_rate=1e-2,
                                   warmup_steps=20, progress=False)
  tokens = cp.copy_rows(np.random.default_rng(99), 16, 12, 8, 512)
  loss_before, accuracy_before = (float(v) for v in cp.copy_loss(model, tokens))
  history = cp.copy_pretrain(model, settings)
  loss_after, accuracy_after = (float(v) for v in cp.copy_loss(model, tokens))
  assert len(history) == 250 and history[-1]['seconds'] > 0
  assert loss_before > 5.0 and accuracy_before < 0.05
  assert loss_after < 0.5 and accuracy_after > 0.9, (loss_after, accuracy_after)
