"""The benchmark's cost model: FLOPs and bytes of one decode step, and the floor time they imply."""

import time

import pytest

from coars_jax.models import get_preset
from coars_jax.sampling.generation_speed import MachinePeaks, best_of, decode_step_cost, floor_step_seconds


def test_decode_step_cost_counts_weights_projection_and_cache():
  config = get_preset(
    'tiny', vocab_size=100, embed_dim=8, mlp_dim=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4
  )
  per_layer = 8 * 4 * (2 * 2 + 2 * 1) + 3 * 8 * 16 + 2 * 8
  params = 2 * per_layer + 100 * 8 + 8
  assert config.num_params() == params
  flops, bytes_read = decode_step_cost(config, batch=3, context_length=10)
  # Tied: the embedding table is read once and multiplied once, as the output projection.
  assert flops == 2 * 3 * params + 4 * 3 * 2 * 2 * 4 * 10
  assert bytes_read == 4 * params + 4 * 2 * 3 * 2 * 1 * 4 * 10
  untied_flops, untied_bytes = decode_step_cost(config.replace(tie_word_embeddings=False), batch=3, context_length=10)
  assert untied_flops == flops  # the lookup table adds bytes, not multiplications
  assert untied_bytes == bytes_read + 4 * 100 * 8


def test_floor_is_the_slower_of_compute_and_memory():
  config = get_preset('tiny')
  flops, bytes_read = decode_step_cost(config, batch=16, context_length=160)
  compute_bound = MachinePeaks(
    matmul_flops_per_s=1.0, copy_bytes_per_s=1e30, jnp_matmul_flops_per_s=1.0, numpy_matmul_flops_per_s=1.0
  )
  memory_bound = MachinePeaks(
    matmul_flops_per_s=1e30, copy_bytes_per_s=1.0, jnp_matmul_flops_per_s=1e30, numpy_matmul_flops_per_s=1e30
  )
  assert floor_step_seconds(config, 16, 160, compute_bound) == pytest.approx(flops)
  assert floor_step_seconds(config, 16, 160, memory_bound) == pytest.approx(bytes_read)


def test_best_of_returns_the_fastest_run():
  delays = iter([0.02, 0.0, 0.01])
  assert best_of(3, lambda: time.sleep(next(delays))) < 0.005
