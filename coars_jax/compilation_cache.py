"""JAX's persistent compilation cache, on by default for every command: a compiled program (a 30-layer update step
costs 30 to 60 s to compile on 2 cores) is written to a folder in the user's cache directory and read back by every
later process that compiles the same program, so table cells, resumed runs and repeated benchmarks compile once.
`COARS_COMPILATION_CACHE` names another folder, or 'off' to disable it."""

from __future__ import annotations

import os
import pathlib
import sys

ENV_VARIABLE = 'COARS_COMPILATION_CACHE'
# Programs that compile faster than this are not written (the cache would fill with tiny eager programs).
MIN_COMPILE_SECONDS = 1.0


def default_folder() -> pathlib.Path:
  """`<user cache dir>/coars_jax/jax_compilation_cache` (platformdirs: ~/.cache on Linux)."""
  import platformdirs

  return pathlib.Path(platformdirs.user_cache_dir('coars_jax')) / 'jax_compilation_cache'


def enable(folder: str | os.PathLike | None = None, *, announce: bool = True) -> pathlib.Path | None:
  """Turns the persistent cache on in `folder` (default: $COARS_COMPILATION_CACHE, else `default_folder()`);
  returns the folder, or None when the variable says 'off'. Announced as one line on stderr."""
  chosen = folder if folder is not None else os.environ.get(ENV_VARIABLE) or default_folder()
  if str(chosen).strip().lower() in ('off', '0', 'false', 'none', ''):
    return None
  path = pathlib.Path(chosen).expanduser().resolve()
  path.mkdir(parents=True, exist_ok=True)
  import jax

  jax.config.update('jax_compilation_cache_dir', str(path))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', MIN_COMPILE_SECONDS)
  if announce:
    print(f'[coars] JAX compilation cache: {path} (set {ENV_VARIABLE}=off to disable)', file=sys.stderr, flush=True)
  return path
