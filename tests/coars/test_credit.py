"""Token advantages (Eq. 10): clip and mask by hand, no gradient through either side; one-pass teacher + student
scoring equal to two separate `completion_log_probs` calls, with the teacher half carrying no gradient."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coars_jax.coars import credit
from coars_jax.sampling import completion_log_probs, left_pad, right_pad
from tests.coars.conftest import PAD


def test_token_advantages_clip_and_mask_by_hand():
  teacher = jnp.array([[-0.5, -3.0, -1.0, -7.0], [-2.0, -0.1, 0.0, 0.0]])
  student = jnp.array([[-1.0, -0.5, -4.0, -2.0], [-0.5, -0.4, 0.0, 0.0]])
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]])
  advantages = jax.jit(credit.token_advantages)(teacher, student, mask)
  chex.assert_shape(advantages, (2, 4))
  chex.assert_type(advantages, jnp.float32)
  # (-0.5 + 1.0) = 0.5; (-3 + 0.5) = -2.5 -> -1; (-1 + 4) = 3 -> 1; off the mask 0 (the raw gap -5 is ignored).
  np.testing.assert_allclose(advantages, [[0.5, -1.0, 1.0, 0.0], [-1.0, 0.3, 0.0, 0.0]], atol=1e-6)
  half = credit.token_advantages(teacher, student, mask, clip=0.25)
  np.testing.assert_allclose(half, [[0.25, -0.25, 0.25, 0.0], [-0.25, 0.25, 0.0, 0.0]], atol=1e-6)
  with pytest.raises(ValueError, match='clip must be positive'):
    credit.token_advantages(teacher, student, mask, clip=0.0)


def test_token_advantages_carry_no_gradient():
  teacher = jnp.array([[-0.5, -1.2]])
  student = jnp.array([[-1.0, -0.9]])
  mask = jnp.array([[1, 1]])
  grad_teacher, grad_student = jax.grad(lambda t, s: credit.token_advantages(t, s, mask).sum(), argnums=(0, 1))(
    teacher, student
  )
  np.testing.assert_array_equal(grad_teacher, 0.0)
  np.testing.assert_array_equal(grad_student, 0.0)


STUDENT_PROMPTS = [[5, 9, 14], [7, 1, 22, 40, 11]]
TEACHER_PROMPTS = [[5, 9, 14, 50, 51, 52, 53], [7, 1, 22, 40, 11, 60, 61, 62, 63]]  # x followed by d
COMPLETIONS = [[20, 21, 22, 23], [30, 31]]
ADAPTERS = np.array([0, 1], np.int32)  # recommender row, user row


def _arrays():
  student_tokens, student_mask = left_pad(STUDENT_PROMPTS, 6, PAD)
  teacher_tokens, teacher_mask = left_pad(TEACHER_PROMPTS, 10, PAD)
  completion_tokens, completion_mask = right_pad(COMPLETIONS, 5, PAD)
  return tuple(
    map(jnp.asarray, (student_tokens, student_mask, teacher_tokens, teacher_mask, completion_tokens, completion_mask))
  )


def test_one_pass_equals_two_separate_scoring_calls(shared_model):
  model = shared_model
  student_tokens, student_mask, teacher_tokens, teacher_mask, completion_tokens, completion_mask = _arrays()
  adapters = jnp.asarray(ADAPTERS)
  both = nnx.jit(lambda m, *a: credit.teacher_student_log_probs(m, *a, adapter=adapters))(
    model, student_tokens, student_mask, teacher_tokens, teacher_mask, completion_tokens, completion_mask
  )
  separate = nnx.jit(lambda m, x, xm, y, ym: completion_log_probs(m, x, xm, y, ym, adapter=adapters))
  student = separate(model, student_tokens, student_mask, completion_tokens, completion_mask)
  teacher = separate(model, teacher_tokens, teacher_mask, completion_tokens, completion_mask)
  chex.assert_shape([both.student, both.teacher], (2, 5))
  chex.assert_type([both.student, both.teacher], jnp.float32)
  np.testing.assert_allclose(both.student, student, atol=1e-5)
  np.testing.assert_allclose(both.teacher, teacher, atol=1e-5)
  # The privileged context d changes the scores (otherwise the test above would be vacuous), and the adapters do.
  assert np.abs(np.asarray(both.teacher - both.student)).max() > 1e-3
  swapped = nnx.jit(lambda m, x, xm, y, ym: completion_log_probs(m, x, xm, y, ym, adapter=adapters[::-1]))(
    model, student_tokens, student_mask, completion_tokens, completion_mask
  )
  assert np.abs(np.asarray(swapped - student)).max() > 1e-3
  np.testing.assert_array_equal(np.asarray(both.student)[1, 2:], 0.0)


def test_teacher_half_gets_no_gradient_and_student_half_does(shared_model):
  model = shared_model
  arrays = _arrays()
  adapters = jnp.asarray(ADAPTERS)

  def half(name):
    def total(model):
      return getattr(credit.teacher_student_log_probs(model, *arrays, adapter=adapters), name).sum()

    return nnx.jit(nnx.grad(total, argnums=nnx.DiffState(0, nnx.LoRAParam)))(model)

  teacher_grads = jax.tree.leaves(half('teacher'))
  student_grads = jax.tree.leaves(half('student'))
  assert teacher_grads and all(np.all(np.asarray(g) == 0) for g in teacher_grads)
  assert max(float(jnp.abs(g).max()) for g in student_grads) > 0
