"""Reading PEFT LoRA folders into a `Decoder`: `read_peft_adapter` checks one folder on its own (config fields,
options this converter cannot express, tensor names and shapes) into a `PeftAdapter`, `load_peft_adapters` checks
the folders against the model (rank, target modules, layers, shapes), attaches adapters when the model has none and
writes each folder's A and B into its named adapter (folding a differing scaling into B), and
`peft_export_folders` tells a folder of PEFT folders from a warm-start folder. `models.peft_adapters` re-exports its
public names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from safetensors import safe_open

from coars_jax.models.decoder import Decoder
from coars_jax.models.lora import TARGET_MODULES, LoRAConfig, add_lora, adapted_linears, adapter_index, targeted_linears
from coars_jax.models.peft_format import (
  _SECTION,
  _TENSOR_NAME,
  CONFIG_FILE,
  WEIGHTS_FILE,
  PeftAdapterError,
  _layer_and_module,
  peft_tensor_name,
)

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
