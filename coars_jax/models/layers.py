"""The decoder's building blocks: `Linear` (every projection, and the place LoRA adapters will attach),
`RMSNorm` and `Embedding`, each holding parameters annotated with logical axis names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from coars_jax.models.logical_axes import LogicalAxes, logical_param

INIT_STDDEV = 0.02  # transformers' `initializer_range` default for these families


class Linear(nnx.Module):
  """y = x . kernel (+ bias), contracting the last `len(in_shape)` axes of x with the kernel's leading axes.

  Kernels keep structured shapes, e.g. q_proj is [embed, heads, head_dim] and o_proj is
  [heads, head_dim, embed], so every dimension carries its own logical name and can be sharded by rule.
  `lora` is None until `coars_jax.models.lora.add_lora` attaches a stack of adapters; a call with
  `adapter_ids` then adds the adapter delta chosen per batch row, while the kernel itself is never copied.
  """

  def __init__(
    self,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    *,
    in_axes: LogicalAxes,
    out_axes: LogicalAxes,
    use_bias: bool,
    param_dtype: jnp.dtype,
    compute_dtype: jnp.dtype,
    rngs: nnx.Rngs,
  ):
    self.in_shape = tuple(in_shape)
    self.out_shape = tuple(out_shape)
    self.compute_dtype = compute_dtype
    kernel = jax.random.normal(rngs.params(), self.in_shape + self.out_shape, param_dtype) * INIT_STDDEV
    self.kernel = logical_param(kernel, tuple(in_axes) + tuple(out_axes))
    self.bias = logical_param(jnp.zeros(self.out_shape, param_dtype), tuple(out_axes)) if use_bias else None
    # Marked as data so that add_lora can later put a module here (nnx refuses to turn a static
    # attribute into a data one); while None it adds nothing to the state.
    self.lora = nnx.data(None)

  def __call__(self, x: jax.Array, adapter_ids: jax.Array | None = None) -> jax.Array:
    num_in = len(self.in_shape)
    contracting = (tuple(range(x.ndim - num_in, x.ndim)), tuple(range(num_in)))
    y = jax.lax.dot_general(
      x.astype(self.compute_dtype), self.kernel[...].astype(self.compute_dtype), (contracting, ((), ()))
    )
    if self.bias is not None:
      y = y + self.bias[...].astype(self.compute_dtype)
    if adapter_ids is not None and self.lora is not None:
      y = y + self.lora(x, adapter_ids)
    return y


class RMSNorm(nnx.Module):
  """x / sqrt(mean(x^2) + eps) * scale, normalising in float32 and scaling in the input dtype, as HF does."""

  def __init__(self, dim: int, *, eps: float, axis_name: str, param_dtype: jnp.dtype):
    self.eps = eps
    self.scale = logical_param(jnp.ones((dim,), param_dtype), (axis_name,))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


class Embedding(nnx.Module):
  """Token embedding table [vocab, embed]; `attend` reuses it as the output projection (tied embeddings)."""

  def __init__(
    self, vocab_size: int, embed_dim: int, *, param_dtype: jnp.dtype, compute_dtype: jnp.dtype, rngs: nnx.Rngs
  ):
    self.compute_dtype = compute_dtype
    table = jax.random.normal(rngs.params(), (vocab_size, embed_dim), param_dtype) * INIT_STDDEV
    self.embedding = logical_param(table, ('vocab', 'embed'))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], tokens, axis=0).astype(self.compute_dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    return jnp.einsum('...e,ve->...v', x.astype(self.compute_dtype), self.embedding[...].astype(self.compute_dtype))
