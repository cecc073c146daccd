"""The memory planner: its resident estimate against the bytes a real tiny decoder with adapters and an optimizer
allocates on CPU, its activation estimate against XLA's compiled memory analysis, and the scale-out presets."""

import importlib
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from coars_jax import configlib
from coars_jax.models import BASE_PARAMS, Decoder, LoRAConfig, add_lora, get_preset
from coars_jax.parallel import planner
from coars_jax.sampling.scoring import completion_log_probs
from coars_jax.pipeline import experiment

REPO = pathlib.Path(__file__).resolve().parents[2]
PRESETS = (
  'qwen2p5_1p5b_1gpu',
  'qwen2p5_1p5b_8gpu_fsdp',
  'qwen2p5_7b_1gpu',
  'qwen2p5_7b_8gpu_fsdp',
  'qwen2p5_7b_tpu_v5e16',
)
AGENTS = ('recommender', 'user')


def state_bytes(state) -> int:
  return sum(leaf.nbytes for leaf in jax.tree.leaves(state))


def preset(name: str, method: str = 'coars'):
  return importlib.import_module(f'configs.presets.{name}').get_config(method)


def tiny_workload(**overrides) -> planner.Workload:
  fields = dict(
    model=get_preset('tiny'), lora_rank=8, rollout_rows=4, prompt_length=256, completion_length=64, microbatch_rows=2
  )
  return planner.Workload(**{**fields, **overrides})


def test_resident_estimate_matches_the_allocated_tiny_state():
  model = add_lora(
    Decoder(get_preset('tiny'), rngs=nnx.Rngs(0)), LoRAConfig(rank=8, alpha=16.0), AGENTS, rngs=nnx.Rngs(1)
  )
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.LoRAParam)
  plan = planner.plan_memory(tiny_workload(), planner.MeshShape())
  assert plan.component('base weights').num_bytes == state_bytes(nnx.state(model, BASE_PARAMS))
  assert plan.component('adapters').num_bytes == state_bytes(nnx.state(model, nnx.LoRAParam))
  # Tolerance: Adam's step counters (a few scalars) are not counted; they are 0.001% of the moments here.
  assert plan.component('optimizer state').num_bytes == pytest.approx(state_bytes(nnx.state(optimizer)), rel=1e-4)


def test_activation_estimate_bounds_the_compiled_gradient_of_the_tiny_model():
  """The update's activations against the temporaries XLA plans for the gradient of the student's log-probs
  (abstract shapes only: nothing is allocated). The planner may overestimate by up to 35%, never underestimate."""
  work = tiny_workload()
  abstract = nnx.eval_shape(
    lambda: add_lora(Decoder(work.model, rngs=nnx.Rngs(0)), LoRAConfig(rank=8, alpha=16.0), AGENTS, rngs=nnx.Rngs(1))
  )
  graphdef, lora, frozen = nnx.split(abstract, nnx.LoRAParam, ...)

  def loss(lora, frozen, context, context_mask, completion, completion_mask, adapter):
    model = nnx.merge(graphdef, lora, frozen)
    return completion_log_probs(
      model, context, context_mask, completion, completion_mask, adapter=adapter, chunk_size=work.score_chunk_size
    ).sum()

  rows = work.microbatch_rows
  ints = lambda length: jax.ShapeDtypeStruct((rows, length), jnp.int32)
  compiled = (
    jax.jit(jax.grad(loss))
    .lower(
      lora,
      frozen,
      ints(work.prompt_length),
      ints(work.prompt_length),
      ints(work.completion_length),
      ints(work.completion_length),
      jax.ShapeDtypeStruct((rows,), jnp.int32),
    )
    .compile()
  )
  measured = compiled.memory_analysis().temp_size_in_bytes
  plan = planner.plan_memory(work, planner.MeshShape())
  estimate = sum(plan.component(name).num_bytes for name in ('saved activations', 'layer in backward', 'logits chunk'))
  assert measured <= estimate <= 1.35 * measured, (estimate, measured)


def test_mesh_axes_divide_weights_rows_and_heads():
  cfg = get_preset('tiny')
  assert sum(math.prod(shape) for shape, _ in planner.base_arrays(cfg)) == cfg.num_params()
  work = tiny_workload(microbatch_rows=8, rollout_rows=8)
  single = planner.plan_memory(work, planner.MeshShape())
  mesh = planner.MeshShape.resolve({'data': 1, 'fsdp': -1, 'tensor': 2}, 8)
  assert (mesh.data, mesh.fsdp, mesh.tensor) == (1, 4, 2)
  sharded = planner.plan_memory(work, mesh)
  # Matrices split over fsdp (embed) x tensor (heads, mlp, vocab); the norms over fsdp alone.
  base = sharded.component('base weights').num_bytes
  assert single.component('base weights').num_bytes / 8 < base < single.component('base weights').num_bytes / 7.9
  # A LoRA matrix has one split dimension: A of q/k/v/gate/up and B of o/down over fsdp=4, the others over tensor=2.
  e, q, kv, f, r = cfg.embed_dim, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.mlp_dim, 8
  a_widths = 5 * e / 4 + q / 2 + f / 2
  b_widths = q / 2 + 2 * kv / 2 + 2 * e / 4 + 2 * f / 2  # q; k, v; o, down; gate, up
  assert sharded.component('adapters').num_bytes == 2 * r * (a_widths + b_widths) * cfg.num_layers * 4
  assert sharded.component('optimizer state').num_bytes == 2 * sharded.component('adapters').num_bytes
  # The KV cache: rows over data x fsdp = 4, the 2 kv heads over tensor = 2.
  assert sharded.component('kv cache').num_bytes * 8 == pytest.approx(single.component('kv cache').num_bytes, rel=0.01)
  assert sharded.component('saved activations').num_bytes < single.component('saved activations').num_bytes / 4
  with pytest.raises(configlib.ConfigError, match='unknown axes'):
    planner.MeshShape.resolve({'data': 1, 'model': 8}, 8)
  with pytest.raises(configlib.ConfigError, match='does not divide'):
    planner.MeshShape.resolve({'data': -1, 'tensor': 3}, 8)


def test_remat_keeps_only_layer_inputs():
  plain = planner.plan_memory(tiny_workload(), planner.MeshShape())
  remat = planner.plan_memory(tiny_workload(remat=True), planner.MeshShape())
  cfg = get_preset('tiny')
  assert remat.component('saved activations').num_bytes == 2 * (256 + 64) * cfg.num_layers * 4 * cfg.embed_dim
  assert remat.peak_bytes < plain.peak_bytes


@pytest.mark.parametrize('name', PRESETS)
def test_presets_validate_and_fit_their_device(name, tmp_path, monkeypatch):
  config = preset(name)
  assert config.plan.model_dtype == 'bfloat16' and config.plan.model_shape.startswith('qwen2p5_')
  assert planner.model_config(config).compute_dtype == 'bfloat16'
  plan = planner.check(config)  # the checkpoint folder is a placeholder: shapes come from plan.model_shape
  assert plan.fits and plan.mesh.num_devices == config.plan.num_devices
  # Validated as on the machine the preset is for: an existing checkpoint folder and plan.num_devices devices.
  monkeypatch.setattr(jax, 'local_device_count', lambda: config.plan.num_devices)
  monkeypatch.setattr(jax, 'device_count', lambda: config.plan.num_devices)
  config.model = str(tmp_path)
  experiment.validate(config)
  assert preset(name, 'outcome_rl').rl.reward == 'outcome'


def test_planner_accepts_1p5b_on_one_h100_and_refuses_7b_on_16_gib():
  plan = planner.check(preset('qwen2p5_1p5b_1gpu'))
  assert plan.device == 'h100-80gb' and plan.peak_bytes < plan.usable_bytes
  config = preset('qwen2p5_7b_1gpu')
  config.plan.device = 'tpu-v5e'
  biggest = planner.plan_config(config).biggest()
  assert biggest.num_bytes > 16 * planner.GIB
  with pytest.raises(planner.MemoryPlanError, match=rf'tpu-v5e has 16\.00 GiB.*biggest component is {biggest.name}'):
    planner.check(config)
  config.plan.device, config.plan.device_memory_gib = '', 16.0
  assert not planner.plan_config(config).fits
  config.plan.model_shape = 'no_such_model'
  with pytest.raises(configlib.ConfigError, match='plan.model_shape'):
    planner.validate_fields(config)


def test_plan_memory_command_refuses_with_a_non_zero_exit():
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'experiments.plan_memory',
      '--config=configs/presets/qwen2p5_7b_1gpu.py',
      '--config.plan.device=tpu-v5e',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
  )
  assert result.returncode == 1, result.stderr[-2000:]
  assert 'DOES NOT FIT' in result.stdout
  assert 'refused' in result.stderr and 'tpu-v5e has 16.00 GiB' in result.stderr
  assert 'the biggest component is saved activations' in result.stderr
