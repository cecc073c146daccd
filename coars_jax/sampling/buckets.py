"""Length buckets: prompts and completions are padded up to one of a few fixed lengths, so the jitted prefill,
decode and scoring programs see a bounded set of shapes and a multi-turn run stops compiling after warm-up;
plus the host-side padding helpers (left padding for prompts and contexts, right padding for completions)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

DEFAULT_PROMPT_BUCKETS = (64, 128, 256, 512, 1024, 2048)
DEFAULT_COMPLETION_BUCKETS = (16, 32, 64, 128, 256, 512)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LengthBuckets:
  """The padded lengths a sampler or scorer may compile for.

  prompt: strictly increasing lengths that prompts (and scoring contexts) are left-padded up to.
  completion: strictly increasing lengths that completions are right-padded up to; a generation of
    max_new_tokens runs in a buffer of the smallest completion bucket >= max_new_tokens.
  For one batch size, sampling setting and set of static model keywords, a run compiles at most
  |prompt| x |completion| prefill programs (the cache holds prompt + completion slots), as many decode
  programs, and as many scoring programs (contexts use the prompt buckets).
  """

  prompt: tuple[int, ...] = DEFAULT_PROMPT_BUCKETS
  completion: tuple[int, ...] = DEFAULT_COMPLETION_BUCKETS

  def __post_init__(self):
    for name in ('prompt', 'completion'):
      sizes = getattr(self, name)
      if not isinstance(sizes, tuple) or not sizes:
        raise ValueError(f'LengthBuckets.{name}: expected a non-empty tuple of ints, found {sizes!r}')
      if any(not isinstance(size, int) or isinstance(size, bool) or size <= 0 for size in sizes):
        raise ValueError(f'LengthBuckets.{name}: every size must be a positive int, found {sizes!r}')
      if any(later <= earlier for earlier, later in zip(sizes, sizes[1:])):
        raise ValueError(f'LengthBuckets.{name}: sizes must be strictly increasing, found {sizes!r}')

  def prompt_length(self, length: int) -> int:
    """The smallest prompt bucket that holds `length` tokens."""
    return bucket_length(length, self.prompt, 'LengthBuckets.prompt')

  def completion_length(self, length: int) -> int:
    """The smallest completion bucket that holds `length` tokens."""
    return bucket_length(length, self.completion, 'LengthBuckets.completion')


def bucket_length(length: int, sizes: Sequence[int], what: str = 'buckets') -> int:
  """The smallest size in `sizes` (increasing) that is >= `length`; an error names the largest if none is."""
  for size in sizes:
    if size >= length:
      return size
  raise ValueError(
    f'{what}: {length} tokens exceed the largest bucket {sizes[-1]}; add a bucket of at least '
    f'{length} to {what} (sizes now {tuple(sizes)})'
  )


def left_pad(sequences: Sequence[Sequence[int]], length: int, pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Ragged token lists -> (tokens[B, length] int32, mask[B, length] int32), real tokens flush right."""
  tokens, mask = _empty(sequences, length, pad_token_id, 'left_pad')
  for row, sequence in enumerate(sequences):
    if len(sequence):
      tokens[row, length - len(sequence) :] = sequence
      mask[row, length - len(sequence) :] = 1
  return tokens, mask


def right_pad(sequences: Sequence[Sequence[int]], length: int, pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Ragged token lists -> (tokens[B, length] int32, mask[B, length] int32), real tokens flush left."""
  tokens, mask = _empty(sequences, length, pad_token_id, 'right_pad')
  for row, sequence in enumerate(sequences):
    tokens[row, : len(sequence)] = sequence
    mask[row, : len(sequence)] = 1
  return tokens, mask


def repad_left(tokens: np.ndarray, mask: np.ndarray, length: int, pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Adds left padding to a left-padded batch [B, L] so it is [B, length] (length >= L)."""
  extra = length - tokens.shape[1]
  if extra < 0:
    raise ValueError(f'repad_left: batch is {tokens.shape[1]} wide, longer than the target {length}')
  return (np.pad(tokens, ((0, 0), (extra, 0)), constant_values=pad_token_id), np.pad(mask, ((0, 0), (extra, 0))))


def repad_right(tokens: np.ndarray, mask: np.ndarray, length: int, pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Adds right padding to a right-padded batch [B, L] so it is [B, length] (length >= L)."""
  extra = length - tokens.shape[1]
  if extra < 0:
    raise ValueError(f'repad_right: batch is {tokens.shape[1]} wide, longer than the target {length}')
  return (np.pad(tokens, ((0, 0), (0, extra)), constant_values=pad_token_id), np.pad(mask, ((0, 0), (0, extra))))


def check_left_padded(mask: np.ndarray, what: str, *, allow_empty: bool = False) -> None:
  """Raises unless every row of the 0/1 `mask` [B, L] is zeros then ones (and, unless allowed, has a one)."""
  _check_padding(mask, what, 'left', allow_empty)


def check_right_padded(mask: np.ndarray, what: str, *, allow_empty: bool = True) -> None:
  """Raises unless every row of the 0/1 `mask` [B, L] is ones then zeros (and, unless allowed, has a one)."""
  _check_padding(mask, what, 'right', allow_empty)


def _check_padding(mask: np.ndarray, what: str, side: str, allow_empty: bool) -> None:
  if mask.ndim != 2:
    raise ValueError(f'{what}: expected a [batch, length] mask, found shape {mask.shape}')
  real = mask != 0
  # Left padding: once a row turns real it stays real; right padding is the mirror image.
  steps = np.diff(real.astype(np.int8), axis=1)
  bad_rows = np.nonzero((steps < 0).any(axis=1) if side == 'left' else (steps > 0).any(axis=1))[0]
  if bad_rows.size:
    raise ValueError(
      f'{what}: row {int(bad_rows[0])} is not {side}-padded (mask '
      f'{real[bad_rows[0]].astype(int).tolist()}); put padding on the {side}'
    )
  if not allow_empty:
    empty = np.nonzero(~real.any(axis=1))[0]
    if empty.size:
      raise ValueError(f'{what}: row {int(empty[0])} has no real tokens; every row needs at least one')


def _empty(sequences: Sequence[Sequence[int]], length: int, pad_token_id: int, what: str):
  longest = max((len(sequence) for sequence in sequences), default=0)
  if longest > length:
    raise ValueError(f'{what}: a sequence of {longest} tokens does not fit length {length}')
  return (np.full((len(sequences), length), pad_token_id, np.int32), np.zeros((len(sequences), length), np.int32))
