"""Sampler throughput against HF transformers: `python -m experiments.bench_sampler --model=tiny --output=FILE`.

Runs `coars_jax.sampling.generation_speed.run_benchmark` for each --model, prints a table per model and writes the
results as JSON (a list when several models are given) to --output.
"""

import json
import pathlib

from absl import flags

from coars_jax.sampling import SamplingParams
from coars_jax.sampling import generation_speed
from experiments import cli

_MODELS = flags.DEFINE_list('model', ['tiny'], f'Models to measure, from {generation_speed.MODELS}.')
_BATCH = flags.DEFINE_integer('batch', 16, 'Prompts per batch.')
_PROMPT_LENGTH = flags.DEFINE_integer('prompt_length', 128, 'Tokens per prompt (no padding).')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 64, 'Tokens generated per prompt; end-of-sequence is ignored.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs per measurement; the fastest counts.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, '0 is greedy; otherwise both sample at this temperature.')
_TOP_K = flags.DEFINE_integer('top_k', None, 'Top-k for sampling (both samplers).')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Top-p for sampling (both samplers).')
_TORCH_THREADS = flags.DEFINE_integer(
  'torch_threads', None, 'torch threads; default: the fastest of 1..cores on a short probe generation.'
)
_PROFILE_DIR = flags.DEFINE_string('profile_dir', None, 'Write a jax.profiler trace of one coars_jax generation.')
_OUTPUT = flags.DEFINE_string('output', None, 'Write the results as JSON to this file.')


def main(argv):
  del argv
  params = SamplingParams(temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value)
  results = []
  for name in _MODELS.value:
    result = generation_speed.run_benchmark(
      name,
      batch=_BATCH.value,
      prompt_length=_PROMPT_LENGTH.value,
      new_tokens=_NEW_TOKENS.value,
      repeats=_REPEATS.value,
      params=params,
      torch_threads=_TORCH_THREADS.value,
      profile_dir=_PROFILE_DIR.value,
    )
    print(generation_speed.format_table(result), flush=True)
    print(flush=True)
    results.append(result)
  if _OUTPUT.value:
    path = pathlib.Path(_OUTPUT.value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    print(f'Wrote {path}')


if __name__ == '__main__':
  cli.run(main)
