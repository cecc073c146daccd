"""What the sampler and the scorer hand to the decoder: the model in inference mode, RoPE positions from a
padding mask, and extra model keyword arguments (such as an adapter selector) split into the static ones,
which jit must hash, and the array ones, which it traces."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

StaticKwargs = tuple[tuple[str, Any], ...]


def inference_view(model: nnx.Module) -> nnx.Module:
  """`model` sharing its arrays, with every dropout (e.g. LoRA dropout) switched off: sampling and scoring
  must be deterministic, and a dropout drawing random bits inside the decode loop could not update its RNG
  state from there."""
  return nnx.view(model, only=nnx.Dropout, raise_if_not_found=False, deterministic=True)


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """RoPE positions [B, L] int32 that count real tokens only, so a left-padded row numbers its first real
  token 0 exactly as the same prompt without padding would; padding slots get 0 (never attended)."""
  return jnp.maximum(jnp.cumsum(mask != 0, axis=1) - 1, 0).astype(jnp.int32)


def split_model_kwargs(model_kwargs: Mapping[str, Any], what: str) -> tuple[StaticKwargs, dict[str, Any]]:
  """(static items sorted by name, array items): arrays become traced jit arguments; anything else (an
  adapter name, a flag) becomes part of the compiled program's key and must be hashable."""
  static, arrays = {}, {}
  for name, value in model_kwargs.items():
    if isinstance(value, (jax.Array, np.ndarray)):
      arrays[name] = value
      continue
    try:
      hash(value)
    except TypeError:
      raise TypeError(
        f'{what}: model keyword {name}={value!r} is neither an array nor hashable; pass arrays '
        'for per-call data and hashable values (str, int, tuple) for static choices'
      ) from None
    static[name] = value
  return tuple(sorted(static.items())), arrays


def model_kwargs(static_kwargs: StaticKwargs, array_kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """The keyword arguments for the model call, reassembled inside a jitted function."""
  return {**dict(static_kwargs), **array_kwargs}
