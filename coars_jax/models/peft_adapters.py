"""LoRA adapters to and from Hugging Face PEFT folders (`adapter_config.json` + `adapter_model.safetensors`, the
layout `PeftModel.from_pretrained` and LoRA-serving engines read): `save_peft_adapters` writes one folder per named
adapter of a `Decoder` under the tensor names PEFT gives Llama, Qwen2 and Qwen3, `load_peft_adapters` reads such
folders back into a `Decoder` (attaching adapters first when it has none), and `export_checkpoint` turns a warm-start
or RL export folder into PEFT folders. A folder that does not fit the model raises `PeftAdapterError`, one line that
names the config field or tensor at fault.

The converter lives in three modules, re-exported here (import from this one): `peft_format` (file and tensor
names, `PeftAdapterError`), `peft_export` (`save_peft_adapters` and the tensors and config it writes) and
`peft_import` (`read_peft_adapter`, `load_peft_adapters`, `peft_export_folders`). This module keeps the checkpoint
conversion (`export_checkpoint`)."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

from flax import nnx

from coars_jax.models.config import DecoderConfig, RopeScaling
from coars_jax.models.decoder import Decoder
from coars_jax.models.lora import BASE_PARAMS
from coars_jax.models.peft_export import peft_config, peft_tensors, save_peft_adapter, save_peft_adapters
from coars_jax.models.peft_format import CONFIG_FILE, WEIGHTS_FILE, PeftAdapterError, _dtype, peft_tensor_name
from coars_jax.models.peft_import import PeftAdapter, load_peft_adapters, peft_export_folders, read_peft_adapter

__all__ = [
  'BASE_DIR',
  'CONFIG_FILE',
  'HUB_NAMES',
  'WEIGHTS_FILE',
  'PeftAdapter',
  'PeftAdapterError',
  'export_checkpoint',
  'load_peft_adapters',
  'peft_config',
  'peft_export_folders',
  'peft_tensor_name',
  'peft_tensors',
  'read_peft_adapter',
  'save_peft_adapter',
  'save_peft_adapters',
]

BASE_DIR = 'base'  # where `export_checkpoint` writes a trained (not frozen) base as an HF folder
# Backbone names of coars_jax's configs whose weights have a Hugging Face Hub id.
HUB_NAMES = {
  'smollm2-135m': 'HuggingFaceTB/SmolLM2-135M-Instruct',
  'smollm2_135m': 'HuggingFaceTB/SmolLM2-135M-Instruct',
}


def export_checkpoint(
  checkpoint: str | os.PathLike, output: str | os.PathLike, *, base_model: str | None = None, dtype: str | None = None
) -> dict[str, pathlib.Path]:
  """PEFT folders `<output>/<agent>` for every adapter of a warm-start folder (`training.warm_start.save_warm_start`:
  an SFT warm start, or an RL run's `final/` or `best/`). Returns adapter name -> folder.

  base_model: the base's Hub id or folder for base_model_name_or_path; by default read from the run's config
    (`model` in warm_start.json's config, or in the run's `config.json` beside the folder): a folder stays a folder,
    'smollm2-135m' becomes its Hub id. A checkpoint whose base weights were trained too is exported with that base
    as an HF folder `<output>/base`, which the adapters then name.
  """
  from coars_jax.training import warm_start as warm_start_lib  # the folder format belongs to the trainer

  checkpoint = pathlib.Path(checkpoint).absolute()
  output = pathlib.Path(output).absolute()
  meta_path = checkpoint / warm_start_lib.META_FILE
  if not meta_path.is_file():
    raise PeftAdapterError(
      f"'checkpoint': {checkpoint} holds no {warm_start_lib.META_FILE}; expected a folder "
      f"written by experiments.warm_start or an RL run's final/ or best/"
    )
  if dtype is not None:
    _dtype(dtype)
  meta = json.loads(meta_path.read_text())
  if meta['base_saved']:
    model, _ = warm_start_lib.load_warm_start(checkpoint)
  else:
    # Only the adapters are read: the base stays abstract (shapes only), so no base weights are loaded.
    config = _decoder_config(meta['decoder_config'])
    model, _ = warm_start_lib.load_warm_start(checkpoint, nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
  if meta['base_saved']:
    from coars_jax.models.hf_checkpoint import save_hf_checkpoint

    base_folder = output / BASE_DIR
    save_hf_checkpoint(_base_only(model), base_folder, dtype=dtype)
    name = base_model or str(base_folder)
  else:
    name = base_model or _base_model_name(checkpoint, meta)
  return save_peft_adapters(model, output, base_model_name_or_path=name, dtype=dtype)


def _base_model_name(checkpoint: pathlib.Path, meta: dict[str, Any]) -> str:
  backbone = (meta.get('config') or {}).get('model')
  run_config = checkpoint.parent / 'config.json'  # an RL run's workdir keeps its whole config there
  if backbone is None and run_config.is_file():
    backbone = json.loads(run_config.read_text()).get('model')
  if backbone is None:
    raise PeftAdapterError(
      f"{checkpoint}: 'base_model' is needed: the run does not record its backbone; pass "
      f'the Hub id or folder of the base it was trained on (--base_model)'
    )
  if backbone in HUB_NAMES:
    return HUB_NAMES[backbone]
  if pathlib.Path(backbone).is_dir():
    return str(pathlib.Path(backbone).absolute())
  raise PeftAdapterError(
    f"{checkpoint}: 'base_model' is needed: the run's backbone {backbone!r} has no Hugging "
    f'Face counterpart; pass the Hub id or folder of the base it was trained on (--base_model)'
  )


def _decoder_config(fields: Mapping[str, Any]) -> DecoderConfig:
  fields = dict(fields)
  fields['eos_token_ids'] = tuple(fields['eos_token_ids'])
  if fields.get('rope_scaling') is not None:
    fields['rope_scaling'] = RopeScaling(**fields['rope_scaling'])
  return DecoderConfig(**fields)


def _base_only(model: Decoder) -> Decoder:
  """The model's base parameters in a `Decoder` without adapters (the same arrays, not copies)."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Decoder(model.config, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, nnx.state(model, BASE_PARAMS))
