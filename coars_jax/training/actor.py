"""What the actor writes into the rollout record besides the episodes: each segment's student prompt rebuilt and
checked against what the backend saw, the hindsight teacher prompt x + d (with the peer's ranks, `peer_ranks`), the judge's
prompts and probabilities, and each segment's output grammar when rollouts are constrained."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from jax.sharding import Mesh

from coars_jax.agents.episodes import AGENTS, RECOMMENDER, Episode, LLMBackend, RolloutConfig, bind_peer, encode_prompt
from coars_jax.agents.prompts import Message, PromptConfig, recommender_messages, user_messages
from coars_jax.agents.peer import peer_opinion
from coars_jax.agents.protocol import single_line
from coars_jax.agents.record import RolloutRecord
from coars_jax.agents.trajectory import Trajectory
from coars_jax.coars.reference import candidate_ranks, episode_reference, teacher_messages
from coars_jax.data.schema import Dataset
from coars_jax.models import tokenizer as tokenizer_lib
from coars_jax.models.decoder import Decoder
from coars_jax.models.lora import ADAPTERS_OFF
from coars_jax.parallel.distributed import fetch
from coars_jax.parallel.rules import Rules
from coars_jax.sampling import LengthBuckets, score
from coars_jax.sampling.buckets import left_pad, right_pad
from coars_jax.sampling.sampler import common_prefix_length
from coars_jax.training.rl_config import JUDGE_QUESTION, JUDGE_SYSTEM, TRAIN_SPLIT
from coars_jax.training.update_step import CONSTRAINT_ROW_FIELDS, CONSTRAINT_SHARED_FIELDS


def student_messages(
  episode: Episode, turn_number: int, agent: str, *, rollout: RolloutConfig, dataset_name: str
) -> list[Message]:
  """x_t of `agent` at turn t, rebuilt from the finished episode with the prompt builders `run_episodes` used
  (same history, candidates, memory M_{t-1}, hint and peer opinion); `teacher_prompts` checks that it renders to
  exactly the prompt the backend saw."""
  prompt_config = rollout.prompt or PromptConfig.for_dataset(dataset_name)
  memory = episode.memory(before_turn=turn_number)
  turn = episode.turns[turn_number - 1]
  if agent == RECOMMENDER:
    # The hint moves on after turn 1 (`RolloutConfig.show_hint`), so each turn keeps the one it showed.
    return recommender_messages(
      history_titles=episode.history_titles,
      candidate_titles=episode.candidate_titles,
      memory=memory,
      hint_title=turn.hint_title if rollout.show_hint else None,
      config=prompt_config,
    )
  return user_messages(
    history_titles=episode.history_titles,
    recommended_title=turn.shown_title,
    recommender_reason=turn.shown_reason,
    memory=memory,
    peer_opinion=peer_opinion(episode.peer_title) if rollout.show_peer_opinion else None,
    config=prompt_config,
  )


def teacher_prompts(
  tokenizer,
  episodes: Sequence[Episode],
  trajectory: Trajectory,
  rows: Sequence[int],
  *,
  ranks: Sequence[Sequence[int]] | None,
  rollout: RolloutConfig,
  dataset_name: str,
  omit_samples: bool = False,
) -> list[list[int]]:
  """The token ids of the teacher prompt x + d of each segment in `rows` (`coars.teacher_messages` on the
  rebuilt student messages, d = `coars.episode_reference` of the segment's episode and agent, without each
  turn's sampled item and reaction when `omit_samples`), rendered with the same chat template as the student's
  prompt."""
  references: dict[tuple[int, int], str] = {}
  out = []
  for row in rows:
    episode_id, agent_id, turn_number = (
      int(trajectory.episode[row]),
      int(trajectory.agent[row]),
      int(trajectory.turn[row]),
    )
    episode, agent = episodes[episode_id], AGENTS[agent_id]
    messages = student_messages(episode, turn_number, agent, rollout=rollout, dataset_name=dataset_name)
    generation = getattr(episode.turns[turn_number - 1], agent)
    rendered, _ = encode_prompt(tokenizer, messages)
    if rendered != generation.prompt_text:
      raise RuntimeError(
        f'the rebuilt {agent} prompt of window {episode.window_index}, turn {turn_number} differs '
        f'from the prompt the backend was given; agents.prompts and training.rl.student_messages '
        f'must build x_t the same way'
      )
    key = (episode_id, agent_id)
    if key not in references:
      references[key] = episode_reference(
        episode, agent, None if ranks is None else ranks[episode_id], omit_samples=omit_samples
      )
    _, ids = encode_prompt(tokenizer, teacher_messages(messages, references[key], agent=agent))
    out.append(ids)
  return out


def shared_prefix_length(student_ids: Sequence[int], teacher_ids: Sequence[int]) -> int:
  """How many leading tokens the teacher prompt x + d shares with the student prompt x: x up to the end of its last
  user message's text, where d is inserted (`coars.teacher_messages`). At least 1 (the prompts start alike) and
  short of the whole teacher prompt (d is never empty)."""
  shared = common_prefix_length(student_ids, teacher_ids)
  if not 0 < shared < len(teacher_ids):
    raise ValueError(
      f'the teacher prompt shares {shared} of its {len(teacher_ids)} tokens with the student prompt '
      f"({len(student_ids)} tokens); x + d must start with x's first token and add d"
    )
  return shared


def judge_messages(episode: Episode, prompt_config: PromptConfig) -> list[Message]:
  """The judge-RL prompt: the user's history, the finished dialogue, and `JUDGE_QUESTION`."""
  history = '\n'.join(f'- {single_line(title)}' for title in episode.history_titles) or '(empty)'
  lines = []
  for turn in episode.turns:
    lines.append(
      f'Turn {turn.turn}: the recommender suggested the {prompt_config.item_noun} '
      f'"{single_line(turn.shown_title)}" because: {single_line(turn.shown_reason) or "(no reason)"}. '
      f'The user reacted {turn.action} with score {turn.acceptance_score:.2f}: '
      f'{single_line(turn.user_parse.reason) or "(no reason)"}.'
    )
  content = (
    f"The user's history, oldest first:\n{history}\n\nThe dialogue:\n" + '\n'.join(lines) + f'\n\n{JUDGE_QUESTION}'
  )
  return [{'role': 'system', 'content': JUDGE_SYSTEM}, {'role': 'user', 'content': content}]


def judge_prompt_ids(tokenizer, episodes: Sequence[Episode], dataset_name: str) -> list[list[int]]:
  """The token ids of each finished dialogue's judge prompt (`judge_messages`), rendered with the chat template."""
  prompt_config = PromptConfig.for_dataset(dataset_name)
  return [encode_prompt(tokenizer, judge_messages(e, prompt_config))[1] for e in episodes]


def judge_probabilities(
  model: Decoder,
  tokenizer,
  episodes: Sequence[Episode],
  *,
  answers: tuple[str, str],
  buckets: LengthBuckets,
  dataset_name: str,
  chunk_size: int | None = None,
  mesh: Mesh | None = None,
  rules: Rules | None = None,
) -> np.ndarray:
  """float64[E]: p = P(yes) / (P(yes) + P(no)) of each finished dialogue under the frozen base model
  (`judge_probabilities_of` on `judge_prompt_ids`)."""
  return judge_probabilities_of(
    model,
    tokenizer,
    judge_prompt_ids(tokenizer, episodes, dataset_name),
    answers=answers,
    buckets=buckets,
    chunk_size=chunk_size,
    mesh=mesh,
    rules=rules,
  )


def judge_probabilities_of(
  model: Decoder,
  tokenizer,
  contexts: Sequence[Sequence[int]],
  *,
  answers: tuple[str, str],
  buckets: LengthBuckets,
  chunk_size: int | None = None,
  mesh: Mesh | None = None,
  rules: Rules | None = None,
) -> np.ndarray:
  """float64[E]: p = P(yes) / (P(yes) + P(no)) after each judge prompt (token ids) under the frozen base model
  (adapters off, id -1), from one `sampling.score` pass over the two answers (sharded on `mesh` when given); no
  generation is needed."""
  contexts = [list(map(int, c)) for c in contexts]
  answer_ids = [list(tokenizer(a, add_special_tokens=False)['input_ids']) for a in answers]
  if not all(answer_ids):
    raise ValueError(f'RLConfig.judge_answers {answers!r}: an answer encodes to no tokens')
  pad = tokenizer_lib.special_token_ids(tokenizer).pad_id
  context_length = buckets.prompt_length(max(len(c) for c in contexts))
  context_tokens, context_mask = left_pad(contexts + contexts, context_length, pad)
  completion_tokens, completion_mask = right_pad(
    [answer_ids[0]] * len(contexts) + [answer_ids[1]] * len(contexts), max(len(a) for a in answer_ids), pad
  )
  adapter = np.full(2 * len(contexts), ADAPTERS_OFF, np.int32) if model.adapter_names else None
  kwargs = {} if adapter is None else {'adapter': adapter}
  scores = fetch(
    score(
      model,
      context_tokens,
      context_mask,
      completion_tokens,
      completion_mask,
      buckets=buckets,
      chunk_size=chunk_size,
      pad_token_id=pad,
      mesh=mesh,
      rules=rules,
      **kwargs,
    )
  ).astype(np.float64)
  totals = scores.sum(axis=1)
  yes, no = totals[: len(contexts)], totals[len(contexts) :]
  return 1.0 / (1.0 + np.exp(no - yes))


def segment_constraints(
  backend: LLMBackend, episodes: Sequence[Episode], trajectory: Trajectory, rows: Sequence[int]
) -> dict[str, np.ndarray]:
  """The grammar each segment of `rows` was sampled under (`LLMBackend.constraint`: the recommender's over its
  episode's candidate titles, the user's over the four actions), as host arrays with one leading row per
  segment under the `CONSTRAINT_KEYS` names. Choice slots are padded to the widest of the two agents (padding
  slots have length 0 and are never alive, so the grammar is unchanged)."""
  rows = np.asarray(rows, np.int64)
  parts = {}
  for index, agent in enumerate(AGENTS):
    where = np.flatnonzero(trajectory.agent[rows] == index)  # positions in `rows` of this agent's segments
    if len(where):
      candidates = (
        [episodes[int(trajectory.episode[r])].candidate_titles for r in rows[where]] if agent == RECOMMENDER else None
      )
      parts[agent] = (where, backend.constraint(agent, len(where), candidates))
  some = next(iter(parts.values()))[1]
  num_choices = max(int(c.choices.shape[1]) for _, c in parts.values())
  choice_length = max(int(c.choices.shape[2]) for _, c in parts.values())
  head_length = max(int(c.head.shape[1]) for _, c in parts.values())
  out = {name: None for name in CONSTRAINT_ROW_FIELDS}
  for where, constraint in parts.values():
    fields = {name: np.asarray(getattr(constraint, name)) for name in CONSTRAINT_ROW_FIELDS}
    fields['head'] = np.pad(fields['head'], ((0, 0), (0, head_length - fields['head'].shape[1])))
    fields['choices'] = np.pad(
      fields['choices'],
      ((0, 0), (0, num_choices - fields['choices'].shape[1]), (0, choice_length - fields['choices'].shape[2])),
    )
    fields['choice_lengths'] = np.pad(
      fields['choice_lengths'], ((0, 0), (0, num_choices - fields['choice_lengths'].shape[1]))
    )
    for name, value in fields.items():
      if out[name] is None:
        out[name] = np.zeros((len(rows),) + value.shape[1:], value.dtype)
      out[name][where] = value
  batch = {f'constraint_{name}': value for name, value in out.items()}
  for name in CONSTRAINT_SHARED_FIELDS:
    value = np.asarray(getattr(some, name))
    batch[f'constraint_{name}'] = np.broadcast_to(value, (len(rows),) + value.shape).copy()
  return batch


def peer_ranks(peer, dataset: Dataset, episodes: Sequence[Episode]) -> list[list[int]]:
  """The peer's rank of every candidate of each training-window episode (`coars.candidate_ranks`), for d: the
  out-of-fold SASRec's when `peer` is a cross-fitted one (any peer `agents.bind_peer` accepts)."""
  windows = dataset.split(TRAIN_SPLIT)
  indices = np.asarray([e.window_index for e in episodes], np.int64)
  candidates = np.asarray([e.candidates for e in episodes], np.int32)
  bound = bind_peer(peer, TRAIN_SPLIT, windows.users[indices])
  scores = np.asarray(bound.candidate_scores(windows.history[indices], windows.lengths[indices], candidates))
  return [candidate_ranks(row) for row in scores]


def write_record(
  played,
  *,
  config,
  teacher: bool,
  constrained: bool,
  tokenizer,
  backend: LLMBackend,
  peer,
  dataset: Dataset,
  rollout: RolloutConfig,
) -> RolloutRecord:
  """The rollout record of `played` (a `trainer_state.PlayedRollout` under `config`, an `RLConfig`): its segments,
  and what the learner must not recompute afterwards (each segment's teacher prompt x + d with the peer's ranks when
  `teacher`, its grammar when `constrained`, the judge prompts for the judge reward)."""
  episodes, trajectory = played.episodes, played.trajectory
  teacher_ids = constraints = judge_ids = None
  segments = np.flatnonzero(trajectory.completion_mask.any(axis=1))
  if teacher:
    rendered = (
      teacher_prompts(
        tokenizer,
        episodes,
        trajectory,
        segments,
        ranks=peer_ranks(peer, dataset, episodes),
        rollout=rollout,
        dataset_name=dataset.name,
        omit_samples=config.reference_omits_samples,
      )
      if len(segments)
      else []
    )
    teacher_ids = [np.zeros(0, np.int32)] * trajectory.num_segments
    for row, ids in zip(segments, rendered):
      teacher_ids[row] = np.asarray(ids, np.int32)
  if constrained:
    constraints = segment_constraints(backend, episodes, trajectory, np.arange(trajectory.num_segments))
  if config.reward == 'judge':
    judge_ids = [np.asarray(ids, np.int32) for ids in judge_prompt_ids(tokenizer, episodes, dataset.name)]
  groups = np.repeat(np.arange(config.windows_per_iteration), config.rollouts_per_window).astype(np.int32)
  return RolloutRecord(
    trajectory=trajectory,
    windows=np.asarray(played.windows, np.int64),
    groups=groups,
    seed=int(played.seed),
    seconds=float(played.seconds),
    teacher_ids=teacher_ids,
    constraints=constraints,
    judge_ids=judge_ids,
  )
