"""The rollout record: the one hand-off from acting to learning. It holds every segment (agent message) of one
iteration's rollout as arrays (`Trajectory`: prompt and completion token ids, behaviour log-probs, agent, turn,
episode, hit, s, q, action, validity), the episodes' groups (windows), and what the learner must not recompute
after the rollout: each segment's hindsight teacher prompt x + d as token ids (rendered from the episode's facts,
the ground truth and the peer's ranks), the output grammar each segment was sampled under when decoding was
constrained, and the judge's prompt per episode when the reward is the judge's.

`save` writes it as `arrays.npz` (numbers and token ids), `meta.json` (seed, windows, texts) and `episodes.jsonl`
(the dialogues for people, `trajectory.to_jsonl`); `load` reads it back, and an update from a loaded record needs no
backend, no episodes and no SASRec (`training.rl.RLTrainer.learn_record`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from coars_jax.agents.trajectory import Trajectory, to_jsonl

ARRAYS_FILE, META_FILE, JSONL_FILE = 'arrays.npz', 'meta.json', 'episodes.jsonl'
_TEXT_FIELDS = ('prompt_texts', 'completion_texts', 'records', 'split')


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class RolloutRecord:
  """One iteration's rollout, everything the learner needs.

  Attributes:
    trajectory: the segments as arrays (see `Trajectory`).
    windows: int64[W], the training windows of the iteration (one group each).
    groups: int32[E], the group (index into `windows`) of each episode.
    seed: the rollout's sampling seed.
    seconds: the rollout's wall time.
    teacher_ids: per segment, the token ids of its teacher prompt x + d (empty for a segment that cannot carry
      loss); None when the update has no teacher (lambda_SD = 0).
    constraints: per-segment output-grammar arrays (`training.rl.CONSTRAINT_KEYS`, leading dimension S) when
      decoding was constrained, else None.
    judge_ids: per episode, the token ids of the judge's prompt when the reward is the judge's, else None.
  """

  trajectory: Trajectory
  windows: np.ndarray
  groups: np.ndarray
  seed: int
  seconds: float
  teacher_ids: Sequence[np.ndarray] | None = None
  constraints: Mapping[str, np.ndarray] | None = None
  judge_ids: Sequence[np.ndarray] | None = None

  def __post_init__(self):
    segments, episodes = self.trajectory.num_segments, self.trajectory.num_episodes
    if self.groups.shape != (episodes,):
      raise ValueError(f'RolloutRecord.groups must have one entry per episode ({episodes}), found {self.groups.shape}')
    if self.teacher_ids is not None and len(self.teacher_ids) != segments:
      raise ValueError(
        f'RolloutRecord.teacher_ids must have one entry per segment ({segments}), found {len(self.teacher_ids)}'
      )
    if self.judge_ids is not None and len(self.judge_ids) != episodes:
      raise ValueError(
        f'RolloutRecord.judge_ids must have one entry per episode ({episodes}), found {len(self.judge_ids)}'
      )
    for name, value in (self.constraints or {}).items():
      if np.shape(value)[0] != segments:
        raise ValueError(
          f'RolloutRecord.constraints[{name!r}] must have one row per segment ({segments}), found '
          f'shape {np.shape(value)}'
        )

  def save(self, folder: str | os.PathLike) -> pathlib.Path:
    """Writes the record to `folder` (created); returns its absolute path."""
    folder = pathlib.Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    for field in dataclasses.fields(Trajectory):
      if field.name not in _TEXT_FIELDS:
        arrays[f'trajectory.{field.name}'] = getattr(self.trajectory, field.name)
    arrays['windows'], arrays['groups'] = np.asarray(self.windows, np.int64), np.asarray(self.groups, np.int32)
    for name, ragged in (('teacher_ids', self.teacher_ids), ('judge_ids', self.judge_ids)):
      if ragged is not None:
        arrays[f'{name}.flat'], arrays[f'{name}.lengths'] = _flatten(ragged)
    for name, value in (self.constraints or {}).items():
      arrays[f'constraints.{name}'] = np.asarray(value)
    np.savez(folder / ARRAYS_FILE, **arrays)
    meta = {
      'seed': int(self.seed),
      'seconds': float(self.seconds),
      **{
        name: list(getattr(self.trajectory, name)) if name != 'split' else self.trajectory.split
        for name in _TEXT_FIELDS
      },
    }
    # As in `to_jsonl`: a lone surrogate in a message is written as the JSON escape that reads back to it.
    (folder / META_FILE).write_text(
      json.dumps(meta, ensure_ascii=False, allow_nan=False), encoding='utf-8', errors='backslashreplace'
    )
    to_jsonl(self.trajectory, folder / JSONL_FILE)
    return folder

  @classmethod
  def load(cls, folder: str | os.PathLike) -> 'RolloutRecord':
    """The record `save` wrote to `folder`."""
    folder = pathlib.Path(folder)
    for name in (ARRAYS_FILE, META_FILE):
      if not (folder / name).is_file():
        raise FileNotFoundError(f'{folder} holds no rollout record ({name} is missing)')
    meta = json.loads((folder / META_FILE).read_text(encoding='utf-8'))
    with np.load(folder / ARRAYS_FILE) as stored:
      arrays = {key: stored[key] for key in stored.files}
    fields = {key.split('.', 1)[1]: value for key, value in arrays.items() if key.startswith('trajectory.')}
    fields.update(
      prompt_texts=tuple(meta['prompt_texts']),
      completion_texts=tuple(meta['completion_texts']),
      records=tuple(meta['records']),
      split=meta['split'],
    )
    ragged = {
      name: _unflatten(arrays[f'{name}.flat'], arrays[f'{name}.lengths'])
      for name in ('teacher_ids', 'judge_ids')
      if f'{name}.flat' in arrays
    }
    constraints = {key.split('.', 1)[1]: value for key, value in arrays.items() if key.startswith('constraints.')}
    return cls(
      trajectory=Trajectory(**fields),
      windows=arrays['windows'],
      groups=arrays['groups'],
      seed=int(meta['seed']),
      seconds=float(meta['seconds']),
      teacher_ids=ragged.get('teacher_ids'),
      constraints=constraints or None,
      judge_ids=ragged.get('judge_ids'),
    )


def _flatten(ragged: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
  lengths = np.asarray([len(row) for row in ragged], np.int64)
  flat = np.concatenate([np.asarray(row, np.int32) for row in ragged]) if len(ragged) else np.zeros(0, np.int32)
  return flat.astype(np.int32), lengths


def _unflatten(flat: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
  ends = np.cumsum(lengths)
  return [flat[end - length : end] for end, length in zip(ends.tolist(), lengths.tolist())]
