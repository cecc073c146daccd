"""The text a tokenizer is trained on: the dialogue-protocol lines the agents exchange (`PROTOCOL_TEMPLATES`
filled with titles, reasons, actions, scores and ranks by `protocol_corpus`, seeded so the same arguments give the
same lines) and `tokenizer_corpus`, which puts every item title (with the leading space it has in prompts) before
them. It reads no dataset: the titles are passed in. `models.tokenizer` re-exports its public names.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence

from coars_jax.models.tokenizer_build import TRAINING_SEED

# Lines in the formats the agents exchange. Each template is filled `repeats` times by `protocol_corpus`; add a line
# here when the prompts gain a new phrasing. Fields: {title}, {other_title}, {reason}, {action}, {score}, {rank}.
PROTOCOL_TEMPLATES = (
  # Recommender turn.
  'Reason: {reason}',
  'Item: {title}',
  'Recommend exactly one item from the candidates. Answer with a Reason line and an Item line.',
  'The previous recommendation was {title}. The user chose {action} with score {score}.',
  'The user did not accept {title}. Recommend a different candidate.',
  # Simulated-user turn.
  'Action: {action}',
  'Score: {score}',
  'You are a user with the history below. Decide how you react to the recommended item.',
  'Answer with a Reason line, an Action line (click, star, skip or dislike) and a Score line between 0 and 1.',
  'Recommended item: {title}',
  'Feedback: {action}. {reason}',
  # History and candidate lists.
  "The user's history, oldest first:",
  'The user has interacted with {rank} items:',
  '{rank}. {title}',
  'Candidate items:',
  '- {title}',
  'Candidates: "{title}", "{other_title}"',
  # Peer opinions.
  'People with a history like yours chose "{title}".',
  'Users similar to you rated "{title}" highly.',
  'A recommender trained on past interactions ranks "{title}" first.',
  'Most people who liked "{other_title}" also liked "{title}".',
)

PROTOCOL_REASONS = (
  'It matches the style of the items in the history.',
  'The user played {other_title} many times, and {title} is close to it.',
  'The history leans towards this genre, and this candidate fits it best.',
  'It is popular with people who share this history.',
  'The user skipped similar items before, so a different kind of item is safer.',
  'I already own something like {title}, so I would skip it.',
  'This is exactly what I was looking for after {other_title}.',
  'It is not my taste at all.',
  'I might try it, but it does not excite me.',
  'The recent items point to a new interest, and {title} follows it.',
)

PROTOCOL_ACTIONS = ('click', 'star', 'skip', 'dislike')
# Stand-in titles for `protocol_corpus()` without titles; invented, not from any dataset.
EXAMPLE_TITLES = (
  'Blue Harbour',
  'The Quiet Year',
  'Night Trains',
  'Studio Condenser Microphone',
  'Guitar Strings, Light Gauge',
  'Café Nocturne',
  'Åsa Lind',
  'Return of the Lighthouse',
)


def protocol_corpus(titles: Sequence[str] = (), *, repeats: int = 16, seed: int = TRAINING_SEED) -> Iterator[str]:
  """Lines in the dialogue formats (`PROTOCOL_TEMPLATES`), each template filled `repeats` times.

  titles: the titles to put in {title} and {other_title}; `EXAMPLE_TITLES` when empty. Filling is seeded, so the
  same arguments give the same lines.
  """
  pool = tuple(titles) or EXAMPLE_TITLES
  rng = random.Random(seed)
  for template in PROTOCOL_TEMPLATES:
    for _ in range(repeats):
      title, other_title = rng.choice(pool), rng.choice(pool)
      reason = rng.choice(PROTOCOL_REASONS).format(title=title, other_title=other_title)
      yield template.format(
        title=title,
        other_title=other_title,
        reason=reason,
        action=rng.choice(PROTOCOL_ACTIONS),
        score=f'{rng.random():.2f}',
        rank=rng.randint(1, 20),
      )


def tokenizer_corpus(title_sets: Iterable[Sequence[str]], *, repeats: int = 16) -> list[str]:
  """The training lines: every title, then the protocol corpus filled with those titles.

  Titles get a leading space because in prompts they follow a label or list marker ("Item: X", "1. X"); without
  a dummy prefix, that space is part of the title's first piece.
  """
  titles = [title for title_set in title_sets for title in title_set]
  return [' ' + title for title in titles] + list(protocol_corpus(titles, repeats=repeats))
