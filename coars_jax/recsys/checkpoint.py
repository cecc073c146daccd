"""SASRec checkpoints: parameters through Orbax, and the config and provenance beside them as JSON.

A checkpoint is a folder: `params/` (Orbax) and `meta.json`. `meta.json` is written last and atomically,
so a folder without it is an interrupted save and is never loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil

import jax
import orbax.checkpoint as ocp
from flax import nnx

from coars_jax.recsys.sasrec import SASRec, SASRecConfig

META_FILE = 'meta.json'


def save_sasrec(directory: str | os.PathLike, model: SASRec, metadata: dict) -> pathlib.Path:
  """Writes `model` and `metadata` (JSON-serialisable) to `directory`, replacing an earlier checkpoint."""
  directory = pathlib.Path(directory).absolute()  # Orbax requires absolute paths.
  if directory.exists():
    shutil.rmtree(directory)
  directory.mkdir(parents=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / 'params', nnx.to_pure_dict(nnx.state(model)))
  checkpointer.wait_until_finished()
  meta = {'model_config': dataclasses.asdict(model.config), **metadata}
  tmp = directory / (META_FILE + '.tmp')
  tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
  os.replace(tmp, directory / META_FILE)
  return directory


def is_complete(directory: str | os.PathLike) -> bool:
  return (pathlib.Path(directory) / META_FILE).is_file()


def load_sasrec(directory: str | os.PathLike) -> tuple[SASRec, dict]:
  """Restores a model saved by `save_sasrec`. Returns (model, metadata)."""
  directory = pathlib.Path(directory).absolute()
  if not is_complete(directory):
    raise FileNotFoundError(f'{directory} holds no complete SASRec checkpoint ({META_FILE} is missing)')
  meta = json.loads((directory / META_FILE).read_text())
  model = SASRec(SASRecConfig(**meta['model_config']), rngs=nnx.Rngs(0))
  state = nnx.state(model)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(state))
  restored = ocp.StandardCheckpointer().restore(directory / 'params', abstract)
  nnx.replace_by_pure_dict(state, restored)
  nnx.update(model, state)
  return model, meta
