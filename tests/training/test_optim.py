"""The one learning-rate schedule: the first update of every trainer has a positive step size and the peak comes at
the end of the warm-up."""

import pytest

from coars_jax.training import optim, rl
from coars_jax.training import warm_start as ws


@pytest.mark.parametrize(
  'name, schedule, peak, warmup, total',
  [
    (
      'rl',
      rl.learning_rate_schedule(rl.RLConfig(iterations=50, learning_rate=1e-4, warmup_iterations=10)),
      1e-4,
      10,
      50,
    ),
    (
      'warm_start',
      ws.learning_rate_schedule(ws.WarmStartConfig(steps=40, learning_rate=1e-3, warmup_steps=4)),
      1e-3,
      4,
      40,
    ),
  ],
)
def test_first_step_is_positive_and_the_peak_is_reached_at_the_end_of_the_warm_up(name, schedule, peak, warmup, total):
  rates = [float(schedule(k)) for k in range(total + 1)]
  assert rates[0] == pytest.approx(peak / (warmup + 1), rel=1e-5), name
  for k in range(warmup):
    assert rates[k] == pytest.approx(peak * (k + 1) / (warmup + 1), rel=1e-5), (name, k)
  assert rates[warmup] == pytest.approx(peak, rel=1e-6) and max(rates) == pytest.approx(peak, rel=1e-6)
  assert all(later <= earlier for earlier, later in zip(rates[warmup:], rates[warmup + 1 :])), name


def test_no_warm_up_starts_at_the_peak_and_bad_steps_are_refused():
  schedule = optim.warmup_cosine_schedule(2.0, warmup_steps=0, total_steps=10, final_fraction=0.5)
  assert float(schedule(0)) == pytest.approx(2.0)
  assert float(schedule(10)) == pytest.approx(1.0) and float(schedule(20)) == pytest.approx(1.0)
  with pytest.raises(ValueError, match='0 <= warmup_steps <= total_steps'):
    optim.warmup_cosine_schedule(1.0, warmup_steps=5, total_steps=4, final_fraction=0.1)
