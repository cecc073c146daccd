"""A sample of an iteration's dialogues with the token credit A of Eq. 10 on every token, for people
(`experiments.view`): what the self-distilled teacher thought of each token the agents wrote.

The credit is the update's own: the update step returns A per reply token as its loss weighed it
(`training.update_step.TOKEN_CREDIT`, the first epoch's, so under the parameters that sampled the rollout), and
`credit_sample` maps it back to the messages of the first episodes. Nothing is scored a second time for people. A
is therefore taken exactly as the loss takes it: under the segment's output grammar when rollouts are constrained,
and only on the segments that carry loss (a segment the reward rule excludes, or any segment without a teacher,
shows no credit).
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
from typing import Any, Sequence

import numpy as np

from coars_jax.agents.episodes import AGENTS
from coars_jax.agents.record import RolloutRecord

TRAJECTORY_DIR = 'trajectories'


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
  """Each token's own text (a byte-level piece may show as a replacement character on its own)."""
  return [tokenizer.decode([int(i)], skip_special_tokens=False) for i in ids]


def credit_sample(
  record: RolloutRecord,
  reward: np.ndarray | None,
  token_credit: np.ndarray | None,
  slots: np.ndarray | None,
  *,
  tokenizer,
  episodes: int,
) -> list[dict[str, Any]]:
  """The first `episodes` episodes of `record` as episode records (`trajectory.episode_record`) whose messages
  carry 'tokens', 'credit' (A per token; None for a segment the update did not weigh with a teacher, or whose A
  is not finite) and 'reward'
  (R of the segment; None when not given).

  Args:
    record: the iteration's rollout record.
    reward: float[S], each segment's R (`RLTrainer._rewards`), or None.
    token_credit: float[K, J, N], the update step's A per reply slot (`update_step.TOKEN_CREDIT`), or None (no
      teacher, or no update).
    slots: int[K, J], the trajectory segment each reply slot holds, -1 for padding (`loss_rows.pack_loss_rows`).
    tokenizer: renders each token's text.
    episodes: how many episodes, from the first.
  """
  trajectory = record.trajectory
  wanted = min(episodes, trajectory.num_episodes)
  rows = [int(r) for r in np.flatnonzero(trajectory.completion_mask.any(axis=1) & (trajectory.episode < wanted))]
  credit: dict[int, np.ndarray] = {}
  if token_credit is not None and slots is not None:
    if token_credit.shape[:2] != slots.shape:
      raise ValueError(f'credit_sample: token credit {token_credit.shape} does not match slots {slots.shape}')
    flat_credit = token_credit.reshape((-1,) + token_credit.shape[2:])
    for slot, segment in enumerate(slots.reshape(-1)):
      values = flat_credit[slot, : int(trajectory.completion_mask[segment].sum())] if segment >= 0 else None
      # A non-finite A (an update the step skipped) is shown as no credit: the sample's JSON holds numbers only.
      if values is not None and trajectory.episode[segment] < wanted and np.isfinite(values).all():
        credit[int(segment)] = values

  records = [copy.deepcopy(trajectory.records[e]) for e in range(wanted)]
  for row in rows:
    episode, turn, agent = int(trajectory.episode[row]), int(trajectory.turn[row]), AGENTS[int(trajectory.agent[row])]
    message = records[episode]['turns'][turn - 1][agent]
    ids = trajectory.completion_tokens[row][trajectory.completion_mask[row]]
    message['tokens'] = token_texts(tokenizer, ids)
    message['credit'] = None if row not in credit else [round(float(a), 4) for a in credit[row]]
    message['reward'] = None if reward is None else round(float(reward[row]), 4)
  return records


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
