"""What the entry points share for their `--output=FILE` flags."""

import json
import pathlib
from typing import Any


def write_json(path: str | pathlib.Path, value: Any) -> pathlib.Path:
  """Writes `value` as indented JSON to `path` (parents created) and says so on stdout."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(value, indent=2))
  print(f'Wrote {path}')
  return path
