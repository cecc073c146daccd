"""The update batch of a rollout as packed dialogues (`sampling.packed`): for each (episode, agent) with a
loss-carrying turn, the agent's dialogue up to its last such turn is ONE token sequence (append-only prompts make
turn t's prompt and reply a prefix of it), dialogues of one agent share rows of a few fixed lengths (first fit,
longest first), and each loss turn becomes a reply segment [J, N] that points at its slots in the rows. With the
hindsight teacher, turn t's teacher segment (the part of x_t + d_t after what it shares with x_t, then y_t) goes in
the teacher row beside its dialogue and reads the dialogue's first `shared` slots. Host-side numpy only; the arrays
come out as [K, ...] microbatches with K fixed for the run, so the step's shapes depend on a few row lengths alone.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from coars_jax.sampling.buckets import bucket_length
from coars_jax.sampling.sampler import common_prefix_length

# Row lengths a packed dialogue row (and a teacher row) may have: multiples of 256, so that two dialogues of 650
# tokens share a 1,280-token row rather than pad to 2,048; each distinct shape compiles its own step once (the
# persistent compilation cache keeps it for later processes).
ROW_LENGTHS = tuple(range(256, 8192 + 1, 256))
# Reply segments per microbatch are padded up to one of these counts.
SEGMENT_COUNTS = (8, 16, 32, 64, 128, 256)


class NotAppendOnlyError(ValueError):
  """A turn's prompt and reply are not a prefix of the agent's later prompt, so its dialogue is not one sequence."""


@dataclasses.dataclass(frozen=True)
class PackingStats:
  """Real and forwarded tokens of one packed batch (microbatches that carry no row are skipped by the step and not
  counted)."""

  student_real: int
  student_forwarded: int
  teacher_real: int
  teacher_forwarded: int
  rows: int
  microbatches: int
  dialogues: int

  @property
  def padding(self) -> float:
    """The share of forwarded tokens (student and teacher rows) that are padding."""
    forwarded = self.student_forwarded + self.teacher_forwarded
    return 1.0 - (self.student_real + self.teacher_real) / max(forwarded, 1)

  def as_dict(self) -> dict[str, float]:
    return dict(
      student_real=self.student_real,
      student_forwarded=self.student_forwarded,
      teacher_real=self.teacher_real,
      teacher_forwarded=self.teacher_forwarded,
      rows=self.rows,
      microbatches=self.microbatches,
      dialogues=self.dialogues,
      padding=self.padding,
    )


@dataclasses.dataclass
class _Dialogue:
  agent: int
  tokens: np.ndarray  # the dialogue up to its last loss turn's reply
  segments: list[int]  # loss rows (indices into the caller's `rows`) in turn order
  starts: list[int]  # slot of each segment's reply in `tokens`
  teachers: list[np.ndarray]  # teacher suffix + reply tokens per segment (empty without a teacher)
  shared: list[int]  # tokens of x_t each teacher reads

  @property
  def teacher_length(self) -> int:
    return sum(len(t) for t in self.teachers)


def _dialogues(prompts, completions, rows, episode, agent, turn, teacher_ids) -> list[_Dialogue]:
  by_key: dict[tuple[int, int], list[int]] = {}
  for position, row in enumerate(rows):
    by_key.setdefault((int(episode[row]), int(agent[row])), []).append(position)
  out = []
  for (episode_id, agent_id), positions in sorted(by_key.items()):
    positions.sort(key=lambda p: int(turn[rows[p]]))
    last = positions[-1]
    tokens = np.concatenate([prompts[last], completions[last]])
    dialogue = _Dialogue(agent=agent_id, tokens=tokens, segments=positions, starts=[], teachers=[], shared=[])
    for p in positions:
      start = len(prompts[p])
      end = start + len(completions[p])
      if end > len(tokens) or not (
        np.array_equal(tokens[:start], prompts[p]) and np.array_equal(tokens[start:end], completions[p])
      ):
        raise NotAppendOnlyError(
          f"episode {episode_id}: turn {int(turn[rows[p]])}'s prompt and reply are not a prefix of the agent's "
          f'later prompt, so the dialogue is not one sequence; set rl.packed_update=False for this backend'
        )
      dialogue.starts.append(start)
      if teacher_ids is not None:
        shared = common_prefix_length(prompts[p], teacher_ids[p])
        if not 0 < shared < len(teacher_ids[p]):
          raise ValueError(
            f'the teacher prompt shares {shared} of its {len(teacher_ids[p])} tokens with the '
            f"student prompt; x + d must start with x's first token and add d"
          )
        dialogue.shared.append(shared)
        dialogue.teachers.append(np.concatenate([np.asarray(teacher_ids[p][shared:], np.int32), completions[p]]))
    out.append(dialogue)
  return out


def _first_fit(dialogues: Sequence[_Dialogue], student_length: int, teacher_length: int) -> list[list[int]]:
  """Rows of dialogue indices, one agent per row, longest dialogue first, each into the first row it fits."""
  rows: list[list[int]] = []
  fill: list[tuple[int, int, int]] = []  # (agent, student fill, teacher fill)
  for index in sorted(range(len(dialogues)), key=lambda i: (-len(dialogues[i].tokens), i)):
    item = dialogues[index]
    for position, (agent, student, teacher) in enumerate(fill):
      if (
        agent == item.agent
        and student + len(item.tokens) <= student_length
        and teacher + item.teacher_length <= teacher_length
      ):
        rows[position].append(index)
        fill[position] = (agent, student + len(item.tokens), teacher + item.teacher_length)
        break
    else:
      rows.append([index])
      fill.append((item.agent, len(item.tokens), item.teacher_length))
  return rows


def _layout(
  dialogues: Sequence[_Dialogue], teacher: bool, tokens_per_microbatch: int, row_multiple: int
) -> tuple[int, int, int, list[list[int]], int]:
  """(student row length, teacher row length, rows per microbatch, rows of dialogue indices, microbatches used):
  the pair of row lengths from `ROW_LENGTHS` whose first-fit packing forwards the fewest tokens (student and teacher
  rows together, padding included). Both lengths are searched: a dialogue's teacher segments are about three times
  its own tokens, so a teacher row tied to its student row's length pads one or the other."""
  longest = max(len(d.tokens) for d in dialogues)
  teacher_need = max(d.teacher_length for d in dialogues)
  student_lengths = [n for n in ROW_LENGTHS if n >= longest] or [longest]
  teacher_lengths = ([n for n in ROW_LENGTHS if n >= teacher_need] or [teacher_need]) if teacher else [0]
  best = None
  for student_length in student_lengths:
    for teacher_length in teacher_lengths:
      packed = _first_fit(dialogues, student_length, teacher_length if teacher else 1 << 30)
      if teacher:  # the shortest teacher rows that hold what the packing put in them
        fill = max(sum(dialogues[m].teacher_length for m in row) for row in packed)
        teacher_length = bucket_length(fill, ROW_LENGTHS, 'update_batch.ROW_LENGTHS')
      most = max(row_multiple, (tokens_per_microbatch // student_length) // row_multiple * row_multiple)
      # Rows per microbatch: a power of two (a few compiled shapes) no larger than the rows need.
      per_row = min(most, max(row_multiple, 1 << (len(packed) - 1).bit_length()))
      per_row = -(-per_row // row_multiple) * row_multiple
      used = -(-len(packed) // per_row)
      cost = used * per_row * (student_length + teacher_length)
      if best is None or cost < best[0]:
        best = (cost, student_length, teacher_length, per_row, packed, used)
  return best[1:]


def pack_update_batch(
  *,
  prompts: Sequence[np.ndarray],
  completions: Sequence[np.ndarray],
  rows: np.ndarray,
  episode: np.ndarray,
  agent: np.ndarray,
  turn: np.ndarray,
  reward: np.ndarray,
  adapter_of_agent: np.ndarray,
  num_microbatches: int,
  tokens_per_microbatch: int,
  completion_length: int,
  pad_token_id: int,
  row_multiple: int = 1,
  teacher_ids: Sequence[Sequence[int]] | None = None,
  per_segment: Mapping[str, np.ndarray] | None = None,
  behaviour_log_probs: Sequence[np.ndarray] | None = None,
  max_positions: int | None = None,
) -> tuple[dict[str, np.ndarray], PackingStats, np.ndarray]:
  """(batch, statistics, slots): the packed microbatches [K, ...] of the loss-carrying segments `rows` (see the
  module docstring), and int64[K, J] naming the segment (an entry of `rows`) each reply slot holds, -1 for padding.

  Args:
    prompts, completions: every segment's real prompt x_t and reply y_t ids (indexed by segment).
    rows: the loss-carrying segments, in the order `reward` and `teacher_ids` follow.
    episode, agent, turn: per segment.
    reward: float32 per row of `rows`, the loss weight R_t.
    adapter_of_agent: the adapter index of each agent.
    num_microbatches: K; the rows must fit in K microbatches (a dialogue per row at worst).
    tokens_per_microbatch: R x Ls is at most this (R at least `row_multiple`).
    completion_length: N, the completion bucket the replies are padded to.
    row_multiple: R is a multiple of this (the mesh's data axis).
    teacher_ids: per row of `rows`, the teacher prompt x_t + d_t; None: no teacher.
    per_segment: extra arrays with one leading entry per row of `rows` (grammar fields), gathered into [K, J, ...].
    behaviour_log_probs: per row of `rows`, log pi_old of the reply's tokens (PPO).
    max_positions: the model's max_position_embeddings, checked against every dialogue and teacher segment.
  """
  prompts = [np.asarray(prompts[r], np.int32) for r in rows]
  completions = [np.asarray(completions[r], np.int32) for r in rows]
  local = np.arange(len(rows))
  dialogues = _dialogues(
    prompts, completions, local, np.asarray(episode)[rows], np.asarray(agent)[rows], np.asarray(turn)[rows], teacher_ids
  )
  longest = max(len(d.tokens) for d in dialogues)
  teacher_longest = max(
    (len(d.shared) and max(s + len(t) for s, t in zip(d.shared, d.teachers))) or 0 for d in dialogues
  )
  if max_positions is not None and max(longest, teacher_longest) > max_positions:
    raise ValueError(
      f"a dialogue (or its teacher) is {max(longest, teacher_longest)} tokens, beyond the model's "
      f'max_position_embeddings {max_positions}; lower rollout.max_turns or the token budgets'
    )

  layout = _layout(dialogues, bool(teacher_ids), tokens_per_microbatch, row_multiple)
  student_length, teacher_length, per_row, packed, used = layout
  if used > num_microbatches:
    raise AssertionError(f"{len(packed)} packed rows need {used} microbatches, more than the step's {num_microbatches}")

  capacity = num_microbatches * per_row
  segments_per_micro = np.zeros(num_microbatches, np.int64)
  for index, members in enumerate(packed):
    segments_per_micro[index // per_row] += sum(len(dialogues[m].segments) for m in members)
  count = bucket_length(max(int(segments_per_micro.max()), 1), SEGMENT_COUNTS, 'update_batch.SEGMENT_COUNTS')
  count = -(-count // row_multiple) * row_multiple

  def zeros(shape, dtype=np.int32, fill=0):
    return np.full(shape, fill, dtype)

  out = dict(
    dialogue_tokens=zeros((capacity, student_length), fill=pad_token_id),
    dialogue_segments=zeros((capacity, student_length)),
    dialogue_positions=zeros((capacity, student_length)),
    row_adapter=zeros((capacity,)),
    completion_tokens=zeros((num_microbatches, count, completion_length), fill=pad_token_id),
    completion_mask=zeros((num_microbatches, count, completion_length), bool),
    student_row=zeros((num_microbatches, count)),
    student_start=zeros((num_microbatches, count), fill=1),
    reward=zeros((num_microbatches, count), np.float32),
    included=zeros((num_microbatches, count), bool),
    agent=zeros((num_microbatches, count)),
    adapter=zeros((num_microbatches, count)),
  )
  if teacher_ids is not None:
    out.update(
      teacher_tokens=zeros((capacity, teacher_length), fill=pad_token_id),
      teacher_segments=zeros((capacity, teacher_length)),
      teacher_positions=zeros((capacity, teacher_length)),
      teacher_prefix_start=zeros((capacity, teacher_length)),
      teacher_prefix_end=zeros((capacity, teacher_length)),
      teacher_row=zeros((num_microbatches, count)),
      teacher_start=zeros((num_microbatches, count), fill=1),
    )
  if behaviour_log_probs is not None:
    out['behaviour_log_probs'] = zeros((num_microbatches, count, completion_length), np.float32)
  extra = {}
  for key, value in (per_segment or {}).items():
    value = np.asarray(value)
    extra[key] = np.zeros((num_microbatches, count) + value.shape[1:], value.dtype)
    # Padding segments copy the first row's grammar, so every segment's grammar is a valid one.
    extra[key][:] = value[0]

  slots = np.full((num_microbatches, count), -1, np.int64)
  next_segment = np.zeros(num_microbatches, np.int64)
  student_real = teacher_real = 0
  for row_index, members in enumerate(packed):
    micro, row_in_micro = divmod(row_index, per_row)
    student_fill = teacher_fill = 0
    out['row_adapter'][row_index] = adapter_of_agent[dialogues[members[0]].agent]
    for number, member in enumerate(members, start=1):
      dialogue = dialogues[member]
      start, length = student_fill, len(dialogue.tokens)
      out['dialogue_tokens'][row_index, start : start + length] = dialogue.tokens
      out['dialogue_segments'][row_index, start : start + length] = number
      out['dialogue_positions'][row_index, start : start + length] = np.arange(length)
      student_fill += length
      student_real += length
      for k, position in enumerate(dialogue.segments):
        j = next_segment[micro]
        next_segment[micro] += 1
        reply = completions[position]
        slots[micro, j] = rows[position]
        out['completion_tokens'][micro, j, : len(reply)] = reply
        out['completion_mask'][micro, j, : len(reply)] = True
        out['student_row'][micro, j] = row_in_micro
        out['student_start'][micro, j] = start + dialogue.starts[k]
        out['reward'][micro, j] = reward[position]
        out['included'][micro, j] = True
        out['agent'][micro, j] = dialogue.agent
        out['adapter'][micro, j] = adapter_of_agent[dialogue.agent]
        if behaviour_log_probs is not None:
          values = np.asarray(behaviour_log_probs[position], np.float32)
          out['behaviour_log_probs'][micro, j, : len(values)] = values
        for key, value in extra.items():
          value[micro, j] = np.asarray(per_segment[key])[position]
        if teacher_ids is not None:
          tokens, shared = dialogue.teachers[k], dialogue.shared[k]
          t0, tn = teacher_fill, len(tokens)
          segment_id = int(out['teacher_segments'][row_index].max()) + 1
          out['teacher_tokens'][row_index, t0 : t0 + tn] = tokens
          out['teacher_segments'][row_index, t0 : t0 + tn] = segment_id
          out['teacher_positions'][row_index, t0 : t0 + tn] = shared + np.arange(tn)
          out['teacher_prefix_start'][row_index, t0 : t0 + tn] = start
          out['teacher_prefix_end'][row_index, t0 : t0 + tn] = start + shared
          out['teacher_row'][micro, j] = row_in_micro
          out['teacher_start'][micro, j] = t0 + tn - len(reply)
          teacher_fill += tn
          teacher_real += tn
  row_keys = (
    'dialogue_tokens',
    'dialogue_segments',
    'dialogue_positions',
    'row_adapter',
    'teacher_tokens',
    'teacher_segments',
    'teacher_positions',
    'teacher_prefix_start',
    'teacher_prefix_end',
  )
  for key in [k for k in row_keys if k in out]:
    out[key] = out[key].reshape((num_microbatches, per_row) + out[key].shape[1:])
  out.update(extra)
  stats = PackingStats(
    student_real=student_real,
    student_forwarded=used * per_row * student_length,
    teacher_real=teacher_real,
    teacher_forwarded=used * per_row * teacher_length,
    rows=len(packed),
    microbatches=used,
    dialogues=len(dialogues),
  )
  return out, stats, slots
