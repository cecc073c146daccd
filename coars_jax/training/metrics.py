"""Where a training run's metrics go: one JSON line per record in `<workdir>/metrics.jsonl` (everything, lists
included) and TensorBoard scalars under `<workdir>/tensorboard` (numbers and booleans only). A resumed run first
drops the lines written after the checkpoint it resumes from, and any end-of-run summary (a record with a 'stage'),
which it writes again itself, so the file reads as one uninterrupted run. In a multi-host run only the primary
process writes (the others hold the same records).
"""

from __future__ import annotations

import json
import math
import numbers
import pathlib
from typing import Any, Mapping

import tensorboardX

from coars_jax.parallel.distributed import is_primary

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'


def json_value(value: Any) -> Any:
  # Strict JSON has no NaN or infinity: a non-finite number is written as null (and named in the record).
  if isinstance(value, bool) or value is None or isinstance(value, str):
    return value
  if isinstance(value, numbers.Number):
    number = float(value) if not isinstance(value, numbers.Integral) else int(value)
    return number if isinstance(number, int) or math.isfinite(number) else None
  if isinstance(value, (list, tuple)):
    return [json_value(v) for v in value]
  if isinstance(value, Mapping):
    return {str(k): json_value(v) for k, v in value.items()}
  return str(value)


class MetricsWriter:
  """Appends records to `metrics.jsonl` and scalars to TensorBoard; use as a context manager or `close()`."""

  def __init__(self, workdir: str | pathlib.Path, *, keep_up_to: int | None = None):
    """keep_up_to: keep the existing lines up to this 'iteration' except summaries (a resume from that
    iteration); None keeps nothing (a fresh run starts an empty file). Off the primary process it writes
    nothing."""
    self.workdir = pathlib.Path(workdir).absolute()
    self.path = self.workdir / METRICS_FILE
    self.active = is_primary()
    self.tensorboard = None
    if not self.active:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    kept = []
    if keep_up_to is not None and self.path.is_file():
      for line in self.path.read_text(encoding='utf-8').splitlines():
        try:
          record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
          record = None  # the unfinished last line of a killed process
        if record is not None and record.get('iteration', 0) <= keep_up_to and 'stage' not in record:
          kept.append(line)
    self.path.write_text(''.join(line + '\n' for line in kept), encoding='utf-8')
    self.tensorboard = tensorboardX.SummaryWriter(str(self.workdir / TENSORBOARD_DIR))

  def write(self, step: int, record: Mapping[str, Any]) -> None:
    """One record at `step` (the iteration): every field to the JSONL file, scalars to TensorBoard."""
    if not self.active:
      return
    line = {'iteration': int(step), **{k: v for k, v in record.items() if k != 'iteration'}}
    with open(self.path, 'a', encoding='utf-8') as handle:
      handle.write(json.dumps(json_value(line), allow_nan=False) + '\n')
    for name, value in record.items():
      if isinstance(value, bool):
        value = int(value)
      if isinstance(value, numbers.Number) and name != 'iteration' and math.isfinite(float(value)):
        self.tensorboard.add_scalar(name, float(value), int(step))
    self.tensorboard.flush()

  def close(self) -> None:
    if self.tensorboard is not None:
      self.tensorboard.close()

  def __enter__(self) -> 'MetricsWriter':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_metrics(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
  """The records of `<workdir>/metrics.jsonl`, in order."""
  path = pathlib.Path(workdir) / METRICS_FILE
  return [json.loads(line) for line in path.read_text(encoding='utf-8').splitlines() if line.strip()]
