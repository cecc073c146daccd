"""Saving and restoring LoRA adapters alone, without the frozen base, as one Orbax checkpoint folder: the
`nnx.LoRAParam` arrays of every adapter plus JSON metadata (the `LoRAConfig`, the adapter names and the
base projection shapes they were trained on), so a restore into a base model they do not fit is refused
before any array is read."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from coars_jax.models.decoder import Decoder
from coars_jax.models.lora import LoRAConfig, add_lora, targeted_linears

FORMAT = 'coars_jax.lora_adapters'
FORMAT_VERSION = 1
ADAPTERS_ITEM = 'adapters'
METADATA_ITEM = 'lora_metadata'


def save_adapters(model: Decoder, directory: str | os.PathLike, *, overwrite: bool = False) -> str:
  """Writes the adapters of `model` (all of them, stacked) to `directory`; returns its absolute path.

  overwrite: replace an existing checkpoint at `directory` instead of failing.
  """
  if not model.adapter_names:
    raise ValueError('save_adapters: the model has no LoRA adapters; attach them with add_lora first')
  path = os.path.abspath(os.fspath(directory))  # Orbax requires absolute paths
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f'save_adapters: {path} already exists; pass overwrite=True to replace it')
  arrays = _nested(
    {path_: variable.get_value() for path_, variable in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
  )
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(
      path,
      args=ocp.args.Composite(
        **{ADAPTERS_ITEM: ocp.args.StandardSave(arrays), METADATA_ITEM: ocp.args.JsonSave(_metadata(model))}
      ),
      force=overwrite,
    )
  return path


def load_adapters(model: Decoder, directory: str | os.PathLike, *, rngs: nnx.Rngs | None = None) -> Decoder:
  """Restores the adapters saved in `directory` into `model` (e.g. a freshly loaded base), in place.

  A model without adapters first gets them with the checkpoint's config and names (`rngs` seeds the
  initial values and any dropout stream; the initial values are then overwritten). A model that already
  has adapters must match the checkpoint's config and names. Either way the base projection shapes must
  match the checkpoint's. Returns `model`.
  """
  path = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(path):
    raise FileNotFoundError(f'load_adapters: {path} is not a directory')
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    metadata = checkpointer.restore(path, args=ocp.args.Composite(**{METADATA_ITEM: ocp.args.JsonRestore()}))[
      METADATA_ITEM
    ]
    lora_config, adapter_names = _check_metadata(metadata, model, path)
    if not model.adapter_names:
      add_lora(model, lora_config, adapter_names, rngs=rngs if rngs is not None else nnx.Rngs(0))
    flat = nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
    # Restoring onto the current arrays' shapes, dtypes and shardings keeps a sharded model sharded.
    target = _nested(
      {
        path_: jax.ShapeDtypeStruct(
          variable.get_value().shape, variable.get_value().dtype, sharding=variable.get_value().sharding
        )
        for path_, variable in flat
      }
    )
    restored = checkpointer.restore(path, args=ocp.args.Composite(**{ADAPTERS_ITEM: ocp.args.StandardRestore(target)}))[
      ADAPTERS_ITEM
    ]
  nnx.update(
    model, nnx.from_flat_state([(path_, variable.replace(_lookup(restored, path_))) for path_, variable in flat])
  )
  return model


def _metadata(model: Decoder) -> dict[str, Any]:
  return {
    'format': FORMAT,
    'version': FORMAT_VERSION,
    'lora_config': model.lora_config.to_dict(),
    'adapter_names': list(model.adapter_names),
    'base': {
      'architecture': model.config.architecture,
      'num_layers': model.config.num_layers,
      'projections': _projection_shapes(model, model.lora_config.target_modules),
    },
  }


def _projection_shapes(model: Decoder, target_modules) -> dict[str, dict[str, list[int]]]:
  return {
    path: {'in_shape': list(linear.in_shape), 'out_shape': list(linear.out_shape)}
    for path, linear in targeted_linears(model, target_modules)
  }


def _check_metadata(metadata: Any, model: Decoder, path: str) -> tuple[LoRAConfig, tuple[str, ...]]:
  if not isinstance(metadata, dict) or metadata.get('format') != FORMAT:
    found = metadata.get('format') if isinstance(metadata, dict) else type(metadata).__name__
    raise ValueError(f'{path}: expected a {FORMAT!r} checkpoint written by save_adapters; found format {found!r}')
  if metadata.get('version') != FORMAT_VERSION:
    raise ValueError(f'{path}: expected {FORMAT} version {FORMAT_VERSION}, found {metadata.get("version")!r}')
  lora_config = LoRAConfig.from_dict(metadata['lora_config'])
  adapter_names = tuple(metadata['adapter_names'])

  base = metadata['base']
  if base['num_layers'] != model.config.num_layers:
    raise ValueError(
      f'{path}: adapters were saved for a base with num_layers={base["num_layers"]}; the model '
      f'has num_layers={model.config.num_layers}'
    )
  ours = _projection_shapes(model, lora_config.target_modules)
  for projection, shapes in base['projections'].items():
    if ours.get(projection) != shapes:
      raise ValueError(
        f'{path}: base projection {projection} had in_shape {shapes["in_shape"]} and '
        f"out_shape {shapes['out_shape']} when the adapters were saved; the model's is "
        f'{_describe(ours.get(projection))}'
      )

  if model.adapter_names:
    if model.lora_config != lora_config:
      differing = [name for name, value in lora_config.to_dict().items() if model.lora_config.to_dict()[name] != value]
      raise ValueError(
        f"{path}: the checkpoint's LoRAConfig differs from the model's in {differing}: "
        f'checkpoint {lora_config}, model {model.lora_config}'
      )
    if model.adapter_names != adapter_names:
      raise ValueError(f'{path}: the checkpoint holds adapters {adapter_names}; the model has {model.adapter_names}')
  return lora_config, adapter_names


def _describe(shapes: dict[str, list[int]] | None) -> str:
  if shapes is None:
    return 'absent (no such projection)'
  return f'in_shape {shapes["in_shape"]} and out_shape {shapes["out_shape"]}'


def _nested(flat: dict[tuple, Any]) -> dict[str, Any]:
  """{('layers', 0, 'mlp', 'up_proj', 'lora', 'a'): x} -> {'layers': {'0': {...}}}: string keys only, so the
  tree saved and the tree restored compare equal whatever Orbax does with integer keys."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for part in path[:-1]:
      node = node.setdefault(str(part), {})
    node[str(path[-1])] = value
  return tree


def _lookup(tree: dict[str, Any], path: tuple) -> Any:
  for part in path:
    tree = tree[str(part)]
  return tree
