"""Measuring the sampler against HF transformers' `generate` on the same weights and the same batch (fixed
length, no early stop): new tokens/s end to end, prefill tokens/s, compile time and peak memory, next to this
machine's measured fp32 matmul rate and memory bandwidth and the floor time of one decode step they imply,
max(FLOPs / peak rate, bytes read / bandwidth). torch and transformers are imported only here."""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coars_jax.models import Decoder, DecoderConfig, get_preset, load_gguf, save_hf_checkpoint, smollm2_gguf_path
from coars_jax.sampling import sampler as sampler_lib
from coars_jax.sampling.buckets import LengthBuckets
from coars_jax.sampling.compilation import count_backend_compiles
from coars_jax.sampling.distributions import SamplingParams
from coars_jax.sampling.sampler import generate

MODELS = ('tiny', 'smollm2_135m')


@dataclasses.dataclass(frozen=True, kw_only=True)
class MachinePeaks:
  """matmul_flops_per_s: best fp32 matmul rate of jnp and numpy on a square matmul; copy_bytes_per_s:
  bytes read plus written per second by a large array copy."""

  matmul_flops_per_s: float
  copy_bytes_per_s: float
  jnp_matmul_flops_per_s: float
  numpy_matmul_flops_per_s: float


def measure_machine_peaks(matmul_size: int = 2048, copy_megabytes: int = 512, repeats: int = 5) -> MachinePeaks:
  """This machine's fp32 matmul rate and memory bandwidth, best of `repeats`."""
  rng = np.random.default_rng(0)
  left = rng.standard_normal((matmul_size, matmul_size), np.float32)
  right = rng.standard_normal((matmul_size, matmul_size), np.float32)
  flops = 2.0 * matmul_size**3
  matmul = jax.jit(jnp.matmul)
  left_device, right_device = jnp.asarray(left), jnp.asarray(right)
  jnp_seconds = best_of(repeats, lambda: matmul(left_device, right_device).block_until_ready())
  numpy_seconds = best_of(repeats, lambda: np.matmul(left, right))
  source = np.ones(copy_megabytes * 2**20 // 4, np.float32)
  target = np.empty_like(source)
  copy_seconds = best_of(repeats, lambda: np.copyto(target, source))
  return MachinePeaks(
    matmul_flops_per_s=flops / min(jnp_seconds, numpy_seconds),
    copy_bytes_per_s=2.0 * source.nbytes / copy_seconds,
    jnp_matmul_flops_per_s=flops / jnp_seconds,
    numpy_matmul_flops_per_s=flops / numpy_seconds,
  )


def decode_step_cost(config: DecoderConfig, batch: int, context_length: int) -> tuple[float, float]:
  """(FLOPs, bytes read) of one one-token decode step over `context_length` cached tokens, counting the
  matmuls (every weight except the embedding lookup, plus the vocabulary projection), attention over the
  cache, every weight read once and the cache read once."""
  embedding = config.vocab_size * config.embed_dim
  # Tied embeddings are counted once in num_params and serve as the output projection.
  matmul_params = config.num_params() - (0 if config.tie_word_embeddings else embedding)
  attention_flops = 4.0 * batch * config.num_layers * config.num_heads * config.head_dim * context_length
  flops = 2.0 * batch * matmul_params + attention_flops
  itemsize = jnp.dtype(config.param_dtype).itemsize
  cache_bytes = (
    2.0
    * batch
    * config.num_layers
    * config.num_kv_heads
    * config.head_dim
    * context_length
    * jnp.dtype(config.compute_dtype).itemsize
  )
  return flops, config.num_params() * itemsize + cache_bytes


def floor_step_seconds(config: DecoderConfig, batch: int, context_length: int, peaks: MachinePeaks) -> float:
  flops, bytes_read = decode_step_cost(config, batch, context_length)
  return max(flops / peaks.matmul_flops_per_s, bytes_read / peaks.copy_bytes_per_s)


def best_of(repeats: int, run: Callable[[], Any]) -> float:
  """The fastest of `repeats` timed calls of `run`, in seconds."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return min(times)


class PeakRSS:
  """Peak resident memory of this process while the block runs, sampled every `interval` seconds by a
  thread (XLA and torch release the GIL inside their kernels, so the thread sees the peaks)."""

  def __init__(self, interval: float = 0.002):
    import psutil

    self._process = psutil.Process()
    self._interval = interval
    self._stop = threading.Event()
    self.start_bytes = self.peak_bytes = 0

  def __enter__(self) -> PeakRSS:
    self.start_bytes = self.peak_bytes = self._process.memory_info().rss
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()
    self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)

  def _sample(self) -> None:
    while not self._stop.is_set():
      self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)
      time.sleep(self._interval)

  @property
  def growth_bytes(self) -> int:
    return self.peak_bytes - self.start_bytes


def load_models(name: str, workdir: str) -> tuple[Decoder, Any]:
  """The coars_jax model and the transformers model holding the same float32 weights."""
  import torch
  import transformers

  if name == 'tiny':
    model = Decoder(get_preset('tiny'), rngs=nnx.Rngs(0))
    folder = os.path.join(workdir, 'tiny')
    save_hf_checkpoint(model, folder)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
  elif name == 'smollm2_135m':
    path = smollm2_gguf_path()
    model = load_gguf(path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
  else:
    raise ValueError(f'load_models: unknown model {name!r}; expected one of {MODELS}')
  return model, hf_model.eval()


def run_benchmark(
  name: str,
  *,
  batch: int = 16,
  prompt_length: int = 128,
  new_tokens: int = 64,
  repeats: int = 3,
  params: SamplingParams = SamplingParams(temperature=0.0),
  seed: int = 0,
  torch_threads: int | None = None,
  profile_dir: str | None = None,
) -> dict[str, Any]:
  """Both samplers on one batch of random prompts; returns the numbers as a flat dict.

  torch_threads: threads for torch; None tries 1 .. os.cpu_count() on a short generation and keeps the
    fastest, since on a shared machine torch's OpenMP threads can slow down badly when a core is busy.
  """
  import torch

  load_at_start = os.getloadavg()
  with tempfile.TemporaryDirectory() as workdir:
    model, hf_model = load_models(name, workdir)
  config = model.config
  prompts = np.random.default_rng(seed).integers(3, config.vocab_size, size=(batch, prompt_length)).astype(np.int32)
  buckets = LengthBuckets(prompt=(prompt_length,), completion=(new_tokens,))
  peaks = measure_machine_peaks()

  def ours():
    out = generate(
      model, prompts, max_new_tokens=new_tokens, params=params, buckets=buckets, eos_token_ids=(), seed=seed
    )
    return jax.block_until_ready(out)

  with count_backend_compiles() as compiles:
    start = time.perf_counter()
    first = ours()
    first_call_seconds = time.perf_counter() - start
  if int(first.num_steps) != new_tokens or not np.asarray(first.mask).all():
    raise RuntimeError(
      f'run_benchmark: coars_jax stopped after {int(first.num_steps)} of {new_tokens} tokens; '
      'the comparison needs fixed-length generations'
    )
  with PeakRSS() as coars_memory:
    coars_seconds = best_of(repeats, ours)
  coars_prefill_seconds = best_of(repeats, lambda: _our_prefill(model, prompts, prompt_length + new_tokens))
  op_breakdown = None
  if profile_dir:
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
      ours()
    op_breakdown = op_time_breakdown(profile_dir)

  hf_inputs = dict(
    input_ids=torch.tensor(prompts, dtype=torch.long),
    attention_mask=torch.ones((batch, prompt_length), dtype=torch.long),
  )
  sampling = (
    dict(do_sample=False)
    if params.greedy
    else dict(do_sample=True, temperature=params.temperature, top_k=params.top_k or 0, top_p=params.top_p)
  )

  def theirs():
    with torch.inference_mode():
      # min_new_tokens masks end-of-sequence tokens, so every row runs the full length, as ours does.
      return hf_model.generate(
        **hf_inputs,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=config.pad_token_id or 0,
        **sampling,
      )

  def short_hf_generation():
    with torch.inference_mode():
      hf_model.generate(
        **hf_inputs, max_new_tokens=4, min_new_tokens=4, pad_token_id=config.pad_token_id or 0, **sampling
      )

  probe_seconds = {}
  for threads in [torch_threads] if torch_threads else range(1, (os.cpu_count() or 1) + 1):
    torch.set_num_threads(threads)
    short_hf_generation()  # warm-up
    probe_seconds[threads] = best_of(1, short_hf_generation)
  torch.set_num_threads(min(probe_seconds, key=probe_seconds.get))

  start = time.perf_counter()
  hf_tokens = theirs()
  hf_first_call_seconds = time.perf_counter() - start
  with PeakRSS() as hf_memory:
    hf_seconds = best_of(repeats, theirs)

  def hf_prefill():
    with torch.inference_mode():
      hf_model(**hf_inputs, use_cache=True, logits_to_keep=1)

  hf_prefill_seconds = best_of(repeats, hf_prefill)
  hf_new = hf_tokens[:, prompt_length:].numpy()

  generated = batch * new_tokens
  floor_seconds = floor_step_seconds(config, batch, prompt_length + new_tokens // 2, peaks)
  floor_tokens_per_s = batch / floor_seconds
  coars_tokens_per_s = generated / coars_seconds
  hf_tokens_per_s = generated / hf_seconds
  coars_decode_step = (coars_seconds - coars_prefill_seconds) / (new_tokens - 1)
  hf_decode_step = (hf_seconds - hf_prefill_seconds) / (new_tokens - 1)
  flops, bytes_read = decode_step_cost(config, batch, prompt_length + new_tokens // 2)
  return {
    'model': name,
    'batch': batch,
    'prompt_length': prompt_length,
    'new_tokens': new_tokens,
    'repeats': repeats,
    'sampling': dataclasses.asdict(params),
    'coars_tokens_per_s': coars_tokens_per_s,
    'hf_tokens_per_s': hf_tokens_per_s,
    'ratio': coars_tokens_per_s / hf_tokens_per_s,
    'floor_tokens_per_s': floor_tokens_per_s,
    'coars_fraction_of_floor': coars_tokens_per_s / floor_tokens_per_s,
    'hf_fraction_of_floor': hf_tokens_per_s / floor_tokens_per_s,
    'coars_seconds': coars_seconds,
    'hf_seconds': hf_seconds,
    'coars_prefill_tokens_per_s': batch * prompt_length / coars_prefill_seconds,
    'hf_prefill_tokens_per_s': batch * prompt_length / hf_prefill_seconds,
    'coars_decode_step_ms': 1e3 * coars_decode_step,
    'hf_decode_step_ms': 1e3 * hf_decode_step,
    'floor_decode_step_ms': 1e3 * floor_seconds,
    'coars_decode_fraction_of_floor': floor_seconds / coars_decode_step,
    'hf_decode_fraction_of_floor': floor_seconds / hf_decode_step,
    'coars_compile_seconds': compiles.seconds,
    'coars_compiles': compiles.count,
    'coars_first_call_seconds': first_call_seconds,
    'hf_first_call_seconds': hf_first_call_seconds,
    'coars_peak_rss_growth_mb': coars_memory.growth_bytes / 2**20,
    'hf_peak_rss_growth_mb': hf_memory.growth_bytes / 2**20,
    'process_peak_rss_mb': max(coars_memory.peak_bytes, hf_memory.peak_bytes) / 2**20,
    'greedy_token_agreement': float((np.asarray(first.tokens) == hf_new).mean()) if params.greedy else None,
    'step_gflops': flops / 1e9,
    'step_megabytes_read': bytes_read / 2**20,
    'matmul_gflops_per_s': peaks.matmul_flops_per_s / 1e9,
    'jnp_matmul_gflops_per_s': peaks.jnp_matmul_flops_per_s / 1e9,
    'numpy_matmul_gflops_per_s': peaks.numpy_matmul_flops_per_s / 1e9,
    'copy_gb_per_s': peaks.copy_bytes_per_s / 1e9,
    'torch_threads': torch.get_num_threads(),
    'torch_thread_probe_seconds': probe_seconds,
    'load_average_at_start': load_at_start,
    'load_average': os.getloadavg(),
    'coars_op_breakdown_ms': op_breakdown,
  }


def op_time_breakdown(profile_dir: str, top: int = 8) -> dict[str, float]:
  """Milliseconds per kind of XLA op in the newest perfetto trace under `profile_dir`, largest first: op
  names with their numeric suffix removed (`ynn_fusion.12` counts as `ynn_fusion`), plus the total."""
  paths = sorted(glob.glob(os.path.join(profile_dir, '**', '*.json.gz'), recursive=True), key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f'op_time_breakdown: no perfetto trace (*.json.gz) under {profile_dir}')
  with gzip.open(paths[-1]) as handle:
    trace = json.load(handle)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  kinds: collections.Counter[str] = collections.Counter()
  for event in events:
    name = event.get('name', '')
    # Complete events that are XLA ops, not Python frames ("$file:line") or runtime bookkeeping.
    if event.get('ph') == 'X' and not name.startswith(('$', 'Thunk', 'PjitFunction', 'CommonPjRt', 'Slinky')):
      kinds[re.sub(r'\.\d+$', '', name)] += event.get('dur', 0) / 1e3
  breakdown = {'total': sum(kinds.values())}
  breakdown.update(kinds.most_common(top))
  return breakdown


def _our_prefill(model: Decoder, prompts: np.ndarray, cache_length: int):
  graphdef, state = nnx.split(model)
  mask = jnp.ones(prompts.shape, jnp.int32)
  return jax.block_until_ready(
    sampler_lib._prefill(
      graphdef,
      state,
      jnp.asarray(prompts),
      mask,
      {},
      static_kwargs=(),
      cache_length=cache_length,
      cache_dtype=model.config.compute_dtype,
    )
  )


def format_table(result: dict[str, Any]) -> str:
  """The headline numbers of one `run_benchmark` result as a markdown table."""
  rows = [
    ('new tokens/s (end to end)', 'coars_tokens_per_s', 'hf_tokens_per_s', 'floor_tokens_per_s', '{:.1f}'),
    ('  fraction of floor', 'coars_fraction_of_floor', 'hf_fraction_of_floor', None, '{:.3f}'),
    ('decode step (ms)', 'coars_decode_step_ms', 'hf_decode_step_ms', 'floor_decode_step_ms', '{:.2f}'),
    ('prefill tokens/s', 'coars_prefill_tokens_per_s', 'hf_prefill_tokens_per_s', None, '{:.0f}'),
    ('first call (s)', 'coars_first_call_seconds', 'hf_first_call_seconds', None, '{:.2f}'),
    ('compile (s)', 'coars_compile_seconds', None, None, '{:.2f}'),
    ('peak RSS growth (MiB)', 'coars_peak_rss_growth_mb', 'hf_peak_rss_growth_mb', None, '{:.0f}'),
  ]
  load = ', '.join(f'{value:.2f}' for value in result['load_average'])
  lines = [
    f'model {result["model"]}, batch {result["batch"]}, prompt {result["prompt_length"]}, '
    f'{result["new_tokens"]} new tokens, best of {result["repeats"]}, load average {load}, torch threads '
    f'{result["torch_threads"]} (4-token probe seconds by thread count: '
    f'{ {k: round(v, 2) for k, v in result["torch_thread_probe_seconds"].items()} })',
    '',
    '| | coars_jax | HF transformers | floor |',
    '|---|---|---|---|',
  ]
  for label, ours, theirs, floor, number in rows:
    cells = [number.format(result[key]) if key else '' for key in (ours, theirs, floor)]
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  lines += [
    '',
    f'ratio coars/HF = {result["ratio"]:.2f}; greedy token agreement {result["greedy_token_agreement"]}; '
    f'one step = {result["step_gflops"]:.2f} GFLOP, {result["step_megabytes_read"]:.0f} MiB read; '
    f'machine: fp32 matmul {result["matmul_gflops_per_s"]:.0f} GFLOP/s (jnp '
    f'{result["jnp_matmul_gflops_per_s"]:.0f}, numpy {result["numpy_matmul_gflops_per_s"]:.0f}), '
    f'copy {result["copy_gb_per_s"]:.1f} GB/s',
  ]
  if result.get('coars_op_breakdown_ms'):
    total = result['coars_op_breakdown_ms']['total']
    lines += ['', f'coars_jax XLA op time by kind, one generation (profile), total {total:.0f} ms:']
    lines += [
      f'  {kind}: {ms:.0f} ms ({100 * ms / total:.1f}%)'
      for kind, ms in result['coars_op_breakdown_ms'].items()
      if kind != 'total'
    ]
  return '\n'.join(lines)
