"""What every entry point shares: expected errors (a bad config, missing or corrupt data, a bad checkpoint, a bad
flag or config file) print one or two lines and exit with status 2; `--verbose` shows the traceback instead.

`cli.run(main)` replaces `absl.app.run(main)`. Every command also turns on JAX's persistent compilation cache
(`coars_jax.compilation_cache`), announced on stderr.
"""

from __future__ import annotations

import logging as std_logging
import os
import pathlib
import re
import sys

from absl import app, flags, logging

from coars_jax import compilation_cache
from coars_jax.configlib import ConfigError
from coars_jax.data.errors import DataError
from coars_jax.training.checkpointing import CheckpointError

# The errors a user can cause and fix; anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (ConfigError, DataError, CheckpointError)
USAGE_STATUS = 2

_VERBOSE = flags.DEFINE_bool(
  'verbose',
  False,
  'Show the full traceback of expected errors (config, data, checkpoint) instead of a one-line message.',
)


def program() -> str:
  """The command as the user typed it: `python -m experiments.<name>` or the console script's name."""
  name = pathlib.Path(sys.argv[0]).stem
  return f'python -m experiments.{name}' if pathlib.Path(sys.argv[0]).parent.name == 'experiments' else name


def fail(message: str, hint: str = '') -> None:
  print(f'{program()}: error: {message}', file=sys.stderr)
  if hint:
    print(hint, file=sys.stderr)
  sys.exit(USAGE_STATUS)


def _verbose_requested(argv) -> bool:
  return any(arg in ('--verbose', '--verbose=true', '--verbose=True', '--verbose=1') for arg in argv)


def _config_problem(name: str, error: BaseException, argv) -> str:
  """One line for a config flag that failed to load: the file that could not be read, or the override that names
  no field (with its full path and the closest valid one)."""
  root = error
  while root.__cause__ is not None or (root.__context__ is not None and not root.__suppress_context__):
    root = root.__cause__ or root.__context__
  text = str(root).strip().strip('\'"')
  typo = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', str(error) + str(root))
  overrides = [arg.split('=', 1)[0][2:] for arg in argv if arg.startswith(f'--{name}.')]
  if typo or isinstance(root, (KeyError, AttributeError)):
    wrong = typo.group(2) if typo else text.splitlines()[0]
    path = next((o[len(name) + 1 :] for o in overrides if o.split('.')[-1] == wrong), wrong)
    hint = f"; did you mean '{path.rsplit('.', 1)[0] + '.' if '.' in path else ''}{typo.group(1)}'?" if typo else ''
    return f"unknown config field '{path}' (from --{name}.{path}){hint}"
  given = next((arg.split('=', 1)[1] for arg in argv if arg.startswith(f'--{name}=')), '')
  last = text.splitlines()[-1].strip().strip('\'"') if text else repr(root)
  return f'--{name}={given}: the config file could not be loaded: {last}'


REPOSITORY = pathlib.Path(__file__).resolve().parents[1]


def resolve_config_paths(argv, names) -> list[str]:
  """`--config=configs/x.py[:arg]` read from the repository when the path does not exist where the command runs, so
  the console scripts work from any directory (outputs still go under the working directory)."""
  out = []
  for arg in argv:
    for name in names:
      prefix = f'--{name}='
      if arg.startswith(prefix):
        path, colon, rest = arg[len(prefix) :].partition(':')
        if (
          path
          and not pathlib.Path(path).is_absolute()
          and not pathlib.Path(path).exists()
          and (REPOSITORY / path).is_file()
        ):
          arg = f'{prefix}{REPOSITORY / path}{colon}{rest}'
    out.append(arg)
  return out


def _parse_flags(argv):
  """absl's parsing, with a bad flag, config file or config override reported in one line and status 2."""
  config_flags = [name for name in flags.FLAGS if type(flags.FLAGS[name]).__name__ == '_ConfigFlag']
  argv = resolve_config_paths(argv, config_flags)
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as error:
    if _verbose_requested(argv):
      raise
    text = str(error).strip().splitlines()
    fail(text[-1] if text else repr(error), 'Pass --helpfull to see the flags.')
  except (AttributeError, KeyError) as error:  # an override of a field the config does not have
    if _verbose_requested(argv):
      raise
    name = next((n for n in config_flags if any(arg.startswith(f'--{n}.') for arg in argv)), None)
    if name is None:
      raise
    fail(_config_problem(name, error, argv), 'Pass --verbose for the traceback.')
  # Config files are loaded and overridden while parsing; a failure surfaces when the value is first read.
  for name in config_flags:
    flag = flags.FLAGS[name]
    if flag.value is None:
      continue
    try:
      flag.value.keys()  # a config that failed to load raises its error on first use
    except Exception as error:  # pylint: disable=broad-except
      if _verbose_requested(argv):
        raise
      fail(_config_problem(name, error, argv), 'Pass --verbose for the traceback.')
  return rest


def _quiet_logs(argv) -> None:
  """Warnings and errors only, unless --verbosity / -v was given: Orbax logs every read and write at INFO and
  JAX its backend probes, through loggers that a flag default alone does not reach."""
  if any(arg.startswith(('--verbosity', '-v=', '--v=')) or arg == '-v' for arg in argv):
    return
  logging.set_verbosity(logging.WARNING)
  std_logging.getLogger().setLevel(std_logging.WARNING)


def run(main, *, required: tuple[str, ...] = (), quiet: bool = True) -> None:
  """`app.run(main)` with expected errors turned into one-line messages and exit status 2, the flags in `required`
  marked required, and (when `quiet`) INFO logs off unless --verbosity asks for them."""
  if required:
    flags.mark_flags_as_required(list(required))

  def wrapped(argv):
    if quiet:
      _quiet_logs(sys.argv)
    compilation_cache.enable()
    try:
      return main(argv)
    except EXPECTED_ERRORS as error:
      if _VERBOSE.value or os.environ.get('COARS_TRACEBACK'):
        raise
      fail(f'{type(error).__name__}: {error}', 'Pass --verbose for the traceback.')
    except app.UsageError as error:
      if _VERBOSE.value:
        raise
      fail(str(error), 'Pass --helpfull to see the flags.')

  app.run(wrapped, flags_parser=_parse_flags)
