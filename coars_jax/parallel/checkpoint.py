"""Orbax checkpoints of sharded pytrees (adapters, optimizer state) that restore straight onto another mesh: each
array is read into the target `NamedSharding` given at restore time, whatever mesh wrote it, so a run saved on
(data=8) resumes on (data=2, fsdp=2, tensor=2) without gathering the arrays on one host first."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _absolute(path: str | os.PathLike) -> pathlib.Path:
  # Orbax refuses relative paths; resolving here keeps callers free to pass workdir-relative ones.
  return pathlib.Path(path).expanduser().absolute()


def save_sharded(path: str | os.PathLike, tree: Any) -> pathlib.Path:
  """Writes the arrays of `tree` (nested dicts / lists of jax or numpy arrays) to the new folder `path`; returns
  the absolute folder. A collective in a multi-host run: every process calls it with the same tree, each writes
  the shards it holds, and Orbax commits the folder once all have (numpy leaves are written by the primary)."""
  folder = _absolute(path)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(folder, tree)
    checkpointer.wait_until_finished()
  return folder


def restore_sharded(path: str | os.PathLike, abstract_tree: Any, shardings: Any) -> Any:
  """The arrays saved at `path`, shaped like `abstract_tree` (arrays or `jax.ShapeDtypeStruct`s: only shape and
  dtype are read) and placed on `shardings` (a matching tree of `jax.sharding.Sharding`s, e.g. from
  `Partitioning.state` / `Partitioning.optimizer` on the new mesh). The mesh and process count may differ from
  the writer's; on a mesh that spans processes every process calls it and reads only its own shards."""
  folder = _absolute(path)
  if not folder.is_dir():
    raise FileNotFoundError(f'restore_sharded: no checkpoint folder at {folder}')

  def target(leaf, sharding):
    leaf = leaf if hasattr(leaf, 'shape') and hasattr(leaf, 'dtype') else np.asarray(leaf)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(folder, jax.tree.map(target, abstract_tree, shardings))
