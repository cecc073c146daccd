"""A sample of an iteration's dialogues with the token credit A of Eq. 10 on every token, for people
(`experiments.view`): what the self-distilled teacher thought of each token the agents wrote.

`credit_sample` scores the sampled messages of the first episodes of a rollout record twice with the model as it
was when they were sampled (before the update), as the student on x and as the teacher on x + d, and returns their
episode records (`trajectory.episode_record`) with, per message, its tokens, A per token and its reward R.
The numbers are Eq. 10's under the model's own (unconstrained) distribution: with constrained decoding the loss
scores under the grammar, so A here can differ from the loss's on grammar-forced tokens.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import pathlib
from typing import Any, Sequence

import numpy as np
from flax import nnx

from coars_jax.agents.episodes import AGENTS
from coars_jax.agents.record import RolloutRecord
from coars_jax.parallel.distributed import fetch
from coars_jax.sampling import score
from coars_jax.sampling.buckets import left_pad, right_pad
from coars_jax.sampling.scoring import MODEL_DISTRIBUTION, shared_prefix_log_probs

TRAJECTORY_DIR = 'trajectories'


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
  """Each token's own text (a byte-level piece may show as a replacement character on its own)."""
  return [tokenizer.decode([int(i)], skip_special_tokens=False) for i in ids]


def credit_sample(trainer, record: RolloutRecord, reward: np.ndarray | None, *, episodes: int) -> list[dict[str, Any]]:
  """The first `episodes` episodes of `record` as episode records whose messages carry 'tokens', 'credit' (A per
  token; None for a segment with no teacher prompt) and 'reward' (R of the segment; None when not given).

  Args:
    trainer: the `RLTrainer` that played the record (its model, tokenizer, buckets, adapters, mesh).
    record: the iteration's rollout record, with teacher prompts (lambda_SD != 0) or without (no credit).
    reward: float[S], each segment's R (`RLTrainer._rewards`), or None.
    episodes: how many episodes, from the first.
  """
  trajectory = record.trajectory
  wanted = min(episodes, trajectory.num_episodes)
  rows = [int(r) for r in np.flatnonzero(trajectory.completion_mask.any(axis=1) & (trajectory.episode < wanted))]
  credit: dict[int, np.ndarray] = {}
  scored = [r for r in rows if record.teacher_ids is not None and len(record.teacher_ids[r])]
  if scored:
    config, pad = trainer.config, trainer.pad_id
    # Rows padded to a power of two with copies of the first (dropped after), so few programs are compiled.
    padded = scored + [scored[0]] * ((1 << (len(scored) - 1).bit_length()) - len(scored))
    prompts = [trajectory.prompt_tokens[r][trajectory.prompt_mask[r]] for r in padded]
    teachers = [np.asarray(record.teacher_ids[r]) for r in padded]
    completions = [trajectory.completion_tokens[r][trajectory.completion_mask[r]] for r in padded]
    completion_tokens, completion_mask = right_pad(completions, max(map(len, completions)), pad)
    adapter = trainer.adapter_of_agent[trajectory.agent[padded]]

    buckets = config.buckets
    if trainer.settings.teacher_cache:
      # As the update scores it: x + y once, the teacher reading x's shared prefix from its cache (about half the
      # cost of two full passes).
      from coars_jax.training.rl import shared_prefix_length  # Imported here: rl imports this module lazily too.

      shared = [shared_prefix_length(x, t) for x, t in zip(prompts, teachers)]
      x, x_mask = left_pad(prompts, buckets.prompt_length(max(map(len, prompts))), pad)
      suffixes = [t[n:] for t, n in zip(teachers, shared)]
      d, d_mask = left_pad(suffixes, buckets.prompt_length(max(map(len, suffixes))), pad)
      y, y_mask = right_pad(completions, buckets.completion_length(max(map(len, completions))), pad)
      student, teacher = (
        np.asarray(a)
        for a in fetch(
          _shared_prefix_scores(
            trainer.model,
            x,
            x_mask,
            y,
            y_mask,
            d,
            d_mask,
            np.asarray(shared, np.int32),
            adapter,
            config.score_chunk_size,
          )
        )
      )
    else:

      def log_probs(contexts):
        tokens, mask = left_pad(contexts, max(map(len, contexts)), pad)
        return np.asarray(
          fetch(
            score(
              trainer.model,
              tokens,
              mask,
              completion_tokens,
              completion_mask,
              params=MODEL_DISTRIBUTION,
              buckets=buckets,
              chunk_size=config.score_chunk_size,
              pad_token_id=pad,
              mesh=trainer.mesh,
              rules=trainer.rules,
              adapter=adapter,
            )
          )
        )

      student, teacher = log_probs(prompts), log_probs(teachers)
    clip = config.advantage_clip
    for position, row in enumerate(scored):
      length = len(completions[position])
      gap = teacher[position, :length] - student[position, :length]
      credit[row] = np.clip(gap, -clip, clip)

  records = [copy.deepcopy(trajectory.records[e]) for e in range(wanted)]
  for row in rows:
    episode, turn, agent = int(trajectory.episode[row]), int(trajectory.turn[row]), AGENTS[int(trajectory.agent[row])]
    message = records[episode]['turns'][turn - 1][agent]
    ids = trajectory.completion_tokens[row][trajectory.completion_mask[row]]
    message['tokens'] = token_texts(trainer.tokenizer, ids)
    message['credit'] = None if row not in credit else [round(float(a), 4) for a in credit[row]]
    message['reward'] = None if reward is None else round(float(reward[row]), 4)
  return records


@functools.partial(nnx.jit, static_argnames=('chunk_size',))
def _shared_prefix_scores(model, x, x_mask, y, y_mask, d, d_mask, shared, adapter, chunk_size):
  return shared_prefix_log_probs(
    model, x, x_mask, y, y_mask, d, d_mask, shared, params=MODEL_DISTRIBUTION, chunk_size=chunk_size, adapter=adapter
  )


def write_sample(workdir: str | os.PathLike, iteration: int, records: Sequence[dict[str, Any]]) -> pathlib.Path:
  """`<workdir>/trajectories/iteration_<k>.jsonl`: one episode record per line."""
  folder = pathlib.Path(workdir) / TRAJECTORY_DIR
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / f'iteration_{iteration:06d}.jsonl'
  tmp = path.with_suffix('.jsonl.tmp')
  with open(tmp, 'w', encoding='utf-8') as handle:
    for item in records:
      handle.write(json.dumps({'iteration': int(iteration), **item}, ensure_ascii=False, allow_nan=False) + '\n')
  tmp.replace(path)
  return path
