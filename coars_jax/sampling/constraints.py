"""Constrained decoding: a per-row output grammar as plain arrays, applied by the sampler at every step and
recomputed by the scorer from the completion tokens, so that both report log-probs under the same constrained
distribution (which is what makes the RL ratio pi_new / pi_old correct).

The grammar has four segments, which the sampler walks through per row with a small state (`ConstraintState`):

  HEAD  a forced token sequence (e.g. the tokens of "Reason:"), one token per step;
  LINE  free text on one line: any token in `free_ok` (no line break, not a special token), ended by a token in
        `line_end` (one line break, at its end). The line holds at least one free token before its end and at most
        `line_budget` tokens in all: once `line_budget - 1` tokens are out, only `line_end` tokens are allowed;
  TAIL  one of C token sequences (`choices`, e.g. "Item: <title>" for each candidate), decoded as a trie: an
        `alive` mask over the choices and a position counter; the allowed tokens are the union over alive choices
        of choices[c, pos], and after a token alive &= (choices[:, pos] == token);
  FINAL after a complete choice: either the end token at once (`final_free` False, the recommender), or free
        one-line text then the end token (`final_free` True, the user's Score line), with the end token forced
        once `final_budget` free tokens are out.

A choice that is a token prefix of another (titles "Item 1" and "Item 10") is handled by letting a complete choice
and longer alive choices coexist: the allowed set is then the longer choices' next tokens plus the first tokens of
FINAL. A sampled token that continues an alive choice stays in TAIL (continuing wins when a token could do both);
any other allowed token moves to FINAL and counts as its first token. Padding choices have length 0 and are never
alive; real choices have at least one token.

Masking comes before the sampling transform: forbidden logits become -inf, then temperature, top-k and top-p
apply to the allowed tokens only, and the log-probs are those of this renormalised distribution (for greedy
decoding, log_softmax of the masked logits). A completion token the grammar forbids scores -inf.

Shapes are static per (batch, choices, choice length, head length, vocab); builders pad C, L and the head to
powers of two so that calls with different candidate lists reuse the compiled programs. Token classes come from
decoding each vocabulary id on its own (`token_classes`). Free text uses only tokens that decode on their own to
whole characters: a partial UTF-8 byte token (byte fallback, byte-level BPE) is left out, because a decoder turns
a run of bytes that is not valid UTF-8 into replacement characters, which could swallow the line break that
follows it, and because bytes could spell a line break (U+2028) that no single token shows. Free text therefore
cannot hold characters the vocabulary spells only in bytes (rare CJK); choices can, as they are checked whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

HEAD, LINE, TAIL, FINAL = 0, 1, 2, 3
# The characters str.splitlines breaks at: what the parsers treat as line breaks.
LINE_BREAKS = '\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029'


@struct.dataclass
class ChoiceConstraint:
  """A per-row output grammar (see the module docstring); every field is an array, traced under jit.

  head: [B, H] int32, the forced opening tokens, padded; head_lengths: [B] int32 (0: no head).
  choices: [B, C, L] int32, the tail options, padded; choice_lengths: [B, C] int32 (0: a padding slot).
  line_budget: [B] int32, the most tokens of the free line, its line-ending token included (>= 2).
  final_free: [B] bool, whether free one-line text may follow the choice before the end token.
  final_budget: [B] int32, the most free tokens after the choice (when final_free).
  free_ok: [V] bool, tokens allowed in free text; line_end: [V] bool, tokens that end the free line.
  end_token_id: [] int32, the token that ends the message (must be one of the sampler's eos tokens).
  """

  head: jax.Array
  head_lengths: jax.Array
  choices: jax.Array
  choice_lengths: jax.Array
  line_budget: jax.Array
  final_free: jax.Array
  final_budget: jax.Array
  free_ok: jax.Array
  line_end: jax.Array
  end_token_id: jax.Array

  @property
  def batch_size(self) -> int:
    return self.choices.shape[0]

  @property
  def vocab_size(self) -> int:
    return self.free_ok.shape[0]

  def max_length(self) -> int:
    """Host side: the most tokens any row's message can take under this grammar, end token included."""
    head = np.asarray(self.head_lengths)
    longest = np.asarray(self.choice_lengths).max(axis=1)
    final = np.where(np.asarray(self.final_free), np.asarray(self.final_budget), 0)
    return int((head + np.asarray(self.line_budget) + longest + final + 1).max())


@struct.dataclass
class ConstraintState:
  """Where each row is in the grammar: phase [B] int32 (HEAD, LINE, TAIL, FINAL), count [B] int32 (tokens so
  far in this phase, i.e. the position in the head or the trie, or free tokens written), alive [B, C] bool."""

  phase: jax.Array
  count: jax.Array
  alive: jax.Array


def initial_state(constraint: ChoiceConstraint) -> ConstraintState:
  """The state before a row's first token."""
  chex.assert_rank([constraint.head_lengths, constraint.choice_lengths], [1, 2])
  phase = jnp.where(constraint.head_lengths > 0, HEAD, LINE).astype(jnp.int32)
  return ConstraintState(phase=phase, count=jnp.zeros_like(phase), alive=constraint.choice_lengths > 0)


def _one_hot(tokens: jax.Array, vocab_size: int) -> jax.Array:
  return jnp.arange(vocab_size, dtype=jnp.int32)[None, :] == tokens[:, None]


def _next_choice_tokens(constraint: ChoiceConstraint, state: ConstraintState) -> tuple[jax.Array, jax.Array]:
  """(choices[b, c, count] [B, C], whether choice c is alive and not yet complete [B, C])."""
  length = constraint.choices.shape[2]
  position = jnp.clip(state.count, 0, length - 1)[:, None, None]
  next_tokens = jnp.take_along_axis(constraint.choices, position, axis=2)[:, :, 0]
  continuing = state.alive & (state.count[:, None] < constraint.choice_lengths)
  return next_tokens, continuing


def _final_allowed(constraint: ChoiceConstraint, count: jax.Array) -> jax.Array:
  """[B, V]: what FINAL allows after `count` free tokens."""
  free = (constraint.final_free & (count < constraint.final_budget))[:, None] & constraint.free_ok[None, :]
  end = jnp.broadcast_to(constraint.end_token_id, count.shape)
  return free | _one_hot(end, constraint.vocab_size)


def allowed_tokens(constraint: ChoiceConstraint, state: ConstraintState) -> jax.Array:
  """[B, V] bool: the tokens each row may emit next. A row with nothing allowed (a malformed constraint)
  allows everything rather than producing NaN log-probs."""
  batch, vocab = constraint.batch_size, constraint.vocab_size
  chex.assert_shape([state.phase, state.count], (batch,))
  chex.assert_shape(state.alive, constraint.choice_lengths.shape)
  count = state.count

  head_position = jnp.clip(count, 0, constraint.head.shape[1] - 1)[:, None]
  head = _one_hot(jnp.take_along_axis(constraint.head, head_position, axis=1)[:, 0], vocab)

  line_free = (count < constraint.line_budget - 1)[:, None] & constraint.free_ok[None, :]
  line = line_free | ((count > 0)[:, None] & constraint.line_end[None, :])

  next_tokens, continuing = _next_choice_tokens(constraint, state)
  rows = jnp.arange(batch)[:, None]
  # Dead choices write out of bounds and are dropped; every write sets True, so duplicates agree.
  tail = jnp.zeros((batch, vocab), bool).at[rows, jnp.where(continuing, next_tokens, vocab)].set(True, mode='drop')
  complete = (state.alive & (count[:, None] == constraint.choice_lengths)).any(axis=1)
  tail = tail | (complete[:, None] & _final_allowed(constraint, jnp.zeros_like(count)))

  final = _final_allowed(constraint, count)
  phase = state.phase[:, None]
  allowed = jnp.where(phase == HEAD, head, jnp.where(phase == LINE, line, jnp.where(phase == TAIL, tail, final)))
  chex.assert_shape(allowed, (batch, vocab))
  return allowed | ~allowed.any(axis=1, keepdims=True)


def mask_logits(constraint: ChoiceConstraint, state: ConstraintState, logits: jax.Array) -> jax.Array:
  """logits [B, V] with every token the grammar forbids set to -inf (dtype kept)."""
  chex.assert_shape(logits, (constraint.batch_size, constraint.vocab_size))
  return jnp.where(allowed_tokens(constraint, state), logits, -jnp.inf).astype(logits.dtype)


def advance(constraint: ChoiceConstraint, state: ConstraintState, tokens: jax.Array) -> ConstraintState:
  """The state after each row emits tokens [B] (assumed allowed; rows past their end move on harmlessly)."""
  chex.assert_shape(tokens, (constraint.batch_size,))
  phase, count = state.phase, state.count

  head_count = count + 1
  head_done = head_count >= constraint.head_lengths
  head_phase = jnp.where(head_done, LINE, HEAD)
  head_count = jnp.where(head_done, 0, head_count)

  ends_line = constraint.line_end[tokens]
  line_phase = jnp.where(ends_line, TAIL, LINE)
  line_count = jnp.where(ends_line, 0, count + 1)

  next_tokens, continuing = _next_choice_tokens(constraint, state)
  matching = continuing & (next_tokens == tokens[:, None])
  continues = matching.any(axis=1)
  tail_phase = jnp.where(continues, TAIL, FINAL)
  # Leaving the trie, the token is FINAL's first one.
  tail_count = jnp.where(continues, count + 1, 1)
  tail_alive = jnp.where(continues[:, None], matching, state.alive)

  new_phase = jnp.select([phase == HEAD, phase == LINE, phase == TAIL], [head_phase, line_phase, tail_phase], FINAL)
  new_count = jnp.select([phase == HEAD, phase == LINE, phase == TAIL], [head_count, line_count, tail_count], count + 1)
  new_alive = jnp.where((phase == TAIL)[:, None], tail_alive, state.alive)
  return ConstraintState(phase=new_phase.astype(jnp.int32), count=new_count.astype(jnp.int32), alive=new_alive)


def states_along(constraint: ChoiceConstraint, tokens: jax.Array) -> ConstraintState:
  """The state before each completion token: fields [B, N] (alive [B, N, C]) for tokens [B, N], by a scan
  over positions from `initial_state`; what the sampler's state was at each step it sampled that token."""
  chex.assert_rank(tokens, 2)
  chex.assert_equal_shape_prefix([tokens, constraint.choices], 1)

  def step(state, token):
    return advance(constraint, state, token), state

  _, states = jax.lax.scan(step, initial_state(constraint), tokens.T.astype(jnp.int32))
  return jax.tree.map(lambda leaf: jnp.moveaxis(leaf, 0, 1), states)


# --- host-side building ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class TokenClasses:
  """Per-vocabulary token classes, host numpy [V] bool: free_ok (allowed in free text: decodes on its own to
  whole characters without a line break, and is not a special or added token), line_end (whole characters with
  one line break, at the end)."""

  free_ok: np.ndarray
  line_end: np.ndarray


def _has_break(text: str) -> bool:
  return any(character in LINE_BREAKS for character in text)


def token_classes(tokenizer, vocab_size: int | None = None) -> TokenClasses:
  """`TokenClasses` of an HF tokenizer over `vocab_size` ids (default len(tokenizer)); ids the tokenizer does
  not have (a model's padded embedding rows) are in neither class."""
  size = len(tokenizer)
  vocab_size = size if vocab_size is None else vocab_size
  if vocab_size < size:
    raise ValueError(f"token_classes: vocab_size {vocab_size} is smaller than the tokenizer's {size} tokens")
  texts = tokenizer.batch_decode(
    [[index] for index in range(size)], skip_special_tokens=False, clean_up_tokenization_spaces=False
  )
  special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
  free_ok, line_end = np.zeros(vocab_size, bool), np.zeros(vocab_size, bool)
  for index, text in enumerate(texts):
    if index in special or not text or '\ufffd' in text:  # U+FFFD: a partial UTF-8 byte sequence
      continue
    free_ok[index] = not _has_break(text)
    line_end[index] = text.endswith('\n') and not _has_break(text[:-1])
  if not free_ok.any() or not line_end.any():
    raise ValueError(
      f'token_classes: the tokenizer has {int(free_ok.sum())} free-text tokens and '
      f'{int(line_end.sum())} line-ending tokens; a constrained line needs both'
    )
  return TokenClasses(free_ok=free_ok, line_end=line_end)


def continuation_ids(tokenizer, context: str, text: str) -> list[int]:
  """The token ids of `text` as the tokenizer writes it after `context` (so a tokenizer that adds a leading
  space or merges across the boundary is handled), falling back to `text` alone when the context's ids are
  not a prefix; raises if neither decodes back to `text` after the context."""
  context_ids = tokenizer(context, add_special_tokens=False)['input_ids']
  together = tokenizer(context + text, add_special_tokens=False)['input_ids']
  candidates = []
  if together[: len(context_ids)] == context_ids:
    candidates.append(together[len(context_ids) :])
  candidates.append(tokenizer(text, add_special_tokens=False)['input_ids'])
  expected = tokenizer.decode(context_ids, skip_special_tokens=True) + text
  for ids in candidates:
    if ids and tokenizer.decode(context_ids + ids, skip_special_tokens=True) == expected:
      return list(ids)
  raise ValueError(
    f'continuation_ids: the tokenizer cannot write {text!r} after {context!r} so that it decodes back unchanged'
  )


def _power_of_two(size: int, least: int) -> int:
  return max(least, 1 << (max(size, 1) - 1).bit_length())


def build_constraint(
  classes: TokenClasses,
  heads: Sequence[Sequence[int]],
  choices: Sequence[Sequence[Sequence[int]]],
  *,
  end_token_id: int,
  max_new_tokens: int,
  max_line_tokens: int | None = None,
  final_free: bool = False,
  final_tokens: int = 0,
  num_choices: int | None = None,
  choice_length: int | None = None,
  head_length: int | None = None,
) -> ChoiceConstraint:
  """A `ChoiceConstraint` from token ids, one row per entry of `heads` / `choices`.

  heads: each row's forced opening tokens (may be empty).
  choices: each row's tail options, each a non-empty token list; identical options are kept once.
  end_token_id: the token that ends a message; it must be one of the sampler's eos tokens.
  max_new_tokens: the sampler's budget: each row's free line gets what is left of it after the head, the
    row's longest choice, the final free tokens and the end token (at most `max_line_tokens`), so that every
    message completes within the budget.
  final_free, final_tokens: whether free one-line text (at most final_tokens tokens) may follow the choice.
  num_choices, choice_length, head_length: padded sizes of C, L and H (default the next power of two of the
    longest, at least 4, 8 and 4), fixed so that calls share compiled programs.
  """
  if len(heads) != len(choices) or not choices:
    raise ValueError(
      f'build_constraint: {len(heads)} heads and {len(choices)} choice lists; expected one of each '
      'per row, at least one row'
    )
  rows = [list(dict.fromkeys(tuple(int(t) for t in option) for option in options)) for options in choices]
  for row, options in enumerate(rows):
    if not options or min(map(len, options)) == 0:
      raise ValueError(
        f'build_constraint: row {row} has no choices or an empty one; every row needs at least one non-empty choice'
      )
  longest_choice = max(len(option) for options in rows for option in options)
  most_choices = max(map(len, rows))
  longest_head = max(map(len, heads))
  num_choices = _power_of_two(most_choices, 4) if num_choices is None else num_choices
  choice_length = _power_of_two(longest_choice, 8) if choice_length is None else choice_length
  head_length = _power_of_two(longest_head, 4) if head_length is None else head_length
  if most_choices > num_choices or longest_choice > choice_length or longest_head > head_length:
    raise ValueError(
      f'build_constraint: {most_choices} choices of up to {longest_choice} tokens and heads of up '
      f'to {longest_head} tokens do not fit num_choices={num_choices}, '
      f'choice_length={choice_length}, head_length={head_length}'
    )
  vocab_size = classes.free_ok.shape[0]
  every_token = [t for head in heads for t in head] + [t for options in rows for o in options for t in o]
  if not 0 <= end_token_id < vocab_size or any(not 0 <= t < vocab_size for t in every_token):
    raise ValueError(f'build_constraint: token ids must lie in [0, {vocab_size})')

  batch = len(rows)
  head = np.zeros((batch, head_length), np.int32)
  head_lengths = np.asarray([len(h) for h in heads], np.int32)
  tokens = np.zeros((batch, num_choices, choice_length), np.int32)
  lengths = np.zeros((batch, num_choices), np.int32)
  for row, options in enumerate(rows):
    head[row, : len(heads[row])] = heads[row]
    for index, option in enumerate(options):
      tokens[row, index, : len(option)] = option
      lengths[row, index] = len(option)
  final = final_tokens if final_free else 0
  budget = max_new_tokens - head_lengths - lengths.max(axis=1) - final - 1
  if max_line_tokens is not None:
    budget = np.minimum(budget, max_line_tokens)
  if budget.min() < 2:
    row = int(budget.argmin())
    raise ValueError(
      f'build_constraint: max_new_tokens={max_new_tokens} leaves row {row} a free line of '
      f'{int(budget[row])} tokens after its head ({int(head_lengths[row])}), longest choice '
      f'({int(lengths[row].max())}), {final} final tokens and the end token; it needs 2'
    )
  return ChoiceConstraint(
    head=jnp.asarray(head),
    head_lengths=jnp.asarray(head_lengths),
    choices=jnp.asarray(tokens),
    choice_lengths=jnp.asarray(lengths),
    line_budget=jnp.asarray(budget, jnp.int32),
    final_free=jnp.full((batch,), final_free, bool),
    final_budget=jnp.full((batch,), final_tokens, jnp.int32),
    free_ok=jnp.asarray(classes.free_ok),
    line_end=jnp.asarray(classes.line_end),
    end_token_id=jnp.asarray(end_token_id, jnp.int32),
  )
