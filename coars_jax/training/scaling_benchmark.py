"""Scaling measurements for `experiments/bench_scaling.py`: the RL update step of an `RLTrainer` timed on each mesh
(data, fsdp, tensor) of the available devices, with its compilation counts; and, on a GPU, the update step's model
FLOP utilisation and the decode step's memory-bandwidth utilisation for random weights of a preset's shape.

The trainer's peer is the caller's (`make_peer(dataset)`, e.g. an untrained micro SASRec: this package does not
import `recsys`); the update step never consults it. The update step is fed a synthetic batch of fixed shape
([K, R, ...] microbatches of random tokens, every row carrying loss), so a mesh's number measures the step alone,
without rollouts. FLOPs counted as useful for MFU: the
teacher's forward pass, the student's forward pass and the student's input-gradient backward pass (the base is
frozen, so no weight gradients of its matrices), each 2 x (matrix parameters) per token plus the attention over the
padded S x S scores; peaks are a measured bf16 matmul rate and a measured device copy bandwidth.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coars_jax.agents.protocol import AGENTS
from coars_jax.data import Dataset
from coars_jax.models import Decoder, DecoderConfig, LoRAConfig, add_lora, get_preset
from coars_jax.models import tokenizer as tokenizer_lib
from coars_jax.parallel import mesh as mesh_lib
from coars_jax.sampling.generation_speed import best_of
from coars_jax.sampling.compilation import count_backend_compiles

MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8))


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepShape:
  """The synthetic update batch: K microbatches of R rows, prompts (student and teacher) of P tokens, completions
  of C tokens."""

  microbatches: int = 2
  rows: int = 8
  prompt_length: int = 64
  completion_length: int = 16


# --- an RLTrainer without data files ---------------------------------------------------------------------------


def synthetic_parts(vocab_size: int, make_peer: Callable[[Dataset], Any]):
  """The synthetic dataset, a small tokenizer trained on its titles (it only supplies the pad id and the chat
  template here) and `make_peer(dataset)`: what `RLTrainer` needs besides the model."""
  from coars_jax.agents.prompts import recommender_system_prompt, user_system_prompt
  from coars_jax.data import synthetic

  dataset = synthetic.synthetic_dataset()
  lines = tokenizer_lib.tokenizer_corpus([dataset.catalog.titles], repeats=4)
  for text in (recommender_system_prompt(), user_system_prompt()):
    lines += [line for line in text.splitlines() if line]
  folder = tokenizer_lib.build_tokenizer(
    lines, tempfile.mkdtemp(prefix='bench-scaling-tokenizer-'), vocab_size=min(700, vocab_size)
  )
  return dataset, tokenizer_lib.load_tokenizer(folder), make_peer(dataset)


def model_with_adapters(config: DecoderConfig, rank: int = 8, seed: int = 0) -> Decoder:
  """Random weights of `config` with both agents' adapters, B random so that the adapters change the outputs."""
  from coars_jax.models.lora import adapted_linears

  model = add_lora(
    Decoder(config, rngs=nnx.Rngs(seed)), LoRAConfig(rank=rank, alpha=2.0 * rank), AGENTS, rngs=nnx.Rngs(seed + 1)
  )
  rng = np.random.default_rng(seed + 2)
  for _, linear in adapted_linears(model):
    b = linear.lora.b.get_value()
    linear.lora.b.set_value(jnp.asarray(0.02 * rng.standard_normal(b.shape), b.dtype))
  return model


def make_trainer(model: Decoder, mesh, shape: StepShape, parts, **rl_fields):
  """An `RLTrainer` of `model` on `parts` (`synthetic_parts`), its update step shaped by `shape`; `rl_fields`
  override the `RLConfig` (e.g. teacher_reuses_student_cache=False, remat=False)."""
  from coars_jax.agents.episodes import RolloutConfig
  from coars_jax.training import rl

  dataset, tokenizer, peer = parts
  config = rl.RLConfig(
    iterations=10,
    windows_per_iteration=1,
    rows_per_microbatch=shape.rows,
    warmup_iterations=0,
    recommender_max_new_tokens=shape.completion_length,
    user_max_new_tokens=shape.completion_length,
    **rl_fields,
  )
  return rl.RLTrainer(model, tokenizer, dataset, peer, config, rollout=RolloutConfig(max_turns=1), mesh=mesh)


def synthetic_batch(
  shape: StepShape, vocab_size: int, seed: int = 0, *, teacher_cache: bool = True
) -> dict[str, np.ndarray]:
  """Every row real and carrying loss; rows alternate between the two adapters. The teacher prompt is x + d of
  2P tokens: with `teacher_cache` (the trainer's default layout) as the suffix d of P tokens after x's first P - 4
  (`rl.TEACHER_CACHE_KEYS`), else whole (`rl.TEACHER_KEYS`)."""
  rng = np.random.default_rng(seed)
  k, r, p, c = shape.microbatches, shape.rows, shape.prompt_length, shape.completion_length
  tokens = lambda length: rng.integers(3, vocab_size, size=(k, r, length)).astype(np.int32)
  agent = np.broadcast_to(np.arange(r, dtype=np.int32) % 2, (k, r)).copy()
  batch = {
    'prompt_tokens': tokens(p),
    'prompt_mask': np.ones((k, r, p), np.int32),
    'completion_tokens': tokens(c),
    'completion_mask': np.ones((k, r, c), np.int32),
    'adapter': agent,
    'agent': agent.copy(),
    'reward': rng.standard_normal((k, r)).astype(np.float32),
    'included': np.ones((k, r), bool),
  }
  if teacher_cache:
    batch.update(
      teacher_suffix_tokens=tokens(p),
      teacher_suffix_mask=np.ones((k, r, p), np.int32),
      teacher_shared_length=np.full((k, r), max(p - 4, 1), np.int32),
    )
  else:
    batch.update(teacher_prompt_tokens=tokens(2 * p), teacher_prompt_mask=np.ones((k, r, 2 * p), np.int32))
  return batch


def time_update_step(trainer, shape: StepShape, repeats: int = 3) -> dict[str, Any]:
  """Seconds of the trainer's update step on a synthetic batch: the first call (compilation included), then the
  best of `repeats`, with the traces and XLA compilations of each phase (the timed calls must compile nothing)."""
  from coars_jax.training import rl

  step = rl.build_update_step(
    trainer.graphdef, trainer.settings, trainer.mesh, trainer.settings.teacher, getattr(trainer, 'rules', None)
  )
  batch = synthetic_batch(shape, trainer.model.config.vocab_size, teacher_cache=trainer.settings.teacher_cache)
  scalars = (np.float32(shape.microbatches * shape.rows), trainer.adapter_update_mask, np.float32(1e-4))
  state = {'lora': trainer.lora, 'opt': trainer.opt_state}

  def run():
    lora, opt_state, metrics = step(state['lora'], trainer.frozen, state['opt'], batch, *scalars)
    jax.block_until_ready(metrics)
    state['lora'], state['opt'] = lora, opt_state  # the step donates both
    return metrics

  traces = rl.step_traces()
  with count_backend_compiles() as warm_up:
    start = time.perf_counter()
    metrics = run()
    first = time.perf_counter() - start
  warm_traces = rl.step_traces() - traces
  with count_backend_compiles() as timed:
    seconds = best_of(repeats, run)
  trainer.lora, trainer.opt_state = state['lora'], state['opt']
  nnx.update(trainer.model, trainer.lora)  # the model's own adapter arrays were donated to the first call
  return {
    'first_call_seconds': first,
    'seconds_per_step': seconds,
    'step_traces_warm_up': warm_traces,
    'step_traces_timed': rl.step_traces() - traces - warm_traces,
    'backend_compiles_warm_up': warm_up.count,
    'backend_compiles_timed': timed.count,
    'loss_finite': bool(np.isfinite(float(metrics['loss']))),
  }


def mesh_sweep(
  meshes: Sequence[tuple[int, int, int]] = MESHES,
  *,
  make_peer: Callable[[Dataset], Any],
  preset: str = 'tiny',
  shape: StepShape = StepShape(),
  repeats: int = 3,
  devices=None,
) -> list[dict[str, Any]]:
  """The update step of `preset`'s shape on each (data, fsdp, tensor) mesh of `devices` (default the local ones).
  A mesh the installed sharding code cannot build or run is reported with its error, not raised."""
  config = get_preset(preset)
  parts = synthetic_parts(config.vocab_size, make_peer)
  base = model_with_adapters(config)
  results = []
  for sizes in meshes:
    entry: dict[str, Any] = {'mesh': dict(zip(mesh_lib.KNOWN_AXES, sizes))}
    try:
      mesh = mesh_lib.make_mesh(entry['mesh'], devices=devices)
    except ValueError as error:
      entry['error'] = f'mesh not supported by coars_jax.parallel.mesh yet: {error}'
      results.append(entry)
      continue
    try:
      # A host copy per mesh: the step donates the adapters it is given, which may alias the base's arrays.
      model = nnx.clone(base)
      nnx.update(model, jax.tree.map(np.array, nnx.state(model)))
      trainer = make_trainer(model, mesh, shape, parts)
      entry.update(time_update_step(trainer, shape, repeats))
    except (ValueError, TypeError, NotImplementedError) as error:
      entry['error'] = f'{type(error).__name__}: {error}'
    results.append(entry)
  return results


# --- accelerator efficiency ------------------------------------------------------------------------------------


def measure_peaks(matmul_size: int = 8192, copy_gib: float = 1.0, repeats: int = 5) -> dict[str, float]:
  """This device's bf16 matmul rate (FLOP/s) and copy bandwidth (bytes read + written per second)."""
  left = jnp.ones((matmul_size, matmul_size), jnp.bfloat16)
  right = jnp.ones((matmul_size, matmul_size), jnp.bfloat16)
  matmul = jax.jit(jnp.matmul)
  matmul(left, right).block_until_ready()
  matmul_seconds = best_of(repeats, lambda: matmul(left, right).block_until_ready())
  source = jnp.ones((int(copy_gib * 2**30) // 4,), jnp.float32)
  copy = jax.jit(lambda x: x + 1.0)
  copy(source).block_until_ready()
  copy_seconds = best_of(repeats, lambda: copy(source).block_until_ready())
  return {
    'bf16_matmul_flops_per_s': 2.0 * matmul_size**3 / matmul_seconds,
    'copy_bytes_per_s': 2.0 * source.nbytes / copy_seconds,
  }


def update_step_flops(config: DecoderConfig, shape: StepShape) -> float:
  """Useful FLOPs of one update step (module docstring): teacher forward + student forward + student backward to
  the inputs, every position of the padded prompt + completion, and the vocabulary projection of the completion."""
  tokens = shape.microbatches * shape.rows * (shape.prompt_length + shape.completion_length)
  length = shape.prompt_length + shape.completion_length
  embedding = config.vocab_size * config.embed_dim
  layer_params = config.num_params() - embedding * (1 if config.tie_word_embeddings else 2)
  attention = 4.0 * tokens * config.num_layers * config.num_heads * config.head_dim * length
  projection = 2.0 * shape.microbatches * shape.rows * shape.completion_length * embedding
  forward = 2.0 * tokens * layer_params + attention + projection
  return 3.0 * forward


def accelerator_efficiency(
  preset: str = 'qwen2p5_1p5b',
  *,
  make_peer: Callable[[Dataset], Any],
  shape: StepShape = StepShape(microbatches=1, rows=4, prompt_length=512, completion_length=128),
  decode_batch: int = 16,
  decode_prompt_length: int = 128,
  decode_tokens: tuple[int, int] = (64, 128),
  repeats: int = 3,
) -> dict[str, Any]:
  """On the default device: the bf16 update step's MFU and the decode step's bandwidth utilisation, for random
  weights of `preset`'s shape."""
  from coars_jax.sampling import LengthBuckets, generate
  from coars_jax.sampling.generation_speed import decode_step_cost

  config = get_preset(preset, param_dtype='bfloat16', compute_dtype='bfloat16')
  on_cpu = jax.default_backend() == 'cpu'  # a dry run of this code path; the peaks are then sized for a CPU
  peaks = measure_peaks(matmul_size=1024 if on_cpu else 8192, copy_gib=0.25 if on_cpu else 1.0)
  model = model_with_adapters(config, rank=16)
  parts = synthetic_parts(config.vocab_size, make_peer)
  trainer = make_trainer(model, mesh_lib.make_mesh({'data': 1}, devices=jax.devices()[:1]), shape, parts)
  update = time_update_step(trainer, shape, repeats)
  flops = update_step_flops(config, shape)
  update['model_flops'] = flops
  update['mfu_vs_measured_bf16_matmul'] = flops / update['seconds_per_step'] / peaks['bf16_matmul_flops_per_s']

  short, long = decode_tokens
  prompts = (
    np.random.default_rng(0).integers(3, config.vocab_size, size=(decode_batch, decode_prompt_length)).astype(np.int32)
  )
  buckets = LengthBuckets(prompt=(decode_prompt_length,), completion=(long,))

  def run(new_tokens):
    out = generate(model, prompts, max_new_tokens=new_tokens, buckets=buckets, eos_token_ids=(), seed=0)
    return jax.block_until_ready(out)

  run(long)  # compiles the one prefill and decode program both lengths share (one completion bucket)
  step_seconds = (best_of(repeats, lambda: run(long)) - best_of(repeats, lambda: run(short))) / (long - short)
  # The decode step attends over every slot of the cache, so it reads the whole cache each step.
  step_flops, step_bytes = decode_step_cost(config, decode_batch, decode_prompt_length + long)
  decode = {
    'batch': decode_batch,
    'prompt_length': decode_prompt_length,
    'cache_length': decode_prompt_length + long,
    'seconds_per_step': step_seconds,
    'bytes_per_step': step_bytes,
    'flops_per_step': step_flops,
    'bandwidth_utilisation': step_bytes / step_seconds / peaks['copy_bytes_per_s'],
  }
  return {
    'preset': preset,
    'device': jax.devices()[0].device_kind,
    'peaks': peaks,
    'update_step': {**dataclasses.asdict(shape), **update},
    'decode': decode,
  }
