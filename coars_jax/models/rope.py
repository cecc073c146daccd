"""Rotary position embeddings: inverse frequencies for plain, linear and Llama-3.1 ("llama3") scaling, and the
half-split rotation HF transformers uses (first half of head_dim paired with the second half)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from coars_jax.models.config import DecoderConfig


def inverse_frequencies(config: DecoderConfig) -> np.ndarray:
  """Inverse frequencies theta^(-2i/D) for i < D/2, float32, after `config.rope_scaling`.

  Computed in float32 like transformers does, so positions far from 0 rotate by the same angles.
  """
  dim = config.head_dim
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
  scaling = config.rope_scaling
  if scaling is None:
    return inv_freq
  if scaling.kind == 'linear':
    return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
  # llama3: wavelengths longer than the pre-training context are stretched by `factor`, short ones are
  # kept, and the band between is interpolated smoothly.
  context = scaling.original_max_position_embeddings
  low_freq_wavelength = context / scaling.low_freq_factor
  high_freq_wavelength = context / scaling.high_freq_factor
  wavelength = 2 * math.pi / inv_freq
  scaled = np.where(wavelength > low_freq_wavelength, inv_freq / scaling.factor, inv_freq)
  smooth = (context / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
  blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  in_band = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
  return np.where(in_band, blended, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotates x[B, L, N, D] by angle positions[B, L] * inv_freq; the rotation runs in float32."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, L, D/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # broadcast over heads
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x32 = x.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)
  rotated_half = jnp.concatenate([-second, first], axis=-1)
  return (x32 * cos + rotated_half * sin).astype(x.dtype)
