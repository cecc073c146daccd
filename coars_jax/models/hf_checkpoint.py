"""Reading and writing HF transformers checkpoint folders: config.json plus safetensors, either one
`model.safetensors` or shards listed in `model.safetensors.index.json`. The folder written by
`save_hf_checkpoint` loads with `transformers.AutoModelForCausalLM.from_pretrained(folder)` as is."""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
from safetensors import safe_open
from safetensors.flax import save_file

from coars_jax.models.config import DecoderConfig
from coars_jax.models.decoder import Decoder
from coars_jax.models.weight_mapping import HFTensor, hf_tensors_from_model, model_from_hf_tensors

SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
CONFIG_FILE = 'config.json'


def load_hf_checkpoint(
  folder: str | os.PathLike, config: DecoderConfig | None = None, **config_overrides: Any
) -> Decoder:
  """A `Decoder` with the weights of the HF checkpoint in `folder`.

  config: defaults to `DecoderConfig.from_hf(folder, **config_overrides)`; pass one to choose dtypes
  (e.g. `param_dtype="bfloat16"`) without editing config.json.
  """
  folder = os.fspath(folder)
  if config is None:
    config = DecoderConfig.from_hf(folder, **config_overrides)
  elif config_overrides:
    config = config.replace(**config_overrides)
  return model_from_hf_tensors(config, _checkpoint_tensors(folder), origin=folder)


def hf_export_problems(config) -> list[str]:
  """Why transformers would rebuild a DIFFERENT model from `config`'s export (empty when it fits its family):
  each HF family hard-codes some of the flags this decoder leaves free."""
  problems = []
  family = config.architecture
  if family == 'llama':
    if config.qk_norm:
      problems.append('Llama has no q/k norm (qk_norm=True)')
    if config.qkv_bias != config.out_bias:
      problems.append("Llama's attention_bias covers q, k, v and o together (qkv_bias != out_bias)")
  elif family == 'qwen2':
    if not config.qkv_bias:
      problems.append('Qwen2 always has q, k, v biases (qkv_bias=False)')
    if config.out_bias or config.mlp_bias:
      problems.append('Qwen2 has no o or MLP bias (out_bias or mlp_bias is True)')
    if config.qk_norm:
      problems.append('Qwen2 has no q/k norm (qk_norm=True)')
  elif family == 'qwen3':
    if not config.qk_norm:
      problems.append('Qwen3 always norms q and k (qk_norm=False)')
    if config.mlp_bias:
      problems.append('Qwen3 has no MLP bias (mlp_bias=True)')
    if config.qkv_bias != config.out_bias:
      problems.append("Qwen3's attention_bias covers q, k, v and o together (qkv_bias != out_bias)")
  return problems


def save_hf_checkpoint(
  model: Decoder,
  folder: str | os.PathLike,
  *,
  dtype: str | None = None,
  max_shard_bytes: int | None = None,
  merge_adapter: str | None = None,
) -> list[str]:
  """Writes config.json and safetensors for `model` into `folder`; returns the files written.

  dtype: "float32" or "bfloat16" for the saved tensors (default: the model's param_dtype).
  max_shard_bytes: split tensors over several files plus an index once a file would exceed this size.
  merge_adapter: the name of a LoRA adapter to merge into the base weights before saving; required when the
    model carries adapters, since HF checkpoints have no place for them.
  Raises ValueError when the config's flags do not fit its HF family (`hf_export_problems`).
  """
  problems = hf_export_problems(model.config)
  if problems:
    raise ValueError(
      f'save_hf_checkpoint: a {model.config.architecture} config.json cannot describe this model '
      f'({"; ".join(problems)}); transformers would load it as a different model. Export with an '
      f"architecture whose flags fit, or keep the project's own checkpoint format"
    )
  if merge_adapter is not None:
    from coars_jax.models.lora import merge_lora  # lora imports this module's neighbours; avoid a cycle

    model = merge_lora(model, merge_adapter)
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  config = model.config if dtype is None else model.config.replace(param_dtype=dtype)
  tensors = hf_tensors_from_model(model, jnp.dtype(config.param_dtype))
  with open(os.path.join(folder, CONFIG_FILE), 'w') as handle:
    json.dump(config.to_hf_dict(), handle, indent=2)
  written = [CONFIG_FILE]
  shards = _split_into_shards(tensors, max_shard_bytes)
  if len(shards) == 1:
    save_file(shards[0], os.path.join(folder, SINGLE_FILE), metadata={'format': 'pt'})
    return written + [SINGLE_FILE]
  weight_map = {}
  for number, shard in enumerate(shards, start=1):
    filename = f'model-{number:05d}-of-{len(shards):05d}.safetensors'
    save_file(shard, os.path.join(folder, filename), metadata={'format': 'pt'})
    weight_map.update({name: filename for name in shard})
    written.append(filename)
  total = sum(int(tensor.size) * tensor.dtype.itemsize for tensor in tensors.values())
  with open(os.path.join(folder, INDEX_FILE), 'w') as handle:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, handle, indent=2)
  return written + [INDEX_FILE]


def _split_into_shards(tensors: dict, max_shard_bytes: int | None) -> list[dict]:
  if max_shard_bytes is None:
    return [tensors]
  shards: list[dict] = [{}]
  shard_bytes = 0
  for name, tensor in tensors.items():
    size = int(tensor.size) * tensor.dtype.itemsize
    if shards[-1] and shard_bytes + size > max_shard_bytes:
      shards.append({})
      shard_bytes = 0
    shards[-1][name] = tensor
    shard_bytes += size
  return shards


def check_checkpoint_folder(folder: str | os.PathLike) -> DecoderConfig:
  """The config of the HF checkpoint in `folder`, after checking that every weights file it needs is there; reads
  no tensor, so a caller can compare the config with a tokenizer before loading gigabytes."""
  folder = os.fspath(folder)
  config = DecoderConfig.from_hf(folder)
  _weight_files(folder)
  return config


def _weight_files(folder: str) -> list[str]:
  """The safetensors files of `folder`: the shards its index lists (each must exist), or the single file."""
  index_path = os.path.join(folder, INDEX_FILE)
  if os.path.isfile(index_path):
    try:
      with open(index_path) as handle:
        weight_map = json.load(handle).get('weight_map')
    except (json.JSONDecodeError, AttributeError) as error:
      raise ValueError(f"{index_path}: not a JSON object with a 'weight_map' ({error})") from error
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f"{index_path}: expected a non-empty 'weight_map' of tensor name -> file")
    files = sorted(set(weight_map.values()))
    for filename in files:
      if not os.path.isfile(os.path.join(folder, filename)):
        raise FileNotFoundError(f'{index_path}: lists shard {filename!r}, which is not in {folder}')
  elif os.path.isfile(os.path.join(folder, SINGLE_FILE)):
    files = [SINGLE_FILE]
  else:
    present = sorted(os.listdir(folder)) if os.path.isdir(folder) else 'the folder does not exist'
    raise FileNotFoundError(f'{folder}: expected {SINGLE_FILE} or {INDEX_FILE}; found {present}')
  return files


def _checkpoint_tensors(folder: str) -> list[HFTensor]:
  tensors = []
  for filename in _weight_files(folder):
    path = os.path.join(folder, filename)
    with safe_open(path, framework='flax') as handle:
      for name in handle.keys():
        shape = tuple(handle.get_slice(name).get_shape())
        tensors.append(HFTensor(name, shape, _reader(path, name), path))
  return tensors


def _reader(path: str, name: str):
  def load():
    with safe_open(path, framework='flax') as handle:
      return handle.get_tensor(name)

  return load
