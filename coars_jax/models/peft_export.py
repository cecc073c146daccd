"""Writing a `Decoder`'s LoRA adapters as PEFT folders: `peft_tensors` lays one adapter's a and b out as PEFT's
lora_A [r, in] and lora_B [out, r] under PEFT's tensor names, `peft_config` writes the matching
adapter_config.json fields, and `save_peft_adapter` / `save_peft_adapters` write one folder per adapter name.
`models.peft_adapters` re-exports its public names.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.flax import save_file

from coars_jax.models.decoder import Decoder
from coars_jax.models.lora import TARGET_MODULES, adapted_linears, adapter_index
from coars_jax.models.peft_format import (
  CONFIG_FILE,
  WEIGHTS_FILE,
  PeftAdapterError,
  _dtype,
  _layer_and_module,
  peft_tensor_name,
)


def peft_tensors(model: Decoder, adapter_name: str, dtype: str | None = None) -> dict[str, jax.Array]:
  """The adapter `adapter_name` as PEFT tensors: lora_A.weight [r, in] and lora_B.weight [out, r] per projection.

  Our a[*in_shape, r] and b[r, *out_shape] flatten their structured axes row-major ((heads, head_dim) -> heads *
  head_dim), which is the order of HF's rows and columns (`weight_mapping` reshapes kernels the same way). A model
  loaded from GGUF needs no permutation: `load_gguf` un-permutes llama.cpp's q/k rows into HF's order when it
  reads them, so adapters trained on it already speak HF's convention.
  """
  index = adapter_index(model, adapter_name)
  tensors = {}
  for path, linear in adapted_linears(model):
    layer, module = _layer_and_module(path)
    a, b = linear.lora.a[...][index], linear.lora.b[...][index]
    rank = a.shape[-1]
    tensors[peft_tensor_name(layer, module, 'A')] = a.reshape(-1, rank).T
    tensors[peft_tensor_name(layer, module, 'B')] = b.reshape(rank, -1).T
  if dtype is not None:
    tensors = {name: tensor.astype(_dtype(dtype)) for name, tensor in tensors.items()}
  return tensors


def peft_config(model: Decoder, base_model_name_or_path: str) -> dict[str, Any]:
  """adapter_config.json for the model's adapters. PEFT scales the delta by lora_alpha / r, as `LoRAConfig` does,
  so r and alpha carry over unchanged; `layers_to_transform` lists the adapted layers when not all are."""
  config = model.lora_config
  if config is None:
    raise PeftAdapterError('peft_config: the model has no LoRA adapters; attach them with add_lora first')
  layers = config.layer_indices(model.config.num_layers)
  every_layer = len(layers) == model.config.num_layers
  alpha = int(config.alpha) if float(config.alpha).is_integer() else config.alpha
  return {
    'peft_type': 'LORA',
    'task_type': 'CAUSAL_LM',
    'base_model_name_or_path': base_model_name_or_path,
    'revision': None,
    'r': config.rank,
    'lora_alpha': alpha,
    'lora_dropout': config.dropout,
    'use_rslora': False,
    'target_modules': [name for name in TARGET_MODULES if name in config.target_modules],
    'layers_to_transform': None if every_layer else list(layers),
    'layers_pattern': None if every_layer else 'layers',
    'bias': 'none',
    'fan_in_fan_out': False,
    'use_dora': False,
    'modules_to_save': None,
    'init_lora_weights': True,
    'inference_mode': True,
    'rank_pattern': {},
    'alpha_pattern': {},
  }


def save_peft_adapter(
  model: Decoder,
  adapter_name: str,
  folder: str | os.PathLike,
  *,
  base_model_name_or_path: str,
  dtype: str | None = None,
) -> pathlib.Path:
  """Writes adapter `adapter_name` of `model` as a PEFT LoRA folder; returns its absolute path.

  base_model_name_or_path: the Hub id or folder of the base weights the adapter belongs on.
  dtype: 'float32' or 'bfloat16' for the saved tensors (default: as stored, float32 unless configured otherwise).
  """
  config = peft_config(model, base_model_name_or_path)
  tensors = peft_tensors(model, adapter_name, dtype)
  folder = pathlib.Path(folder).absolute()
  folder.mkdir(parents=True, exist_ok=True)
  # Contiguous host copies: safetensors writes the bytes as laid out, and the transposes above are views.
  save_file(
    {name: jnp.asarray(np.ascontiguousarray(np.asarray(tensor))) for name, tensor in tensors.items()},
    str(folder / WEIGHTS_FILE),
    metadata={'format': 'pt'},
  )
  (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + '\n')
  return folder


def save_peft_adapters(
  model: Decoder, folder: str | os.PathLike, *, base_model_name_or_path: str, dtype: str | None = None
) -> dict[str, pathlib.Path]:
  """Every adapter of `model` as a PEFT folder `<folder>/<adapter name>`; returns name -> absolute folder."""
  if not model.adapter_names:
    raise PeftAdapterError('save_peft_adapters: the model has no LoRA adapters; attach them with add_lora first')
  return {
    name: save_peft_adapter(
      model, name, pathlib.Path(folder) / name, base_model_name_or_path=base_model_name_or_path, dtype=dtype
    )
    for name in model.adapter_names
  }
