"""Where a rollout's wall time goes, for `rollout_timing`: the stages it is split into (`STAGES`), the timer that
charges each wrapped call to its stage (`StageTimer`), and a rollout run with every stage wrapped
(`_instrumented_rollout`), with a record of each `sampling.generate` call (`TimedCall`).

The time is split by wrapping, for the duration of a measurement only, the functions the episode loop reaches
through module attributes (no library file is changed):

- `llm_prefill`, `llm_decode`: the sampler's jitted programs (`sampler._prefill`, or `sampler._prefill_after_prefix`
  when the backend reuses a prompt prefix, and `sampler._decode`), each followed by `jax.block_until_ready`, so
  the device time is counted where it is spent. This is "inside jit".
- `sampler_host`: the rest of `sampling.generate` (left padding into buckets, `nnx.split`, the PRNG key).
- `chat_template`: `render_chat` (the tokenizer's jinja chat template).
- `tokenize`: the rest of `chat_tokens.DialogueTokens.encode`: the tokenizer calls on the new text of each
  append-only prompt, or on a whole prompt that extends no kept dialogue (batched per generation).
- `prompt_messages`: building each agent's chat messages (`recommender_messages`, `user_messages`).
- `detokenize`: `tokenizer.decode` of each completion.
- `parse`: `parse_recommender_output` and `parse_user_output`.
- `peer`: the peer's `top_candidates` and `candidate_similarities` (a SASRec peer runs its own small jitted
  programs; they count as outside the LLM's jitted code).
- `candidates`: `data.candidate_list`, the seeded candidate list of each window.
- `constraint`: building the output grammar of a call (`LLMBackend.constraint`), when the backend decodes under
  one (`LLMBackendConfig.constrained`); 0 otherwise.
- `other_python`: the wall time left: the episode loop's bookkeeping, `Generation` / `Turn` records, the memory,
  device-to-host copies of the (already finished) outputs, and the timers' own overhead.

Stages are exclusive (a nested stage's time is taken out of its parent's), so the stages add up to the wall time
of the rollout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from coars_jax.agents import chat_tokens
from coars_jax.agents import dialogue_loop
from coars_jax.agents import llm_backend
from coars_jax.agents.episodes import Episode, LLMBackend
from coars_jax.sampling import sampler as sampler_lib

JIT_STAGES = ('llm_prefill', 'llm_decode')
STAGES = (
  *JIT_STAGES,
  'sampler_host',
  'chat_template',
  'tokenize',
  'prompt_messages',
  'detokenize',
  'parse',
  'peer',
  'candidates',
  'constraint',
  'other_python',
)


class StageTimer:
  """Exclusive wall time per stage over nested wrapped calls.

  `wrap(stage, fn)` returns `fn` timed under `stage`; when a wrapped call runs inside another, its time is
  charged to its own stage and taken out of the enclosing one, so the stages never count a second twice.
  """

  def __init__(self):
    self.seconds: dict[str, float] = {}
    self.calls: dict[str, int] = {}
    self._children: list[float] = []  # time already charged to nested stages, one slot per open call

  def wrap(self, stage: str, fn: Callable[..., Any], *, block: bool = False) -> Callable[..., Any]:
    """`fn` timed under `stage`; with `block`, its outputs are waited for (`jax.block_until_ready`) inside the
    timed span, so asynchronously dispatched device work is charged to this stage."""

    @functools.wraps(fn)
    def timed(*args, **kwargs):
      self._children.append(0.0)
      start = time.perf_counter()
      try:
        out = fn(*args, **kwargs)
        if block:
          out = jax.block_until_ready(out)
        return out
      finally:
        elapsed = time.perf_counter() - start
        nested = self._children.pop()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + elapsed - nested
        self.calls[stage] = self.calls.get(stage, 0) + 1
        if self._children:
          self._children[-1] += elapsed

    return timed


class _TimedPeer:
  """A `Peer` whose two methods are timed under 'peer'."""

  def __init__(self, peer, timer: StageTimer):
    self.top_candidates = timer.wrap('peer', peer.top_candidates)
    self.candidate_similarities = timer.wrap('peer', peer.candidate_similarities)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TimedCall:
  """One `sampling.generate` call of a rollout as it ran.

  live: the prompts of live episodes; padded_batch: the batch it ran at (copies of the first prompt fill it);
  prompt_bucket / completion_bucket: the padded lengths; num_steps: token positions sampled; generated_tokens and
  prompt_tokens: real tokens of the live rows only; prefill_seconds / decode_seconds: time in the jitted programs.
  """

  agent: str
  turn: int
  live: int
  padded_batch: int
  prompt_bucket: int
  completion_bucket: int
  num_steps: int
  generated_tokens: int
  prompt_tokens: int
  prefill_seconds: float
  decode_seconds: float


@contextlib.contextmanager
def _patched(replacements: Sequence[tuple[Any, str, Any]]) -> Iterator[None]:
  """Sets each (owner, attribute, value) for the block and restores the previous attribute after it (an attribute
  that lived on the class, not the instance, is removed from the instance again)."""
  saved = []
  try:
    for owner, name, value in replacements:
      saved.append((owner, name, name in vars(owner), vars(owner).get(name)))
      setattr(owner, name, value)
    yield
  finally:
    for owner, name, had_own, old in reversed(saved):
      if had_own:
        setattr(owner, name, old)
      else:
        delattr(owner, name)


def _instrumented_rollout(
  backend: LLMBackend, run: Callable[[Any], list[Episode]], peer
) -> tuple[list[Episode], float, StageTimer, list[TimedCall]]:
  """Runs `run(timed_peer)` with every stage wrapped: (episodes, wall seconds, timer, one record per generate)."""
  timer = StageTimer()
  records: list[TimedCall] = []
  prefill = timer.wrap('llm_prefill', sampler_lib._prefill, block=True)
  prefill_after_prefix = timer.wrap('llm_prefill', sampler_lib._prefill_after_prefix, block=True)
  decode = timer.wrap('llm_decode', sampler_lib._decode, block=True)
  timed_generate = timer.wrap('sampler_host', llm_backend.generate)

  def generate(*args, **kwargs):
    before = (timer.seconds.get('llm_prefill', 0.0), timer.seconds.get('llm_decode', 0.0))
    output = timed_generate(*args, **kwargs)
    # Outside every stage, so it counts as other_python; the arrays are ready (decode was waited for), so these
    # are small host copies.
    call = backend.calls[-1]
    lengths, mask = np.asarray(output.lengths), np.asarray(output.prompt_mask)
    records.append(
      TimedCall(
        agent=call.agent,
        turn=call.turn,
        live=call.batch_size,
        padded_batch=int(lengths.shape[0]),
        prompt_bucket=int(mask.shape[1]),
        completion_bucket=int(output.tokens.shape[1]),
        num_steps=int(output.num_steps),
        generated_tokens=int(lengths[: call.batch_size].sum()),
        prompt_tokens=int(mask[: call.batch_size].sum()),
        prefill_seconds=timer.seconds.get('llm_prefill', 0.0) - before[0],
        decode_seconds=timer.seconds.get('llm_decode', 0.0) - before[1],
      )
    )
    return output

  tokenizer = backend.tokenizer
  replacements = [
    (sampler_lib, '_prefill', prefill),
    (sampler_lib, '_prefill_after_prefix', prefill_after_prefix),
    (sampler_lib, '_decode', decode),
    (llm_backend, 'generate', generate),
    (chat_tokens, 'render_chat', timer.wrap('chat_template', chat_tokens.render_chat)),
    (chat_tokens.DialogueTokens, 'encode', timer.wrap('tokenize', chat_tokens.DialogueTokens.encode)),
    (dialogue_loop, 'recommender_messages', timer.wrap('prompt_messages', dialogue_loop.recommender_messages)),
    (dialogue_loop, 'user_messages', timer.wrap('prompt_messages', dialogue_loop.user_messages)),
    (dialogue_loop, 'parse_recommender_output', timer.wrap('parse', dialogue_loop.parse_recommender_output)),
    (dialogue_loop, 'parse_user_output', timer.wrap('parse', dialogue_loop.parse_user_output)),
    (dialogue_loop, 'candidate_list', timer.wrap('candidates', dialogue_loop.candidate_list)),
    (tokenizer, 'decode', timer.wrap('detokenize', tokenizer.decode)),
  ]
  if callable(getattr(backend, 'constraint', None)):
    replacements.append((backend, 'constraint', timer.wrap('constraint', backend.constraint)))
  timed_peer = _TimedPeer(peer, timer)
  with _patched(replacements):
    start = time.perf_counter()
    result = run(timed_peer)
    wall = time.perf_counter() - start
  return result, wall, timer, records
