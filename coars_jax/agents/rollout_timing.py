"""Measuring full multi-turn rollouts (`episodes.run_episodes` with an `LLMBackend` and a peer): episodes/s,
generated tokens/s and prefill tokens/s, and where the wall time goes.

The wall time is split into stages by `rollout_stages` (its docstring lists them), which wraps, for the duration
of a measurement only, the functions the episode loop reaches through module attributes (no library file is
changed); the stages add up to the wall time of the rollout. `run_benchmark` loads a named backbone, a dataset and
its trained SASRec; `measure_rollouts` does the measuring on objects the caller built (the smoke test passes a
micro model and a table peer).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from typing import Any, Sequence

import jax
import numpy as np

from coars_jax.models import backbone
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
from coars_jax.agents.rollout_stages import JIT_STAGES, STAGES, TimedCall, StageTimer, _instrumented_rollout
from coars_jax.recsys.sasrec import SASRec
from coars_jax.sampling import SamplingParams
from coars_jax.sampling.compilation import count_backend_compiles

__all__ = [
  'JIT_STAGES',
  'MODELS',
  'STAGES',
  'TARGET_OUTSIDE_JIT_SHARE',
  'TimedCall',
  'StageTimer',
  'episode_token_counts',
  'evenly_spaced',
  'format_table',
  'load_sasrec_peer',
  'measure_rollouts',
  'run_benchmark',
]

MODELS = ('tiny', 'smollm2_135m')
# The bar: at most this share of a rollout's wall time outside the LLM's jitted code.
TARGET_OUTSIDE_JIT_SHARE = 0.20


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
  experiment's `runs/sasrec_<dataset>`), whatever training settings made it (e.g. capped epochs). Refuses, rather
  than trains, when no checkpoint of this dataset and model is there: a benchmark must not start a SASRec training
  run."""
  from coars_jax.recsys import checkpoint as sasrec_checkpoint
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
      f'the SASRec checkpoint at {folder} was trained for dataset {meta.get("dataset")!r} or another model config'
    )
  model, _ = sasrec_checkpoint.load_sasrec(folder)
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
  agents: tuple[Any, Any, Any] | None = None,
  merge_adapters: bool = False,
) -> dict[str, Any]:
  """Loads `model_name` ('tiny' at random init or 'smollm2_135m'), `dataset` and its trained SASRec (seed 0),
  then `measure_rollouts` on `windows` evenly spaced windows of `split`, both agents on the base model (no
  adapters) unless `agents` gives (model, tokenizer, adapters) already loaded (a warm start's, say).
  `constrained` decodes under the agents' output grammars (`LLMBackendConfig.constrained`), `merge_adapters` folds
  each agent's adapter into its weights (`LLMBackendConfig.merge_adapters`). Returns the summary with the model,
  machine and load average added."""
  from coars_jax.data import load_dataset

  if model_name not in MODELS:
    raise ValueError(f'run_benchmark: unknown model {model_name!r}; expected one of {MODELS}')
  load_at_start = os.getloadavg()
  data = load_dataset(dataset, data_root)
  indices = evenly_spaced(windows, len(data.split(split)))
  sasrec = load_sasrec_peer(data, workdir=sasrec_workdir, data_root=data_root)
  if agents is None:
    model, tokenizer = backbone.load_backbone(backbone.BackboneSpec(name=model_name, data_root=data_root))
    adapters = None
  else:
    model, tokenizer, adapters = agents
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
      constrained=constrained,
      merge_adapters=merge_adapters,
    ),
    adapters=adapters,
    repeats=repeats,
    seed=seed,
  )
  device = jax.devices()[0]
  return {
    'model': model_name,
    'model_parameters': model.config.num_params(),
    'dataset': dataset,
    'constrained': constrained,
    'adapters': adapters,
    'merge_adapters': merge_adapters,
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
