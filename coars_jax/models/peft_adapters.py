"""LoRA adapters to and from Hugging Face PEFT folders (`adapter_config.json` + `adapter_model.safetensors`, the
layout `PeftModel.from_pretrained` and LoRA-serving engines read): `save_peft_adapters` writes one folder per named
adapter of a `Decoder` under the tensor names PEFT gives Llama, Qwen2 and Qwen3, `load_peft_adapters` reads such
folders back into a `Decoder` (attaching adapters first when it has none), and `export_checkpoint` turns a warm-start
or RL export folder into PEFT folders. A folder that does not fit the model raises `PeftAdapterError`, one line that
names the config field or tensor at fault."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.flax import save_file

from coars_jax.models.config import DTYPES, DecoderConfig, RopeScaling
from coars_jax.models.decoder import Decoder
from coars_jax.models.lora import (
  ATTENTION_MODULES,
  BASE_PARAMS,
  MLP_MODULES,
  TARGET_MODULES,
  LoRAConfig,
  add_lora,
  adapted_linears,
  adapter_index,
  targeted_linears,
)

CONFIG_FILE = 'adapter_config.json'
WEIGHTS_FILE = 'adapter_model.safetensors'
BASE_DIR = 'base'  # where `export_checkpoint` writes a trained (not frozen) base as an HF folder

# transformers' Llama, Qwen2 and Qwen3 share these module paths. PEFT wraps the causal LM as
# PeftModel.base_model (LoraModel) .model (the CausalLM) .model (the decoder stack), and drops the adapter's own
# name ('default') from every key when it saves, so a saved key reads base_model.model.model.layers.i....
_SECTION = {**{name: 'self_attn' for name in ATTENTION_MODULES}, **{name: 'mlp' for name in MLP_MODULES}}
_TENSOR_NAME = re.compile(
  r'base_model\.model\.model\.layers\.(?P<layer>\d+)\.(?P<section>self_attn|mlp)\.'
  r'(?P<module>[a-z_]+)\.lora_(?P<matrix>[AB])\.weight\Z'
)
# Backbone names of coars_jax's configs whose weights have a Hugging Face Hub id.
HUB_NAMES = {
  'smollm2-135m': 'HuggingFaceTB/SmolLM2-135M-Instruct',
  'smollm2_135m': 'HuggingFaceTB/SmolLM2-135M-Instruct',
}
# PEFT LoRA options this converter cannot express: each must hold one of the listed values (absent counts as the
# first), or the folder is refused by name rather than loaded into something PEFT would compute differently.
_UNSUPPORTED_OPTIONS = {
  'use_dora': (False,),
  'bias': ('none',),
  'fan_in_fan_out': (False,),
  'lora_bias': (False,),
  'modules_to_save': (None, []),
  'rank_pattern': ({}, None),
  'alpha_pattern': ({}, None),
  'layer_replication': (None,),
  'target_parameters': (None, []),
  'trainable_token_indices': (None,),
}


class PeftAdapterError(ValueError):
  """A PEFT folder that this converter cannot read, or whose adapters do not fit the model; the one-line message
  names the folder, the field or tensor, what was expected and what was found."""


def peft_tensor_name(layer: int, module: str, matrix: str) -> str:
  """PEFT's saved name of LoRA matrix `matrix` ('A' or 'B') of projection `module` in decoder layer `layer`."""
  return f'base_model.model.model.layers.{layer}.{_SECTION[module]}.{module}.lora_{matrix}.weight'


# --- export ------------------------------------------------------------------------------------------------------


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


# --- import ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PeftAdapter:
  """One PEFT LoRA folder in memory.

  rank: r; scaling: the factor PEFT applies to B A x (lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora);
  target_modules: the projections it adapts (TARGET_MODULES order); layers: `layers_to_transform`, None for all;
  a, b: PEFT's lora_A [r, in] and lora_B [out, r] per (layer, module) present in the file.
  """

  folder: str
  rank: int
  lora_alpha: float
  scaling: float
  dropout: float
  target_modules: tuple[str, ...]
  layers: tuple[int, ...] | None
  a: Mapping[tuple[int, str], jax.Array]
  b: Mapping[tuple[int, str], jax.Array]


def read_peft_adapter(folder: str | os.PathLike) -> PeftAdapter:
  """Reads and checks a PEFT LoRA folder on its own (the model is checked by `load_peft_adapters`)."""
  folder = pathlib.Path(folder).absolute()
  config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
  for path in (config_path, weights_path):
    if not path.is_file():
      raise PeftAdapterError(
        f'{folder}: {path.name} is missing; expected a PEFT LoRA folder ({CONFIG_FILE} and {WEIGHTS_FILE})'
      )
  try:
    config = json.loads(config_path.read_text())
  except json.JSONDecodeError as error:
    raise PeftAdapterError(f'{config_path}: not valid JSON ({error})') from None
  if not isinstance(config, dict):
    raise PeftAdapterError(f'{config_path}: expected a JSON object, found {type(config).__name__}')

  def field_error(name: str, expected: str) -> PeftAdapterError:
    return PeftAdapterError(f'{config_path}: field {name!r}: expected {expected}, found {config.get(name)!r}')

  if config.get('peft_type') != 'LORA':
    raise field_error('peft_type', "'LORA'")
  for name, accepted in _UNSUPPORTED_OPTIONS.items():
    if config.get(name, accepted[0]) not in accepted:
      raise field_error(name, f'{accepted[0]!r} (this converter reads plain LoRA on the decoder projections)')
  rank = config.get('r')
  if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
    raise field_error('r', 'a positive int')
  alpha = config.get('lora_alpha', 8)  # PEFT's default
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
    raise field_error('lora_alpha', 'a positive number')
  dropout = config.get('lora_dropout', 0.0) or 0.0
  scaling = alpha / math.sqrt(rank) if config.get('use_rslora', False) else alpha / rank
  layers = config.get('layers_to_transform')
  if isinstance(layers, int) and not isinstance(layers, bool):
    layers = [layers]
  if layers is not None and (
    not isinstance(layers, list)
    or not layers
    or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
  ):
    raise field_error('layers_to_transform', 'null, a layer index or a non-empty list of layer indices')
  layers = None if layers is None else tuple(sorted(set(layers)))

  a, b = {}, {}
  with safe_open(str(weights_path), framework='flax') as handle:
    for name in handle.keys():
      found = _TENSOR_NAME.match(name)
      if found is None or _SECTION.get(found['module']) != found['section']:
        raise PeftAdapterError(
          f'{weights_path}: tensor {name!r} is not the lora_A or lora_B of a decoder '
          f'projection (expected names like {peft_tensor_name(0, "q_proj", "A")!r} for the '
          f'modules {list(TARGET_MODULES)})'
        )
      tensor = handle.get_tensor(name)
      key = (int(found['layer']), found['module'])
      rank_axis = 0 if found['matrix'] == 'A' else 1
      if tensor.ndim != 2 or tensor.shape[rank_axis] != rank:
        raise PeftAdapterError(
          f'{weights_path}: tensor {name!r} has shape {tuple(tensor.shape)}, which does not fit '
          f"field 'r' = {rank} of {CONFIG_FILE} (lora_A is [r, in], lora_B [out, r])"
        )
      if layers is not None and key[0] not in layers:
        raise PeftAdapterError(
          f"{weights_path}: tensor {name!r} is for layer {key[0]}, outside field 'layers_to_transform' = {list(layers)}"
        )
      (a if found['matrix'] == 'A' else b)[key] = tensor
  unpaired = sorted(set(a) ^ set(b))
  if unpaired:
    layer, module = unpaired[0]
    matrix = 'B' if (layer, module) in a else 'A'
    raise PeftAdapterError(
      f'{weights_path}: tensor {peft_tensor_name(layer, module, matrix)!r} is missing (each '
      f'adapted projection needs both lora_A and lora_B)'
    )
  if not a:
    raise PeftAdapterError(f'{weights_path}: holds no lora_A / lora_B tensors')

  found_modules = {module for _, module in a}
  targets = config.get('target_modules')
  if isinstance(targets, list):
    unknown = [name for name in targets if name not in TARGET_MODULES]
    if unknown:
      raise PeftAdapterError(
        f"{config_path}: field 'target_modules' names {unknown}, which coars_jax has no "
        f'adapters for; expected names from {list(TARGET_MODULES)}'
      )
    stray = sorted(found_modules - set(targets))
    if stray:
      raise PeftAdapterError(
        f"{config_path}: field 'target_modules' = {targets} omits {stray}, which {WEIGHTS_FILE} holds tensors for"
      )
    targets = set(targets)
  elif isinstance(targets, str):  # a regex or 'all-linear' in PEFT: the tensors say what it matched
    targets = found_modules
  else:
    raise field_error('target_modules', 'a list of module names or a regex string')
  return PeftAdapter(
    folder=str(folder),
    rank=rank,
    lora_alpha=float(alpha),
    scaling=float(scaling),
    dropout=float(dropout),
    target_modules=tuple(name for name in TARGET_MODULES if name in targets),
    layers=layers,
    a=a,
    b=b,
  )


def load_peft_adapters(
  model: Decoder,
  folders: Mapping[str, str | os.PathLike],
  *,
  lora_config: LoRAConfig | None = None,
  rngs: nnx.Rngs | None = None,
) -> Decoder:
  """Loads PEFT LoRA folders into `model`'s adapters, in place: `folders` maps an adapter name (e.g. 'recommender')
  to its folder. Returns `model`.

  A model without adapters first gets them (`add_lora`): with `lora_config` when given (a run's own settings; the
  folders must fit inside it), else with the folders' r, alpha, target modules and layers (their union). A model
  with adapters must already carry every name in `folders` and fit them. Afterwards each named adapter computes
  exactly what PEFT computes on the HF model: projections or layers the folder does not adapt get B = 0 (A keeps its
  initial values, so training can move them), and a folder whose scaling differs from the model's (another alpha,
  or use_rslora) has the ratio folded into B. Raises `PeftAdapterError` naming the field when r, target_modules,
  layers_to_transform or a tensor's shape does not fit the model; nothing is changed then.
  """
  if isinstance(folders, (str, os.PathLike)) or not isinstance(folders, Mapping) or not folders:
    raise PeftAdapterError(
      f'load_peft_adapters: folders: expected a mapping adapter name -> PEFT folder, found {folders!r}'
    )
  adapters = {name: read_peft_adapter(folder) for name, folder in folders.items()}
  if model.adapter_names:
    missing = [name for name in adapters if name not in model.adapter_names]
    if missing:
      raise PeftAdapterError(f'load_peft_adapters: the model has adapters {list(model.adapter_names)}, not {missing}')
    target_config = model.lora_config
  else:
    target_config = lora_config if lora_config is not None else _union_config(adapters)
  for name, adapter in adapters.items():
    _check_fits(model, target_config, adapter, name)
  if not model.adapter_names:
    add_lora(model, target_config, list(adapters), rngs=rngs if rngs is not None else nnx.Rngs(0))
  for name, adapter in adapters.items():
    _write_adapter(model, name, adapter)
  return model


def peft_export_folders(folder: str | os.PathLike, adapter_names: Sequence[str]) -> dict[str, pathlib.Path] | None:
  """{name: <folder>/<name>} when `folder` holds a PEFT folder per adapter name (the layout `save_peft_adapters`
  and experiments.export_adapters write), else None: lets a run or an evaluation tell it from a warm-start folder."""
  folders = {name: pathlib.Path(folder).absolute() / name for name in adapter_names}
  if all((path / CONFIG_FILE).is_file() for path in folders.values()):
    return folders
  return None


def _union_config(adapters: Mapping[str, PeftAdapter]) -> LoRAConfig:
  """One `LoRAConfig` for adapters attached together: a `Decoder`'s adapters share one rank, so the folders must
  agree on r; the first folder's scaling is the model's (the others' ratio goes into their B)."""
  first = next(iter(adapters.values()))
  ranks = {name: adapter.rank for name, adapter in adapters.items()}
  if len(set(ranks.values())) > 1:
    raise PeftAdapterError(
      f"load_peft_adapters: field 'r' differs between the folders ({ranks}); adapters attached together share one rank"
    )
  targets = {module for adapter in adapters.values() for module in adapter.target_modules}
  if any(adapter.layers is None for adapter in adapters.values()):
    layers = 'all'
  else:
    layers = ','.join(str(i) for i in sorted({i for adapter in adapters.values() for i in adapter.layers}))
  return LoRAConfig(
    rank=first.rank,
    alpha=first.scaling * first.rank,
    dropout=first.dropout,
    target_modules=tuple(name for name in TARGET_MODULES if name in targets),
    layers=layers,
  )


def _check_fits(model: Decoder, config: LoRAConfig, adapter: PeftAdapter, name: str) -> None:
  where = f'{adapter.folder} (adapter {name!r})'
  if adapter.rank != config.rank:
    raise PeftAdapterError(
      f"{where}: field 'r' is {adapter.rank} but the model's adapters have rank {config.rank} (LoRAConfig.rank)"
    )
  outside = [module for module in adapter.target_modules if module not in config.target_modules]
  if outside:
    raise PeftAdapterError(
      f"{where}: field 'target_modules' includes {outside}, but the model's adapters cover "
      f'{list(config.target_modules)} only (LoRAConfig.target_modules)'
    )
  num_layers = model.config.num_layers
  # The layers PEFT would change: those with tensors (a layer PEFT adapts without tensors keeps B = 0) and any
  # named explicitly.
  wanted = {layer for layer, _ in adapter.a} | set(adapter.layers or ())
  too_deep = sorted(layer for layer in wanted if layer >= num_layers)
  if too_deep:
    raise PeftAdapterError(
      f"{where}: field 'layers_to_transform' or a tensor names layer {too_deep[-1]}, but the "
      f'model has num_layers={num_layers}'
    )
  adapted = set(config.layer_indices(num_layers))
  if not wanted <= adapted:
    raise PeftAdapterError(
      f"{where}: field 'layers_to_transform' covers layers {sorted(wanted - adapted)} that "
      f'the model has no adapters on (LoRAConfig.layers={config.layers!r})'
    )
  shapes = {_layer_and_module(path): linear for path, linear in targeted_linears(model, TARGET_MODULES)}
  for key in sorted(adapter.a):
    linear = shapes[key]
    expected = {'A': (adapter.rank, math.prod(linear.in_shape)), 'B': (math.prod(linear.out_shape), adapter.rank)}
    for matrix, tensor in (('A', adapter.a[key]), ('B', adapter.b[key])):
      if tuple(tensor.shape) != expected[matrix]:
        raise PeftAdapterError(
          f'{where}: tensor {peft_tensor_name(*key, matrix)!r} has shape {tuple(tensor.shape)}, '
          f'expected {expected[matrix]} for this model; the adapter was trained on another '
          f'base (base_model_name_or_path)'
        )


def _write_adapter(model: Decoder, name: str, adapter: PeftAdapter) -> None:
  index = adapter_index(model, name)
  ratio = adapter.scaling / model.lora_config.scaling
  for path, linear in adapted_linears(model):
    key = _layer_and_module(path)
    stacked_a, stacked_b = linear.lora.a.get_value(), linear.lora.b.get_value()
    if key in adapter.a:
      a = jnp.asarray(adapter.a[key], jnp.float32).T.reshape(stacked_a.shape[1:])
      b = (jnp.asarray(adapter.b[key], jnp.float32) * ratio).T.reshape(stacked_b.shape[1:])
    else:  # PEFT adds nothing here; B = 0 keeps it so while A stays a usable starting point for training
      a = stacked_a[index]
      b = jnp.zeros(stacked_b.shape[1:], stacked_b.dtype)
    linear.lora.a.set_value(stacked_a.at[index].set(a.astype(stacked_a.dtype)))
    linear.lora.b.set_value(stacked_b.at[index].set(b.astype(stacked_b.dtype)))


# --- checkpoints -------------------------------------------------------------------------------------------------


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


def _layer_and_module(path: str) -> tuple[int, str]:
  """'layers.3.attention.q_proj' -> (3, 'q_proj')."""
  parts = path.split('.')
  return int(parts[1]), parts[-1]


def _dtype(name: str) -> jnp.dtype:
  if name not in DTYPES:
    raise PeftAdapterError(f"'dtype': expected one of {DTYPES}, found {name!r}")
  return jnp.dtype(name)
