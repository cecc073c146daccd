"""LoRA adapters on the frozen decoder: `LoRAConfig`, the `LoRAAdapters` stack that one `Linear` carries
(every named adapter of that projection, stacked on a leading adapter axis and stored as `nnx.LoRAParam`
so optimizers and `nnx.DiffState` can select them), `add_lora` to attach them in place to a built or
loaded `Decoder`, and `merge_lora` to fold one adapter into plain base-shaped weights for export."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from coars_jax.models.config import DTYPES
from coars_jax.models.decoder import Decoder
from coars_jax.models.layers import Linear
from coars_jax.models.logical_axes import ADAPTER, LORA_RANK, LogicalAxes, constrain

LORA_AXIS_NAMES: tuple[str, ...] = (ADAPTER, LORA_RANK)
ADAPTERS_OFF = -1  # adapter index meaning "base model only" (the reference policy)

ATTENTION_MODULES: tuple[str, ...] = ('q_proj', 'k_proj', 'v_proj', 'o_proj')
MLP_MODULES: tuple[str, ...] = ('gate_proj', 'up_proj', 'down_proj')
TARGET_MODULES: tuple[str, ...] = ATTENTION_MODULES + MLP_MODULES

# The frozen base weights: LoRAParam subclasses Param, so the filter nnx.Param alone would include adapters.
BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig:
  """Low-rank adapters W + (alpha / r) A B on the chosen projections (Hu et al., 2021).

  rank: r, the inner dimension of A [in, r] and B [r, out].
  alpha: the LoRA alpha; the delta is scaled by `scaling` = alpha / r.
  dropout: probability of dropping adapter inputs (x before A) while training; 0 disables it. The
    dropout is active unless the model is viewed with `nnx.view(model, deterministic=True)`.
  target_modules: which projections of every layer get adapters, a subset of `TARGET_MODULES`.
  param_dtype: dtype A and B are stored in; float32 by default so that small optimizer updates are not
    rounded away when the base model is bfloat16. They are cast to the model's compute dtype when applied.
  layers: which decoder layers get adapters (`LAYER_SPECS`): "all" (default), "top_half", "top_third",
    "top:N" (the last N), "A-B" (A to B inclusive) or a comma-separated list of indices. Below the lowest
    adapted layer nothing is trained, so the backward pass stops there (`Decoder.hidden_states`).
  """

  rank: int
  alpha: float
  dropout: float = 0.0
  target_modules: tuple[str, ...] = TARGET_MODULES
  param_dtype: str = 'float32'
  layers: str = 'all'

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
      raise ValueError(f'LoRAConfig.rank: expected a positive int, found {self.rank!r}')
    if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not self.alpha > 0:
      raise ValueError(f'LoRAConfig.alpha: expected a positive number, found {self.alpha!r}')
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'LoRAConfig.dropout: expected a probability in [0, 1), found {self.dropout!r}')
    if isinstance(self.target_modules, str):
      raise ValueError(
        f'LoRAConfig.target_modules: expected a sequence of names from {TARGET_MODULES}, '
        f'found the string {self.target_modules!r}'
      )
    targets = tuple(self.target_modules)
    unknown = [name for name in targets if name not in TARGET_MODULES]
    if unknown:
      raise ValueError(f'LoRAConfig.target_modules: unknown module names {unknown}; valid names are {TARGET_MODULES}')
    if not targets or len(set(targets)) != len(targets):
      raise ValueError(f'LoRAConfig.target_modules: expected a non-empty list without repeats, found {list(targets)}')
    if self.param_dtype not in DTYPES:
      raise ValueError(f'LoRAConfig.param_dtype: expected one of {DTYPES}, found {self.param_dtype!r}')
    # A tuple keeps the config hashable: it is static data in the model's graph definition.
    object.__setattr__(self, 'target_modules', targets)
    if not isinstance(self.layers, str):
      raise ValueError(f'LoRAConfig.layers: expected a string ({LAYER_SPECS}), found {self.layers!r}')
    layer_indices(self.layers, None)  # the spelling is checked now, the range once the model is known

  def layer_indices(self, num_layers: int) -> tuple[int, ...]:
    """The sorted indices of the adapted layers of a `num_layers`-layer decoder."""
    return layer_indices(self.layers, num_layers)

  @property
  def scaling(self) -> float:
    return self.alpha / self.rank

  def to_dict(self) -> dict[str, Any]:
    return {
      'rank': self.rank,
      'alpha': self.alpha,
      'dropout': self.dropout,
      'target_modules': list(self.target_modules),
      'param_dtype': self.param_dtype,
      'layers': self.layers,
    }

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any]) -> LoRAConfig:
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise ValueError(f'LoRAConfig.from_dict: unknown fields {unknown}; known fields are {sorted(known)}')
    values = dict(fields)
    if 'target_modules' in values:
      values['target_modules'] = tuple(values['target_modules'])
    return cls(**values)


LAYER_SPECS = '"all", "top_half", "top_third", "top:N", "A-B" or "i,j,k"'


def layer_indices(spec: str, num_layers: int | None) -> tuple[int, ...]:
  """The layer indices a `LoRAConfig.layers` spec names in a `num_layers`-layer decoder (sorted, distinct).

  With num_layers None only the spelling is checked (and () returned).
  """
  text = spec.strip().replace(' ', '')
  error = f'LoRAConfig.layers: expected {LAYER_SPECS}, found {spec!r}'
  fractions = {'all': 1, 'top_half': 2, 'top_third': 3}
  try:
    if text in fractions:
      count = None if num_layers is None else max(1, num_layers // fractions[text])
    elif text.startswith('top:'):
      count = int(text[4:])
      if count < 1:
        raise ValueError(error)
    elif '-' in text:
      low, high = (int(part) for part in text.split('-'))
      if not 0 <= low <= high:
        raise ValueError(error)
      indices = tuple(range(low, high + 1))
      count = None
    else:
      indices = tuple(sorted({int(part) for part in text.split(',')}))
      if not indices or indices[0] < 0 or len(indices) != len(text.split(',')):
        raise ValueError(error)
      count = None
  except ValueError:
    raise ValueError(error) from None
  if num_layers is None:
    return ()
  if text in fractions or text.startswith('top:'):
    if count > num_layers:
      raise ValueError(f'LoRAConfig.layers: {spec!r} asks for {count} layers of a {num_layers}-layer model')
    return tuple(range(num_layers - count, num_layers))
  if indices[-1] >= num_layers:
    raise ValueError(
      f'LoRAConfig.layers: {spec!r} names layer {indices[-1]} of a {num_layers}-layer model '
      f'(indices 0-{num_layers - 1})'
    )
  return indices


# Read at trace time by `LoRAAdapters`: the up-projection with its own VJP (`up_project`, the default) or plain
# autodiff of the same contraction (False; `experiments.bench_lora_gradient`'s baseline).
UP_PROJECT_VJP = True


@jax.custom_vjp
def up_project(projected: jax.Array, b: jax.Array) -> jax.Array:
  """projected[B, ..., N, r] . b[N, r, *out] -> [B, ..., *out], contracting (adapter, rank).

  Autodiff would give b's gradient as the transpose of (the output's gradient [tokens, *out] contracted over its
  token axis), and XLA:CPU then copies that gradient transposed ([*out, tokens]) once per adapted projection and
  layer: 57 ms for a 2,048-token MLP row (`gate_proj`, `up_proj`), as long as the layer's largest product. This
  VJP contracts the small projected operand first ([N, r, tokens] is what gets transposed), with the gradient in its
  own layout as the right operand; the values are the same contraction.
  """
  return _up_project(projected, b)


def _up_project(projected, b):
  return jax.lax.dot_general(projected, b, (((projected.ndim - 2, projected.ndim - 1), (0, 1)), ((), ())))


def _up_project_forward(projected, b):
  return _up_project(projected, b), (projected, b)


def _up_project_backward(residuals, d_out):
  projected, b = residuals
  tokens = tuple(range(projected.ndim - 2))
  d_b = jax.lax.dot_general(projected, d_out, ((tokens, tokens), ((), ())))  # [N, r, *out]
  out_axes = tuple(range(projected.ndim - 2, d_out.ndim))
  d_projected = jax.lax.dot_general(d_out, b, ((out_axes, tuple(range(2, b.ndim))), ((), ())))  # [B, ..., N, r]
  return d_projected.astype(projected.dtype), d_b.astype(b.dtype)


up_project.defvjp(_up_project_forward, _up_project_backward)


class LoRAAdapters(nnx.Module):
  """All adapters of one `Linear`: a[N, *in_shape, r] and b[N, r, *out_shape], N = number of adapters.

  Called with x[B, ..., *in_shape] and adapter_ids[B] it returns the delta scaling * (x . a[i]) . b[i]
  of row b's adapter i = adapter_ids[b], and zero for rows with `ADAPTERS_OFF`. Rows never gather their
  own copy of a or b: x is projected through every adapter's A (cheap, r is small), the projections of
  the adapters a row does not use are zeroed by a one-hot mask, and one contraction over (adapter, rank)
  applies B. Gradients therefore reach only the adapter each row selected.
  """

  def __init__(self, linear: Linear, num_adapters: int, config: LoRAConfig, *, rngs: nnx.Rngs):
    in_axes, out_axes = _kernel_axes(linear)
    in_shape, out_shape = linear.in_shape, linear.out_shape
    dtype = jnp.dtype(config.param_dtype)
    self.scaling = config.scaling
    self.compute_dtype = linear.compute_dtype
    # The scale PEFT's default init gives A (kaiming-uniform with a = sqrt(5)): uniform(+-1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(math.prod(in_shape))
    a = jax.random.uniform(rngs.params(), (num_adapters, *in_shape, config.rank), dtype, -bound, bound)
    # B = 0 makes every adapter start as the identity: the model's outputs are unchanged by add_lora.
    b = jnp.zeros((num_adapters, config.rank, *out_shape), dtype)
    self.a = _lora_param(a, (ADAPTER, *in_axes, LORA_RANK))
    self.b = _lora_param(b, (ADAPTER, LORA_RANK, *out_axes))
    self.dropout = nnx.Dropout(config.dropout, rngs=rngs) if config.dropout > 0 else None

  @property
  def num_adapters(self) -> int:
    return self.a.get_value().shape[0]

  def __call__(self, x: jax.Array, adapter_ids: jax.Array) -> jax.Array:
    num_in = self.a.get_value().ndim - 2
    if adapter_ids.shape != x.shape[:1]:
      raise ValueError(
        f'LoRAAdapters: adapter_ids must have one entry per row of x {x.shape}; found shape {adapter_ids.shape}'
      )
    if self.dropout is not None:
      x = self.dropout(x)
    x = x.astype(self.compute_dtype)
    a, b = self.a[...].astype(self.compute_dtype), self.b[...].astype(self.compute_dtype)
    # [B, ..., N, r]: every adapter's down-projection of x.
    contracting = (tuple(range(x.ndim - num_in, x.ndim)), tuple(range(1, 1 + num_in)))
    projected = jax.lax.dot_general(x, a, (contracting, ((), ())))
    selected = adapter_ids[:, None] == jnp.arange(self.num_adapters, dtype=adapter_ids.dtype)[None, :]
    selected = selected.reshape(selected.shape[:1] + (1,) * (projected.ndim - 3) + selected.shape[1:] + (1,))
    projected = jnp.where(selected, projected, jnp.zeros((), projected.dtype))
    delta = (up_project if UP_PROJECT_VJP else _up_project)(projected, b)
    return delta * jnp.asarray(self.scaling, self.compute_dtype)

  def merged_delta(self, index: int) -> jax.Array:
    """scaling * a[index] . b[index] in float32, shaped like the base kernel [*in_shape, *out_shape]."""
    a = self.a[...][index].astype(jnp.float32)
    b = self.b[...][index].astype(jnp.float32)
    return jnp.tensordot(a, b, axes=1) * self.scaling


def add_lora(model: Decoder, lora_config: LoRAConfig, adapter_names: Sequence[str], *, rngs: nnx.Rngs) -> Decoder:
  """Attaches one stack of `len(adapter_names)` adapters to every targeted projection of `model`, in place.

  The base parameters are untouched and not copied: each adapter only adds its own A and B. Returns
  `model` for chaining. A model that already has adapters is refused; build or load a fresh one.
  """
  if model.adapter_names:
    raise ValueError(
      f'add_lora: the model already has adapters {model.adapter_names}; attach all adapters '
      'in one call, on a model without any'
    )
  if isinstance(adapter_names, str):
    raise ValueError(f'add_lora: adapter_names must be a sequence of names, found the string {adapter_names!r}')
  names = tuple(adapter_names)
  if not names or len(set(names)) != len(names) or not all(isinstance(name, str) and name for name in names):
    raise ValueError(f'add_lora: adapter_names must be distinct non-empty strings, found {list(names)}')
  layers = lora_config.layer_indices(model.config.num_layers)
  for _, linear in targeted_linears(model, lora_config.target_modules, layers):
    linear.lora = LoRAAdapters(linear, len(names), lora_config, rngs=rngs)
  model.lora_config = lora_config
  model.adapter_names = names
  return model


def extend_lora(model: Decoder, layers: str, *, rngs: nnx.Rngs) -> Decoder:
  """Widens the model's adapters to the layers `layers` names (a superset of today's), in place: each new
  projection gets adapters with B = 0, so the model computes exactly what it computed before, and the adapters it
  already had are kept. The benchmarks use it to compare an update on every layer with one on the top layers from
  the same starting function."""
  config = model.lora_config
  if config is None:
    raise ValueError('extend_lora: the model has no adapters; attach them with add_lora')
  old, new = set(config.layer_indices(model.config.num_layers)), layer_indices(layers, model.config.num_layers)
  if not old <= set(new):
    raise ValueError(f'extend_lora: layers {layers!r} drop adapted layers {sorted(old - set(new))}')
  wider = dataclasses.replace(config, layers=layers)
  for _, linear in targeted_linears(model, config.target_modules, [i for i in new if i not in old]):
    linear.lora = LoRAAdapters(linear, len(model.adapter_names), wider, rngs=rngs)
  model.lora_config = wider
  return model


def targeted_linears(
  model: Decoder, target_modules: Sequence[str], layers: Sequence[int] | None = None
) -> Iterator[tuple[str, Linear]]:
  """(dotted path, `Linear`) of every projection named in `target_modules`, layer by layer, in the layers
  `layers` (None: all)."""
  chosen = None if layers is None else set(layers)
  for index, layer in enumerate(model.layers):
    if chosen is not None and index not in chosen:
      continue
    for name in target_modules:
      if name in ATTENTION_MODULES:
        yield f'layers.{index}.attention.{name}', getattr(layer.attention, name)
      elif name in MLP_MODULES:
        yield f'layers.{index}.mlp.{name}', getattr(layer.mlp, name)
      else:
        raise ValueError(f'targeted_linears: unknown module {name!r}; valid names are {TARGET_MODULES}')


def adapted_linears(model: Decoder) -> Iterator[tuple[str, Linear]]:
  """(dotted path, `Linear`) of every projection that carries adapters (the model's `LoRAConfig`)."""
  config = model.lora_config
  if config is None:
    return iter(())
  return targeted_linears(model, config.target_modules, config.layer_indices(model.config.num_layers))


def lowest_adapted_layer(model: Decoder) -> int:
  """The index of the lowest layer with adapters (0 without adapters): the backward pass of an adapter-only
  update stops there, and `num_layers` minus it is the number of layers backpropagated."""
  if model.lora_config is None:
    return 0
  return model.lora_config.layer_indices(model.config.num_layers)[0]


def adapter_index(model: Decoder, adapter_name: str | None) -> int:
  """The index of `adapter_name` in the model's adapter stack, or `ADAPTERS_OFF` for None."""
  if adapter_name is None:
    return ADAPTERS_OFF
  if adapter_name not in model.adapter_names:
    raise ValueError(f'adapter_index: expected one of {model.adapter_names}, found {adapter_name!r}')
  return model.adapter_names.index(adapter_name)


def merge_lora(model: Decoder, adapter_name: str | None) -> Decoder:
  """A plain `Decoder` (no adapters) whose targeted kernels are W + (alpha / r) A B of `adapter_name` (None: the
  base model's kernels, as `ADAPTERS_OFF` runs them).

  Every other parameter is the same array as in `model`, not a copy. The result is what
  `save_hf_checkpoint` exports: `save_hf_checkpoint(merge_lora(model, "recommender"), folder)`.
  """
  index = None if adapter_name is None else adapter_index(model, adapter_name)
  merged: dict[tuple, jax.Array] = {}
  for path, linear in adapted_linears(model) if index is not None else ():
    kernel = linear.kernel[...]
    merged[_path_tuple(path) + ('kernel',)] = (kernel.astype(jnp.float32) + linear.lora.merged_delta(index)).astype(
      kernel.dtype
    )

  base = dict(nnx.to_flat_state(nnx.state(model, BASE_PARAMS)))
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(model.config, rngs=nnx.Rngs(0))))
  abstract = dict(nnx.to_flat_state(abstract))
  if set(abstract) != set(base):
    raise ValueError(
      f"merge_lora: the model's base parameters {sorted(set(base) ^ set(abstract))} differ "
      'from those of a Decoder built from its config'
    )
  filled = [(path, variable.replace(merged.get(path, base[path].get_value()))) for path, variable in abstract.items()]
  return nnx.merge(graphdef, nnx.from_flat_state(filled))


def _lora_param(value: jax.Array, axes: LogicalAxes) -> nnx.LoRAParam:
  # As logical_param does for base weights: names for the sharding rules, placed now if rules are active.
  return nnx.LoRAParam(constrain(value, axes), out_sharding=tuple(axes), eager_sharding=False)


def _kernel_axes(linear: Linear) -> tuple[LogicalAxes, LogicalAxes]:
  """The logical names of the kernel's input and output dimensions (None where the kernel has none)."""
  axes = linear.kernel.get_metadata().get('out_sharding')
  num_in = len(linear.in_shape)
  if axes is None or len(axes) != num_in + len(linear.out_shape):
    return (None,) * num_in, (None,) * len(linear.out_shape)
  return tuple(axes[:num_in]), tuple(axes[num_in:])


def _path_tuple(path: str) -> tuple:
  return tuple(int(part) if part.isdigit() else part for part in path.split('.'))
