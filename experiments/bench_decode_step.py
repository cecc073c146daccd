"""Milliseconds per one-token decode step of SmolLM2-135M-Instruct against the live length of its KV cache:
`python -m experiments.bench_decode_step [--batch=16] [--live=10,400,900] [--cache_length=2048] [--steps=16]
[--repeats=4] [--output=results/bench/decode_step_smollm2.json] [--profile=DIR]`.

Each live length gets a cache of `--cache_length` slots whose last `--live` slots before slot 1,024 hold random keys
and values (the rest empty, as a left-padded prompt leaves them), then `--steps` decode steps run in one jitted
`fori_loop` (greedy, no sampling), `--repeats` times after a compiling run; the minimum and every run are reported.
The model's weights come from the GGUF (`backbone.load_backbone`), so the matrix products are the real ones.

`--profile=DIR` also traces one more run per live length (`jax.profiler`, into DIR/live_<n>) and prints the XLA
ops that took longest, summed over the CPU backend's worker threads (loop and executor wrappers left out).

Compare two versions of the code by running it on each, one after the other on an idle machine, e.g. the parent
commit's in a worktree: `PYTHONPATH=<worktree> python -m experiments.bench_decode_step` (BUILD_NOTES Part 14).
"""

import functools
import json
import pathlib
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from coars_jax.models import backbone
from coars_jax.models.kv_cache import init_cache
from experiments import cli
from experiments.xla_profile import top_ops

_BATCH = flags.DEFINE_integer('batch', 16, 'Rows decoded together.')
_LIVE = flags.DEFINE_list('live', ['10', '400', '900'], 'Live cache lengths (slots holding tokens) to time.')
_CACHE_LENGTH = flags.DEFINE_integer('cache_length', 2048, 'Slots of the cache (prompt bucket + completion bucket).')
_STEPS = flags.DEFINE_integer('steps', 16, 'Decode steps per timed run.')
_REPEATS = flags.DEFINE_integer('repeats', 4, 'Timed runs per live length (after one that compiles).')
_OUTPUT = flags.DEFINE_string('output', '', 'Write the timings here as JSON (default: print only).')
_PROFILE = flags.DEFINE_string('profile', '', 'Trace one more run per live length into this folder; print top ops.')
# The slot after the prompts' last token: the live slots end here, as a 1,024-token prompt bucket leaves them.
PROMPT_END = 1024


def random_cache(config, batch: int, cache_length: int, live: int, seed: int = 0):
  """A cache whose `live` slots before `PROMPT_END` hold random keys and values, its end index after them."""
  if not 0 < live <= PROMPT_END or PROMPT_END >= cache_length:
    raise ValueError(f'--live values must lie in [1, {PROMPT_END}] and --cache_length exceed {PROMPT_END}')
  cache = init_cache(config, batch, cache_length)
  rng = np.random.default_rng(seed)
  shape = cache.keys[0].shape
  keys = tuple(jnp.asarray(rng.normal(size=shape), cache.keys[0].dtype) for _ in cache.keys)
  values = tuple(jnp.asarray(rng.normal(size=shape), cache.values[0].dtype) for _ in cache.values)
  segment_ids = np.zeros((batch, cache_length), np.int32)
  segment_ids[:, PROMPT_END - live : PROMPT_END] = 1
  return cache.replace(
    keys=keys, values=values, segment_ids=jnp.asarray(segment_ids), end_index=jnp.asarray(PROMPT_END, jnp.int32)
  )


@functools.partial(jax.jit, static_argnums=(0, 4), donate_argnums=(2,))
def decode_steps(graphdef, state, cache, tokens, steps: int):
  """`steps` greedy one-token decode steps through `cache` (donated)."""
  model = nnx.merge(graphdef, state)

  def step(index, carry):
    cache, tokens = carry
    positions = jnp.full(tokens.shape, PROMPT_END, jnp.int32) + index
    hidden, cache = model.hidden_states(tokens, positions, jnp.ones_like(tokens), cache)
    return cache, jnp.argmax(model.logits(hidden[:, 0]), axis=-1)[:, None].astype(jnp.int32)

  return jax.lax.fori_loop(0, steps, step, (cache, tokens))


def _commit() -> str:
  try:
    return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()
  except OSError:
    return ''


def main(argv):
  del argv
  model, _ = backbone.load_backbone(backbone.BackboneSpec(name='smollm2-135m', allow_download=False))
  graphdef, state = nnx.split(model)
  batch, steps = _BATCH.value, _STEPS.value
  tokens = jnp.ones((batch, 1), jnp.int32)
  results = []
  for live in (int(value) for value in _LIVE.value):
    make = functools.partial(random_cache, model.config, batch, _CACHE_LENGTH.value, live)
    jax.block_until_ready(decode_steps(graphdef, state, make(), tokens, steps))  # compiles
    runs = []
    for _ in range(_REPEATS.value):
      cache = make()
      start = time.perf_counter()
      jax.block_until_ready(decode_steps(graphdef, state, cache, tokens, steps))
      runs.append(1000 * (time.perf_counter() - start) / steps)
    results.append({'live': live, 'ms_per_step_min': min(runs), 'ms_per_step_runs': runs})
    if _PROFILE.value:
      trace_dir = pathlib.Path(_PROFILE.value).absolute() / f'live_{live}'
      cache = make()
      with jax.profiler.trace(str(trace_dir)):
        jax.block_until_ready(decode_steps(graphdef, state, cache, tokens, steps))
      ops = top_ops(trace_dir)
      results[-1]['top_ops_ms'] = {kind: ms for kind, ms, _ in ops}
      for kind, ms, count in ops:
        print(f'  {kind:<32} {ms:9.1f} ms over {count} events ({ms / steps:.1f} ms per step, summed over threads)')
    print(
      f'batch {batch}, {live} live slots of {_CACHE_LENGTH.value}: {min(runs):.1f} ms per decode step '
      f'(min of {len(runs)}: {" ".join(f"{run:.0f}" for run in runs)})',
      flush=True,
    )
  if _OUTPUT.value:
    path = pathlib.Path(_OUTPUT.value)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {'batch': batch, 'cache_length': _CACHE_LENGTH.value, 'steps': steps, 'commit': _commit()}
    path.write_text(json.dumps({**info, 'results': results}, indent=2) + '\n')
    print(f'-> {path}')


if __name__ == '__main__':
  cli.run(main)
