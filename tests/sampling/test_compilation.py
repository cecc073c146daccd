"""Compilation counting: a multi-turn-like run over varied prompt, budget and context lengths compiles at
most one program per bucket combination, and repeating it with new lengths compiles nothing at all."""

import numpy as np

from coars_jax.sampling import (
  LengthBuckets,
  SamplingParams,
  count_backend_compiles,
  generate,
  left_pad,
  score,
  trace_counts,
)
from coars_jax.sampling.compilation import count_trace
from tests.sampling.conftest import PAD

BUCKETS = LengthBuckets(prompt=(8, 16), completion=(4, 8))
PARAMS = SamplingParams(temperature=1.0, top_k=10)
BATCH = 3


def _turn(model, rng, prompt_length, max_new_tokens, hint_length, seed):
  """One rollout turn and its two scoring passes: student (context x) and teacher (x plus a hint d)."""
  prompts = [rng.integers(1, 60, size=rng.integers(1, prompt_length + 1)).tolist() for _ in range(BATCH)]
  prompts[0] = prompts[0] + [7] * (prompt_length - len(prompts[0]))  # the longest sets the bucket
  out = generate(model, prompts, max_new_tokens=max_new_tokens, params=PARAMS, buckets=BUCKETS, seed=seed)
  score(model, out.prompt_tokens, out.prompt_mask, out.tokens, out.mask, params=PARAMS, buckets=BUCKETS)
  teacher = [prompt + [9] * hint_length for prompt in prompts]
  teacher_tokens, teacher_mask = left_pad(teacher, max(map(len, teacher)), PAD)
  score(model, teacher_tokens, teacher_mask, out.tokens, out.mask, params=PARAMS, buckets=BUCKETS)


def _delta(before, after):
  return {name: count - before.get(name, 0) for name, count in after.items() if count != before.get(name, 0)}


def test_trace_counter_counts_calls_by_name():
  before = trace_counts()
  count_trace('test.example')
  count_trace('test.example')
  assert _delta(before, trace_counts()) == {'test.example': 2}


def test_bucketed_lengths_compile_a_bounded_set_of_programs_once(model):
  rng = np.random.default_rng(0)
  before = trace_counts()
  # Warm-up touches every bucket: prompts of 5 and 13 tokens (buckets 8, 16), budgets of 3 and 7 (4, 8);
  # teacher contexts of up to 16 tokens.
  for prompt_length, max_new_tokens in ((5, 3), (13, 7), (5, 7), (13, 3)):
    _turn(model, rng, prompt_length, max_new_tokens, hint_length=2, seed=0)
  warm = _delta(before, trace_counts())
  prompts, completions = len(BUCKETS.prompt), len(BUCKETS.completion)
  # The cache is sized prompt bucket + completion bucket, so prefill too compiles per pair.
  assert warm['sampler.prefill'] == prompts * completions
  assert warm['sampler.decode'] == prompts * completions
  assert 1 <= warm['scoring.score'] <= prompts * completions
  after_warm_up = trace_counts()

  # Later turns with other lengths inside the same buckets: no new trace, and no XLA compilation at all.
  with count_backend_compiles() as compiles:
    for turn in range(6):
      _turn(
        model,
        rng,
        prompt_length=int(rng.integers(1, 14)),
        max_new_tokens=int(rng.integers(1, 9)),
        hint_length=int(rng.integers(0, 3)),
        seed=turn + 1,
      )
  assert trace_counts() == after_warm_up
  assert compiles.count == 0


def test_backend_compile_counter_sees_new_programs(model):
  # Guards the test above: a shape never seen before must register, or "0 compiles" proves nothing.
  with count_backend_compiles() as compiles:
    generate(model, [[1, 2]] * 5, max_new_tokens=2, buckets=BUCKETS)  # batch 5 is new
  assert compiles.count >= 2
