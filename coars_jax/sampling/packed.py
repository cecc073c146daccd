"""Scoring packed dialogues: each agent's whole dialogue is one token sequence, several dialogues share a row (segment
ids and positions restart per dialogue), and ONE student forward over the rows gives the log-probs of every turn's
reply y_t, gathered at the reply's slots. The hindsight teacher of turn t (CoARS's x_t + d_t) is a teacher segment:
the tokens after the part of x_t it shares with the student (d_t, the turn header, y_t), in a teacher row that reads
the student's keys and values of exactly that shared part (stop-gradient) through an explicit attention mask. So a
dialogue's prompt is forwarded once, not once per turn, and the teacher scores only d_t and y_t.

The arrays of one batch (`PackedRows`), R rows, J reply segments of at most N tokens:
  dialogue_tokens, dialogue_segments, dialogue_positions: [R, Ls] (segment 0 = padding);
  teacher_tokens, teacher_segments, teacher_positions: [R, Lt]; teacher_prefix_start / _end: [R, Lt], the
    student slots [start, end) of the same row each teacher token may read;
  completion_tokens, completion_mask: [J, N], the replies y; student_row, student_start: [J], the row and slot of
    y_{t,0} in the dialogue rows; teacher_row, teacher_start: [J], the same in the teacher rows.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from coars_jax.models.decoder import Decoder
from coars_jax.models.kv_cache import KVCache, init_cache
from coars_jax.sampling.constraints import ChoiceConstraint, states_along
from coars_jax.sampling.distributions import SamplingParams
from coars_jax.sampling.scoring import MODEL_DISTRIBUTION, _target_log_probs

DIALOGUE_KEYS = (
  'dialogue_tokens',
  'dialogue_segments',
  'dialogue_positions',
  'completion_tokens',
  'completion_mask',
  'student_row',
  'student_start',
)
# Read at trace time: the teacher rows' attention reads only the key blocks their mask needs (the student prefix
# each segment shares and the segment itself; `models.block_attention`). False: the dense [Lt, Ls + Lt] softmax (the
# benchmarks' baseline).
BLOCK_SPARSE_TEACHER = True
# Read at trace time: the student's differentiated pass over the dialogue rows uses the block-sparse attention too
# (causal and per dialogue, with its custom gradient): the gradient of a pilot-shaped microbatch (2 dialogues in a
# 2,048-slot row, a 5,120-slot teacher row) took 37 s against 69 s with the dense [Ls, Ls] softmax
# (`experiments.bench_packed_update`, BUILD_NOTES Part 13). False: the dense softmax (the tests' reference).
BLOCK_SPARSE_STUDENT = True
TEACHER_KEYS = (
  'teacher_tokens',
  'teacher_segments',
  'teacher_positions',
  'teacher_prefix_start',
  'teacher_prefix_end',
  'teacher_row',
  'teacher_start',
)


def gather_slots(hidden: jax.Array, rows: jax.Array, starts: jax.Array, length: int) -> jax.Array:
  """hidden [R, L, E] -> [J, length, E]: for segment j the states at slots starts[j] - 1 + n of row rows[j], the
  ones that predict its tokens n = 0 .. length - 1 (slots past the row are clipped; those tokens are masked)."""
  slots = jnp.clip(starts[:, None] - 1 + jnp.arange(length)[None, :], 0, hidden.shape[1] - 1)
  return hidden[rows[:, None], slots]


def teacher_attention_mask(
  teacher_segments: jax.Array, prefix_start: jax.Array, prefix_end: jax.Array, student_length: int
) -> jax.Array:
  """bool [R, Lt, Ls + Lt]: a teacher token reads the student slots [start, end) of its row, then the tokens of its
  own teacher segment up to itself."""
  student_slots = jnp.arange(student_length)[None, None, :]
  reads_student = (student_slots >= prefix_start[:, :, None]) & (student_slots < prefix_end[:, :, None])
  length = teacher_segments.shape[1]
  causal = jnp.arange(length)[None, :, None] >= jnp.arange(length)[None, None, :]
  same = (teacher_segments[:, :, None] == teacher_segments[:, None, :]) & (teacher_segments[:, None, :] != 0)
  return jnp.concatenate([reads_student, causal & same], axis=-1)


def packed_log_probs(
  model: Decoder,
  rows: dict[str, jax.Array],
  *,
  teacher: bool,
  params: SamplingParams = MODEL_DISTRIBUTION,
  chunk_size: int | None = None,
  constraint: ChoiceConstraint | None = None,
  **model_call_kwargs: Any,
) -> tuple[jax.Array, jax.Array | None]:
  """(student [J, N], teacher [J, N] or None) log-probs of the replies in `rows` (see the module docstring).

  The student pass is differentiable; the teacher pass runs on stop-gradient parameters and keys and values, so no
  tangent of it is formed. `model_call_kwargs` (the per-row adapter, remat) go to the student pass; the teacher
  uses the same adapter, without remat. Log-probs are 0 off completion_mask.
  """
  tokens, segments = rows['dialogue_tokens'], rows['dialogue_segments']
  completion_tokens = rows['completion_tokens'].astype(jnp.int32)
  completion_mask = rows['completion_mask']
  chex.assert_rank([tokens, segments, rows['dialogue_positions'], completion_tokens, completion_mask], 2)
  chex.assert_equal_shape([tokens, segments, rows['dialogue_positions']])
  chex.assert_equal_shape([completion_tokens, completion_mask])
  batch, student_length = tokens.shape
  length = completion_tokens.shape[1]
  grammar = None if constraint is None else states_along(constraint, completion_tokens)
  cache = None
  if teacher:
    chex.assert_equal_shape([rows[key] for key in TEACHER_KEYS[:5]])
    # Exactly the student's slots: its attention is [Ls x Ls], never over the teacher's slots too.
    cache = init_cache(model.config, batch, student_length)
  hidden, cache = model.hidden_states(
    tokens.astype(jnp.int32),
    rows['dialogue_positions'].astype(jnp.int32),
    segments.astype(jnp.int32),
    cache,
    block_sparse=BLOCK_SPARSE_STUDENT,
    **model_call_kwargs,
  )
  predicting = gather_slots(hidden, rows['student_row'], rows['student_start'], length)
  student = _target_log_probs(model, predicting, completion_tokens, params, chunk_size, constraint, grammar)
  student = jnp.where(completion_mask != 0, student, 0.0)
  if not teacher:
    return student, None

  graphdef, state = nnx.split(model)
  teacher_model = nnx.merge(graphdef, jax.tree.map(jax.lax.stop_gradient, state))
  teacher_length = rows['teacher_tokens'].shape[1]

  def extended(array):  # the student's keys or values, constant, with room for the teacher's slots after them
    return jnp.pad(jax.lax.stop_gradient(array), ((0, 0), (0, 0), (0, teacher_length), (0, 0)))  # head-major

  stopped = KVCache(
    keys=tuple(extended(k) for k in cache.keys),
    values=tuple(extended(v) for v in cache.values),
    segment_ids=jnp.pad(cache.segment_ids, ((0, 0), (0, teacher_length))),
    end_index=jnp.asarray(student_length, jnp.int32),
  )
  teacher_segments = rows['teacher_segments'].astype(jnp.int32)
  mask = teacher_attention_mask(
    teacher_segments, rows['teacher_prefix_start'], rows['teacher_prefix_end'], student_length
  )
  teacher_kwargs = {key: value for key, value in model_call_kwargs.items() if key != 'remat'}
  teacher_hidden, _ = teacher_model.hidden_states(
    rows['teacher_tokens'].astype(jnp.int32),
    rows['teacher_positions'].astype(jnp.int32),
    teacher_segments,
    stopped,
    attention_mask=mask,
    block_sparse=BLOCK_SPARSE_TEACHER,
    **teacher_kwargs,
  )
  teacher_predicting = gather_slots(teacher_hidden, rows['teacher_row'], rows['teacher_start'], length)
  scores = _target_log_probs(
    teacher_model, teacher_predicting, completion_tokens, params, chunk_size, constraint, grammar
  )
  return student, jax.lax.stop_gradient(jnp.where(completion_mask != 0, scores, 0.0))
