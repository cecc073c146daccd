"""Parity with HF transformers, without network: tiny random transformers models are built here, saved,
loaded by coars_jax, compared on logits and greedy generations, exported back and reloaded by transformers."""

import json
import os

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from coars_jax.models import init_cache, load_hf_checkpoint, save_hf_checkpoint

torch = pytest.importorskip('torch', reason='HF parity tests need torch (pip install torch==2.13.0, CPU wheel)')
transformers = pytest.importorskip('transformers', reason='HF parity tests need transformers')

VOCAB = 96
NEW_TOKENS = 8
COMMON = dict(
  vocab_size=VOCAB,
  hidden_size=64,
  intermediate_size=112,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=256,
  bos_token_id=None,
  eos_token_id=None,
  pad_token_id=0,
)

CASES = {
  'llama_tied_gqa': lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=True),
  'llama_llama3_rope_biases': lambda: transformers.LlamaConfig(
    **COMMON,
    tie_word_embeddings=False,
    attention_bias=True,
    mlp_bias=True,
    rope_parameters={
      'rope_type': 'llama3',
      'rope_theta': 10000.0,
      'factor': 8.0,
      'low_freq_factor': 1.0,
      'high_freq_factor': 4.0,
      'original_max_position_embeddings': 16,
    },
  ),
  'llama_linear_rope': lambda: transformers.LlamaConfig(
    **COMMON, tie_word_embeddings=False, rope_parameters={'rope_type': 'linear', 'rope_theta': 500.0, 'factor': 2.0}
  ),
  'qwen2_qkv_bias': lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=False),
  'qwen3_qk_norm_tied': lambda: transformers.Qwen3Config(**COMMON, head_dim=24, tie_word_embeddings=True),
}
CAUSAL_LM = {
  'llama': transformers.LlamaForCausalLM,
  'qwen2': transformers.Qwen2ForCausalLM,
  'qwen3': transformers.Qwen3ForCausalLM,
}


def _random_hf_model(hf_config):
  torch.manual_seed(0)
  model = CAUSAL_LM[hf_config.model_type](hf_config).eval()
  with torch.no_grad():
    # HF initialises norms to 1 and biases to 0; perturb everything so a mis-mapped tensor shows up.
    for parameter in model.parameters():
      parameter.add_(0.1 * torch.randn_like(parameter))
  return model


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def _our_logits(model, tokens):
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  logits, _ = model(jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32))
  return np.asarray(logits)


def _greedy_with_cache(model, tokens, attention_mask, steps):
  """Greedy decoding of a left-padded batch: one prefill, then one cached step per token."""
  batch, length = tokens.shape
  positions = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)
  cache = init_cache(model.config, batch, length + steps)
  logits, cache = model(
    jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32), jnp.asarray(attention_mask, jnp.int32), cache
  )
  next_positions = positions[:, -1:] + 1
  generated = []
  for _ in range(steps):
    next_tokens = np.asarray(jnp.argmax(logits[:, -1], axis=-1))[:, None]
    generated.append(next_tokens)
    logits, cache = model(
      jnp.asarray(next_tokens, jnp.int32),
      jnp.asarray(next_positions, jnp.int32),
      jnp.ones((batch, 1), jnp.int32),
      cache,
    )
    next_positions = next_positions + 1
  return np.concatenate(generated, axis=1)


@pytest.fixture(scope='module', params=sorted(CASES))
def saved_case(request, tmp_path_factory):
  hf_model = _random_hf_model(CASES[request.param]())
  folder = tmp_path_factory.mktemp(request.param)
  # Sharded saves exercise model.safetensors.index.json; the qwen3 case keeps a single file.
  shard = None if request.param.startswith('qwen3') else '40KB'
  hf_model.save_pretrained(folder, max_shard_size=shard) if shard else hf_model.save_pretrained(folder)
  return request.param, hf_model, folder


def test_checkpoint_layout_matches_case(saved_case):
  name, _, folder = saved_case
  sharded = os.path.isfile(folder / 'model.safetensors.index.json')
  assert sharded == (not name.startswith('qwen3'))
  if sharded:
    assert len(set(json.loads((folder / 'model.safetensors.index.json').read_text())['weight_map'].values())) > 1


def test_logits_match_transformers(saved_case):
  _, hf_model, folder = saved_case
  model = load_hf_checkpoint(folder)
  tokens = np.random.default_rng(1).integers(0, VOCAB, size=(2, 24))
  ours = _our_logits(model, tokens)
  chex.assert_shape(ours, (2, 24, VOCAB))
  np.testing.assert_allclose(ours, _hf_logits(hf_model, tokens), atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers_generate(saved_case):
  _, hf_model, folder = saved_case
  model = load_hf_checkpoint(folder)
  rng = np.random.default_rng(2)
  lengths = [5, 9, 7]
  width = max(lengths)
  tokens = np.zeros((len(lengths), width), np.int64)
  attention_mask = np.zeros_like(tokens)
  for row, length in enumerate(lengths):  # left padding, prompts of different lengths
    tokens[row, width - length :] = rng.integers(1, VOCAB, size=length)
    attention_mask[row, width - length :] = 1
  with torch.no_grad():
    expected = hf_model.generate(
      torch.tensor(tokens),
      attention_mask=torch.tensor(attention_mask),
      max_new_tokens=NEW_TOKENS,
      do_sample=False,
      pad_token_id=0,
    )
  expected = expected[:, width:].numpy()
  ours = _greedy_with_cache(model, tokens, attention_mask, NEW_TOKENS)
  np.testing.assert_array_equal(ours, expected)


def test_export_reloads_in_transformers_with_same_logits(saved_case, tmp_path):
  name, hf_model, folder = saved_case
  model = load_hf_checkpoint(folder)
  shard_bytes = 30_000 if name.startswith('llama_tied') else None
  written = save_hf_checkpoint(model, tmp_path, max_shard_bytes=shard_bytes)
  assert ('model.safetensors.index.json' in written) == (shard_bytes is not None)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
  assert type(reloaded) is type(hf_model)
  tokens = np.random.default_rng(3).integers(0, VOCAB, size=(2, 16))
  np.testing.assert_allclose(_hf_logits(reloaded, tokens), _hf_logits(hf_model, tokens), atol=1e-5, rtol=0)
  original = hf_model.state_dict()
  for key, value in reloaded.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), original[key].numpy(), err_msg=key)
  again = load_hf_checkpoint(tmp_path)
  np.testing.assert_array_equal(_our_logits(again, tokens), _our_logits(model, tokens))


def test_bfloat16_load_keeps_logits_close(saved_case):
  _, hf_model, folder = saved_case
  model = load_hf_checkpoint(folder, param_dtype='bfloat16', compute_dtype='bfloat16')
  tokens = np.random.default_rng(4).integers(0, VOCAB, size=(1, 12))
  positions = jnp.arange(12, dtype=jnp.int32)[None]
  logits, _ = model(jnp.asarray(tokens, jnp.int32), positions)
  chex.assert_type(logits, jnp.bfloat16)
  reference = _hf_logits(hf_model, tokens)
  error = np.abs(np.asarray(logits, np.float32) - reference).max()
  assert error < 0.1 * np.abs(reference).max(), error


def test_missing_weights_file_names_folder(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps(CASES['llama_tied_gqa']().to_dict()))
  with pytest.raises(FileNotFoundError, match='model.safetensors'):
    load_hf_checkpoint(tmp_path)


@pytest.mark.parametrize(
  'architecture, flags, message',
  [
    ('llama', dict(qk_norm=True), 'Llama has no q/k norm'),
    ('llama', dict(qkv_bias=True, out_bias=False), "Llama's attention_bias covers q, k, v and o together"),
    ('qwen2', dict(qkv_bias=True, out_bias=True), 'Qwen2 has no o or MLP bias'),
    ('qwen2', dict(qkv_bias=True, mlp_bias=True), 'Qwen2 has no o or MLP bias'),
    ('qwen2', dict(qkv_bias=False), 'Qwen2 always has q, k, v biases'),
    ('qwen3', dict(qk_norm=False), 'Qwen3 always norms q and k'),
  ],
)
def test_export_refuses_flags_its_family_cannot_hold(architecture, flags, message, tmp_path):
  from flax import nnx
  from coars_jax.models import Decoder, get_preset

  config = get_preset(
    'tiny', vocab_size=VOCAB, embed_dim=32, mlp_dim=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8
  ).replace(
    architecture=architecture, **{'qk_norm': architecture == 'qwen3', 'qkv_bias': architecture == 'qwen2', **flags}
  )
  with pytest.raises(ValueError, match=message):
    save_hf_checkpoint(Decoder(config, rngs=nnx.Rngs(0)), tmp_path)
  assert not any(tmp_path.iterdir())  # refused before writing anything
