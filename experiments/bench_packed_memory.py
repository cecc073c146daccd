"""XLA's account of one packed update microbatch's memory on SmolLM2-135M (compiled, not run):
`python -m experiments.bench_packed_memory [--rows=2] [--row_length=2048] [--teacher_length=2048] [--segments=32]
[--dialogues_per_row=1]`.

The gradient of `coars.coars_objective` over one microbatch of packed dialogues (`sampling.packed`) with adapters on
every layer and rematerialised layers, as the update step computes it: `--rows` rows of `--row_length` dialogue
tokens, teacher rows of `--teacher_length` tokens and `--segments` reply segments of `--completion_length` tokens.
Prints the compiled program's temporary, argument and output bytes (`Compiled.memory_analysis`), the figure that
decides whether a microbatch fits beside the model.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from coars_jax.models import backbone
from coars_jax.agents.protocol import AGENTS
from coars_jax.coars.loss import coars_objective
from coars_jax.models.lora import LoRAConfig, add_lora
from experiments import cli

_ROWS = flags.DEFINE_integer('rows', 2, 'Dialogue rows in the microbatch.')
_ROW_LENGTH = flags.DEFINE_integer('row_length', 2048, 'Tokens of each dialogue row.')
_TEACHER_LENGTH = flags.DEFINE_integer('teacher_length', 2048, 'Tokens of each teacher row.')
_SEGMENTS = flags.DEFINE_integer('segments', 32, 'Reply segments J of the microbatch.')
_COMPLETION = flags.DEFINE_integer('completion_length', 128, 'Tokens N of each reply segment.')
_DIALOGUES = flags.DEFINE_integer('dialogues_per_row', 1, 'Dialogues packed in each row (segment ids 1, 2, ...).')


def synthetic_rows(vocab: int) -> dict:
  """One microbatch of the flags' shapes. Each row holds `--dialogues_per_row` dialogues that split its
  `--row_length` tokens evenly (their own segment ids, positions from 0), and `--segments / --rows` teacher segments
  that split the teacher row evenly (the last takes the remainder), spread evenly over the row's dialogues; segment k
  of a dialogue with m segments reads the first (k + 1) / m of that dialogue, as turn t's teacher reads x_t."""
  rows, length, teacher, segments, reply, per_row_dialogues = (
    _ROWS.value,
    _ROW_LENGTH.value,
    _TEACHER_LENGTH.value,
    _SEGMENTS.value,
    _COMPLETION.value,
    _DIALOGUES.value,
  )
  rng = np.random.default_rng(0)
  per_row = segments // rows
  if per_row % per_row_dialogues:
    raise ValueError(f'--segments / --rows ({per_row}) must be a multiple of --dialogues_per_row ({per_row_dialogues})')
  per_dialogue = per_row // per_row_dialogues
  dialogue_length = length // per_row_dialogues
  span = teacher // per_row
  slot_segment = np.minimum(np.arange(teacher) // span, per_row - 1)  # 0-based teacher segment of each teacher slot
  slot_dialogue = slot_segment // per_dialogue
  prefix_start = slot_dialogue * dialogue_length
  prefix_end = prefix_start + ((slot_segment % per_dialogue + 1) * dialogue_length) // per_dialogue
  student_slot = np.arange(length)
  student_dialogue = np.minimum(student_slot // dialogue_length, per_row_dialogues - 1)
  segment = np.arange(segments) % per_row  # each reply segment's teacher segment within its row
  segment_dialogue = segment // per_dialogue
  student_end = segment_dialogue * dialogue_length + ((segment % per_dialogue + 1) * dialogue_length) // per_dialogue

  def per_row_copy(array, dtype=np.int32):
    return np.broadcast_to(array, (rows, array.shape[0])).astype(dtype).copy()

  return {
    'dialogue_tokens': rng.integers(0, vocab, (rows, length)).astype(np.int32),
    'dialogue_segments': per_row_copy(student_dialogue + 1),
    'dialogue_positions': per_row_copy(student_slot - student_dialogue * dialogue_length),
    'row_adapter': (np.arange(rows) % 2).astype(np.int32),
    'teacher_tokens': rng.integers(0, vocab, (rows, teacher)).astype(np.int32),
    'teacher_segments': per_row_copy(slot_segment + 1),
    'teacher_positions': per_row_copy(prefix_end - prefix_start + np.arange(teacher) - slot_segment * span),
    'teacher_prefix_start': per_row_copy(prefix_start),
    'teacher_prefix_end': per_row_copy(prefix_end),
    'completion_tokens': rng.integers(0, vocab, (segments, reply)).astype(np.int32),
    'completion_mask': np.ones((segments, reply), bool),
    'student_row': (np.arange(segments) // per_row).astype(np.int32),
    'student_start': np.maximum(student_end - reply, 0).astype(np.int32),
    'teacher_row': (np.arange(segments) // per_row).astype(np.int32),
    'teacher_start': (segment * span + span - reply).astype(np.int32),
    'agent': (np.arange(segments) % 2).astype(np.int32),
    'adapter': (np.arange(segments) % 2).astype(np.int32),
    'reward': np.ones(segments, np.float32),
    'included': np.ones(segments, bool),
    'num_episodes': np.float32(16),
  }


def smollm2_microbatch():
  """(graphdef, lora, frozen, batch): SmolLM2-135M with rank-8 adapters of both agents on every layer, split into its
  adapters and frozen rest, and one synthetic microbatch of the flags' shapes."""
  model, _ = backbone.load_backbone(backbone.BackboneSpec(name=backbone.SMOLLM2))
  add_lora(model, LoRAConfig(rank=8, alpha=16.0, layers='all'), AGENTS, rngs=nnx.Rngs(0))
  graphdef, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)
  return graphdef, lora, frozen, jax.tree.map(jnp.asarray, synthetic_rows(model.config.vocab_size))


def coars_loss(graphdef):
  """The update step's CoARS objective (lambda_SD 0.1, rematerialised layers) as a function of (lora, frozen, batch),
  ready for `jax.grad`."""

  def loss(lora, frozen, batch):
    return coars_objective(nnx.merge(graphdef, lora, frozen), batch, lambda_sd=0.1, chunk_size=32, remat=True)[0]

  return loss


def main(argv):
  del argv
  graphdef, lora, frozen, batch = smollm2_microbatch()
  compiled = jax.jit(jax.grad(coars_loss(graphdef))).lower(lora, frozen, batch).compile()
  analysis = compiled.memory_analysis()
  gib = 2.0**30
  print(
    f'packed microbatch: {_ROWS.value} rows x {_ROW_LENGTH.value} tokens, teacher rows of {_TEACHER_LENGTH.value}, '
    f'{_SEGMENTS.value} segments x {_COMPLETION.value}: temporary {analysis.temp_size_in_bytes / gib:.2f} GiB, '
    f'arguments {analysis.argument_size_in_bytes / gib:.2f} GiB, outputs {analysis.output_size_in_bytes / gib:.2f} GiB'
  )


if __name__ == '__main__':
  cli.run(main)
