"""Self-distilled token credit (METHOD.md section 4, Eq. 10): the token advantage
A_{t,n} = clip(log pi_T(y_{t,n} | x, d, y_{t,<n}) - log pi_S(y_{t,n} | x, y_{t,<n}), -1, 1), and the scoring of
teacher pi_T (context x + d, stop-gradient) and student pi_S (context x) in one batched forward pass of the same
weights and adapters, the two halves sharing the sampled completion y.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

from coars_jax.models.decoder import Decoder
from coars_jax.sampling.distributions import SamplingParams
from coars_jax.sampling.scoring import MODEL_DISTRIBUTION, completion_log_probs


def token_advantages(
  teacher_log_probs: jax.Array, student_log_probs: jax.Array, mask: jax.Array, *, clip: float = 1.0
) -> jax.Array:
  """A_{t,n} of Eq. 10: clip(log pi_T - log pi_S, -clip, clip) on `mask`, 0 elsewhere; float32 [S, N].

  Both inputs are under stop-gradient here: A is part of the constant weight R + lambda_SD A of Eq. 11-12, so it
  never carries a gradient to the teacher or the student.

  Args:
    teacher_log_probs: float[S, N], log pi_T(y_{t,n} | x_t, d, y_{t,<n}).
    student_log_probs: float[S, N], log pi_S(y_{t,n} | x_t, y_{t,<n}).
    mask: bool/int[S, N], the sampled tokens y_hat (the completion mask).
    clip: the bound of the clip (1 in the paper).
  """
  chex.assert_rank([teacher_log_probs, student_log_probs, mask], 2)
  chex.assert_equal_shape([teacher_log_probs, student_log_probs, mask])
  if not clip > 0:
    raise ValueError(f'token_advantages: clip must be positive, found {clip!r}')
  gap = jax.lax.stop_gradient(teacher_log_probs).astype(jnp.float32) - jax.lax.stop_gradient(student_log_probs).astype(
    jnp.float32
  )
  # The mask is applied last, so whatever sits off the mask (the scorer's zeros, or -inf) never reaches A.
  return jnp.where(jnp.asarray(mask) != 0, jnp.clip(gap, -clip, clip), 0.0)


class TeacherStudentLogProbs(NamedTuple):
  """Per-token log-probs of the same completions y under two contexts, float32 [S, N], 0 off the mask.

  student: log pi_S(y | x), differentiable.
  teacher: log pi_T(y | x + d), under stop-gradient.
  """

  student: jax.Array
  teacher: jax.Array


def teacher_student_log_probs(
  model: Decoder,
  student_prompt_tokens: jax.Array,
  student_prompt_mask: jax.Array,
  teacher_prompt_tokens: jax.Array,
  teacher_prompt_mask: jax.Array,
  completion_tokens: jax.Array,
  completion_mask: jax.Array,
  *,
  adapter: str | jax.Array | None = None,
  pad_token_id: int = 0,
  params: SamplingParams = MODEL_DISTRIBUTION,
  chunk_size: int | None = None,
  **model_call_kwargs: Any,
) -> TeacherStudentLogProbs:
  """Student and teacher log-probs of the sampled completions from one `completion_log_probs` call.

  The student rows (x, y) and the teacher rows (x + d, y) are stacked along the batch axis, [2S, ...]: both
  prompt batches are left-padded to the wider of the two (padding is masked, and positions follow the mask, so
  extra left padding does not change a row's scores), and the completion arrays and adapter ids are repeated.
  One pass, one compiled program, the same weights: the teacher is the same agent with the same adapter and the
  current parameters (section 4). The teacher half is wrapped in stop-gradient.

  Under differentiation the backward pass still runs over the teacher rows (with zero cotangents). When the
  update does not need the teacher at the current parameters (one epoch per rollout), scoring the teacher
  beforehand with `sampling.score` and passing it to `token_advantages` gives the same A for less compute.

  Args:
    model: the decoder with its adapters.
    student_prompt_tokens, student_prompt_mask: [S, P], x_t, left-padded.
    teacher_prompt_tokens, teacher_prompt_mask: [S, P'], x_t + d, left-padded.
    completion_tokens, completion_mask: [S, N], y_t, right-padded.
    adapter: which adapter scores each row, as `Decoder.__call__` takes it: None (base model), a name, or an
      int32 [S] array of per-row indices (-1 = adapter off); an array is repeated for the teacher half.
    pad_token_id: fills the added left padding (masked, so any valid id works).
    params, chunk_size, model_call_kwargs: passed to `completion_log_probs`.
  """
  chex.assert_rank(
    [
      student_prompt_tokens,
      student_prompt_mask,
      teacher_prompt_tokens,
      teacher_prompt_mask,
      completion_tokens,
      completion_mask,
    ],
    2,
  )
  chex.assert_equal_shape([student_prompt_tokens, student_prompt_mask])
  chex.assert_equal_shape([teacher_prompt_tokens, teacher_prompt_mask])
  chex.assert_equal_shape([completion_tokens, completion_mask])
  chex.assert_equal_shape_prefix([student_prompt_tokens, teacher_prompt_tokens, completion_tokens], 1)
  if model_call_kwargs.get('constraint') is not None:
    # A per-row output grammar has S rows, the stacked batch 2S; the teacher must be scored under the same
    # grammar as the student, so rather than guess which constraint fields are per row, ask for the two calls.
    raise ValueError(
      'teacher_student_log_probs: a constraint is not repeated for the teacher rows; score the '
      'teacher with its own call (sampling.score or completion_log_probs with the same constraint) '
      "and pass it as batch['teacher_log_probs'] / to token_advantages"
    )
  rows = completion_tokens.shape[0]
  width = max(student_prompt_tokens.shape[1], teacher_prompt_tokens.shape[1])

  def widen(tokens, mask):
    extra = width - tokens.shape[1]
    return (
      jnp.pad(jnp.asarray(tokens, jnp.int32), ((0, 0), (extra, 0)), constant_values=pad_token_id),
      jnp.pad(jnp.asarray(mask, jnp.int32), ((0, 0), (extra, 0))),
    )

  student_tokens, student_mask = widen(student_prompt_tokens, student_prompt_mask)
  teacher_tokens, teacher_mask = widen(teacher_prompt_tokens, teacher_prompt_mask)
  if adapter is not None and not isinstance(adapter, str):
    adapter = jnp.asarray(adapter)
    chex.assert_shape(adapter, (rows,))
    adapter = jnp.concatenate([adapter, adapter])
  both = completion_log_probs(
    model,
    jnp.concatenate([student_tokens, teacher_tokens]),
    jnp.concatenate([student_mask, teacher_mask]),
    jnp.concatenate([completion_tokens, completion_tokens]),
    jnp.concatenate([completion_mask, completion_mask]),
    params=params,
    chunk_size=chunk_size,
    adapter=adapter,
    **model_call_kwargs,
  )
  return TeacherStudentLogProbs(student=both[:rows], teacher=jax.lax.stop_gradient(both[rows:]))
