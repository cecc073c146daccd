"""`models.backbone.load_backbone` on HF checkpoint folders that do not hold what they should: a missing config,
weights file or tokenizer, and a tokenizer from another model. Each fails before any weight is read, saying
what does not match."""

import shutil

import pytest
from flax import nnx

from coars_jax.models import backbone
from coars_jax.data import synthetic
from coars_jax.models import hf_checkpoint
from coars_jax.models import tokenizer as tokenizer_lib
from coars_jax.models.decoder import Decoder
from coars_jax.models.presets import get_preset

TOKENIZER_VOCAB = 400


@pytest.fixture(scope='module')
def tokenizer_folder(tmp_path_factory):
  lines = tokenizer_lib.tokenizer_corpus([synthetic.synthetic_dataset().catalog.titles], repeats=2)
  return tokenizer_lib.build_tokenizer(lines, tmp_path_factory.mktemp('tokenizer'), vocab_size=TOKENIZER_VOCAB)


def model_folder(tmp_path, tokenizer_folder, vocab_size):
  """An HF checkpoint folder of a 1-layer decoder with `vocab_size` embeddings and the tokenizer's files."""
  config = get_preset(
    'tiny',
    vocab_size=vocab_size,
    embed_dim=16,
    mlp_dim=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
    max_position_embeddings=64,
  )
  folder = tmp_path / f'model_{vocab_size}'
  hf_checkpoint.save_hf_checkpoint(Decoder(config, rngs=nnx.Rngs(0)), folder)
  for path in tokenizer_folder.iterdir():
    shutil.copy(path, folder / path.name)
  return folder


def test_a_matching_folder_loads(tmp_path, tokenizer_folder):
  model, tokenizer = backbone.load_backbone(
    backbone.BackboneSpec(name=str(model_folder(tmp_path, tokenizer_folder, TOKENIZER_VOCAB + 16)))
  )
  assert model.config.vocab_size == TOKENIZER_VOCAB + 16 and len(tokenizer) == TOKENIZER_VOCAB


def test_a_tokenizer_from_another_model_fails_before_the_weights_are_read(tmp_path, tokenizer_folder, monkeypatch):
  folder = model_folder(tmp_path, tokenizer_folder, 128)
  monkeypatch.setattr(backbone, 'load_hf_checkpoint', lambda *a, **k: pytest.fail('weights were read'))
  with pytest.raises(
    ValueError,
    match=rf'backbone folder {folder} \(config.json\): the tokenizer has '
    rf"{TOKENIZER_VOCAB} tokens but the model's vocab_size is 128",
  ):
    backbone.load_backbone(backbone.BackboneSpec(name=str(folder)))


def test_special_ids_beyond_the_vocabulary_are_named(tokenizer_folder):
  tokenizer = tokenizer_lib.load_tokenizer(tokenizer_folder)
  backbone.check_tokenizer_fits(tokenizer, TOKENIZER_VOCAB, 'here')
  with pytest.raises(ValueError, match='here: the tokenizer has 400 tokens'):
    backbone.check_tokenizer_fits(tokenizer, 3, 'here')

  class Shrunk:  # a tokenizer whose length fits but whose eos id does not
    def __len__(self):
      return 2

    def __getattr__(self, name):
      return getattr(tokenizer, name)

  with pytest.raises(
    ValueError,
    match=r"here: the tokenizer's special ids \{.*'eos/end-of-turn #0': 3.*\} are outside "
    r"the model's vocab_size 3",
  ):
    backbone.check_tokenizer_fits(Shrunk(), 3, 'here')


@pytest.mark.parametrize(
  'remove, error, message',
  [
    ('config.json', FileNotFoundError, 'no config.json at'),
    ('model.safetensors', FileNotFoundError, 'expected model.safetensors or model.safetensors.index.json'),
    ('tokenizer.json', FileNotFoundError, 'holds none of'),
  ],
)
def test_a_missing_file_is_named(tmp_path, tokenizer_folder, monkeypatch, remove, error, message):
  folder = model_folder(tmp_path, tokenizer_folder, TOKENIZER_VOCAB)
  (folder / remove).unlink()
  for name in tokenizer_lib.VOCABULARY_FILES if remove == 'tokenizer.json' else ():
    (folder / name).unlink(missing_ok=True)
  monkeypatch.setattr(backbone, 'load_hf_checkpoint', lambda *a, **k: pytest.fail('weights were read'))
  with pytest.raises(error, match=message):
    backbone.load_backbone(backbone.BackboneSpec(name=str(folder)))


def test_a_damaged_shard_index_is_named(tmp_path, tokenizer_folder):
  folder = model_folder(tmp_path, tokenizer_folder, TOKENIZER_VOCAB)
  (folder / hf_checkpoint.INDEX_FILE).write_text('{"weight_map": ')
  with pytest.raises(ValueError, match=r'model.safetensors.index.json: not a JSON object'):
    hf_checkpoint.check_checkpoint_folder(folder)
