"""A decode step over the live cache slots against one over the whole cache (or a block-sparse prefill against the
dense one), in one process: `python -m experiments.bench_decode_slots [--switch=live_slot_decode] [--batch=16]
[--min_prompt=700] [--max_prompt=1000] [--new_tokens=64]`.

SmolLM2-135M-Instruct (the GGUF) generates `--new_tokens` tokens (no end-of-sequence stop, so every run takes the
same steps) after random prompts of `--min_prompt` to `--max_prompt` tokens in a 1,024 / 2,048 prompt bucket, with
`models.decoder.LIVE_SLOT_DECODE` (`--switch=live_slot_decode`) or `models.decoder.BLOCK_SPARSE_PREFILL`
(`--switch=block_sparse_prefill`) on and off, twice each in alternation; each setting's second run (compiled) is
reported: prefill and decode seconds and milliseconds per decode step.
"""

import time

import jax
import numpy as np
from absl import flags

from coars_jax.models import backbone
from coars_jax.models import decoder as decoder_lib
from coars_jax.sampling import LengthBuckets, generate
from coars_jax.sampling import sampler as sampler_lib
from experiments import cli

_BATCH = flags.DEFINE_integer('batch', 16, 'Rows of the generation.')
_MIN_PROMPT = flags.DEFINE_integer('min_prompt', 700, 'Shortest prompt, tokens.')
_MAX_PROMPT = flags.DEFINE_integer('max_prompt', 1000, 'Longest prompt, tokens.')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 64, 'Tokens generated per row.')
_SWITCH = flags.DEFINE_enum(
  'switch', 'live_slot_decode', ['live_slot_decode', 'block_sparse_prefill'], 'The models.decoder flag to compare.'
)


def main(argv):
  del argv
  model, _ = backbone.load_backbone(backbone.BackboneSpec(name='smollm2-135m', allow_download=False))
  rng = np.random.default_rng(0)
  lengths = rng.integers(_MIN_PROMPT.value, _MAX_PROMPT.value + 1, size=_BATCH.value)
  prompts = [rng.integers(100, 40000, size=int(n)).tolist() for n in lengths]
  buckets = LengthBuckets(prompt=(1024, 2048), completion=(_NEW_TOKENS.value,))
  switch = _SWITCH.value.upper()
  default = getattr(decoder_lib, switch)
  for live in (True, False, True, False):
    setattr(decoder_lib, switch, live)
    jax.clear_caches()
    seconds = {}
    programs = {'prefill': sampler_lib._prefill, 'decode': sampler_lib._decode}

    def timed(name):
      def run(*args, **kwargs):
        start = time.perf_counter()
        out = jax.block_until_ready(programs[name](*args, **kwargs))
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
        return out

      return run

    sampler_lib._prefill, sampler_lib._decode = timed('prefill'), timed('decode')
    try:
      for _ in range(2):  # the first run compiles
        seconds.clear()
        out = generate(model, prompts, max_new_tokens=_NEW_TOKENS.value, buckets=buckets, eos_token_ids=(), seed=0)
    finally:
      sampler_lib._prefill, sampler_lib._decode = programs['prefill'], programs['decode']
    steps = int(out.num_steps)
    print(
      f'{_SWITCH.value}={live} batch={_BATCH.value} prompts {lengths.min()}-{lengths.max()} tokens, {steps} steps: '
      f'prefill {seconds["prefill"]:.2f} s, decode {seconds["decode"]:.2f} s, '
      f'{1000 * seconds["decode"] / steps:.0f} ms per step',
      flush=True,
    )
  setattr(decoder_lib, switch, default)


if __name__ == '__main__':
  cli.run(main)
