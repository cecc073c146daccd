"""PEFT LoRA folders against Hugging Face peft, without network: tiny random transformers models (Llama, Qwen2,
Qwen3) are saved and loaded by coars_jax, adapters with non-zero B are attached and exported, peft loads them onto
the transformers model and the logits are compared; the folders are then read back into a fresh coars_jax model and
compared again. Also the names and shapes against peft's own save, the one-line errors, and the checkpoint export."""

import json
import os
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from coars_jax.models import LoRAConfig, PeftAdapterError, add_lora, load_hf_checkpoint, load_peft_adapters
from coars_jax.models import save_peft_adapters
from coars_jax.models.lora import adapted_linears
from coars_jax.models.peft_adapters import (
  CONFIG_FILE,
  WEIGHTS_FILE,
  export_checkpoint,
  peft_export_folders,
  peft_tensor_name,
)

torch = pytest.importorskip('torch', reason='PEFT parity tests need torch (pip install torch==2.13.0, CPU wheel)')
transformers = pytest.importorskip('transformers', reason='PEFT parity tests need transformers')
peft = pytest.importorskip('peft', reason='PEFT parity tests need peft (pip install peft==0.18.0 --no-deps)')

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AGENTS = ('recommender', 'user')
VOCAB = 96
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
# Both sides run float32 and differ only in the order of float32 operations (structured dot_generals here, flat
# matmuls in torch): measured at a few 1e-6 on logits of size ~3, so 1e-4 (as in test_hf_checkpoint) leaves room for
# other BLAS builds while a wrong transpose, q/k permutation or scale moves the logits by 1e-2 or more.
ATOL = 1e-4

# Each case: the HF config and the adapters. alpha != r, so that a wrong scale shows; the Qwen2 case adapts the top
# layer only (layers_to_transform) and the Qwen3 case has heads * head_dim != hidden_size (q and o reshapes).
CASES = {
  'llama_all_modules': (
    lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=True),
    LoRAConfig(rank=4, alpha=8.0),
  ),
  'qwen2_top_layer': (
    lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=False),
    LoRAConfig(
      rank=4, alpha=16.0, target_modules=('q_proj', 'k_proj', 'v_proj', 'o_proj', 'down_proj'), layers='top:1'
    ),
  ),
  'qwen3_head_dim': (
    lambda: transformers.Qwen3Config(**COMMON, head_dim=24, tie_word_embeddings=True),
    LoRAConfig(rank=2, alpha=3.0, target_modules=('q_proj', 'k_proj', 'o_proj', 'up_proj')),
  ),
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


def _with_random_adapters(model, lora_config, seed):
  """Attaches both agents' adapters and gives every B (and A) distinct random values, so each adapter changes the
  logits and a swapped agent, matrix or projection would show."""
  add_lora(model, lora_config, list(AGENTS), rngs=nnx.Rngs(seed))
  key = jax.random.key(seed)
  for _, linear in adapted_linears(model):
    key, key_a, key_b = jax.random.split(key, 3)
    a, b = linear.lora.a.get_value(), linear.lora.b.get_value()
    linear.lora.a.set_value(a + 0.05 * jax.random.normal(key_a, a.shape, a.dtype))
    linear.lora.b.set_value(0.1 * jax.random.normal(key_b, b.shape, b.dtype))
  return model


def _tokens(seed=1):
  return np.random.default_rng(seed).integers(0, VOCAB, size=(2, 16))


def _our_logits(model, tokens, adapter=None):
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  logits, _ = model(jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32), adapter=adapter)
  return np.asarray(logits)


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def _peft_model(hf_folder, adapter_folders):
  """The transformers model with every adapter loaded by peft itself."""
  base = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
  names = list(adapter_folders)
  model = peft.PeftModel.from_pretrained(base, str(adapter_folders[names[0]]), adapter_name=names[0]).eval()
  for name in names[1:]:
    model.load_adapter(str(adapter_folders[name]), adapter_name=name)
  return model


@pytest.fixture(scope='module', params=sorted(CASES))
def exported(request, tmp_path_factory):
  """(case, HF folder, coars_jax model with adapters, PEFT folders by agent)."""
  make_config, lora_config = CASES[request.param]
  root = tmp_path_factory.mktemp(request.param)
  _random_hf_model(make_config()).save_pretrained(root / 'hf')
  model = _with_random_adapters(load_hf_checkpoint(root / 'hf'), lora_config, seed=3)
  folders = save_peft_adapters(model, root / 'peft', base_model_name_or_path=str(root / 'hf'))
  return request.param, root / 'hf', model, folders


def test_names_shapes_and_config_match_peft_own_save(exported, tmp_path):
  name, hf_folder, model, folders = exported
  lora_config = CASES[name][1]
  layers = lora_config.layer_indices(model.config.num_layers)
  subset = len(layers) < model.config.num_layers
  reference = peft.get_peft_model(
    transformers.AutoModelForCausalLM.from_pretrained(hf_folder),
    peft.LoraConfig(
      r=lora_config.rank,
      lora_alpha=lora_config.alpha,
      target_modules=list(lora_config.target_modules),
      layers_to_transform=list(layers) if subset else None,
      layers_pattern='layers' if subset else None,
      task_type='CAUSAL_LM',
    ),
  )
  reference.save_pretrained(tmp_path)
  theirs = load_file(tmp_path / WEIGHTS_FILE)
  ours = load_file(folders['recommender'] / WEIGHTS_FILE)
  assert {key: value.shape for key, value in ours.items()} == {key: value.shape for key, value in theirs.items()}
  assert peft_tensor_name(layers[0], lora_config.target_modules[0], 'A') in ours
  chex.assert_shape(ours[peft_tensor_name(layers[0], 'q_proj', 'A')], (lora_config.rank, model.config.embed_dim))
  chex.assert_shape(
    ours[peft_tensor_name(layers[0], 'q_proj', 'B')], (model.config.num_heads * model.config.head_dim, lora_config.rank)
  )
  assert all(value.dtype == np.float32 for value in ours.values())
  their_config = json.loads((tmp_path / CONFIG_FILE).read_text())
  our_config = json.loads((folders['recommender'] / CONFIG_FILE).read_text())
  for field in (
    'peft_type',
    'task_type',
    'r',
    'lora_alpha',
    'layers_to_transform',
    'layers_pattern',
    'bias',
    'use_rslora',
    'use_dora',
  ):
    assert our_config[field] == their_config[field], field
  assert sorted(our_config['target_modules']) == sorted(their_config['target_modules'])
  assert our_config['base_model_name_or_path'] == str(hf_folder)


def test_peft_on_transformers_matches_our_logits(exported):
  _, hf_folder, model, folders = exported
  reference = _peft_model(hf_folder, folders)
  tokens = _tokens()
  base = _our_logits(model, tokens)
  for agent in AGENTS:
    reference.set_adapter(agent)
    ours = _our_logits(model, tokens, adapter=agent)
    chex.assert_shape(ours, (2, 16, VOCAB))
    assert np.abs(ours - base).max() > 1e-2, 'the adapter must change the logits for the comparison to mean anything'
    np.testing.assert_allclose(ours, _hf_logits(reference, tokens), atol=ATOL, rtol=0, err_msg=agent)


def test_import_into_fresh_model_round_trips(exported):
  name, hf_folder, model, folders = exported
  fresh = load_peft_adapters(load_hf_checkpoint(hf_folder), folders)
  assert fresh.adapter_names == AGENTS
  assert fresh.lora_config.rank == model.lora_config.rank
  assert fresh.lora_config.scaling == pytest.approx(model.lora_config.scaling)
  assert fresh.lora_config.target_modules == model.lora_config.target_modules
  num_layers = model.config.num_layers
  assert fresh.lora_config.layer_indices(num_layers) == model.lora_config.layer_indices(num_layers)
  for (path, ours), (_, theirs) in zip(adapted_linears(model), adapted_linears(fresh)):
    np.testing.assert_array_equal(np.asarray(theirs.lora.a[...]), np.asarray(ours.lora.a[...]), err_msg=path)
    np.testing.assert_array_equal(np.asarray(theirs.lora.b[...]), np.asarray(ours.lora.b[...]), err_msg=path)
  reference = _peft_model(hf_folder, folders)
  tokens = _tokens(2)
  for agent in AGENTS:
    reference.set_adapter(agent)
    np.testing.assert_array_equal(_our_logits(fresh, tokens, agent), _our_logits(model, tokens, agent))
    np.testing.assert_allclose(_our_logits(fresh, tokens, agent), _hf_logits(reference, tokens), atol=ATOL, rtol=0)


def test_import_folds_another_alpha_into_b_and_zeroes_what_peft_leaves_out(exported):
  """A run's own adapters (here rank r on every module, alpha 1) take a folder adapting fewer modules with another
  alpha: the loaded adapter still computes what peft computes."""
  name, hf_folder, model, folders = exported
  rank = CASES[name][1].rank
  target = load_hf_checkpoint(hf_folder)
  load_peft_adapters(target, {'user': folders['user']}, lora_config=LoRAConfig(rank=rank, alpha=1.0), rngs=nnx.Rngs(7))
  assert target.adapter_names == ('user',)
  tokens = _tokens(4)
  np.testing.assert_allclose(_our_logits(target, tokens, 'user'), _our_logits(model, tokens, 'user'), atol=1e-5, rtol=0)


def _assert_one_line(error, field):
  message = str(error.value)
  assert isinstance(error.value, ValueError)
  assert '\n' not in message and f"'{field}'" in message, message


def test_rank_mismatch_is_one_line_naming_r(exported):
  name, hf_folder, _, folders = exported
  model = add_lora(
    load_hf_checkpoint(hf_folder), LoRAConfig(rank=CASES[name][1].rank + 1, alpha=2.0), list(AGENTS), rngs=nnx.Rngs(0)
  )
  before = [np.asarray(linear.lora.b[...]) for _, linear in adapted_linears(model)]
  with pytest.raises(PeftAdapterError) as error:
    load_peft_adapters(model, folders)
  _assert_one_line(error, 'r')
  for value, (_, linear) in zip(before, adapted_linears(model)):  # refused before anything was written
    np.testing.assert_array_equal(np.asarray(linear.lora.b[...]), value)


def test_target_module_the_model_lacks_is_one_line_naming_target_modules(exported, tmp_path):
  name, hf_folder, _, folders = exported
  model = add_lora(
    load_hf_checkpoint(hf_folder),
    LoRAConfig(rank=CASES[name][1].rank, alpha=2.0, target_modules=('v_proj',)),
    list(AGENTS),
    rngs=nnx.Rngs(0),
  )
  with pytest.raises(PeftAdapterError) as error:
    load_peft_adapters(model, folders)
  _assert_one_line(error, 'target_modules')
  # A module coars_jax has no adapters for at all (peft allows lm_head) is refused while reading the folder.
  shutil.copytree(folders['user'], tmp_path / 'lm_head')
  config = json.loads((tmp_path / 'lm_head' / CONFIG_FILE).read_text())
  config['target_modules'].append('lm_head')
  (tmp_path / 'lm_head' / CONFIG_FILE).write_text(json.dumps(config))
  with pytest.raises(PeftAdapterError) as error:
    load_peft_adapters(load_hf_checkpoint(hf_folder), {'user': tmp_path / 'lm_head'})
  _assert_one_line(error, 'target_modules')
  assert 'lm_head' in str(error.value)


def test_shape_mismatch_is_one_line_naming_the_tensor(exported, tmp_path):
  name, hf_folder, _, folders = exported
  shutil.copytree(folders['user'], tmp_path / 'wider')
  tensors = load_file(tmp_path / 'wider' / WEIGHTS_FILE)
  layer = CASES[name][1].layer_indices(COMMON['num_hidden_layers'])[0]
  tensor = peft_tensor_name(layer, 'q_proj', 'A')
  tensors[tensor] = np.concatenate([tensors[tensor], tensors[tensor][:, :1]], axis=1)  # in = hidden_size + 1
  save_file(tensors, tmp_path / 'wider' / WEIGHTS_FILE, metadata={'format': 'pt'})
  with pytest.raises(PeftAdapterError) as error:
    load_peft_adapters(load_hf_checkpoint(hf_folder), {'user': tmp_path / 'wider'})
  _assert_one_line(error, tensor)
  assert 'shape' in str(error.value)


def test_unsupported_peft_options_are_refused_by_name(exported, tmp_path):
  _, _, model, folders = exported
  for field, value in (('use_dora', True), ('peft_type', 'LOHA'), ('modules_to_save', ['lm_head'])):
    folder = tmp_path / field
    shutil.copytree(folders['user'], folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    config[field] = value
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(PeftAdapterError) as error:
      load_peft_adapters(model, {'user': folder})
    _assert_one_line(error, field)


def test_export_checkpoint_of_a_warm_start(tmp_path):
  """The CLI over a warm-start folder whose base is frozen: base_model_name_or_path comes from the run's config."""
  from coars_jax.training.warm_start import save_warm_start

  make_config, lora_config = CASES['llama_all_modules']
  _random_hf_model(make_config()).save_pretrained(tmp_path / 'hf')
  model = _with_random_adapters(load_hf_checkpoint(tmp_path / 'hf'), lora_config, seed=5)
  save_warm_start(model, tmp_path / 'warm_start', save_base=False, metadata={'config': {'model': str(tmp_path / 'hf')}})
  env = dict(os.environ, JAX_PLATFORMS='cpu', COARS_COMPILATION_CACHE='off')
  command = [sys.executable, '-m', 'experiments.export_adapters', f'--checkpoint={tmp_path / "warm_start"}']
  result = subprocess.run(
    command + [f'--output={tmp_path / "peft"}'], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
  )
  assert result.returncode == 0, result.stderr[-3000:]
  folders = {agent: tmp_path / 'peft' / agent for agent in AGENTS}
  assert json.loads(result.stdout) == {agent: str(folder) for agent, folder in folders.items()}
  for agent, folder in folders.items():
    assert json.loads((folder / CONFIG_FILE).read_text())['base_model_name_or_path'] == str(tmp_path / 'hf')
    expected = save_peft_adapters(model, tmp_path / 'direct', base_model_name_or_path='')[agent]
    direct = load_file(expected / WEIGHTS_FILE)
    for key, value in load_file(folder / WEIGHTS_FILE).items():
      np.testing.assert_array_equal(value, direct[key], err_msg=key)
  # A folder that is not a checkpoint: one line on stderr, exit status 2.
  result = subprocess.run(
    command[:-1] + [f'--checkpoint={tmp_path / "hf"}', f'--output={tmp_path / "x"}'],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines() if 'error:' in line]
  assert len(errors) == 1 and "'checkpoint'" in errors[0] and 'Traceback' not in result.stderr, result.stderr


def test_export_checkpoint_with_trained_base_writes_the_base(tmp_path):
  """A warm start that trained the base too: the adapters name the base folder written beside them, and peft on
  that folder computes what coars_jax computes."""
  from coars_jax.training.warm_start import save_warm_start

  make_config, lora_config = CASES['qwen2_top_layer']
  _random_hf_model(make_config()).save_pretrained(tmp_path / 'hf')
  model = _with_random_adapters(load_hf_checkpoint(tmp_path / 'hf'), lora_config, seed=6)
  embedding = model.token_embedding.embedding
  embedding.set_value(embedding.get_value() + 0.05)  # stands for a trained base: no longer the HF folder's
  save_warm_start(model, tmp_path / 'warm_start', save_base=True)
  folders = export_checkpoint(tmp_path / 'warm_start', tmp_path / 'peft')
  base = tmp_path / 'peft' / 'base'
  assert all(
    json.loads((folder / CONFIG_FILE).read_text())['base_model_name_or_path'] == str(base)
    for folder in folders.values()
  )
  reference = _peft_model(base, folders)
  tokens = _tokens(5)
  for agent in AGENTS:
    reference.set_adapter(agent)
    np.testing.assert_allclose(_our_logits(model, tokens, agent), _hf_logits(reference, tokens), atol=ATOL, rtol=0)


def test_export_checkpoint_without_a_known_base_names_base_model(tmp_path):
  """The tiny preset has no Hub id: the error names base_model; given one, a bfloat16 export reads back."""
  from coars_jax.models import Decoder, get_preset
  from coars_jax.training.warm_start import save_warm_start

  model = _with_random_adapters(
    Decoder(
      get_preset(
        'tiny', vocab_size=VOCAB, embed_dim=32, mlp_dim=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8
      ),
      rngs=nnx.Rngs(0),
    ),
    LoRAConfig(rank=2, alpha=4.0),
    seed=0,
  )
  save_warm_start(model, tmp_path / 'warm_start', save_base=False, metadata={'config': {'model': 'tiny'}})
  with pytest.raises(PeftAdapterError) as error:
    export_checkpoint(tmp_path / 'warm_start', tmp_path / 'peft')
  _assert_one_line(error, 'base_model')
  folders = export_checkpoint(tmp_path / 'warm_start', tmp_path / 'peft', base_model='my/tiny-base', dtype='bfloat16')
  assert json.loads((folders['user'] / CONFIG_FILE).read_text())['base_model_name_or_path'] == 'my/tiny-base'
  with safe_open(str(folders['user'] / WEIGHTS_FILE), framework='flax') as handle:
    assert {handle.get_tensor(key).dtype for key in handle.keys()} == {jnp.dtype('bfloat16')}
  assert peft_export_folders(tmp_path / 'peft', AGENTS) == folders
  assert peft_export_folders(tmp_path / 'warm_start', AGENTS) is None
  fresh = Decoder(model.config, rngs=nnx.Rngs(1))
  load_peft_adapters(fresh, folders)
  for (path, ours), (_, theirs) in zip(adapted_linears(model), adapted_linears(fresh)):
    np.testing.assert_allclose(np.asarray(theirs.lora.b[...]), np.asarray(ours.lora.b[...]), rtol=1e-2, err_msg=path)


@pytest.mark.slow
def test_smollm2_gguf_adapters_load_on_transformers_gguf_model(tmp_path):
  """A model read from GGUF (q/k rows permuted by llama.cpp, un-permuted by load_gguf) exports q/k adapters in HF's
  row order: peft on transformers' own GGUF load of the same file agrees."""
  pytest.importorskip('gguf', reason='GGUF loading needs the gguf package')
  pytest.importorskip('accelerate', reason='transformers needs accelerate to load GGUF files')
  from coars_jax.models import load_gguf, smollm2_gguf_path

  try:
    gguf_path = smollm2_gguf_path()
  except FileNotFoundError as error:
    pytest.skip(f'SmolLM2 GGUF not available: {error}')
  os.symlink(gguf_path, tmp_path / 'model.gguf')
  model = _with_random_adapters(
    load_gguf(gguf_path), LoRAConfig(rank=4, alpha=8.0, target_modules=('q_proj', 'k_proj'), layers='top:2'), seed=8
  )
  folders = save_peft_adapters(model, tmp_path / 'peft', base_model_name_or_path='HuggingFaceTB/SmolLM2-135M-Instruct')
  base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file='model.gguf', dtype=torch.float32).eval()
  reference = peft.PeftModel.from_pretrained(base, str(folders['recommender']), adapter_name='recommender').eval()
  tokens = np.random.default_rng(9).integers(0, 1000, size=(1, 12))
  ours = _our_logits(model, tokens, 'recommender')
  assert np.abs(ours - _our_logits(model, tokens)).max() > 1e-2
  # 49152-way logits of a 30-layer model: float32 op order accumulates to about 1e-4 here, so 1e-3.
  np.testing.assert_allclose(ours, _hf_logits(reference, tokens), atol=1e-3, rtol=0)


def test_an_evaluation_starts_from_a_folder_of_peft_folders(tmp_path):
  """`eval.experiment.load_agents` reads a folder holding one PEFT folder per agent (what export_adapters writes)
  into the named backbone: the same logits as the exporting model, under each agent's adapter."""
  from coars_jax.models import backbone
  from coars_jax.eval import experiment as eval_experiment
  from tests.conftest import require_files
  from coars_jax.data import lastfm

  root = require_files(lastfm.ITEM_FILE)  # the tiny tokenizer is built from the datasets' titles
  config = eval_experiment.default_config()
  config.data_root, config.allow_download = str(root), False
  spec = backbone.BackboneSpec(
    name='tiny',
    data_root=config.data_root,
    allow_download=False,
    tiny_vocab_size=config.tokenizer_vocab_size,
    seed=config.model_seed,
  )
  base, _ = backbone.load_backbone(spec)
  model = _with_random_adapters(base, LoRAConfig(rank=4, alpha=8.0), seed=7)
  save_peft_adapters(model, tmp_path / 'peft', base_model_name_or_path='tiny')
  config.model, config.checkpoint = 'tiny', str(tmp_path / 'peft')
  loaded, _, adapters = eval_experiment.load_agents(config)
  assert adapters == {agent: agent for agent in AGENTS}
  tokens = _tokens()
  for agent in AGENTS:
    ours, theirs = _our_logits(loaded, tokens, agent), _our_logits(model, tokens, agent)
    np.testing.assert_array_equal(ours, theirs)  # the same weights and the same program: bit for bit
    assert np.abs(ours - _our_logits(loaded, tokens)).max() > 1e-3  # the adapter is really on
