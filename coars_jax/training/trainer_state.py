"""What an RL run is at a point in time, apart from its arrays: the endless stream of training windows a data
position points into (`windows_at`), the trainer state a checkpoint keeps (`TrainerState`), one played rollout
(`PlayedRollout`), and the error a run of non-finite updates raises."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from coars_jax.agents.episodes import Episode
from coars_jax.agents.trajectory import Trajectory


def window_order(num_windows: int, seed: int, epoch: int) -> np.ndarray:
  """The permutation of the training windows used in `epoch` (a pure function of the seed and the epoch)."""
  return np.random.default_rng([int(seed), int(epoch), 0x52AB]).permutation(num_windows)


def windows_at(num_windows: int, seed: int, position: int, count: int) -> np.ndarray:
  """`count` window indices of the endless stream epoch 0, epoch 1, ..., starting at global `position`; the stream
  is what a checkpoint's data position points into, so a resumed run draws exactly the same windows."""
  if num_windows < 1:
    raise ValueError('the training split has no windows')
  out = []
  while len(out) < count:
    epoch, offset = divmod(position, num_windows)
    take = min(count - len(out), num_windows - offset)
    out.extend(window_order(num_windows, seed, epoch)[offset : offset + take].tolist())
    position += take
  return np.asarray(out, np.int64)


@dataclasses.dataclass(kw_only=True)
class TrainerState:
  """What a checkpoint must hold besides the adapters and the optimizer state to resume exactly.

  Attributes:
    iteration: finished iterations.
    next_window: the data position, an index into the endless window stream (`windows_at`).
    rng: the raw key data (uint32) of the JAX PRNG key the rollout seeds are split from.
    consecutive_nonfinite: skipped updates in a row so far.
  """

  iteration: int
  next_window: int
  rng: np.ndarray
  consecutive_nonfinite: int = 0

  def to_json(self) -> dict[str, Any]:
    return {
      'iteration': self.iteration,
      'next_window': self.next_window,
      'rng': self.rng.tolist(),
      'consecutive_nonfinite': self.consecutive_nonfinite,
    }

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> 'TrainerState':
    return cls(
      iteration=int(data['iteration']),
      next_window=int(data['next_window']),
      rng=np.asarray(data['rng'], np.uint32),
      consecutive_nonfinite=int(data['consecutive_nonfinite']),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlayedRollout:
  """One iteration's rollout: the training windows, the sampling seed, the episodes, their `Trajectory`, and the
  rollout's wall time in seconds."""

  windows: np.ndarray
  seed: int
  episodes: Sequence[Episode]
  trajectory: Trajectory
  seconds: float


class NonFiniteUpdateError(FloatingPointError):
  """`max_consecutive_nonfinite` updates in a row had a non-finite loss or gradient."""
