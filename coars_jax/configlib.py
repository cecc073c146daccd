"""Config checks shared by every experiment: unknown keys with a suggestion, typed and ranged fields, and folder
paths a run may write to.

Configs are `ml_collections.ConfigDict`s built by `get_config()` files. `check_keys` compares a config with
its defaults, so a misspelt field fails before any work starts, naming the closest valid field; `check_types`
holds every field to its default's kind, so a bool never passes for a number, nor infinity for a rate.
"""

from __future__ import annotations

import difflib
import math
import os
import pathlib
from typing import Any, Iterable

import ml_collections


class ConfigError(ValueError):
  """A config field is unknown, of the wrong type, or out of range."""


def check_keys(config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict, prefix: str = '') -> None:
  for key in config.keys():
    name = f'{prefix}{key}'
    if key not in defaults:
      close = difflib.get_close_matches(key, list(defaults.keys()), n=1)
      hint = f'; did you mean {prefix + close[0]!r}?' if close else ''
      raise ConfigError(f'Unknown config field {name!r}{hint} Valid fields here: {sorted(defaults.keys())}')
    if isinstance(defaults[key], ml_collections.ConfigDict):
      if not isinstance(config[key], ml_collections.ConfigDict):
        raise ConfigError(f'Config field {name!r} must be a group of fields, found {config[key]!r}')
      check_keys(config[key], defaults[key], prefix=f'{name}.')


def require(condition: bool, field: str, expected: str, found: Any) -> None:
  if not condition:
    raise ConfigError(f'Config field {field!r}: expected {expected}, found {found!r}')


def require_int_list(values: Iterable, field: str, minimum: int = 0) -> tuple[int, ...]:
  values = tuple(values)
  require(
    len(values) > 0 and all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in values),
    field,
    f'a non-empty list of integers >= {minimum}',
    values,
  )
  return values


def require_int_field(config: ml_collections.ConfigDict, field: str, least: int) -> None:
  """The dotted `field` of `config` ('rl.iterations') is an int >= `least` (bools refused)."""
  value = config
  for part in field.split('.'):
    value = value[part]
  require(isinstance(value, int) and not isinstance(value, bool) and value >= least, field, f'an int >= {least}', value)


def require_sampling_fields(config: ml_collections.ConfigDict) -> None:
  """`sampling.temperature` (a number >= 0) and `sampling.top_p` (in (0, 1]), which every run config carries."""
  temperature, top_p = config.sampling.temperature, config.sampling.top_p
  require(_is_finite_number(temperature) and temperature >= 0, 'sampling.temperature', 'a number >= 0', temperature)
  require(_is_finite_number(top_p) and 0 < top_p <= 1, 'sampling.top_p', 'a number in (0, 1]', top_p)


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_types(config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict, prefix: str = '') -> None:
  """Every field of `config` that `defaults` has is of its default's kind: a bool, an int, a finite real number
  (an int is accepted where the default is a float), a string, or a list. Ranges are the owners' to check."""
  for key, default in defaults.items():
    if key not in config:
      continue
    name, value = f'{prefix}{key}', config[key]
    if isinstance(default, ml_collections.ConfigDict):
      if isinstance(value, ml_collections.ConfigDict):
        check_types(value, default, prefix=f'{name}.')
    elif isinstance(default, bool):
      require(isinstance(value, bool), name, 'a bool (True or False)', value)
    elif isinstance(default, int):
      require(_is_int(value), name, 'an int', value)
    elif isinstance(default, float):
      require(_is_finite_number(value), name, 'a finite number', value)
    elif isinstance(default, str):
      require(isinstance(value, str), name, 'a string', value)
    elif isinstance(default, (tuple, list)):
      require(isinstance(value, (tuple, list)), name, 'a list', value)


def require_folder(field: str, value: Any, *, allow_empty: bool = False) -> pathlib.Path | None:
  """A folder a run writes into: a path string without NUL or newline that is not the file-system root, the home
  folder, the current directory or one of its parents (a run there would scatter its files among the user's).
  Returns the resolved path (symlinks followed), or None for '' when `allow_empty`."""
  if allow_empty and value == '':
    return None
  require(
    isinstance(value, str) and value.strip() != '' and not any(c in value for c in '\x00\n\r'),
    field,
    'a folder path (a non-empty string without NUL or line breaks)',
    value,
  )
  path = pathlib.Path(value).absolute().resolve()
  cwd = pathlib.Path(os.getcwd()).resolve()
  # Later entries name a place more precisely ('/' is also a parent of the current directory).
  shared = {
    **{parent: 'a parent of the current directory' for parent in cwd.parents},
    cwd: 'the current directory',
    pathlib.Path.home().resolve(): 'the home folder',
    pathlib.Path(path.anchor): 'the file-system root',
  }
  require(path not in shared, field, 'a folder of its own for this run', f'{value} ({shared.get(path, "")}: {path})')
  return path


def require_peer_fields(config: ml_collections.ConfigDict) -> None:
  """The SASRec peer fields an agentic config shares: the training seed, the epoch cap and the cross-fitting."""
  for field in ('sasrec_seed', 'sasrec_max_epochs', 'sasrec_fold_seed'):
    require_int_field(config, field, 0)
  folds = config.sasrec_folds
  require(
    _is_int(folds) and (folds == 0 or folds >= 2),
    'sasrec_folds',
    '0 (training windows use the full SASRec, an oracle on them) or an int >= 2',
    folds,
  )
