"""The packed update batch (`training.update_batch`): every dialogue lands whole in one row, each teacher segment
points at its own dialogue's prefix, and the row lengths the packer picks forward no more tokens than any layout
whose teacher rows are tied to the student row's length (the layout before both lengths were searched)."""

import numpy as np
import pytest

from coars_jax.sampling.buckets import bucket_length
from coars_jax.training import update_batch as ub

PAD = 0


def _record(rng, dialogues=32, turns=5):
  """Append-only dialogues of two agents (turn t's prompt is turn t-1's prompt and reply, then a new message), with
  teacher prompts x_t + d_t (d about as long as the whole dialogue, as the hindsight reference is) and replies."""
  prompts, completions, teachers, episode, agent, turn = [], [], [], [], [], []
  for index in range(dialogues):
    history = list(rng.integers(1, 1000, int(rng.integers(150, 400))))
    reference = list(rng.integers(1, 1000, int(rng.integers(250, 450))))
    for t in range(turns):
      reply = list(rng.integers(1, 1000, int(rng.integers(20, 60))))
      prompts.append(np.asarray(history, np.int32))
      completions.append(np.asarray(reply, np.int32))
      teachers.append(np.asarray(history + reference, np.int32))
      episode.append(index // 2)
      agent.append(index % 2)
      turn.append(t)
      history = history + reply + list(rng.integers(1, 1000, int(rng.integers(60, 160))))
  rows = np.arange(len(prompts))
  return dict(
    prompts=prompts,
    completions=completions,
    rows=rows,
    episode=np.asarray(episode),
    agent=np.asarray(agent),
    turn=np.asarray(turn),
    reward=rng.normal(size=len(rows)).astype(np.float32),
    adapter_of_agent=np.asarray([0, 1]),
    num_microbatches=dialogues,
    completion_length=64,
    pad_token_id=PAD,
    teacher_ids=teachers,
  )


def _tied_cost(dialogues, tokens_per_microbatch):
  """The fewest tokens the tied layout forwards: teacher rows of the student row's length or the longest teacher
  need, whichever is longer, shortened to what the packing put in them."""
  longest = max(len(d.tokens) for d in dialogues)
  need = max(d.teacher_length for d in dialogues)
  costs = []
  for student_length in [n for n in ub.ROW_LENGTHS if n >= longest]:
    teacher_length = bucket_length(max(need, student_length), ub.ROW_LENGTHS, 'ROW_LENGTHS')
    packed = ub._first_fit(dialogues, student_length, teacher_length)
    fill = max(sum(dialogues[m].teacher_length for m in row) for row in packed)
    teacher_length = bucket_length(fill, ub.ROW_LENGTHS, 'ROW_LENGTHS')
    per_row = min(max(1, tokens_per_microbatch // student_length), 1 << (len(packed) - 1).bit_length())
    costs.append(-(-len(packed) // per_row) * per_row * (student_length + teacher_length))
  return min(costs)


@pytest.mark.parametrize('tokens_per_microbatch', [4096, 16384])
def test_every_dialogue_is_one_run_of_its_row_and_each_teacher_reads_its_own_prefix(tokens_per_microbatch):
  record = _record(np.random.default_rng(0))
  batch, stats, slots = ub.pack_update_batch(**record, tokens_per_microbatch=tokens_per_microbatch)
  k, per_row, length = batch['dialogue_tokens'].shape
  tokens = batch['dialogue_tokens'].reshape(k * per_row, length)
  segments = batch['dialogue_segments'].reshape(k * per_row, length)
  positions = batch['dialogue_positions'].reshape(k * per_row, length)
  teacher_tokens = batch['teacher_tokens'].reshape(k * per_row, -1)
  prefix_start = batch['teacher_prefix_start'].reshape(k * per_row, -1)
  prefix_end = batch['teacher_prefix_end'].reshape(k * per_row, -1)
  seen = 0
  for micro in range(k):
    for j in np.flatnonzero(batch['included'][micro]):
      row = micro * per_row + batch['student_row'][micro, j]
      start = batch['student_start'][micro, j]
      reply = batch['completion_tokens'][micro, j][batch['completion_mask'][micro, j]]
      seen += 1
      # The slot map names the segment whose reply this is (the token credit is mapped back through it).
      np.testing.assert_array_equal(reply, record['completions'][slots[micro, j]])
      # The reply sits at its slots in the row, after its prompt, inside one dialogue (one segment id).
      np.testing.assert_array_equal(tokens[row, start : start + len(reply)], reply)
      dialogue = segments[row, start]
      assert dialogue > 0 and np.all(segments[row, start : start + len(reply)] == dialogue)
      first = int(np.flatnonzero(segments[row] == dialogue)[0])
      assert positions[row, start] == start - first
      prompt_tokens = tokens[row, first:start]
      assert any(np.array_equal(prompt_tokens, p) for p in record['prompts']), 'the prompt is not a real prompt'
      # The teacher segment ends with the reply and reads exactly the shared part of its own dialogue's prompt.
      teacher_row = micro * per_row + batch['teacher_row'][micro, j]
      teacher_start = batch['teacher_start'][micro, j]
      np.testing.assert_array_equal(teacher_tokens[teacher_row, teacher_start : teacher_start + len(reply)], reply)
      assert prefix_start[teacher_row, teacher_start] == first
      assert prefix_end[teacher_row, teacher_start] == start  # x + d shares all of x with the student prompt here
  assert seen == len(record['rows'])
  assert sorted(slots[slots >= 0].tolist()) == record['rows'].tolist()  # every segment in exactly one slot
  assert np.all((slots >= 0) == batch['included'])
  assert stats.dialogues == 32
  assert stats.student_real == sum(len(record['prompts'][i]) + len(record['completions'][i]) for i in range(4, 160, 5))
  assert stats.student_forwarded == batch['dialogue_tokens'][: stats.microbatches].size
  assert stats.teacher_forwarded == batch['teacher_tokens'][: stats.microbatches].size
  assert int((batch['dialogue_segments'] > 0).sum()) == stats.student_real
  assert int((batch['teacher_segments'] > 0).sum()) == stats.teacher_real


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_the_layout_forwards_no_more_than_the_tied_layout(seed):
  """Searching the teacher row's length beside the student's can only help: the tied choice is one of the pairs
  searched. On dialogues whose teacher segments are about three times their tokens it strictly helps (here 102,400
  tokens against 126,720 on each seed); a search that ignored the teacher rows' length would not."""
  record = _record(np.random.default_rng(seed))
  _, stats, _ = ub.pack_update_batch(**record, tokens_per_microbatch=4096)
  forwarded = stats.student_forwarded + stats.teacher_forwarded
  dialogues = ub._dialogues(
    record['prompts'],
    record['completions'],
    record['rows'],
    record['episode'],
    record['agent'],
    record['turn'],
    record['teacher_ids'],
  )
  assert forwarded < _tied_cost(dialogues, 4096)


def test_a_wrong_teacher_prefix_is_rejected():
  record = _record(np.random.default_rng(0), dialogues=2, turns=2)
  record['teacher_ids'][1] = np.asarray([999_999] + list(record['teacher_ids'][1][1:]), np.int32)
  with pytest.raises(ValueError, match='shares 0 of its'):
    ub.pack_update_batch(**record, tokens_per_microbatch=4096)
