"""Adapter-only Orbax checkpoints: a round trip into a freshly loaded base reproduces the logits exactly,
only adapter arrays are written, and checkpoints that do not fit the model are refused by name."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import orbax.checkpoint as ocp
from flax import nnx

from coars_jax.models import (
  Decoder,
  DecoderConfig,
  LoRAConfig,
  add_lora,
  load_adapters,
  load_hf_checkpoint,
  save_adapters,
  save_hf_checkpoint,
)
from coars_jax.models.adapter_checkpoint import ADAPTERS_ITEM
from coars_jax.models.lora import targeted_linears

CONFIG = DecoderConfig(
  architecture='llama',
  vocab_size=48,
  embed_dim=24,
  mlp_dim=40,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=6,
  tie_word_embeddings=True,
)
LORA = LoRAConfig(rank=3, alpha=6.0, target_modules=('q_proj', 'v_proj', 'o_proj', 'down_proj'))
NAMES = ('recommender', 'user')

forward = nnx.jit(lambda model, tokens, positions, adapter_ids: model(tokens, positions, adapter=adapter_ids)[0])


def _trained_model():
  """A base plus two adapters whose A and B are both random, as after some training."""
  model = add_lora(Decoder(CONFIG, rngs=nnx.Rngs(0)), LORA, NAMES, rngs=nnx.Rngs(1))
  keys = iter(jax.random.split(jax.random.key(7), 64))
  for _, linear in targeted_linears(model, LORA.target_modules):
    linear.lora.b.set_value(0.3 * jax.random.normal(next(keys), linear.lora.b.get_value().shape))
  return model


def _batch():
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, CONFIG.vocab_size, size=(3, 5)), jnp.int32)
  return tokens, jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (3, 5))


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """(folder of the base as an HF checkpoint, folder of the adapters, the trained model's logits)."""
  root = tmp_path_factory.mktemp('adapters')
  save_hf_checkpoint(Decoder(CONFIG, rngs=nnx.Rngs(0)), root / 'base')
  model = _trained_model()
  logits = np.asarray(forward(model, *_batch(), jnp.asarray([0, 1, -1], jnp.int32)))
  adapters = save_adapters(model, root / 'adapters')
  return root / 'base', adapters, logits


def test_round_trip_into_a_fresh_base_reproduces_logits_exactly(saved):
  base_folder, adapters, logits = saved
  assert os.path.isabs(adapters)
  model = load_adapters(load_hf_checkpoint(base_folder), adapters)
  assert model.adapter_names == NAMES and model.lora_config == LORA
  restored = np.asarray(forward(model, *_batch(), jnp.asarray([0, 1, -1], jnp.int32)))
  np.testing.assert_array_equal(restored, logits)
  assert np.abs(restored[0] - restored[2]).max() > 1e-3  # the adapters were really restored, not re-initialised


def test_restoring_into_a_model_with_matching_adapters_overwrites_them(saved):
  base_folder, adapters, logits = saved
  model = add_lora(load_hf_checkpoint(base_folder), LORA, NAMES, rngs=nnx.Rngs(5))
  load_adapters(model, adapters)
  np.testing.assert_array_equal(np.asarray(forward(model, *_batch(), jnp.asarray([0, 1, -1], jnp.int32))), logits)


def test_checkpoint_holds_adapters_and_metadata_only(saved):
  _, adapters, _ = saved
  # The stored array tree is exactly the LoRA parameters: same paths, same shapes, no base weight. (Comparing
  # folder sizes with the base instead would count Orbax's own metadata, whose size varies with the path.)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    stored = checkpointer.restore(adapters, args=ocp.args.Composite(**{ADAPTERS_ITEM: ocp.args.StandardRestore()}))[
      ADAPTERS_ITEM
    ]
  stored_shapes = {
    tuple(str(getattr(k, 'key', k)) for k in path): np.shape(leaf)
    for path, leaf in jax.tree_util.tree_leaves_with_path(stored)
  }
  reference = add_lora(Decoder(CONFIG, rngs=nnx.Rngs(0)), LORA, NAMES, rngs=nnx.Rngs(1))
  lora_shapes = {
    tuple(str(k) for k in path): variable.get_value().shape
    for path, variable in nnx.to_flat_state(nnx.state(reference, nnx.LoRAParam))
  }
  assert stored_shapes == lora_shapes
  base_elements = sum(x.size for x in jax.tree.leaves(nnx.state(reference, nnx.Param)))
  assert sum(np.prod(shape) for shape in stored_shapes.values()) < base_elements
  metadata_files = [
    os.path.join(folder, name)
    for folder, _, names in os.walk(adapters)
    for name in names
    if folder.endswith('lora_metadata')
  ]
  assert metadata_files
  with open(metadata_files[0]) as handle:
    metadata = json.load(handle)
  assert metadata['adapter_names'] == list(NAMES)
  assert metadata['lora_config'] == LORA.to_dict()
  assert metadata['base']['projections']['layers.1.attention.o_proj'] == {'in_shape': [4, 6], 'out_shape': [24]}


def test_mismatched_rank_targets_or_base_are_refused(saved, tmp_path):
  base_folder, adapters, _ = saved
  other_rank = add_lora(
    load_hf_checkpoint(base_folder),
    LoRAConfig(rank=2, alpha=6.0, target_modules=LORA.target_modules),
    NAMES,
    rngs=nnx.Rngs(0),
  )
  with pytest.raises(ValueError, match=r"LoRAConfig differs from the model's in \['rank'\]"):
    load_adapters(other_rank, adapters)
  other_targets = add_lora(load_hf_checkpoint(base_folder), LoRAConfig(rank=3, alpha=6.0), NAMES, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"differs from the model's in \['target_modules'\]"):
    load_adapters(other_targets, adapters)
  other_names = add_lora(load_hf_checkpoint(base_folder), LORA, ('user', 'recommender'), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"holds adapters \('recommender', 'user'\); the model has"):
    load_adapters(other_names, adapters)
  wider = Decoder(CONFIG.replace(head_dim=8), rngs=nnx.Rngs(0))
  with pytest.raises(
    ValueError,
    match=r'layers.0.attention.q_proj had in_shape \[24\] and out_shape \[4, 6\].*'
    r"the model's is in_shape \[24\] and out_shape \[4, 8\]",
  ):
    load_adapters(wider, adapters)
  deeper = Decoder(CONFIG.replace(num_layers=3), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='num_layers=2; the model has num_layers=3'):
    load_adapters(deeper, adapters)
  assert not wider.adapter_names and not deeper.adapter_names  # refused before anything was attached


def test_save_refuses_to_overwrite_and_a_model_without_adapters(saved, tmp_path):
  _, adapters, _ = saved
  with pytest.raises(FileExistsError, match='pass overwrite=True'):
    save_adapters(_trained_model(), adapters)
  with pytest.raises(ValueError, match='has no LoRA adapters'):
    save_adapters(Decoder(CONFIG, rngs=nnx.Rngs(0)), tmp_path / 'none')
  with pytest.raises(FileNotFoundError, match='is not a directory'):
    load_adapters(Decoder(CONFIG, rngs=nnx.Rngs(0)), tmp_path / 'missing')


def test_overwrite_replaces_the_adapters(tmp_path):
  model = _trained_model()
  save_adapters(model, tmp_path / 'a')
  zeroed = _trained_model()
  for _, linear in targeted_linears(zeroed, LORA.target_modules):
    linear.lora.b.set_value(jnp.zeros_like(linear.lora.b.get_value()))
  save_adapters(zeroed, tmp_path / 'a', overwrite=True)
  restored = load_adapters(Decoder(CONFIG, rngs=nnx.Rngs(0)), tmp_path / 'a')
  assert not np.asarray(restored.layers[0].attention.q_proj.lora.b.get_value()).any()
