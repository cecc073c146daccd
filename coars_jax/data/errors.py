"""Exceptions raised by the dataset layer; each names the file and, where there is one, the line."""

from __future__ import annotations


class DataError(Exception):
  """Base class for every dataset problem a user can act on."""


class MissingDataError(DataError, FileNotFoundError):
  """A required file is in none of the places searched, and could not be downloaded."""


class ChecksumError(DataError):
  """A file's sha256 differs from the pinned value, so it is not trusted."""


class MalformedDataError(DataError, ValueError):
  """A file could not be parsed: a bad line, a truncated file, an unknown id or a wrong encoding."""

  def __init__(self, path, line: int | None, problem: str):
    where = f'{path}:{line}' if line is not None else f'{path}'
    super().__init__(f'{where}: {problem}')
    self.path = path
    self.line = line
    self.problem = problem
