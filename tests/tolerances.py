"""Tolerances for float32 results that two code paths compute with their sums in different orders (another mesh,
another fusion, another CPU's vector width): what such a comparison can promise, and the errors it uses.

Reordering a float32 sum moves single entries near zero by amounts no absolute tolerance bounds (an entry that is
a difference of large terms keeps the rounding of those terms), but it moves a whole array, measured by its norm,
by the rounding of its sums only. So arrays are compared by their norm-relative error ||a - b|| / ||b||, against
`gamma(n)` = n x eps32, the worst-case relative error of a length-n float32 sum, where for a chain of products n
is the sum of their inner dimensions (Higham, Accuracy and Stability of Numerical Algorithms, 3.1 and 3.5):
`decoder_sums` counts it for a decoder's outputs and gradients. Rounding errors are random in sign and add up to
far less than that in practice (each test says what it measured), while a real error (a missing row, a wrong
layer, a step size 1% off) shows in full.
"""

import jax
import numpy as np

EPS32 = float(np.finfo(np.float32).eps)


def gamma(n: int) -> float:
  """n x eps32: the worst-case relative error of a float32 sum of n terms."""
  return n * EPS32


def decoder_sums(config, length: int, positions: int) -> int:
  """n for a decoder's logits and adapter gradients: the inner dimensions of one forward pass added up (the backward
  pass takes the same sums transposed). Per layer the inputs of q/k/v/gate/up (embed_dim), of o (heads x
  head_dim), of down (mlp_dim), the attention scores (head_dim) and their weighted sum (`length` positions); then
  the unembedding (embed_dim), a sum over the vocabulary (the log-softmax's), and the sum over the batch's
  `positions` that forms each gradient entry."""
  per_layer = config.embed_dim + config.num_heads * config.head_dim + config.mlp_dim + config.head_dim + length
  return config.num_layers * per_layer + config.embed_dim + config.vocab_size + positions


def relative_error(actual, desired, weight=None) -> float:
  """||w (actual - desired)|| / ||w desired|| in float64, w = `weight` (default 1)."""
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  weight = 1.0 if weight is None else np.abs(np.asarray(weight, np.float64))
  return float(np.linalg.norm(weight * (actual - desired)) / np.linalg.norm(weight * desired))


def step_bound(grad_rtol: float) -> float:
  """The bound on `update_errors`' step_error given one on its grad_error: |g_ref| |u(g) - u(g_ref)| <= 2 |g - g_ref|
  for Adam's first step u (see there), plus a few ulps of rounding in the step's own arithmetic."""
  return 2 * grad_rtol + 8 * EPS32


def update_errors(new, moment, ref_new, ref_moment, old, ref_old=None) -> dict:
  """How far one optimizer update (adapters `old` -> `new`, Adam's first moment `moment`) is from a reference
  update, each error the largest over leaves of a norm-relative error:
  'grad_error' = ||mu - mu_ref|| / ||mu_ref||, the gradients compared through Adam's first moment (after one step
  0.1 x the clipped gradient);
  'step_error' = ||g_ref (step - step_ref)|| / ||g_ref step_ref||, the steps (new - old) weighted entry by entry by
  the reference gradient's magnitude. Adam's first step is lr u(g), u(g) = g / (|g| + eps): for |g| near eps = 1e-8,
  rounding of g alone moves it by up to 2 lr (an unweighted comparison of the steps cannot promise more), but
  |g_ref| |u(g) - u(g_ref)| <= 2 |g - g_ref| for every g, so this error is at most `step_bound(grad_error)`, while a
  step of the wrong size or direction shows in full.
  Trees are pytrees of arrays with the same structure; `ref_old` defaults to `old`."""
  trees = (new, moment, ref_new, ref_moment, old, old if ref_old is None else ref_old)
  grad, step = [], []
  for a, mu, ref_a, ref_mu, before, ref_before in zip(*(jax.tree.leaves(tree) for tree in trees)):
    grad.append(relative_error(mu, ref_mu))
    ref_step = np.asarray(ref_a, np.float64) - np.asarray(ref_before, np.float64)
    step.append(relative_error(np.asarray(a, np.float64) - np.asarray(before, np.float64), ref_step, ref_mu))
  return {'grad_error': max(grad), 'step_error': max(step)}
