"""Constrained decoding (`sampling.constraints`, `agents.output_constraints`): the grammar's state machine step by
step, titles that are token prefixes of others, sampler log-probs equal to scorer log-probs under the constraint,
renormalised masked distributions that never emit a forbidden token, no change at all without a constraint, and
messages of a random model with a real tokenizer that always parse."""

import functools
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coars_jax.agents import output_constraints
from coars_jax.agents.parsing import parse_recommender_output, parse_user_output
from coars_jax.agents.prompts import (
  format_recommender_output,
  format_user_output,
  recommender_system_prompt,
  user_system_prompt,
)
from coars_jax.agents.protocol import ACTIONS, format_score, interval_midpoint
from coars_jax.models import Decoder, get_preset
from coars_jax.models import tokenizer as tokenizer_lib
from coars_jax.sampling import (
  GREEDY,
  LengthBuckets,
  SamplingParams,
  completion_log_probs,
  generate,
  score,
  trace_counts,
)
from coars_jax.sampling import constraints
from coars_jax.sampling.constraints import FINAL, HEAD, LINE, TAIL, TokenClasses, build_constraint
from coars_jax.sampling.distributions import log_probs
from coars_jax.sampling.model_inputs import positions_from_mask
from tests.sampling.conftest import EOS, VOCAB
from tests.sampling.test_sampler import _ShiftedLogits

BUCKETS = LengthBuckets(prompt=(8,), completion=(16,))
PROMPTS = [[5, 9, 14], [7, 1, 22, 40, 11, 8, 30], [12, 13, 44, 2, 9]]
MAX_NEW_TOKENS = 16

# A made-up vocabulary of the 61-token test model: 4 and 5 end a line, 8.. are free text except 17, 3 ends a message.
FREE = np.zeros(VOCAB, bool)
FREE[8:] = True
FREE[17] = False
LINE_END = np.zeros(VOCAB, bool)
LINE_END[[4, 5]] = True
CLASSES = TokenClasses(free_ok=FREE, line_end=LINE_END)
HEADS = [[6, 7], [6], []]
# Row 0: [20, 21] is a prefix of [20, 21, 22] (titles "Item 1" and "Item 10"); row 1 holds the token 17, which
# free text may not use.
CHOICES = [[[20, 21], [20, 21, 22], [23]], [[30, 31, 32], [17, 40]], [[24], [25, 26]]]

PARAMS = [GREEDY, SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=20, top_p=0.9)]
PARAM_IDS = ['greedy', 'temperature_1', 'temperature_0.7_top_k_top_p']


def _constraint(final_free=False, max_line_tokens=4, heads=HEADS, choices=CHOICES):
  return build_constraint(
    CLASSES,
    heads,
    choices,
    end_token_id=EOS,
    max_new_tokens=MAX_NEW_TOKENS,
    max_line_tokens=max_line_tokens,
    final_free=final_free,
    final_tokens=3,
  )


GRAMMARS = {'choice_then_end': _constraint(), 'choice_then_free_line': _constraint(final_free=True)}

allowed_tokens = jax.jit(constraints.allowed_tokens)
advance = jax.jit(constraints.advance)


def _allowed_sets(constraint, state):
  return [set(np.flatnonzero(row).tolist()) for row in np.asarray(allowed_tokens(constraint, state))]


def _walk(constraint, rows_tokens):
  """Feeds each row its tokens in lockstep; returns the allowed sets [step][row] before each token and the
  final state."""
  state = constraints.initial_state(constraint)
  seen = []
  for step in range(len(rows_tokens[0])):
    seen.append(_allowed_sets(constraint, state))
    state = advance(constraint, state, jnp.asarray([tokens[step] for tokens in rows_tokens], jnp.int32))
  return seen, state


def test_constraint_arrays_are_padded_to_fixed_shapes():
  constraint = GRAMMARS['choice_then_end']
  chex.assert_shape(constraint.choices, (3, 4, 8))  # 3 choices -> 4, longest 3 tokens -> 8
  chex.assert_shape([constraint.head], [(3, 4)])
  chex.assert_shape([constraint.free_ok, constraint.line_end], (VOCAB,))
  chex.assert_type([constraint.choices, constraint.choice_lengths, constraint.line_budget], jnp.int32)
  np.testing.assert_array_equal(constraint.choice_lengths, [[2, 3, 1, 0], [3, 2, 0, 0], [1, 2, 0, 0]])
  np.testing.assert_array_equal(constraint.head_lengths, [2, 1, 0])
  # max_line_tokens caps the line; max_new_tokens bounds the whole message.
  np.testing.assert_array_equal(constraint.line_budget, [4, 4, 4])
  assert constraint.max_length() <= MAX_NEW_TOKENS
  tight = build_constraint(CLASSES, HEADS, CHOICES, end_token_id=EOS, max_new_tokens=9)
  np.testing.assert_array_equal(tight.line_budget, [9 - 2 - 3 - 1, 9 - 1 - 3 - 1, 9 - 0 - 2 - 1])
  with pytest.raises(ValueError, match='leaves row 0 a free line of 1 tokens'):
    build_constraint(CLASSES, HEADS, CHOICES, end_token_id=EOS, max_new_tokens=7)
  with pytest.raises(ValueError, match='row 1 has no choices or an empty one'):
    build_constraint(CLASSES, HEADS, [[[20]], [], [[24]]], end_token_id=EOS, max_new_tokens=16)


def test_state_machine_walks_head_line_tail_and_end():
  constraint = GRAMMARS['choice_then_end']
  free = set(np.flatnonzero(FREE).tolist())
  # Row 0: head 6 7, a line of 10 11 then 4, then the choice [20, 21], then the end token.
  # Row 1: head 6, a line that reaches its budget (3 free tokens, then only line ends), then [17, 40], end.
  # Row 2: no head; the line, then [25, 26], end.
  rows = [[6, 7, 10, 11, 4, 20, 21, EOS], [6, 12, 13, 14, 5, 17, 40, EOS], [15, 4, 25, 26, EOS, 0, 0, 0]]
  np.testing.assert_array_equal(constraints.initial_state(constraint).phase, [HEAD, HEAD, LINE])
  seen, state = _walk(constraint, rows)
  assert [seen[0][0], seen[1][0]] == [{6}, {7}]
  assert seen[2][0] == free  # the line's first token cannot end it
  assert seen[3][0] == free | {4, 5}
  assert seen[5][0] == {20, 23}  # the trie's first tokens
  assert seen[6][0] == {21}
  assert seen[7][0] == {EOS, 22}  # [20, 21] is complete and [20, 21, 22] goes on
  assert seen[0][1] == {6} and seen[1][1] == free and seen[3][1] == free | {4, 5}
  assert seen[4][1] == {4, 5}  # 3 free tokens out of a budget of 4: only a line end is left
  assert seen[5][1] == {30, 17} and seen[6][1] == {40} and seen[7][1] == {EOS}
  assert seen[0][2] == free and seen[2][2] == {24, 25} and seen[3][2] == {26} and seen[4][2] == {EOS}
  np.testing.assert_array_equal(state.phase, [FINAL, FINAL, FINAL])
  assert 17 not in free  # 17 is allowed in row 1 only as part of its choice


def test_prefix_choice_can_end_or_continue():
  constraint = GRAMMARS['choice_then_end']
  prefix = [6, 7, 10, 4, 20, 21]
  seen, state = _walk(constraint, [prefix + [22], [6, 10, 4, 30, 31, 32, EOS], [10, 4, 24, EOS, 0, 0, 0]])
  np.testing.assert_array_equal(state.phase, [TAIL, FINAL, FINAL])
  np.testing.assert_array_equal(np.asarray(state.alive)[0], [False, True, False, False])
  assert _allowed_sets(constraint, state)[0] == {EOS}  # [20, 21, 22] complete, nothing longer
  # Under the free-line final segment, a complete prefix choice allows the longer choice's next token, the end
  # token and free text; a token that continues the longer choice stays in the trie.
  free_final = GRAMMARS['choice_then_free_line']
  _, state = _walk(free_final, [prefix, [6, 10, 4, 30, 31, 32], [10, 4, 24, 9, 9, 9]])
  allowed = _allowed_sets(free_final, state)
  assert allowed[0] == set(np.flatnonzero(FREE).tolist()) | {22, EOS}
  assert allowed[2] == {EOS}  # the final line's budget of 3 free tokens is spent
  after_22 = advance(free_final, state, jnp.asarray([22, 9, EOS], jnp.int32))
  np.testing.assert_array_equal(after_22.phase, [TAIL, FINAL, FINAL])
  after_9 = advance(free_final, state, jnp.asarray([9, 9, EOS], jnp.int32))
  np.testing.assert_array_equal(after_9.phase, [FINAL, FINAL, FINAL])


def test_scorer_follows_the_grammar_on_given_completions(model):
  constraint = GRAMMARS['choice_then_end']
  completions = np.asarray(
    [
      [6, 7, 10, 4, 20, 21, EOS, 0],  # the shorter of two prefix choices
      [6, 10, 4, 30, 31, 32, EOS, 0],
      [10, 4, 25, 26, EOS, 0, 0, 0],
    ],
    np.int32,
  )
  longer = completions.copy()
  longer[0] = [6, 7, 10, 4, 20, 21, 22, EOS]  # the longer one
  wrong = completions.copy()
  wrong[0] = [6, 7, 10, 4, 20, 21, 23, EOS]  # 23 continues no choice
  mask = (np.arange(8)[None] < np.asarray([[7], [7], [5]])).astype(np.int32)
  longer_mask = (np.arange(8)[None] < np.asarray([[8], [7], [5]])).astype(np.int32)
  context = np.asarray([[0, 0, 0, 0, 0, 5, 9, 14]] * 3, np.int32)
  context_mask = (context != 0).astype(np.int32)
  for tokens, token_mask in ((completions, mask), (longer, longer_mask)):
    scores = np.asarray(score(model, context, context_mask, tokens, token_mask, constraint=constraint))
    assert np.isfinite(scores).all() and (scores[token_mask == 1] <= 0).all()
    # A forced token (the head, a trie step with one alive choice, the end) has probability 1.
    np.testing.assert_allclose(scores[0, [0, 1, 5]], 0.0, atol=1e-6)
  scores = np.asarray(score(model, context, context_mask, wrong, mask, constraint=constraint))
  assert scores[0, 6] == -np.inf and np.isfinite(scores[1:]).all()


def test_constrained_scoring_is_differentiable(model):
  constraint = GRAMMARS['choice_then_free_line']
  out = _generate(model, constraint, SamplingParams(temperature=1.0), 3)
  arrays = tuple(jnp.asarray(a) for a in (out.prompt_tokens, out.prompt_mask, out.tokens, out.mask))

  def total(model):
    return completion_log_probs(model, *arrays, chunk_size=5, constraint=constraint).sum()

  value, grads = nnx.jit(nnx.value_and_grad(total))(model)
  kernel_grad = np.asarray(grads.layers[0].attention.q_proj.kernel[...])
  assert np.isfinite(float(value)) and np.isfinite(kernel_grad).all() and np.abs(kernel_grad).max() > 0


def _generate(model, constraint, params, seed, **kwargs):
  return generate(
    model,
    PROMPTS,
    max_new_tokens=MAX_NEW_TOKENS,
    params=params,
    buckets=BUCKETS,
    eos_token_ids=(EOS,),
    seed=seed,
    constraint=constraint,
    **kwargs,
  )


@pytest.mark.parametrize('grammar', list(GRAMMARS))
@pytest.mark.parametrize('params', PARAMS, ids=PARAM_IDS)
def test_sampler_log_probs_equal_scorer_log_probs_under_the_constraint(model, params, grammar):
  constraint = GRAMMARS[grammar]
  for seed in range(2):
    out = _generate(model, constraint, params, seed)
    assert np.asarray(out.finished).all()  # the grammar fits every message in the budget
    for chunk_size in (None, 5):
      scored = score(
        model,
        out.prompt_tokens,
        out.prompt_mask,
        out.tokens,
        out.mask,
        params=params,
        chunk_size=chunk_size,
        constraint=constraint,
      )
      chex.assert_shape(scored, out.log_probs.shape)
      chex.assert_trees_all_close(scored, out.log_probs, atol=1e-5)
    if params.greedy:
      break


forward = nnx.jit(lambda model, tokens, positions, segments: model(tokens, positions, segments)[0])


@pytest.mark.parametrize('params', PARAMS[1:], ids=PARAM_IDS[1:])
def test_constrained_distribution_renormalises_and_forbidden_tokens_are_never_sampled(model, params):
  constraint = GRAMMARS['choice_then_free_line']
  out = _generate(model, constraint, params, seed=7)
  tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
  prompt_length = out.prompt_tokens.shape[1]
  sequence = jnp.asarray(np.concatenate([out.prompt_tokens, tokens], axis=1))
  segments = jnp.asarray(np.concatenate([out.prompt_mask, mask], axis=1).astype(np.int32))
  logits = forward(model, sequence, positions_from_mask(segments), segments)
  logits = logits[:, prompt_length - 1 : prompt_length - 1 + tokens.shape[1]]
  states = constraints.states_along(constraint, jnp.asarray(tokens))
  allowed = np.asarray(jax.vmap(constraints.allowed_tokens, in_axes=(None, 1), out_axes=1)(constraint, states))
  masked = jax.vmap(constraints.mask_logits, in_axes=(None, 1, 1), out_axes=1)(constraint, states, logits)
  scores = np.asarray(log_probs(masked, params))
  chex.assert_shape(scores, (3, tokens.shape[1], VOCAB))
  real = mask.astype(bool)
  # The constrained distribution sums to 1 over the allowed tokens and puts nothing elsewhere.
  np.testing.assert_allclose(np.exp(scores).sum(-1)[real], 1.0, atol=1e-5)
  assert (scores[real][~allowed[real]] == -np.inf).all()
  # Every sampled token was allowed at its step, and its reported log-prob is read from this distribution.
  assert np.take_along_axis(allowed, tokens[..., None], axis=-1)[..., 0][real].all()
  np.testing.assert_allclose(
    np.take_along_axis(scores, tokens[..., None], axis=-1)[..., 0][real], np.asarray(out.log_probs)[real], atol=1e-5
  )


def test_a_forbidden_token_is_not_sampled_even_when_the_model_insists(model):
  """Token 17 gets +100 on its logit: unconstrained, every token is 17; constrained, it appears only where the
  grammar allows it (row 1's choice [17, 40]) and every message still follows the grammar."""
  wrapped = _ShiftedLogits(model, token=17)
  boost = dict(boost='on', amount=jnp.asarray(100.0))
  free = generate(
    wrapped,
    PROMPTS,
    max_new_tokens=MAX_NEW_TOKENS,
    params=SamplingParams(temperature=1.0),
    buckets=BUCKETS,
    eos_token_ids=(EOS,),
    **boost,
  )
  assert (np.asarray(free.tokens) == 17).all()
  constraint = GRAMMARS['choice_then_end']
  out = _generate(wrapped, constraint, SamplingParams(temperature=1.0), 0, **boost)
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  # Row 1: head 6, a free line of 1 to 3 tokens and its line end, then the boosted choice and the end token.
  line_end = 1 + int(np.flatnonzero(LINE_END[tokens[1, 1:]])[0])
  assert tokens[1, 0] == 6 and 2 <= line_end <= 4 and 17 not in tokens[1, :line_end].tolist()
  assert tokens[1, line_end + 1 : line_end + 4].tolist() == [17, 40, EOS] and lengths[1] == line_end + 4
  assert 17 not in tokens[0, : lengths[0]].tolist() + tokens[2, : lengths[2]].tolist()
  np.testing.assert_allclose(np.asarray(out.log_probs)[1, line_end + 1], 0.0, atol=1e-6)  # 17: all but certain


@pytest.mark.parametrize(
  'boosted, expected', [(EOS, [20, 21, EOS]), (22, [20, 21, 22, EOS])], ids=['shorter', 'longer']
)
def test_both_prefix_titles_are_reachable(model, boosted, expected):
  wrapped = _ShiftedLogits(model, token=boosted)
  # Every row may name [20, 21] or [20, 21, 22]: after 20 21 the boosted token decides between the two.
  constraint = build_constraint(
    CLASSES,
    [[]] * 3,
    [[[20, 21], [20, 21, 22]]] * 3,
    end_token_id=EOS,
    max_new_tokens=MAX_NEW_TOKENS,
    max_line_tokens=3,
  )
  out = generate(
    wrapped,
    PROMPTS,
    max_new_tokens=MAX_NEW_TOKENS,
    params=GREEDY,
    buckets=BUCKETS,
    eos_token_ids=(EOS,),
    constraint=constraint,
    boost='on',
    amount=jnp.asarray(100.0),
  )
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  for row in range(3):
    assert tokens[row, lengths[row] - len(expected) : lengths[row]].tolist() == expected
  scored = score(
    wrapped,
    out.prompt_tokens,
    out.prompt_mask,
    out.tokens,
    out.mask,
    params=GREEDY,
    constraint=constraint,
    boost='on',
    amount=jnp.asarray(100.0),
  )
  chex.assert_trees_all_close(scored, out.log_probs, atol=1e-5)


def test_no_constraint_changes_nothing(model):
  params = SamplingParams(temperature=1.0, top_k=20)
  plain = generate(model, PROMPTS, max_new_tokens=8, params=params, buckets=BUCKETS, seed=5)
  before = trace_counts()
  again = generate(model, PROMPTS, max_new_tokens=8, params=params, buckets=BUCKETS, seed=5, constraint=None)
  scored = score(model, plain.prompt_tokens, plain.prompt_mask, plain.tokens, plain.mask, params=params)
  scored_none = score(
    model, plain.prompt_tokens, plain.prompt_mask, plain.tokens, plain.mask, params=params, constraint=None
  )
  for name in ('tokens', 'log_probs', 'mask', 'lengths', 'finished', 'num_steps'):
    np.testing.assert_array_equal(np.asarray(getattr(again, name)), np.asarray(getattr(plain, name)))
  np.testing.assert_array_equal(np.asarray(scored_none), np.asarray(scored))
  after = trace_counts()
  # constraint=None is the very same jitted call: no new sampler program ("scoring.score" may trace once here).
  assert after.get('sampler.decode') == before.get('sampler.decode')
  assert after.get('sampler.prefill') == before.get('sampler.prefill')
  # The constrained output differs: the grammar is really applied when given.
  constrained = _generate(model, GRAMMARS['choice_then_end'], params, 5)
  assert not np.array_equal(np.asarray(constrained.tokens), np.asarray(plain.tokens)[:, :16])


def test_generate_refuses_a_constraint_that_does_not_fit(model):
  constraint = GRAMMARS['choice_then_end']
  with pytest.raises(ValueError, match='not among the eos tokens'):
    generate(model, PROMPTS, max_new_tokens=16, buckets=BUCKETS, eos_token_ids=(4,), constraint=constraint)
  with pytest.raises(ValueError, match='more than max_new_tokens=8'):
    generate(model, PROMPTS, max_new_tokens=8, buckets=BUCKETS, eos_token_ids=(EOS,), constraint=constraint)
  with pytest.raises(ValueError, match='has 3 rows for 2 prompts'):
    generate(model, PROMPTS[:2], max_new_tokens=16, buckets=BUCKETS, eos_token_ids=(EOS,), constraint=constraint)


# --- the agents' grammars with a real tokenizer and a random model -----------------------------------------------

TITLES = (
  'Item 1',
  'Item 10',
  'Item 12',
  'Item 2',
  'Café Nocturne',
  '東京事変',
  'Lee "Scratch" Perry',
  'Cable -  Straight',
  'Guitar Strings, Light Gauge',
  'The Quiet Year',
  'IRA',
  'Ira!',
  '311',
  'Blue Harbour',
)
CANDIDATE_ROWS = [
  list(TITLES[:8]),
  list(TITLES[6:]),
  ['Item 1', 'Item 10', 'Item 12', 'IRA', 'Ira!'],
  list(reversed(TITLES)),
]
AGENT_BUCKETS = LengthBuckets(prompt=(32,), completion=(64,))
AGENT_MAX_NEW_TOKENS = 48


@functools.lru_cache(maxsize=None)
def agent_tokenizer():
  """A 600-piece BPE trained on the test titles, the protocol corpus and both system prompts."""
  lines = tokenizer_lib.tokenizer_corpus([TITLES], repeats=4)
  for text in (recommender_system_prompt(), user_system_prompt()):
    lines += [line for line in text.splitlines() if line]
  folder = tokenizer_lib.build_tokenizer(lines, tempfile.mkdtemp(prefix='constraints-tokenizer-'), vocab_size=600)
  return tokenizer_lib.load_tokenizer(folder)


@functools.lru_cache(maxsize=None)
def random_agent_model():
  """An untrained tiny decoder over the tokenizer's vocabulary plus 8 padding ids no text uses."""
  config = get_preset(
    'tiny',
    vocab_size=len(agent_tokenizer()) + 8,
    embed_dim=32,
    mlp_dim=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=256,
  )
  return Decoder(config, rngs=nnx.Rngs(0))


def _agent_prompts(batch):
  tokenizer = agent_tokenizer()
  return [
    tokenizer(f'<|user|>\nRecommend one of list {row}.<|end|><|assistant|>\n', add_special_tokens=False)['input_ids']
    for row in range(batch)
  ]


def test_agent_grammars_are_the_formatters_strings():
  tokenizer = agent_tokenizer()
  classes = constraints.token_classes(tokenizer)
  assert output_constraints.message_head() == 'Reason:'
  assert output_constraints.recommender_tail('Item 10') == 'Item: Item 10'
  assert output_constraints.user_tail('star') == 'Action: star\nScore:'
  assert classes.free_ok.shape == (len(tokenizer),) and classes.line_end.any()
  assert not classes.free_ok[tokenizer.all_special_ids].any()
  # A partial UTF-8 byte is never free text; the newline byte ends a line.
  newline, partial = tokenizer.convert_tokens_to_ids(['<0x0A>', '<0xE2>'])
  assert classes.line_end[newline] and not classes.free_ok[newline]
  assert not classes.free_ok[partial] and not classes.line_end[partial]
  recommender = output_constraints.recommender_constraint(tokenizer, CANDIDATE_ROWS, max_new_tokens=48, classes=classes)
  chex.assert_shape(recommender.choices[:, :, 0], (4, 16))  # up to 14 candidates -> 16
  head = np.asarray(recommender.head)[0, : int(recommender.head_lengths[0])].tolist()
  reason = tokenizer(' it fits\n', add_special_tokens=False)['input_ids']
  for row, titles in enumerate(CANDIDATE_ROWS):
    for index, title in enumerate(titles):
      tail = np.asarray(recommender.choices)[row, index, : int(recommender.choice_lengths[row, index])]
      text = tokenizer.decode(head + reason + tail.tolist())
      assert text == format_recommender_output('it fits', title)
  # Other candidate lists of other sizes, within the same powers of two, pad to the same shapes: no new programs.
  other_rows = [list(TITLES[:9]), list(TITLES[2:]), list(TITLES[4:12]), list(TITLES[:3])]
  other = output_constraints.recommender_constraint(tokenizer, other_rows, max_new_tokens=48, classes=classes)
  chex.assert_equal_shape([other.choices, recommender.choices])
  user = output_constraints.user_constraint(tokenizer, 3, max_new_tokens=48, classes=classes)
  for index, action in enumerate(ACTIONS):
    tail = np.asarray(user.choices)[0, index, : int(user.choice_lengths[0, index])].tolist()
    written = format_user_output('it fits', action, interval_midpoint(action))
    assert written == tokenizer.decode(head + reason + tail) + ' ' + format_score(interval_midpoint(action))
  with pytest.raises(ValueError, match=r'leaves row \d+ a free line'):
    output_constraints.recommender_constraint(tokenizer, CANDIDATE_ROWS, max_new_tokens=12, classes=classes)


@pytest.mark.parametrize('params', PARAMS[:2], ids=PARAM_IDS[:2])
def test_every_constrained_message_of_a_random_model_parses(params):
  tokenizer = agent_tokenizer()
  model = random_agent_model()
  end = tokenizer.convert_tokens_to_ids(tokenizer_lib.END_OF_TURN_TOKEN)
  classes = constraints.token_classes(tokenizer, model.config.vocab_size)
  recommender = output_constraints.recommender_constraint(
    tokenizer,
    CANDIDATE_ROWS,
    max_new_tokens=AGENT_MAX_NEW_TOKENS,
    vocab_size=model.config.vocab_size,
    end_token_id=end,
    classes=classes,
  )
  user = output_constraints.user_constraint(
    tokenizer,
    len(CANDIDATE_ROWS),
    max_new_tokens=AGENT_MAX_NEW_TOKENS,
    vocab_size=model.config.vocab_size,
    end_token_id=end,
    classes=classes,
  )
  prompts = _agent_prompts(len(CANDIDATE_ROWS))
  named = set()
  for seed in range(3 if not params.greedy else 1):
    for agent, constraint in (('recommender', recommender), ('user', user)):
      out = generate(
        model,
        prompts,
        max_new_tokens=AGENT_MAX_NEW_TOKENS,
        params=params,
        buckets=AGENT_BUCKETS,
        eos_token_ids=(end,),
        seed=seed,
        constraint=constraint,
      )
      assert np.asarray(out.finished).all()
      tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
      for row, titles in enumerate(CANDIDATE_ROWS):
        text = tokenizer.decode(tokens[row, : lengths[row]].tolist(), skip_special_tokens=True)
        if agent == 'recommender':
          parsed = parse_recommender_output(text, titles)
          assert parsed.valid and parsed.match_rule == 'exact', text
          assert text.endswith(f'\nItem: {parsed.title}') and text.startswith('Reason:')
          named.add(parsed.title)
        else:
          parsed = parse_user_output(text)
          assert parsed.valid and parsed.action in ACTIONS, text
      scored = score(
        model, out.prompt_tokens, out.prompt_mask, out.tokens, out.mask, params=params, constraint=constraint
      )
      chex.assert_trees_all_close(scored, out.log_probs, atol=1e-5)
  assert len(named) >= (2 if params.greedy else 4)  # the messages do vary
