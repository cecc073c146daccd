"""Measuring full multi-turn rollouts (`episodes.run_episodes` with an `LLMBackend` and a peer): episodes/s,
generated tokens/s and prefill tokens/s, and where the wall time goes.

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
of the rollout. `run_benchmark` loads a named backbone, a dataset and its trained SASRec; `measure_rollouts` does
the measuring on objects the caller built (the smoke test passes a micro model and a table peer).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import platform
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from coars_jax.agents import backbone
from coars_jax.agents import chat_tokens
from coars_jax.agents import dialogue_loop
from coars_jax.agents import llm_backend
from coars_jax.agents.episodes import (
  AGENTS,
  Episode,
  LLMBackend,
  LLMBackendConfig,
  RolloutConfig,
  SASRecPeer,
  episode_metrics,
  run_episodes,
)
from coars_jax.recsys.sasrec import SASRec
from coars_jax.sampling import SamplingParams
from coars_jax.sampling import sampler as sampler_lib
from coars_jax.sampling.compilation import count_backend_compiles

MODELS = ('tiny', 'smollm2_135m')
# The bar: at most this share of a rollout's wall time outside the LLM's jitted code.
TARGET_OUTSIDE_JIT_SHARE = 0.20
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
class CallRecord:
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
) -> tuple[list[Episode], float, StageTimer, list[CallRecord]]:
  """Runs `run(timed_peer)` with every stage wrapped: (episodes, wall seconds, timer, one record per generate)."""
  timer = StageTimer()
  records: list[CallRecord] = []
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
      CallRecord(
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


def episode_token_counts(episodes: Sequence[Episode]) -> dict[str, int]:
  """Turns, messages, generated tokens (completion lengths, end-of-turn tokens included) and prompt tokens, in
  total and per agent."""
  counts = {'episodes': len(episodes), 'turns': sum(e.num_turns for e in episodes)}
  counts['messages'] = 2 * counts['turns']
  for agent in AGENTS:
    generations = [getattr(t, agent) for e in episodes for t in e.turns]
    counts[f'{agent}_generated_tokens'] = int(sum(g.completion_ids.size for g in generations))
    counts[f'{agent}_prompt_tokens'] = int(sum(g.prompt_ids.size for g in generations))
    counts[f'{agent}_finished_messages'] = int(sum(g.finished for g in generations))
  counts['generated_tokens'] = sum(counts[f'{a}_generated_tokens'] for a in AGENTS)
  counts['prompt_tokens'] = sum(counts[f'{a}_prompt_tokens'] for a in AGENTS)
  return counts


def measure_rollouts(
  model,
  tokenizer,
  dataset,
  peer,
  *,
  split: str,
  window_indices: Sequence[int],
  rollout: RolloutConfig = RolloutConfig(),
  backend_config: LLMBackendConfig = LLMBackendConfig(),
  adapters=None,
  repeats: int = 3,
  seed: int = 0,
) -> tuple[dict[str, Any], list[Episode]]:
  """Times `run_episodes` on `window_indices`: one warm-up rollout (it compiles), then `repeats` timed ones.

  Every rollout uses the same seed, so the timed rollouts replay the warm-up's messages and compile nothing; the
  fastest one is reported, with its stage breakdown.

  Args:
    model, tokenizer: the shared decoder and its tokenizer (`LLMBackend`).
    dataset, split, window_indices: the windows, one episode each.
    peer: a `recsys.SASRec` or any `episodes.Peer`.
    rollout, backend_config, adapters: as `run_episodes` and `LLMBackend` take them.
    repeats: timed rollouts after the warm-up; the fastest counts.
    seed: the rollouts' sampling seed.
  Returns:
    (summary, the fastest rollout's episodes). The summary's `seconds` and `shares` hold the stages (`STAGES`);
    shares add up to 1.
  """
  if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
    raise ValueError(f'measure_rollouts: repeats must be an int >= 1, found {repeats!r}')
  if isinstance(peer, SASRec):
    peer = SASRecPeer(peer)
  indices = [int(i) for i in window_indices]

  # One backend for every rollout, as a trainer keeps one: what it caches on first use (a constrained backend's
  # token classes) is built during the warm-up, not in each timed rollout.
  backend = LLMBackend(model, tokenizer, adapters=adapters, config=backend_config)

  def rollout_once():
    run = lambda timed_peer: run_episodes(dataset, split, indices, backend, peer=timed_peer, config=rollout, seed=seed)
    return _instrumented_rollout(backend, run, peer)

  with count_backend_compiles() as warmup_compiles:
    _, warmup_seconds, _, _ = rollout_once()
  runs = []
  with count_backend_compiles() as timed_compiles:
    for _ in range(repeats):
      runs.append(rollout_once())
  walls = [wall for _, wall, _, _ in runs]
  episodes, wall, timer, records = runs[int(np.argmin(walls))]
  counts = episode_token_counts(episodes)
  replayed = all(episode_token_counts(r[0]) == counts for r in runs)

  seconds = {stage: timer.seconds.get(stage, 0.0) for stage in STAGES if stage != 'other_python'}
  seconds['other_python'] = wall - sum(seconds.values())
  jit_seconds = sum(seconds[stage] for stage in JIT_STAGES)
  outside = wall - jit_seconds
  padded_prompt_tokens = sum(r.padded_batch * r.prompt_bucket for r in records)
  summary = {
    'split': split,
    'windows': len(indices),
    'window_indices': indices,
    'max_turns': rollout.max_turns,
    'repeats': repeats,
    'seed': seed,
    'recommender_max_new_tokens': backend_config.recommender_max_new_tokens,
    'user_max_new_tokens': backend_config.user_max_new_tokens,
    'sampling': dataclasses.asdict(backend_config.sampling),
    **counts,
    'generate_calls': len(records),
    'padded_prompt_tokens': padded_prompt_tokens,
    'decode_steps': sum(max(r.num_steps - 1, 0) for r in records),
    'wall_seconds': wall,
    'wall_seconds_all_repeats': walls,
    'warmup_seconds': warmup_seconds,
    'warmup_compiles': warmup_compiles.count,
    'warmup_compile_seconds': warmup_compiles.seconds,
    'timed_compiles': timed_compiles.count,
    'repeats_replayed_same_tokens': replayed,
    'episodes_per_s': counts['episodes'] / wall,
    'generated_tokens_per_s': counts['generated_tokens'] / wall,
    'prefill_tokens_per_s': counts['prompt_tokens'] / seconds['llm_prefill'] if seconds['llm_prefill'] else None,
    'padded_prefill_tokens_per_s': (padded_prompt_tokens / seconds['llm_prefill'] if seconds['llm_prefill'] else None),
    'decode_tokens_per_s': counts['generated_tokens'] / seconds['llm_decode'] if seconds['llm_decode'] else None,
    'jit_seconds': jit_seconds,
    'outside_jit_seconds': outside,
    'outside_jit_share': outside / wall,
    'target_outside_jit_share': TARGET_OUTSIDE_JIT_SHARE,
    'meets_target': outside / wall <= TARGET_OUTSIDE_JIT_SHARE,
    'seconds': seconds,
    'shares': {stage: value / wall for stage, value in seconds.items()},
    'outside_jit_shares': {stage: value / outside for stage, value in seconds.items() if stage not in JIT_STAGES}
    if outside > 0
    else None,
    'stage_calls': dict(timer.calls),
    'calls': [dataclasses.asdict(r) for r in records],
    # Real prompt tokens prefilled and read from a kept cache, per rollout (every rollout replays the same).
    'prefill_tokens': {k: v // (1 + repeats) for k, v in backend.prefill_tokens.items()},
    'metrics': episode_metrics(episodes),
  }
  return summary, episodes


def evenly_spaced(count: int, total: int) -> list[int]:
  """`count` distinct window indices spread evenly over [0, total), first and last included."""
  if isinstance(count, bool) or not isinstance(count, int) or count < 1:
    raise ValueError(f'the number of windows must be an int >= 1, found {count!r}')
  if count > total:
    raise ValueError(f'{count} windows asked for, but the split has only {total}')
  return [int(i) for i in np.linspace(0, total - 1, num=count).round()]


def load_sasrec_peer(dataset, *, workdir: str | None = None, seed: int = 0, data_root: str | None = None) -> SASRec:
  """The trained SASRec of `dataset` (training seed `seed`) from its checkpoint under `workdir` (default the
  experiment's `runs/sasrec_<dataset>`). Refuses, rather than trains, when no matching checkpoint is there: a
  benchmark must not start a SASRec training run."""
  from coars_jax.recsys import experiment as sasrec_experiment

  config = sasrec_experiment.default_config(dataset.name)
  config.update({'data_root': data_root or '', 'progress': False, **({'workdir': workdir} if workdir else {})})
  folder = sasrec_experiment.workdir(config) / f'seed_{seed}'
  meta_path = folder / 'meta.json'
  if not meta_path.is_file():
    raise FileNotFoundError(
      f'no trained SASRec checkpoint at {folder}; train it first with '
      f'`python -m experiments.train_sasrec` or pass the workdir that holds it'
    )
  meta = json.loads(meta_path.read_text())
  expected = dataclasses.asdict(sasrec_experiment.model_config(config, dataset.num_items))
  if meta.get('dataset') != dataset.name or meta.get('model_config') != expected:
    raise ValueError(
      f'the SASRec checkpoint at {folder} was trained for dataset {meta.get("dataset")!r} or another '
      f'model config; train_or_load would retrain it'
    )
  model, _ = sasrec_experiment.train_or_load(config, dataset, seed)
  return model


def run_benchmark(
  model_name: str,
  *,
  dataset: str = 'lastfm',
  split: str = 'train',
  windows: int = 64,
  max_turns: int = 5,
  repeats: int = 3,
  max_new_tokens: int = 64,
  params: SamplingParams = SamplingParams(temperature=1.0),
  seed: int = 0,
  data_root: str | None = None,
  sasrec_workdir: str | None = None,
  constrained: bool = False,
) -> dict[str, Any]:
  """Loads `model_name` ('tiny' at random init or 'smollm2_135m'), `dataset` and its trained SASRec (seed 0),
  then `measure_rollouts` on `windows` evenly spaced windows of `split`, both agents on the base model (no
  adapters). `constrained` decodes under the agents' output grammars (`LLMBackendConfig.constrained`). Returns
  the summary with the model, machine and load average added."""
  from coars_jax.data import load_dataset

  if model_name not in MODELS:
    raise ValueError(f'run_benchmark: unknown model {model_name!r}; expected one of {MODELS}')
  load_at_start = os.getloadavg()
  data = load_dataset(dataset, data_root)
  indices = evenly_spaced(windows, len(data.split(split)))
  sasrec = load_sasrec_peer(data, workdir=sasrec_workdir, data_root=data_root)
  model, tokenizer = backbone.load_backbone(backbone.BackboneSpec(name=model_name, data_root=data_root))
  summary, _ = measure_rollouts(
    model,
    tokenizer,
    data,
    sasrec,
    split=split,
    window_indices=indices,
    rollout=RolloutConfig(max_turns=max_turns),
    backend_config=LLMBackendConfig(
      recommender_max_new_tokens=max_new_tokens,
      user_max_new_tokens=max_new_tokens,
      sampling=params,
      **({'constrained': True} if constrained else {}),
    ),
    repeats=repeats,
    seed=seed,
  )
  device = jax.devices()[0]
  return {
    'model': model_name,
    'model_parameters': model.config.num_params(),
    'dataset': dataset,
    'constrained': constrained,
    **summary,
    # The figure is a share of the wall time against the bar; no other implementation is compared.
    'ratio_baseline': None,
    'device': f'{device.platform}: {device.device_kind}',
    'cpu_count': os.cpu_count(),
    'processor': platform.processor() or platform.machine(),
    'jax_version': jax.__version__,
    'load_average_at_start': load_at_start,
    'load_average': os.getloadavg(),
  }


def format_table(result: dict[str, Any]) -> str:
  """The headline numbers and the stage breakdown of one result as markdown."""
  lines = [
    f'{result.get("model", "model")} on {result.get("dataset", "?")} {result["split"]}: {result["episodes"]} '
    f'episodes, {result["turns"]} turns, {result["generate_calls"]} generate calls, best of {result["repeats"]}',
    '',
    '| figure | value |',
    '|---|---|',
    f'| wall (s) | {result["wall_seconds"]:.2f} |',
    f'| episodes/s | {result["episodes_per_s"]:.3f} |',
    f'| generated tokens/s | {result["generated_tokens_per_s"]:.1f} |',
    f'| prefill tokens/s (real prompt tokens) | {result["prefill_tokens_per_s"] or 0:.0f} |',
    f'| decode tokens/s (inside jit) | {result["decode_tokens_per_s"] or 0:.1f} |',
    f'| share outside jit (target <= {TARGET_OUTSIDE_JIT_SHARE:.2f}) | {result["outside_jit_share"]:.3f} |',
    '',
    '| stage | seconds | share of wall |',
    '|---|---|---|',
  ]
  for stage in STAGES:
    lines.append(f'| {stage} | {result["seconds"][stage]:.3f} | {result["shares"][stage]:.3f} |')
  return '\n'.join(lines)
