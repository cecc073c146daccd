"""The RL run's Orbax checkpoints: a `CheckpointManager` under `<workdir>/checkpoints`, each step holding the
trainer's arrays (adapters, optimizer state, RNG key) and its progress as JSON; a manifest of every file's size and
sha256 seals a step once Orbax has committed it, and a resume restores the newest step that verifies, setting the
others aside under `<workdir>/checkpoints_rejected`. Also the export of final and best adapters."""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy

from coars_jax.data.files import sha256_of
from coars_jax.models.decoder import Decoder
from coars_jax.parallel import distributed
from coars_jax.training import faults, rl
from coars_jax.training import warm_start as warm_start_lib

CHECKPOINT_DIR = 'checkpoints'
BEST_METRIC = 'val_hit_at_1'  # what the best checkpoint is chosen by
# Written into a checkpoint's folder after Orbax commits it: every file's size and sha256 (see `seal_checkpoint`).
MANIFEST_FILE = 'coars_manifest.json'
REJECTED_DIR = 'checkpoints_rejected'  # checkpoints a resume found incomplete or corrupt, kept for inspection


class CheckpointError(RuntimeError):
  """A checkpoint could not be written, or no checkpoint of a run could be restored."""


def checkpoint_manager(workdir: pathlib.Path, keep: int, *, cleanup: bool = True) -> ocp.CheckpointManager:
  """Orbax manager of `<workdir>/checkpoints` (absolute): the latest `keep` steps plus the best by val Hit@1.

  Orbax writes each step into a temporary folder and renames it when complete; the temporary folders a killed
  save leaves behind are removed when the next manager opens the directory (`cleanup`; off for a reader, which
  must not remove the folder a running save is writing)."""
  faults.instrument_orbax()
  policy = preservation_policy.AnyPreservationPolicy(
    policies=[
      preservation_policy.LatestN(n=keep),
      preservation_policy.BestN(
        get_metric_fn=lambda metrics: metrics[BEST_METRIC], reverse=False, n=1, keep_checkpoints_without_metrics=False
      ),
    ]
  )
  return ocp.CheckpointManager(
    (workdir / CHECKPOINT_DIR).absolute(),
    options=ocp.CheckpointManagerOptions(
      preservation_policy=policy, enable_async_checkpointing=False, create=True, cleanup_tmp_directories=cleanup
    ),
  )


def step_folder(manager: ocp.CheckpointManager, step: int) -> pathlib.Path:
  return pathlib.Path(str(manager.directory)) / str(step)


def _file_digests(folder: pathlib.Path) -> dict[str, list]:
  return {
    path.relative_to(folder).as_posix(): [path.stat().st_size, sha256_of(path)]
    for path in sorted(folder.rglob('*'))
    if path.is_file() and not path.name.startswith(MANIFEST_FILE)
  }


def seal_checkpoint(folder: pathlib.Path) -> None:
  """Writes `MANIFEST_FILE` (every file's size and sha256) into a committed checkpoint folder, atomically."""
  manifest = {'format': 1, 'files': _file_digests(folder)}
  tmp = folder / (MANIFEST_FILE + '.tmp')
  with open(tmp, 'w', encoding='utf-8') as handle:
    json.dump(manifest, handle, indent=1, sort_keys=True)
    handle.flush()
    os.fsync(handle.fileno())
  os.replace(tmp, folder / MANIFEST_FILE)


def checkpoint_problem(folder: pathlib.Path) -> str | None:
  """Why the checkpoint in `folder` disagrees with its manifest (a file missing, truncated or changed, or the
  manifest unreadable), or None when it agrees. A folder without a manifest is 'unsealed': Orbax committed it but
  the process stopped before the manifest was written (or an older version wrote it)."""
  path = folder / MANIFEST_FILE
  if not path.is_file():
    return 'unsealed'
  try:
    listed = json.loads(path.read_text(encoding='utf-8'))['files']
    listed = {str(name): (int(size), str(digest)) for name, (size, digest) in listed.items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
    return f'its manifest {path} is unreadable ({type(error).__name__}: {error})'
  for name, (size, digest) in listed.items():
    file = folder / name
    if not file.is_file():
      return f'{name} is missing (listed in its manifest)'
    found = file.stat().st_size
    if found != size:
      return f'{name} is {found} bytes, its manifest says {size} (truncated or overwritten)'
    if sha256_of(file) != digest:
      return f'{name} has another sha256 than its manifest records (corrupted)'
  return None


def save_checkpoint(
  manager: ocp.CheckpointManager,
  trainer: rl.RLTrainer,
  progress: dict[str, Any],
  val_hit: float | None,
  *,
  pending_record: dict[str, Any] | None = None,
) -> None:
  """Step = iteration: arrays (adapters, optimizer state, RNG) and JSON (trainer state, best so far), then the
  manifest. `pending_record`: the iteration's metrics when its val evaluation was cut short by SIGTERM; a resume
  runs that evaluation before anything else.

  Raises `CheckpointError` when the write fails (a full disk, say): Orbax never committed the step, so the
  previous checkpoint is the latest and is untouched (older ones are only deleted after a commit)."""
  step = trainer.state.iteration
  meta = {'trainer': trainer.state.to_json(), **progress}
  if pending_record is not None:
    meta['pending_record'] = pending_record
  directory = pathlib.Path(str(manager.directory))
  try:
    manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(trainer.checkpoint_tree()), meta=ocp.args.JsonSave(meta)),
      metrics=None if val_hit is None else {BEST_METRIC: float(val_hit)},
      force=True,
    )
    manager.wait_until_finished()
  except Exception as error:
    # Its temporary folder stays until the next start's manager removes it: writes of other items of the step may
    # still be in flight here.
    manager.reload()
    previous = [s for s in manager.all_steps() if s != step]
    kept = (
      f'the previous checkpoint, iteration {max(previous)}, is intact' if previous else 'no earlier checkpoint exists'
    )
    raise CheckpointError(
      f'writing checkpoint {step} into {directory} failed ({type(error).__name__}: {error}); '
      f'nothing of it will be used and {kept}. Free space or fix the file system, then rerun '
      f'with --config.resume=True'
    ) from error
  folder = step_folder(manager, step)
  faults.point('seal', step, folder)
  try:
    if distributed.is_primary():
      seal_checkpoint(folder)
  except OSError as error:
    raise CheckpointError(
      f'checkpoint {folder} was written but its manifest could not be ({error}); a resume '
      f'still uses it if Orbax can read it. Free space, then rerun with --config.resume=True'
    ) from error
  faults.point('sealed', step, folder)


def _read(manager: ocp.CheckpointManager, trainer: rl.RLTrainer, step: int) -> tuple[Any, dict[str, Any]]:
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, trainer.checkpoint_tree())
  restored = manager.restore(
    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
  )
  return restored['state'], dict(restored['meta'])


def restore_checkpoint(
  manager: ocp.CheckpointManager, trainer: rl.RLTrainer, step: int | None = None
) -> dict[str, Any]:
  """Loads `step` (default the latest) into `trainer`; returns the JSON part (trainer state and progress)."""
  step = manager.latest_step() if step is None else step
  tree, meta = _read(manager, trainer, step)
  trainer.restore(tree, rl.TrainerState.from_json(meta['trainer']))
  return meta


def _set_aside(folder: pathlib.Path, reason: str) -> pathlib.Path:
  """Moves a rejected checkpoint out of the manager's sight (a new save of its step would collide with it) to
  `<workdir>/checkpoints_rejected/<step>-<n>`, with the reason beside it."""
  root = folder.parent.parent / REJECTED_DIR
  root.mkdir(exist_ok=True)
  number = 0
  while (root / f'{folder.name}-{number}').exists():
    number += 1
  target = root / f'{folder.name}-{number}'
  os.replace(folder, target)
  (root / f'{target.name}.reason.txt').write_text(reason + '\n', encoding='utf-8')
  return target


def restore_latest(manager: ocp.CheckpointManager, trainer: rl.RLTrainer) -> dict[str, Any] | None:
  """Restores the newest checkpoint that agrees with its manifest and that Orbax can read, into `trainer`, and
  returns its JSON part; None when there is no checkpoint. Newer ones that fail are set aside with a warning that
  names them; an unsealed one (killed between the commit and the manifest) is used when Orbax reads it.

  Raises `CheckpointError` when checkpoints exist but none of them can be used (nothing is moved then)."""
  rejected = []
  for step in sorted(manager.all_steps(), reverse=True):
    folder = step_folder(manager, step)
    problem = checkpoint_problem(folder)
    if problem in (None, 'unsealed'):
      try:
        tree, meta = _read(manager, trainer, step)
      except Exception as error:  # Orbax's errors for a damaged folder vary (KeyError, ValueError, OSError, ...)
        problem = f'Orbax could not read it ({type(error).__name__}: {str(error)[:300]})'
      else:
        if problem == 'unsealed':
          logging.warning(
            'Checkpoint %s has no manifest (the process stopped between its commit and its '
            'manifest); Orbax reads it, so it is used',
            folder,
          )
        trainer.restore(tree, rl.TrainerState.from_json(meta['trainer']))
        if distributed.is_primary():
          for bad_folder, reason in rejected:
            logging.warning('Set aside checkpoint %s as %s', bad_folder, _set_aside(bad_folder, reason))
        if rejected:
          distributed.barrier(f'checkpoints-set-aside-{step}')
          manager.reload()
        return meta
    logging.warning('Skipping checkpoint %s: %s; trying the one before it', folder, problem)
    rejected.append((folder, problem))
  if rejected:
    listing = '\n  '.join(f'{folder}: {problem}' for folder, problem in rejected)
    raise CheckpointError(
      f'no checkpoint in {manager.directory} can be restored:\n  {listing}\nMove them away to '
      f'start over, or restore a backup'
    )
  return None


def read_checkpoint(workdir: str | pathlib.Path, trainer: rl.RLTrainer, step: int | None = None) -> dict[str, Any]:
  """Loads a run's checkpoint into `trainer` (for inspection and tests)."""
  workdir = pathlib.Path(workdir).absolute()
  with checkpoint_manager(workdir, keep=1_000_000, cleanup=False) as manager:
    return restore_checkpoint(manager, trainer, step)


def export_adapters(model: Decoder, folder: pathlib.Path, *, save_base: bool, metadata: dict[str, Any]) -> None:
  """The adapters (and the base, when it cannot be rebuilt by name) in the warm-start folder format."""
  warm_start_lib.save_warm_start(model, folder, save_base=save_base, metadata=metadata)
