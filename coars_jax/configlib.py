"""Config checks shared by every experiment: unknown keys with a suggestion, and typed, ranged fields.

Configs are `ml_collections.ConfigDict`s built by `get_config()` files. `check_keys` compares a config with
its defaults, so a misspelt field fails before any work starts, naming the closest valid field.
"""

from __future__ import annotations

import difflib
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
  require(len(values) > 0 and all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum
                                  for v in values),
          field, f'a non-empty list of integers >= {minimum}', values)
  return values


def require_int_field(config: ml_collections.ConfigDict, field: str, least: int) -> None:
  """The dotted `field` of `config` ('rl.iterations') is an int >= `least` (bools refused)."""
  value = config
  for part in field.split('.'):
    value = value[part]
  require(isinstance(value, int) and not isinstance(value, bool) and value >= least, field, f'an int >= {least}',
          value)
