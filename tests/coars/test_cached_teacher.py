"""The teacher read from the student's cache (`sampling.shared_prefix_log_probs`): x + d shares x's tokens up to
the end of its last user message, so the teacher can reuse the student pass's keys and values for that prefix and
score only the rest of d and y. Its log-probs, the token credit A and the loss gradient equal the naive teacher
pass on the whole x + d (to float rounding), with and without an output grammar."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coars_jax.coars import coars_objective, token_advantages
from coars_jax.sampling import completion_log_probs, left_pad, right_pad
from coars_jax.sampling.scoring import shared_prefix_log_probs
from tests.coars.conftest import PAD, VOCAB

# Three rows: student prompts x of different lengths; each teacher prompt keeps a prefix of x (all of x but a short
# tail, which stands in for the chat template's end-of-message and assistant header), then its own suffix d + tail.
X = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15], [16, 17, 18, 19, 20, 21]]
SHARED = [5, 3, 6]
SUFFIX = [[30, 31, 32, 33, 10, 11], [34, 35, 14, 15], [36, 37, 38]]
Y = [[40, 41, 42], [43, 44], [45, 46, 47]]
ADAPTER = np.asarray([0, 1, 0], np.int32)


def _arrays():
  x_tokens, x_mask = left_pad(X, 8, PAD)
  suffix_tokens, suffix_mask = left_pad(SUFFIX, 8, PAD)
  y_tokens, y_mask = right_pad(Y, 4, PAD)
  teacher = [x[:shared] + suffix for x, shared, suffix in zip(X, SHARED, SUFFIX)]
  t_tokens, t_mask = left_pad(teacher, 16, PAD)
  return dict(
    prompt_tokens=x_tokens,
    prompt_mask=x_mask,
    teacher_suffix_tokens=suffix_tokens,
    teacher_suffix_mask=suffix_mask,
    teacher_shared_length=np.asarray(SHARED, np.int32),
    completion_tokens=y_tokens,
    completion_mask=y_mask,
    teacher_prompt_tokens=t_tokens,
    teacher_prompt_mask=t_mask,
  )


def test_cached_teacher_equals_the_naive_teacher_pass(shared_model):
  a = {key: jnp.asarray(value) for key, value in _arrays().items()}

  @jax.jit
  def both(model_state):
    model = nnx.merge(graphdef, model_state)
    cached = shared_prefix_log_probs(
      model,
      a['prompt_tokens'],
      a['prompt_mask'],
      a['completion_tokens'],
      a['completion_mask'],
      a['teacher_suffix_tokens'],
      a['teacher_suffix_mask'],
      a['teacher_shared_length'],
      adapter=jnp.asarray(ADAPTER),
    )
    student = completion_log_probs(
      model,
      a['prompt_tokens'],
      a['prompt_mask'],
      a['completion_tokens'],
      a['completion_mask'],
      adapter=jnp.asarray(ADAPTER),
    )
    teacher = completion_log_probs(
      model,
      a['teacher_prompt_tokens'],
      a['teacher_prompt_mask'],
      a['completion_tokens'],
      a['completion_mask'],
      adapter=jnp.asarray(ADAPTER),
    )
    return cached, (student, teacher)

  graphdef, state = nnx.split(shared_model)
  (student, teacher), (naive_student, naive_teacher) = both(state)
  chex.assert_shape([student, teacher], (3, 4))
  np.testing.assert_allclose(student, naive_student, atol=1e-5)
  np.testing.assert_allclose(teacher, naive_teacher, atol=1e-5)
  mask = a['completion_mask']
  assert float(jnp.abs(teacher - student).max()) > 1e-3  # d changes the scores, so the check can fail
  np.testing.assert_allclose(
    token_advantages(teacher, student, mask), token_advantages(naive_teacher, naive_student, mask), atol=1e-4
  )
  assert np.all(np.asarray(teacher)[np.asarray(mask) == 0] == 0)


def test_objective_with_the_cached_teacher_matches_the_naive_one_in_loss_and_gradient(shared_model):
  arrays = _arrays()
  common = {
    key: jnp.asarray(arrays[key]) for key in ('prompt_tokens', 'prompt_mask', 'completion_tokens', 'completion_mask')
  }
  common.update(
    adapter=jnp.asarray(ADAPTER),
    agent=jnp.asarray([0, 1, 0], jnp.int32),
    reward=jnp.asarray([0.7, -0.4, 0.2], jnp.float32),
    included=jnp.ones(3, bool),
    num_episodes=jnp.asarray(2.0),
  )
  cached = dict(
    common,
    **{
      key: jnp.asarray(arrays[key]) for key in ('teacher_suffix_tokens', 'teacher_suffix_mask', 'teacher_shared_length')
    },
  )
  naive = dict(common, **{key: jnp.asarray(arrays[key]) for key in ('teacher_prompt_tokens', 'teacher_prompt_mask')})
  graphdef, lora, rest = nnx.split(shared_model, nnx.LoRAParam, ...)

  def loss(lora, batch, remat):
    return coars_objective(nnx.merge(graphdef, lora, rest), batch, lambda_sd=0.5, pad_token_id=PAD, remat=remat)

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=2)
  (loss_cached, metrics), grads_cached = grad(lora, cached, True)
  (loss_naive, _), grads_naive = grad(lora, naive, False)
  np.testing.assert_allclose(loss_cached, loss_naive, rtol=1e-5)
  assert float(metrics['advantage_abs_mean']) > 1e-3
  chex.assert_trees_all_close(grads_cached, grads_naive, rtol=1e-4, atol=1e-6)
  assert VOCAB > max(max(row) for row in Y)
