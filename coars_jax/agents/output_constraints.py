"""Output grammars for constrained decoding of the two agents' messages (`sampling.constraints`), built from the
exact strings the formatters in `prompts` write, so that every constrained message parses:

  recommender: 'Reason:' + one free line + '\\n', then 'Item: <title>' for one of the row's candidates, then the
    end-of-turn token;
  user: 'Reason:' + one free line + '\\n', then 'Action: <action>\\nScore:' for one of the four actions, then free
    one-line text (the score) and the end-of-turn token.

The free line cannot start a second labelled line (it holds no line break, and its line starts with 'Reason:'),
so the first `Item:` / `Action:` line the parser reads is the constrained one. Each tail is tokenized as it
follows a reason line (`constraints.continuation_ids`), so the trie also covers the label's tokens.
"""

from __future__ import annotations

from typing import Sequence

from coars_jax.agents.prompts import format_recommender_output, format_user_output
from coars_jax.agents.protocol import ACTIONS, SCORE_LABEL, interval_midpoint
from coars_jax.models.tokenizer import end_of_turn_id
from coars_jax.sampling.constraints import (
  ChoiceConstraint,
  TokenClasses,
  build_constraint,
  continuation_ids,
  token_classes,
)

# What a completion's first token follows: the generation prompt of a chat template ends its header with a line
# break (ours '<|assistant|>\n', ChatML '<|im_start|>assistant\n').
PROMPT_END = '\n'
# Tokens of the user's Score line after 'Score:' (' 0.875' is 6 tokens with split digits), then end is forced.
DEFAULT_SCORE_TOKENS = 8


def _split_reason(text: str) -> tuple[str, str]:
  """A formatted message -> (its label 'Reason:', everything after the reason line)."""
  first_line, rest = text.split('\n', 1)
  return first_line[: first_line.index(':') + 1], rest


def message_head() -> str:
  """'Reason:', the forced opening of both agents' messages (the formatters' first label)."""
  return _split_reason(format_recommender_output('x', 'x'))[0]


def recommender_tail(title: str) -> str:
  """'Item: <title>', the lines after the reason that `format_recommender_output` writes for `title`. A title the
  formatter refuses (line breaks, outer whitespace) is first put on one line, as the prompt's list shows it."""
  title = str(title)
  if title != title.strip() or len(title.splitlines()) != 1:
    title = ' '.join(title.splitlines()).strip()
  if not title:
    raise ValueError('recommender_tail: a candidate title is empty or whitespace only; it cannot be named')
  return _split_reason(format_recommender_output('x', title))[1]


def user_tail(action: str) -> str:
  """'Action: <action>\\nScore:', `format_user_output`'s lines after the reason, cut after the Score label."""
  rest = _split_reason(format_user_output('x', action, interval_midpoint(action)))[1]
  score_label = f'\n{SCORE_LABEL}:'
  return rest[: rest.index(score_label) + len(score_label)]


def _tokens(tokenizer, end_token_id: int | None, vocab_size: int | None, classes: TokenClasses | None):
  if end_token_id is None:
    end_token_id = end_of_turn_id(tokenizer)
  if classes is None:
    classes = token_classes(tokenizer, vocab_size)
  elif vocab_size is not None and classes.free_ok.shape[0] != vocab_size:
    raise ValueError(f'token classes cover {classes.free_ok.shape[0]} ids, not vocab_size {vocab_size}')
  head = continuation_ids(tokenizer, PROMPT_END, message_head())
  reason_line = f'{message_head()} x\n'
  return int(end_token_id), classes, head, reason_line


def recommender_constraint(
  tokenizer,
  candidate_titles: Sequence[Sequence[str]],
  *,
  max_new_tokens: int,
  vocab_size: int | None = None,
  end_token_id: int | None = None,
  classes: TokenClasses | None = None,
  max_reason_tokens: int | None = None,
  num_choices: int | None = None,
  choice_length: int | None = None,
) -> ChoiceConstraint:
  """The recommender's grammar for a batch: row b must name one of candidate_titles[b].

  Args:
    tokenizer: the HF tokenizer the model samples with.
    candidate_titles: each row's candidate list C, as the prompt shows it.
    max_new_tokens: the sampler's token budget; the reason line gets what is left after the longest tail.
    vocab_size: the model's vocabulary size (default len(tokenizer)); the masks have this many entries.
    end_token_id: the token that ends the message (default `models.tokenizer.end_of_turn_id(tokenizer)`).
    classes: precomputed `token_classes(tokenizer, vocab_size)` (computing them decodes the whole vocabulary).
    max_reason_tokens: cap on the reason line's tokens, its line break included (default: all that fits).
    num_choices, choice_length: padded C and L (default powers of two), fixed to share compiled programs.
  """
  if isinstance(candidate_titles, str) or any(isinstance(row, str) for row in candidate_titles):
    raise TypeError('recommender_constraint: candidate_titles must be one sequence of titles per row')
  end, classes, head, reason_line = _tokens(tokenizer, end_token_id, vocab_size, classes)
  choices = [
    [continuation_ids(tokenizer, reason_line, recommender_tail(title)) for title in row] for row in candidate_titles
  ]
  return build_constraint(
    classes,
    [head] * len(choices),
    choices,
    end_token_id=end,
    max_new_tokens=max_new_tokens,
    max_line_tokens=max_reason_tokens,
    num_choices=num_choices,
    choice_length=choice_length,
  )


def user_constraint(
  tokenizer,
  batch_size: int,
  *,
  max_new_tokens: int,
  vocab_size: int | None = None,
  end_token_id: int | None = None,
  classes: TokenClasses | None = None,
  max_reason_tokens: int | None = None,
  max_score_tokens: int = DEFAULT_SCORE_TOKENS,
  choice_length: int | None = None,
) -> ChoiceConstraint:
  """The user agent's grammar, the same for each of `batch_size` rows: a reason line, one of the four actions,
  then a Score line of at most `max_score_tokens` free tokens. Other arguments as in `recommender_constraint`."""
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
    raise ValueError(f'user_constraint: batch_size must be a positive int, found {batch_size!r}')
  end, classes, head, reason_line = _tokens(tokenizer, end_token_id, vocab_size, classes)
  tails = [continuation_ids(tokenizer, reason_line, user_tail(action)) for action in ACTIONS]
  return build_constraint(
    classes,
    [head] * batch_size,
    [tails] * batch_size,
    end_token_id=end,
    max_new_tokens=max_new_tokens,
    max_line_tokens=max_reason_tokens,
    final_free=True,
    final_tokens=max_score_tokens,
    choice_length=choice_length,
  )
