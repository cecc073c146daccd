"""`generate`: cached greedy decoding against full forward passes, padded rows against the same prompts run
alone, seeded sampling, top-k / top-p limits, early stopping, cache donation and model keyword passthrough."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coars_jax.models import init_cache
from coars_jax.parallel.mesh import make_mesh
from coars_jax.sampling import GREEDY, LengthBuckets, SamplingParams, generate, score
from coars_jax.sampling import sampler as sampler_lib
from tests.sampling.conftest import EOS, PAD, VOCAB, sharpened_model

BUCKETS = LengthBuckets(prompt=(4, 8), completion=(4, 8))
PROMPTS = [[5, 9, 14], [7, 1, 22, 40, 11, 8, 30], [12, 13, 44, 2, 9]]
TEMPERATURE_ONE = SamplingParams(temperature=1.0)

forward = nnx.jit(lambda model, tokens, positions, segments: model(tokens, positions, segments)[0])


def _greedy_by_full_forward(model, prompt, steps):
  """Greedy decoding that reruns the whole sequence through the model, with no cache, at every step:
  (tokens, their log-probs under the model)."""
  sequence, scores, width = list(prompt), [], 16
  for _ in range(steps):
    # Right padding to one width keeps this to one compilation; causal attention ignores what follows.
    tokens = np.zeros((1, width), np.int32)
    tokens[0, : len(sequence)] = sequence
    segments = (np.arange(width) < len(sequence)).astype(np.int32)[None]
    logits = forward(model, jnp.asarray(tokens), jnp.arange(width, dtype=jnp.int32)[None], jnp.asarray(segments))
    next_scores = jax.nn.log_softmax(logits[0, len(sequence) - 1])
    sequence.append(int(jnp.argmax(next_scores)))
    scores.append(float(next_scores[sequence[-1]]))
  return sequence[len(prompt) :], scores


def test_output_shapes_and_dtypes(model):
  out = generate(model, PROMPTS, max_new_tokens=6, params=GREEDY, buckets=BUCKETS, eos_token_ids=())
  chex.assert_shape([out.tokens, out.log_probs, out.mask], (3, 8))  # 6 new tokens run in the bucket of 8
  chex.assert_type([out.tokens, out.log_probs, out.mask, out.lengths], [jnp.int32, jnp.float32, jnp.bool_, jnp.int32])
  chex.assert_shape([out.lengths, out.finished], (3,))
  assert out.prompt_tokens.shape == out.prompt_mask.shape == (3, 8)
  np.testing.assert_array_equal(out.lengths, [6, 6, 6])
  assert int(out.num_steps) == 6
  np.testing.assert_array_equal(np.asarray(out.tokens)[:, 6:], PAD)
  np.testing.assert_array_equal(np.asarray(out.log_probs)[:, 6:], 0.0)


def test_cached_greedy_equals_full_forward_without_cache(model):
  out = generate(model, PROMPTS, max_new_tokens=7, params=GREEDY, buckets=BUCKETS, eos_token_ids=())
  for row, prompt in enumerate(PROMPTS):
    expected_tokens, expected_scores = _greedy_by_full_forward(model, prompt, 7)
    assert np.asarray(out.tokens)[row, :7].tolist() == expected_tokens, row
    # Log-probs too: RoPE is relative, so a position off by one for every new token can leave the argmax
    # unchanged while it does change the distribution.
    np.testing.assert_allclose(np.asarray(out.log_probs)[row, :7], expected_scores, atol=1e-5)
  # The sequences must actually vary, or the comparison would not test positions or the cache.
  assert len(set(np.asarray(out.tokens)[:, :7].ravel().tolist())) > 5


def test_padded_rows_equal_prompts_run_alone(model):
  batch = generate(model, PROMPTS, max_new_tokens=5, params=GREEDY, buckets=BUCKETS)
  for row, prompt in enumerate(PROMPTS):
    alone = generate(model, [prompt], max_new_tokens=5, params=GREEDY, buckets=BUCKETS)
    np.testing.assert_array_equal(np.asarray(batch.tokens)[row], np.asarray(alone.tokens)[0])
    np.testing.assert_allclose(np.asarray(batch.log_probs)[row], np.asarray(alone.log_probs)[0], atol=1e-5)
    assert int(batch.lengths[row]) == int(alone.lengths[0])
  # The first prompt runs alone in a 4-wide bucket, in the batch in an 8-wide one: padding really differs.
  assert generate(model, [PROMPTS[0]], max_new_tokens=5, params=GREEDY, buckets=BUCKETS).prompt_tokens.shape[1] == 4


def test_padded_prompt_array_equals_ragged_lists(model):
  ragged = generate(model, PROMPTS, max_new_tokens=4, params=GREEDY, buckets=BUCKETS)
  tokens = np.full((3, 7), 55, np.int32)  # padding content must not matter
  mask = np.zeros((3, 7), np.int32)
  for row, prompt in enumerate(PROMPTS):
    tokens[row, 7 - len(prompt) :], mask[row, 7 - len(prompt) :] = prompt, 1
  padded = generate(model, tokens, prompt_mask=mask, max_new_tokens=4, params=GREEDY, buckets=BUCKETS)
  np.testing.assert_array_equal(padded.tokens, ragged.tokens)
  np.testing.assert_array_equal(padded.prompt_tokens, ragged.prompt_tokens)


def test_seeded_sampling_is_reproducible_and_seeds_differ(model):
  def run(seed):
    return generate(
      model, PROMPTS, max_new_tokens=8, params=TEMPERATURE_ONE, buckets=BUCKETS, eos_token_ids=(), seed=seed
    )

  first, again, other = run(0), run(0), run(1)
  np.testing.assert_array_equal(first.tokens, again.tokens)
  np.testing.assert_array_equal(first.log_probs, again.log_probs)
  assert (np.asarray(first.tokens) != np.asarray(other.tokens)).mean() > 0.3
  greedy = generate(model, PROMPTS, max_new_tokens=8, params=GREEDY, buckets=BUCKETS, eos_token_ids=())
  assert (np.asarray(first.tokens) != np.asarray(greedy.tokens)).any()  # it really samples


@pytest.mark.parametrize(
  'params',
  [SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.5, top_p=1e-6)],
  ids=['top_k_1', 'tiny_top_p'],
)
def test_single_candidate_sampling_equals_greedy(model, params):
  greedy = generate(model, PROMPTS, max_new_tokens=8, params=GREEDY, buckets=BUCKETS, eos_token_ids=())
  sampled = generate(model, PROMPTS, max_new_tokens=8, params=params, buckets=BUCKETS, eos_token_ids=(), seed=3)
  np.testing.assert_array_equal(sampled.tokens, greedy.tokens)
  # One candidate left: the sampling distribution is a point mass, so its log-prob is exactly 0, while
  # greedy reports the model's own log-probs, which are negative.
  np.testing.assert_array_equal(sampled.log_probs, 0.0)
  assert (np.asarray(greedy.log_probs) < -1e-3).all()


def test_every_row_stopping_ends_the_loop_early(model):
  out = generate(model, PROMPTS, max_new_tokens=8, params=GREEDY, buckets=BUCKETS, eos_token_ids=tuple(range(VOCAB)))
  assert int(out.num_steps) == 1
  np.testing.assert_array_equal(out.lengths, [1, 1, 1])
  assert np.asarray(out.finished).all()
  np.testing.assert_array_equal(np.asarray(out.tokens)[:, 1:], PAD)


def test_rows_stop_at_their_own_end_token(model):
  free = np.asarray(generate(model, PROMPTS, max_new_tokens=8, params=GREEDY, buckets=BUCKETS, eos_token_ids=()).tokens)
  # End tokens chosen from what each row will say: row 0 stops at its 2nd token, row 2 at its 4th, row 1
  # runs on unless one of those tokens appears in it earlier.
  stops = (int(free[0, 1]), int(free[2, 3]))
  out = generate(model, PROMPTS, max_new_tokens=8, params=GREEDY, buckets=BUCKETS, eos_token_ids=stops)
  expected_lengths = []
  for row in range(3):
    hits = [index for index, token in enumerate(free[row]) if token in stops]
    expected_lengths.append(hits[0] + 1 if hits else 8)
  np.testing.assert_array_equal(out.lengths, expected_lengths)
  np.testing.assert_array_equal(
    out.finished, [length < 8 or free[row, 7] in stops for row, length in enumerate(expected_lengths)]
  )
  assert int(out.num_steps) == max(expected_lengths)
  tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
  np.testing.assert_array_equal(mask, np.arange(8)[None, :] < np.asarray(expected_lengths)[:, None])
  np.testing.assert_array_equal(tokens[mask], free[mask])  # identical until each row stops
  np.testing.assert_array_equal(tokens[~mask], PAD)
  np.testing.assert_array_equal(np.asarray(out.log_probs)[~mask], 0.0)


def test_max_new_tokens_below_the_bucket_stops_there(model):
  out = generate(model, PROMPTS, max_new_tokens=3, params=GREEDY, buckets=BUCKETS, eos_token_ids=())
  assert out.tokens.shape == (3, 4) and int(out.num_steps) == 3
  np.testing.assert_array_equal(out.lengths, [3, 3, 3])


def test_decode_donates_the_cache(model):
  graphdef, state = nnx.split(model)
  cache = init_cache(model.config, 2, 12)
  tokens = jnp.asarray([[0, 5, 6, 7], [8, 9, 10, 11]], jnp.int32)
  mask = jnp.asarray([[0, 1, 1, 1], [1, 1, 1, 1]], jnp.int32)
  logits, cache = sampler_lib._prefill(
    graphdef, state, tokens, mask, {}, static_kwargs=(), cache_length=12, cache_dtype='float32'
  )
  sampler_lib._decode(
    graphdef,
    state,
    cache,
    logits,
    jnp.asarray([3, 4]),
    jnp.asarray(4),
    jax.random.key(0),
    jnp.asarray([EOS]),
    jnp.asarray(PAD),
    {},
    static_kwargs=(),
    params=GREEDY,
    completion_length=8,
  )
  assert cache.keys[0].is_deleted() and cache.values[-1].is_deleted()


class _ShiftedLogits(nnx.Module):
  """Wraps the decoder and takes an adapter-like keyword: `boost` (static) adds `amount` (an array, traced)
  to the logit of one token, through the hidden states the sampler projects."""

  def __init__(self, decoder, token):
    self.decoder, self.config, self.token = decoder, decoder.config, token

  def hidden_states(self, tokens, positions, segment_ids=None, cache=None, *, boost=None, amount=None):
    hidden, cache = self.decoder.hidden_states(tokens, positions, segment_ids, cache)
    if boost == 'on':
      # Moving the hidden state along the token's output column raises that token's logit.
      direction = self.decoder.lm_head.kernel[...][:, self.token]
      hidden = hidden + amount * direction / jnp.sum(direction**2)
    return hidden, cache

  def logits(self, hidden):
    return self.decoder.logits(hidden)


def test_model_keywords_reach_every_decoder_call(model):
  wrapped = _ShiftedLogits(model, token=17)
  plain = generate(wrapped, PROMPTS, max_new_tokens=4, params=GREEDY, buckets=BUCKETS, eos_token_ids=())
  boosted = generate(
    wrapped,
    PROMPTS,
    max_new_tokens=4,
    params=GREEDY,
    buckets=BUCKETS,
    eos_token_ids=(),
    boost='on',
    amount=jnp.asarray(100.0),
  )
  assert (np.asarray(plain.tokens)[:, :4] != 17).any()
  np.testing.assert_array_equal(np.asarray(boosted.tokens)[:, :4], 17)  # prefill and every decode step


def test_bad_inputs_are_reported(model):
  with pytest.raises(ValueError, match='row 0 is not left-padded'):
    generate(model, np.ones((1, 3), np.int32), prompt_mask=np.asarray([[1, 1, 0]]), max_new_tokens=2, buckets=BUCKETS)
  with pytest.raises(ValueError, match='9 tokens exceed the largest bucket 8; add a bucket'):
    generate(model, [list(range(1, 10))], max_new_tokens=2, buckets=BUCKETS)
  with pytest.raises(ValueError, match='prompt 1 is empty'):
    generate(model, [[1], []], max_new_tokens=2, buckets=BUCKETS)
  with pytest.raises(ValueError, match='max_new_tokens must be a positive int'):
    generate(model, [[1]], max_new_tokens=0, buckets=BUCKETS)
  with pytest.raises(TypeError, match='neither an array nor hashable'):
    generate(model, [[1]], max_new_tokens=2, buckets=BUCKETS, adapter=['a'])


def test_lora_adapter_per_row_equals_each_adapter_alone():
  """Runs only once coars_jax.models.lora exists: `adapter` as a name (static) and as per-row ids (traced)."""
  lora = pytest.importorskip('coars_jax.models.lora')
  model = sharpened_model()
  # Dropout on: the sampler and the scorer must switch it off, or rows would not match below.
  lora.add_lora(model, lora.LoRAConfig(rank=2, alpha=4.0, dropout=0.5), ['recommender', 'user'], rngs=nnx.Rngs(1))
  rng = np.random.default_rng(0)
  for _, linear in lora.targeted_linears(model, lora.TARGET_MODULES):
    # B starts at zero (every adapter the identity); random values make the adapters differ.
    linear.lora.b.set_value(jnp.asarray(rng.normal(0.0, 0.5, linear.lora.b.get_value().shape), jnp.float32))

  def run(adapter):
    return generate(model, PROMPTS, max_new_tokens=6, params=GREEDY, buckets=BUCKETS, eos_token_ids=(), adapter=adapter)

  by_name = {name: run(name) for name in ('recommender', 'user')}
  base = run(None)
  assert (np.asarray(by_name['recommender'].tokens) != np.asarray(by_name['user'].tokens)).any()
  mixed = run(jnp.asarray([0, 1, lora.ADAPTERS_OFF], jnp.int32))
  for row, reference in enumerate([by_name['recommender'], by_name['user'], base]):
    np.testing.assert_array_equal(np.asarray(mixed.tokens)[row], np.asarray(reference.tokens)[row])
  user = by_name['user']
  scored = score(model, user.prompt_tokens, user.prompt_mask, user.tokens, user.mask, params=GREEDY, adapter='user')
  np.testing.assert_allclose(np.asarray(scored), np.asarray(user.log_probs), atol=1e-4)


def _prefix_from(out, rows, lengths):
  """A `PromptPrefix` reading the first lengths[b] tokens of each new prompt from row rows[b] of an earlier call."""
  slots = sampler_lib.prompt_slots(out.prompt_mask)
  return sampler_lib.PromptPrefix(
    cache=out.cache, rows=np.asarray(rows, np.int32), sources=[slots[row][:k] for row, k in zip(rows, lengths)]
  )


@pytest.mark.parametrize('sharded', [False, True])
def test_prefix_reuse_equals_a_full_prefill(model, sharded):
  """Turn 2 of three dialogues: each new prompt starts with part of a turn-1 prompt (a shared static prefix),
  then differs. Reading that prefix from turn 1's cache, in a different row order, gives the greedy tokens and
  log-probs of prefilling the whole prompts; so does turn 3 reading turn 2's reused cache. Only a 64-token block
  is prefilled, and the decode program is the one a full prefill uses."""
  mesh = make_mesh() if sharded else None  # every device on the data axis, as the trainer builds it
  buckets = LengthBuckets(prompt=(128,), completion=(8,))
  rng = np.random.default_rng(0)
  turn1 = [rng.integers(4, VOCAB, size=n).tolist() for n in (90, 100, 80)]
  run = dict(max_new_tokens=6, params=GREEDY, buckets=buckets, eos_token_ids=(), mesh=mesh)
  first = generate(model, turn1, **run)
  assert first.cache is not None and first.prompt_mask.shape == (3, 128)
  order, shared = (1, 2, 0), (95, 70, 78)
  turn2 = [turn1[r][:k] + rng.integers(4, VOCAB, size=12).tolist() for r, k in zip(order, shared)]
  full = generate(model, turn2, **run)
  reused = generate(model, turn2, prefix=_prefix_from(first, rows=order, lengths=shared), **run)
  np.testing.assert_array_equal(reused.tokens, full.tokens)
  np.testing.assert_allclose(reused.log_probs, full.log_probs, atol=1e-4)
  np.testing.assert_array_equal(reused.prompt_tokens, full.prompt_tokens)
  turn3 = [p + [33, 34, 35] for p in turn2]
  third_full = generate(model, turn3, **run)
  third = generate(model, turn3, prefix=_prefix_from(reused, rows=[0, 1, 2], lengths=[len(p) for p in turn2]), **run)
  np.testing.assert_array_equal(third.tokens, third_full.tokens)
  np.testing.assert_allclose(third.log_probs, third_full.log_probs, atol=1e-4)
  with pytest.raises(ValueError, match='at least one token'):
    generate(model, [turn1[0]], prefix=_prefix_from(first, rows=[0], lengths=[90]), **run)


def test_prefix_reuse_prefills_a_block_and_shares_the_decode_program(model):
  from coars_jax.sampling.compilation import trace_counts

  buckets = LengthBuckets(prompt=(128,), completion=(8,))
  rng = np.random.default_rng(1)
  turn1 = [rng.integers(4, VOCAB, size=100).tolist() for _ in range(2)]
  run = dict(max_new_tokens=4, params=GREEDY, buckets=buckets, eos_token_ids=())
  first = generate(model, turn1, **run)
  counts = trace_counts()
  turn2 = [p + [7, 8, 9] for p in turn1]
  generate(model, turn2, prefix=_prefix_from(first, rows=[0, 1], lengths=[100, 100]), **run)
  after = trace_counts()
  assert after.get('sampler.prefill_after_prefix', 0) - counts.get('sampler.prefill_after_prefix', 0) <= 1
  assert after.get('sampler.decode', 0) == counts.get('sampler.decode', 0)  # the full prefill's decode program
  assert after.get('sampler.prefill', 0) == counts.get('sampler.prefill', 0)
  # A prompt whose new part does not fit a block shorter than its bucket is prefilled whole, with the same result.
  longer = [turn1[0][:2] + rng.integers(4, VOCAB, size=118).tolist()]
  counts = trace_counts()
  whole = generate(model, longer, prefix=_prefix_from(first, rows=[0], lengths=[2]), **run)
  assert trace_counts().get('sampler.prefill_after_prefix', 0) == counts.get('sampler.prefill_after_prefix', 0)
  np.testing.assert_array_equal(whole.tokens, generate(model, longer, **run).tokens)
