"""`Partitioning` (a mesh plus logical-axis rules) turns logical axis names into `NamedSharding`s for every kind of
array a run holds: base weights and LoRA adapters (from the `out_sharding` names on each `nnx.Variable`), optimizer
state (mirroring the parameters it tracks), KV caches and batch rows, with a divisibility fallback that always
yields a legal sharding (`Partitioning.spec`). It also activates the same rules for the decoder's activation
constraints inside a jitted program, and `sharded_jit` compiles a function with the resulting `in_shardings` /
`out_shardings`. The sampler, the scorer and the RL update step all go through it."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from coars_jax.models.config import DecoderConfig
from coars_jax.models.kv_cache import KVCache
from coars_jax.models.logical_axes import BATCH, EMBED, HEAD_DIM, HEADS, KV_HEADS, MLP, VOCAB, LogicalAxes
from coars_jax.parallel.rules import DEFAULT_RULES, Rules, validate_rules


@dataclasses.dataclass(frozen=True)
class Partitioning:
  """Where arrays live on `mesh` under `rules`. Hashable, so jitted programs can take it as a static argument."""

  mesh: Mesh
  rules: Rules = DEFAULT_RULES

  def __post_init__(self):
    object.__setattr__(self, 'rules', validate_rules(self.rules))

  @classmethod
  def create(cls, mesh: Mesh, rules: Rules | None = None) -> Partitioning:
    return cls(mesh, DEFAULT_RULES if rules is None else rules)

  # -- single arrays ----------------------------------------------------------------------------------------------

  def spec(self, axes: LogicalAxes | None, shape: Sequence[int]) -> PartitionSpec:
    """The `PartitionSpec` of an array of `shape` whose dimensions carry the logical names `axes` (None: whole).

    Fallback: a dimension is split over its rule's mesh axes only where their product divides its size; otherwise
    the minor axes are dropped one by one (batch ('data', 'fsdp') on 2 rows over data=2, fsdp=4 is split over
    'data' only), down to keeping the dimension whole (kv_heads=2 on tensor=8 is replicated on that dimension
    while the array's other dimensions stay split). A mesh axis splits at most one dimension (the first that
    claims it), and axes of size 1 or absent from the mesh are ignored. So every mesh of the right size runs the
    same program, with other placements. Trailing whole dimensions are left out: replicated is `PartitionSpec()`.
    """
    if axes is None or len(axes) != len(shape):
      return PartitionSpec()
    sizes = dict(self.mesh.shape)
    table = dict(self.rules)
    used: set[str] = set()
    entries: list[str | tuple[str, ...] | None] = []
    for name, size in zip(axes, shape):
      targets = [axis for axis in table.get(name, ()) if sizes.get(axis, 1) > 1 and axis not in used]
      while targets and size % math.prod(sizes[axis] for axis in targets):
        targets.pop()
      used.update(targets)
      entries.append(None if not targets else targets[0] if len(targets) == 1 else tuple(targets))
    while entries and entries[-1] is None:
      entries.pop()
    return PartitionSpec(*entries)

  def sharding(self, axes: LogicalAxes | None, shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(axes, shape))

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def batch(self, shape: Sequence[int], row_axis: int = 0) -> NamedSharding:
    """Dimension `row_axis` of an array of `shape` split as the 'batch' rule says, the rest whole."""
    if not 0 <= row_axis < len(shape):
      raise ValueError(f'Partitioning.batch: row_axis {row_axis} is outside an array of shape {tuple(shape)}')
    axes = [None] * len(shape)
    axes[row_axis] = BATCH
    return self.sharding(tuple(axes), shape)

  # -- pytrees ----------------------------------------------------------------------------------------------------

  def state(self, state: Any) -> Any:
    """The same pytree as `state` (an `nnx.State` of parameters, concrete or abstract) with a `NamedSharding` in
    place of each array: by the logical names of its `nnx.Variable` where it has them, replicated otherwise
    (RNG keys and counts, plain leaves)."""

    def place(node):
      if isinstance(node, nnx.Variable):
        return node.replace(self.sharding(node.get_metadata().get('out_sharding'), _shape(node.get_value())))
      return self.replicated()

    return jax.tree.map(place, state, is_leaf=lambda node: isinstance(node, nnx.Variable))

  def optimizer(self, opt_state: Any, params: Any) -> Any:
    """Shardings for an optax state of `params`: every subtree shaped like `params` (Adam's moments, ...) gets the
    parameters' own shardings, every other leaf (step counts, scalars) is replicated."""
    param_shardings = self.state(params)
    structure = jax.tree.structure(params)
    bare_array = structure.num_nodes == 1  # every leaf has that structure: match by shape instead

    def mirrors_params(node) -> bool:
      if bare_array:
        return jax.tree.structure(node).num_nodes == 1 and _shape(node) == _shape(params)
      return jax.tree.structure(node) == structure

    return jax.tree.map(
      lambda node: param_shardings if mirrors_params(node) else self.replicated(), opt_state, is_leaf=mirrors_params
    )

  def cache(self, cache: KVCache) -> KVCache:
    """Shardings of a KV cache (concrete or from `jax.eval_shape`) by its logical names: rows by the batch rule,
    key/value heads by the kv_heads rule, slots and head_dim whole."""
    names = KVCache.logical_axes(len(cache.keys))
    return jax.tree.map(lambda leaf, axes: self.sharding(axes, _shape(leaf)), cache, names)

  def rows(self, tree: Any, batch_size: int, row_axis: int = 0) -> Any:
    """Shardings of a pytree of per-row arrays: a leaf whose dimension `row_axis` has `batch_size` entries is split
    by the batch rule there, any other leaf (scalars, tables) is replicated."""

    def place(leaf):
      shape = _shape(leaf)
      if len(shape) > row_axis and shape[row_axis] == batch_size:
        return self.batch(shape, row_axis)
      return self.replicated()

    return jax.tree.map(place, tree)

  def put(self, tree: Any, shardings: Any) -> Any:
    """`tree` placed on `shardings` (a no-op for arrays already there); multi-process too (`place`)."""
    return place(tree, shardings)

  # -- activations ------------------------------------------------------------------------------------------------

  def activation_rules(
    self, sizes: Mapping[str, int] | None = None
  ) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """The rules in flax's form for `models.logical_axes.constrain`, which sees names but not shapes: only the
    mesh's axes of size > 1; none of the batch's mesh axes on other names (every activation is [batch, ...], and
    an axis may split one dimension only, so by default activations are split on rows, heads, mlp and vocab, never
    on embed); and for each name in `sizes` (its dimension in every activation of the program, see
    `activation_sizes`) the same divisibility fallback as `spec`. A name without a fixed size (length: the prompt
    length in a prefill, 1 in a decode step) keeps its rule; a dimension the mesh does not divide is then left to
    XLA's padded (uneven) sharding, exact but wasteful."""
    sizes = dict(sizes or {})
    mesh_sizes = dict(self.mesh.shape)
    table = dict(self.rules)
    batch_axes = tuple(axis for axis in table.get(BATCH, ()) if mesh_sizes.get(axis, 1) > 1)
    out = []
    for name, axes in self.rules:
      kept = [axis for axis in axes if mesh_sizes.get(axis, 1) > 1 and (name == BATCH or axis not in batch_axes)]
      if name in sizes:
        while kept and sizes[name] % math.prod(mesh_sizes[axis] for axis in kept):
          kept.pop()
      out.append((name, None if not kept else kept[0] if len(kept) == 1 else tuple(kept)))
    return tuple(out)

  @contextlib.contextmanager
  def activate(self, sizes: Mapping[str, int] | None = None) -> Iterator[None]:
    """Inside a traced function: makes the decoder's activation constraints follow these rules on this mesh."""
    with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh), nnx.logical_axis_rules(self.activation_rules(sizes)):
      yield


def activation_sizes(config: DecoderConfig, batch: int) -> dict[str, int]:
  """The size of every logical activation dimension that is the same throughout a program of `batch` rows (all
  but length, which differs between prefill and decode steps)."""
  return {
    BATCH: batch,
    EMBED: config.embed_dim,
    HEADS: config.num_heads,
    KV_HEADS: config.num_kv_heads,
    HEAD_DIM: config.head_dim,
    MLP: config.mlp_dim,
    VOCAB: config.vocab_size,
  }


def activation_scope(partitioning: Partitioning | None, config: DecoderConfig | None = None, batch: int | None = None):
  """`partitioning.activate()` for a model of `config` run on `batch` rows (both known at trace time), or nothing
  when there is no partitioning (the unsharded programs)."""
  if partitioning is None:
    return contextlib.nullcontext()
  return partitioning.activate(None if config is None or batch is None else activation_sizes(config, batch))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules | None = None) -> nnx.Module:
  """Moves `model`'s state onto `mesh` by the rules, in place (the arrays are replaced, not copied per role), so
  later sharded calls find their inputs already placed. Returns `model` for chaining."""
  partitioning = Partitioning.create(mesh, rules)
  state = nnx.state(model)
  nnx.update(model, partitioning.put(state, partitioning.state(state)))
  return model


def place(tree: Any, shardings: Any) -> Any:
  """`tree` on `shardings` (a matching tree, or a prefix of it: one sharding for a whole subtree).

  Single-process this is `jax.device_put`. When a sharding spans devices of other processes, `device_put` would
  refuse a committed process-local array and check every host value with a collective, and jit refuses numpy
  inputs outright; so host values (numpy, scalars, arrays on this process's devices) are assembled into global
  arrays with `jax.make_array_from_callback`, each process filling its own devices from its full copy. That is
  correct because every process runs the same deterministic program and holds the same full value. Arrays that
  already span processes are resharded by `device_put`.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)
  return jax.tree.map(
    lambda sharding, subtree: jax.tree.map(functools.partial(_place_leaf, sharding=sharding), subtree),
    shardings,
    tree,
    is_leaf=lambda node: isinstance(node, jax.sharding.Sharding),
  )


def _place_leaf(leaf, sharding: jax.sharding.Sharding):
  if sharding.is_fully_addressable or (isinstance(leaf, jax.Array) and not leaf.is_fully_addressable):
    return jax.device_put(leaf, sharding)
  if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    data = _place_leaf(jax.random.key_data(leaf), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
  host = np.asarray(leaf)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def sharded_jit(
  fun: Callable,
  in_shardings: Any,
  out_shardings: Any,
  *,
  static_argnums: tuple[int, ...] = (),
  donate_argnums: tuple[int, ...] = (),
) -> Callable:
  """`jax.jit(fun, in_shardings=, out_shardings=, ...)`, memoised on the shardings' values, so a caller that
  recomputes equal shardings on every call reuses one jitted function (and its compiled programs). Positional
  arguments only (jit refuses keyword arguments once in_shardings are given); `in_shardings` covers the
  non-static ones. In a multi-process run the arguments are first `place`d on `in_shardings`, since jit takes
  only global arrays for shardings that span processes; single-process they go to jit as they are."""
  in_leaves, in_tree = jax.tree.flatten(in_shardings)
  out_leaves, out_tree = jax.tree.flatten(out_shardings)
  jitted = _jit(
    fun, tuple(in_leaves), in_tree, tuple(out_leaves), out_tree, tuple(static_argnums), tuple(donate_argnums)
  )
  if jax.process_count() == 1:
    return jitted
  return _PlacingJit(jitted, jax.tree.unflatten(in_tree, in_leaves), tuple(static_argnums))


@functools.lru_cache(maxsize=256)
def _jit(fun, in_leaves, in_tree, out_leaves, out_tree, static_argnums, donate_argnums):
  return jax.jit(
    fun,
    in_shardings=jax.tree.unflatten(in_tree, in_leaves),
    out_shardings=jax.tree.unflatten(out_tree, out_leaves),
    static_argnums=static_argnums,
    donate_argnums=donate_argnums,
  )


class _PlacingJit:
  """A jitted function whose non-static positional arguments are `place`d on its in_shardings first."""

  def __init__(self, jitted, in_shardings, static_argnums: tuple[int, ...]):
    self.jitted, self.in_shardings, self.static_argnums = jitted, in_shardings, static_argnums

  def _placed(self, args: tuple) -> tuple:
    static = set(self.static_argnums)
    dynamic = place(tuple(arg for i, arg in enumerate(args) if i not in static), tuple(self.in_shardings))
    dynamic_iter = iter(dynamic)
    return tuple(arg if i in static else next(dynamic_iter) for i, arg in enumerate(args))

  def __call__(self, *args):
    return self.jitted(*self._placed(args))

  def lower(self, *args):
    return self.jitted.lower(*self._placed(args))


def _shape(leaf) -> tuple[int, ...]:
  return tuple(getattr(leaf, 'shape', ()))
