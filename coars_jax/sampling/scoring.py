"""Scoring given completions: float32 per-token log-probs log pi(y_j | context, y_<j) of a right-padded batch
of completions after a left-padded batch of contexts, from one full forward pass with the vocabulary
projection applied only at completion positions, in sequence chunks. CoARS runs it twice on the same
weights: the student pass (context = the prompt x) and the teacher pass (context = x plus hindsight d). With a
`constraints.ChoiceConstraint`, the grammar states along each completion are recomputed by a scan over its tokens
and every position is scored under the same masked distribution the sampler drew from."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from coars_jax.models.decoder import Decoder
from coars_jax.models.kv_cache import KVCache, init_cache
from coars_jax.parallel.rules import Rules
from coars_jax.parallel.sharding import Partitioning, activation_scope, sharded_jit
from coars_jax.sampling import buckets as buckets_lib
from coars_jax.sampling.buckets import LengthBuckets
from coars_jax.sampling.compilation import count_trace
from coars_jax.sampling.constraints import ChoiceConstraint, ConstraintState, mask_logits, states_along
from coars_jax.sampling.distributions import SamplingParams, log_probs
from coars_jax.sampling.model_inputs import (
  StaticKwargs,
  inference_view,
  model_kwargs,
  positions_from_mask,
  split_model_kwargs,
)

# The default distribution: the model's own, pi = softmax(logits).
MODEL_DISTRIBUTION = SamplingParams()


def completion_log_probs(
  model: Decoder,
  context_tokens: jax.Array,
  context_mask: jax.Array,
  completion_tokens: jax.Array,
  completion_mask: jax.Array,
  *,
  params: SamplingParams = MODEL_DISTRIBUTION,
  chunk_size: int | None = None,
  constraint: ChoiceConstraint | None = None,
  **model_call_kwargs: Any,
) -> jax.Array:
  """Pure and differentiable, for use inside a jitted loss: log-probs [B, C] float32 of completion_tokens.

  context_tokens, context_mask: [B, X], left-padded, each row with at least one real token.
  completion_tokens, completion_mask: [B, C], right-padded; log-probs are 0 where completion_mask is 0.
  params: the distribution to score under (default the model's own; pass the sampler's params to recompute
    its behaviour log-probs; greedy params score under the model's own distribution, as the sampler reports).
  chunk_size: project at most this many completion positions onto the vocabulary at once (None: all), to
    bound the [B, chunk, V] float32 logits held in memory.
  constraint: score under this output grammar, as `generate(..., constraint=)` sampled (the same constraint
    object, one row per completion): a token the grammar forbids at its position scores -inf.
  """
  tokens = jnp.concatenate([context_tokens, completion_tokens], axis=1).astype(jnp.int32)
  mask = jnp.concatenate([context_mask, completion_mask], axis=1).astype(jnp.int32)
  hidden, _ = model.hidden_states(tokens, positions_from_mask(mask), mask, None, **model_call_kwargs)
  # The hidden state at slot t predicts the token at slot t + 1, so completion token j is predicted from
  # slot X - 1 + j: the last context token for j = 0, then the completion itself.
  context_length, completion_length = context_tokens.shape[1], completion_tokens.shape[1]
  predicting = hidden[:, context_length - 1 : context_length - 1 + completion_length]
  completion_tokens = completion_tokens.astype(jnp.int32)
  grammar = None if constraint is None else states_along(constraint, completion_tokens)
  scores = _target_log_probs(model, predicting, completion_tokens, params, chunk_size, constraint, grammar)
  return jnp.where(completion_mask != 0, scores, 0.0)


def shared_prefix_log_probs(
  model: Decoder,
  context_tokens: jax.Array,
  context_mask: jax.Array,
  completion_tokens: jax.Array,
  completion_mask: jax.Array,
  suffix_tokens: jax.Array,
  suffix_mask: jax.Array,
  shared_lengths: jax.Array,
  *,
  params: SamplingParams = MODEL_DISTRIBUTION,
  chunk_size: int | None = None,
  constraint: ChoiceConstraint | None = None,
  **model_call_kwargs: Any,
) -> tuple[jax.Array, jax.Array]:
  """(student [B, C], teacher [B, C]) log-probs of one completion y after two contexts that share a prefix:
  the student's x, and the teacher's x[:shared] + suffix (CoARS's x + d, where d sits inside x's last user
  message, so x and x + d agree up to the end of that message's text).

  The student pass runs x + y once and keeps its keys and values; the teacher reads the first `shared` real
  tokens of x from them (under stop-gradient) and runs only suffix + y. The teacher equals a full pass over
  x[:shared] + suffix + y up to float rounding, at the cost of the suffix and y instead of the whole prompt.
  The teacher half is held constant (stop-gradient): only the student is differentiated.

  context_tokens, context_mask: [B, X], x, left-padded.
  completion_tokens, completion_mask: [B, C], y, right-padded.
  suffix_tokens, suffix_mask: [B, D], the teacher's tokens after the shared prefix, LEFT-padded (so that the
    last suffix token of every row sits at slot D - 1, and y follows at the same slots in every row).
  shared_lengths: int [B], how many real tokens of x the teacher keeps (1 <= shared <= real length of x).
  params, chunk_size, constraint, model_call_kwargs: as in `completion_log_probs`; both passes use the same.
  """
  chex_shapes = (
    context_tokens.shape,
    context_mask.shape,
    completion_tokens.shape,
    completion_mask.shape,
    suffix_tokens.shape,
    suffix_mask.shape,
  )
  batch = context_tokens.shape[0]
  if (
    context_mask.shape != context_tokens.shape
    or completion_mask.shape != completion_tokens.shape
    or suffix_mask.shape != suffix_tokens.shape
    or {s[0] for s in chex_shapes} != {batch}
    or shared_lengths.shape != (batch,)
  ):
    raise ValueError(f'shared_prefix_log_probs: inconsistent shapes {chex_shapes}, shared {shared_lengths.shape}')
  context_length, completion_length = context_tokens.shape[1], completion_tokens.shape[1]
  suffix_length = suffix_tokens.shape[1]
  completion_tokens = completion_tokens.astype(jnp.int32)
  grammar = None if constraint is None else states_along(constraint, completion_tokens)

  # Student: x + y, writing every layer's keys and values into a cache of exactly x + y slots (the attention
  # is the same as without a cache: same keys, same causal segment mask).
  tokens = jnp.concatenate([context_tokens, completion_tokens], axis=1).astype(jnp.int32)
  mask = jnp.concatenate([context_mask, completion_mask], axis=1).astype(jnp.int32)
  positions = positions_from_mask(mask)
  cache = init_cache(model.config, batch, context_length + completion_length)
  hidden, cache = model.hidden_states(tokens, positions, mask, cache, **model_call_kwargs)
  predicting = hidden[:, context_length - 1 : context_length - 1 + completion_length]
  student = _target_log_probs(model, predicting, completion_tokens, params, chunk_size, constraint, grammar)
  student = jnp.where(completion_mask != 0, student, 0.0)

  # Teacher: the kept prefix of x read from the student's cache, then suffix + y written after slot X.
  shared_lengths = shared_lengths.astype(jnp.int32)
  keep = (context_mask != 0) & (positions[:, :context_length] < shared_lengths[:, None])
  extra = suffix_length + completion_length

  def prefix(array):
    return jnp.pad(jax.lax.stop_gradient(array[:, :, :context_length]), ((0, 0), (0, 0), (0, extra), (0, 0)))

  teacher_cache = KVCache(
    keys=tuple(prefix(k) for k in cache.keys),
    values=tuple(prefix(v) for v in cache.values),
    segment_ids=jnp.pad(keep.astype(jnp.int32), ((0, 0), (0, extra))),
    end_index=jnp.asarray(context_length, jnp.int32),
  )
  teacher_tokens = jnp.concatenate([suffix_tokens, completion_tokens], axis=1).astype(jnp.int32)
  teacher_mask = jnp.concatenate([suffix_mask, completion_mask], axis=1).astype(jnp.int32)
  teacher_positions = shared_lengths[:, None] + jnp.cumsum(teacher_mask != 0, axis=1, dtype=jnp.int32) - 1
  # The teacher runs on stop-gradient copies of the parameters too, so that no tangent (and no residual) of its
  # pass is ever formed under differentiation; no remat either, for the same reason.
  graphdef, state = nnx.split(model)
  teacher_model = nnx.merge(graphdef, jax.tree.map(jax.lax.stop_gradient, state))
  teacher_kwargs = {key: value for key, value in model_call_kwargs.items() if key != 'remat'}
  teacher_hidden, _ = teacher_model.hidden_states(
    teacher_tokens, teacher_positions, teacher_mask, teacher_cache, **teacher_kwargs
  )
  teacher_hidden = teacher_hidden[:, suffix_length - 1 : suffix_length - 1 + completion_length]
  teacher = _target_log_probs(teacher_model, teacher_hidden, completion_tokens, params, chunk_size, constraint, grammar)
  teacher = jax.lax.stop_gradient(jnp.where(completion_mask != 0, teacher, 0.0))
  return student, teacher


def score(
  model: Decoder,
  context_tokens: np.ndarray | jax.Array,
  context_mask: np.ndarray | jax.Array,
  completion_tokens: np.ndarray | jax.Array,
  completion_mask: np.ndarray | jax.Array,
  *,
  params: SamplingParams = MODEL_DISTRIBUTION,
  buckets: LengthBuckets | None = None,
  chunk_size: int | None = 256,
  pad_token_id: int = 0,
  constraint: ChoiceConstraint | None = None,
  mesh: Mesh | None = None,
  rules: Rules | None = None,
  **model_call_kwargs: Any,
) -> jax.Array:
  """Jitted `completion_log_probs` (no gradient) on host or device arrays, after checking the padding.

  buckets: if given, contexts are left-padded to a prompt bucket and completions right-padded to a
    completion bucket before the call, bounding the programs compiled; the result then has the bucket's
    width, with 0 past the input's columns (slicing it back would compile a new program per width).
  constraint: the output grammar the completions were sampled under (see `completion_log_probs`); None scores
    under the unconstrained distribution with the unconstrained program.
  mesh, rules: score sharded on `mesh` (`parallel.Partitioning`; rules default to `parallel.DEFAULT_RULES`): the
    model state by the rules, rows and the result by the batch rule, activations constrained by the rules.
    None (default) runs the unsharded program. On a mesh that spans processes every process passes the same
    inputs and gets a global array back (`parallel.distributed.fetch` brings it to each host).
  model_call_kwargs: passed to the decoder call, e.g. an adapter selector (arrays traced, the rest static).
  Returns [B, C'] float32, C' = C or its bucket.
  """
  context_tokens, context_mask = np.asarray(context_tokens, np.int32), np.asarray(context_mask, np.int32)
  completion_tokens = np.asarray(completion_tokens, np.int32)
  completion_mask = np.asarray(completion_mask, np.int32)
  for name, array, like in (
    ('context_mask', context_mask, context_tokens),
    ('completion_tokens', completion_tokens, context_tokens),
    ('completion_mask', completion_mask, completion_tokens),
  ):
    if array.ndim != 2 or array.shape[0] != like.shape[0] or (name.endswith('mask') and array.shape != like.shape):
      raise ValueError(f'score: {name} has shape {array.shape}, incompatible with {like.shape}')
  buckets_lib.check_left_padded(context_mask, 'score: context_mask')
  buckets_lib.check_right_padded(completion_mask, 'score: completion_mask')
  if buckets is not None:
    context_tokens, context_mask = buckets_lib.repad_left(
      context_tokens, context_mask, buckets.prompt_length(context_tokens.shape[1]), pad_token_id
    )
    completion_tokens, completion_mask = buckets_lib.repad_right(
      completion_tokens, completion_mask, buckets.completion_length(completion_tokens.shape[1]), pad_token_id
    )
  if chunk_size is not None and chunk_size <= 0:
    raise ValueError(f'score: chunk_size must be positive or None, found {chunk_size}')
  if constraint is not None:
    if not isinstance(constraint, ChoiceConstraint):
      raise TypeError(f'score: constraint must be a ChoiceConstraint, found {type(constraint).__name__}')
    if constraint.batch_size != context_tokens.shape[0]:
      raise ValueError(
        f'score: the constraint has {constraint.batch_size} rows for {context_tokens.shape[0]} completions'
      )
  static_kwargs, array_kwargs = split_model_kwargs(model_call_kwargs, 'score')
  graphdef, state = nnx.split(inference_view(model))
  arrays = (
    jnp.asarray(context_tokens),
    jnp.asarray(context_mask),
    jnp.asarray(completion_tokens),
    jnp.asarray(completion_mask),
    array_kwargs,
  )
  if mesh is None:
    # The constraint is left out when None, so the unconstrained call is the same jit call (and program).
    score_kwargs = {} if constraint is None else {'constraint': constraint}
    return _score(
      graphdef, state, *arrays, static_kwargs=static_kwargs, params=params, chunk_size=chunk_size, **score_kwargs
    )
  partitioning = Partitioning.create(mesh, rules)
  state_shardings = partitioning.state(state)
  state = partitioning.put(state, state_shardings)
  rows = partitioning.batch((context_tokens.shape[0], 1))
  program = sharded_jit(
    _score_program,
    (
      state_shardings,
      rows,
      rows,
      rows,
      rows,
      partitioning.rows(array_kwargs, context_tokens.shape[0]),
      partitioning.replicated(),
    ),
    rows,
    static_argnums=_SCORE_STATIC,
  )
  return program(graphdef, static_kwargs, params, chunk_size, partitioning, state, *arrays, constraint)


def _score_program(
  graphdef: nnx.GraphDef,
  static_kwargs: StaticKwargs,
  params: SamplingParams,
  chunk_size: int | None,
  partitioning: Partitioning | None,
  state: nnx.State,
  context_tokens: jax.Array,
  context_mask: jax.Array,
  completion_tokens: jax.Array,
  completion_mask: jax.Array,
  array_kwargs: dict[str, Any],
  constraint: ChoiceConstraint | None,
) -> jax.Array:
  count_trace('scoring.score')
  model = nnx.merge(graphdef, state)
  with activation_scope(partitioning, model.config, context_tokens.shape[0]):
    return completion_log_probs(
      model,
      context_tokens,
      context_mask,
      completion_tokens,
      completion_mask,
      params=params,
      chunk_size=chunk_size,
      constraint=constraint,
      **model_kwargs(static_kwargs, array_kwargs),
    )


# The sharded program takes its static arguments first, positionally (a jit given in_shardings takes no keyword
# arguments); a None constraint is an empty pytree, so the unconstrained call runs the unconstrained program.
_SCORE_STATIC = (0, 1, 2, 3, 4)


@functools.partial(jax.jit, static_argnames=('graphdef', 'static_kwargs', 'params', 'chunk_size'))
def _score(
  graphdef: nnx.GraphDef,
  state: nnx.State,
  context_tokens: jax.Array,
  context_mask: jax.Array,
  completion_tokens: jax.Array,
  completion_mask: jax.Array,
  array_kwargs: dict[str, Any],
  *,
  static_kwargs: StaticKwargs,
  params: SamplingParams,
  chunk_size: int | None,
  constraint: ChoiceConstraint | None = None,
) -> jax.Array:
  """The unsharded scoring program."""
  return _score_program(
    graphdef,
    static_kwargs,
    params,
    chunk_size,
    None,
    state,
    context_tokens,
    context_mask,
    completion_tokens,
    completion_mask,
    array_kwargs,
    constraint,
  )


def _target_log_probs(
  model: Decoder,
  hidden: jax.Array,
  targets: jax.Array,
  params: SamplingParams,
  chunk_size: int | None,
  constraint: ChoiceConstraint | None = None,
  grammar: ConstraintState | None = None,
) -> jax.Array:
  """log pi(targets) [B, C] from hidden states [B, C, E], chunk_size positions at a time; with a constraint,
  `grammar` holds the states [B, C, ...] before each target, and the logits are masked by them."""

  def chunk_log_probs(hidden_chunk, target_chunk, grammar_chunk=None):
    logits = model.logits(hidden_chunk)
    if constraint is not None:
      # Mapped over positions (axis 1): the masks are [B, chunk, V] like the logits, never [B, C, V].
      logits = jax.vmap(functools.partial(mask_logits, constraint), in_axes=1, out_axes=1)(grammar_chunk, logits)
    scores = log_probs(logits, params)
    return jnp.take_along_axis(scores, target_chunk[..., None], axis=-1)[..., 0]

  batch, length, embed = hidden.shape
  if chunk_size is None or length <= chunk_size:
    return chunk_log_probs(hidden, targets, grammar)
  num_chunks = -(-length // chunk_size)
  padded = num_chunks * chunk_size
  hidden = jnp.pad(hidden, ((0, 0), (0, padded - length), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, padded - length)))
  hidden_chunks = hidden.reshape(batch, num_chunks, chunk_size, embed).swapaxes(0, 1)
  target_chunks = targets.reshape(batch, num_chunks, chunk_size).swapaxes(0, 1)
  chunks = (hidden_chunks, target_chunks)
  if constraint is not None:
    chunks += (jax.tree.map(lambda leaf: _chunked(leaf, num_chunks, chunk_size), grammar),)
  # Rematerialised under differentiation, so the backward pass also holds one chunk of logits at a time.
  scores = jax.lax.map(lambda chunk: jax.checkpoint(chunk_log_probs)(*chunk), chunks)
  return scores.swapaxes(0, 1).reshape(batch, padded)[:, :length]


def _chunked(leaf: jax.Array, num_chunks: int, chunk_size: int) -> jax.Array:
  """[B, C, ...] -> [num_chunks, B, chunk_size, ...], padding positions at the end with zeros (those
  positions' scores are dropped)."""
  padding = [(0, 0), (0, num_chunks * chunk_size - leaf.shape[1])] + [(0, 0)] * (leaf.ndim - 2)
  leaf = jnp.pad(leaf, padding)
  return leaf.reshape(leaf.shape[0], num_chunks, chunk_size, *leaf.shape[2:]).swapaxes(0, 1)
