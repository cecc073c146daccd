"""Generation and scoring for the agents' shared LLM: a jitted prefill and a cache-donating decode loop with
greedy / temperature / top-k / top-p sampling and behaviour log-probs, length buckets that bound the
programs compiled, and a jitted scorer of given completions for the teacher and student passes; both take an
optional output grammar (`constraints.ChoiceConstraint`) for constrained decoding."""

from coars_jax.sampling.buckets import LengthBuckets, bucket_length, left_pad, right_pad
from coars_jax.sampling.compilation import count_backend_compiles, trace_counts
from coars_jax.sampling.constraints import ChoiceConstraint
from coars_jax.sampling.distributions import GREEDY, SamplingParams
from coars_jax.sampling.sampler import GenerationOutput, generate
from coars_jax.sampling.scoring import completion_log_probs, score

__all__ = [
  'ChoiceConstraint',
  'GREEDY',
  'GenerationOutput',
  'LengthBuckets',
  'SamplingParams',
  'bucket_length',
  'completion_log_probs',
  'count_backend_compiles',
  'generate',
  'left_pad',
  'right_pad',
  'score',
  'trace_counts',
]
