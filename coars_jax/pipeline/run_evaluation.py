"""A run's evaluations: greedy test rows with the user-agent F1 (`evaluate_rows`, resumable batch by batch under a
key of the weights and settings), greedy val metrics during RL (`evaluate_val`), the zero-shot reference row and
the paired bootstrap differences between rows.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from typing import Any

import jax
import numpy as np
from flax import nnx

from coars_jax.agents.episodes import AGENTS, LLMBackend, LLMBackendConfig, episode_metrics
from coars_jax.data.user_sim import UserSimSet, user_sim_set
from coars_jax.eval.agentic import AgenticEvalConfig, evaluate_agentic, play_windows
from coars_jax.eval.metrics import paired_bootstrap
from coars_jax.eval.user_f1 import UserF1Config
from coars_jax.models.decoder import Decoder
from coars_jax.models.lora import BASE_PARAMS
from coars_jax.parallel import distributed
from coars_jax.parallel.mesh import make_mesh, mesh_shape_from_config
from coars_jax.sampling import GREEDY
from coars_jax.training import faults

from coars_jax.training.preemption import PreemptionGuard
from coars_jax.pipeline.run_components import Components
from coars_jax.pipeline.run_config import EVAL_RESUME_DIR, ZERO_SHOT_FILE, buckets, reflexion_config, rollout_config


def greedy_backend(
  model: Decoder, tokenizer, config, guard: 'PreemptionGuard | None' = None, *, constrained: bool = False
) -> LLMBackend:
  """The evaluation backend (under the output grammars when `constrained`); with `guard`, a SIGTERM makes its
  next generation call raise `Preempted`."""
  adapters = {agent: agent for agent in AGENTS} if model.adapter_names else None
  # Multi-host, the trainer has placed the model's arrays over every process's devices, which only the sharded
  # programs take; a single-process run keeps the unsharded programs it always ran.
  mesh = make_mesh(mesh_shape_from_config(config.mesh)) if jax.process_count() > 1 else None
  backend = LLMBackend(
    model,
    tokenizer,
    adapters=adapters,
    config=LLMBackendConfig(
      recommender_max_new_tokens=config.recommender_max_new_tokens,
      user_max_new_tokens=config.user_max_new_tokens,
      sampling=GREEDY,
      buckets=buckets(config),
      constrained=constrained,
      # The adapters stay fixed while the row is evaluated; the merged copies are made for this backend only.
      merge_adapters=mesh is None,
    ),
    mesh=mesh,
  )
  return backend if guard is None else guard.watch(backend)


def _first(count: int, total: int) -> tuple[int, ...]:
  return tuple(range(min(count, total) if count else total))


def evaluate_rows(
  config,
  parts: Components,
  model: Decoder,
  *,
  method: str,
  stage: str,
  user_sim: UserSimSet | None,
  guard: 'PreemptionGuard | None' = None,
  constrained: bool | None = None,
) -> dict[str, Any]:
  """A greedy test row (`eval.agentic.evaluate_agentic`, with the user-agent F1 when configured), decoded under
  the output grammars when `constrained` (None: `eval.constrained`)."""
  if constrained is None:
    constrained = bool(config.eval.constrained)
  total = len(parts.dataset.split('test'))
  # Finished batches are kept here until the row is complete, so a killed evaluation resumes after its last batch.
  resume_dir = pathlib.Path(config.workdir).absolute() / EVAL_RESUME_DIR
  eval_config = AgenticEvalConfig(
    split='test',
    window_indices=_first(config.eval.test_windows, total),
    batch_size=config.eval.batch_size,
    rollout=rollout_config(config),
    reflexion=reflexion_config(config) if config.method == 'reflexion' else None,
    user_f1=UserF1Config(
      batch_size=config.eval.user_f1.batch_size,
      show_peer_opinion=config.eval.user_f1.peer_opinion,
      batching=config.eval.user_f1.batching,
    ),
    user_f1_both_peer_settings=config.eval.user_f1.peer_opinion and config.eval.user_f1.also_without_peer,
    progress=config.progress,
    resume_dir=str(resume_dir),
    resume_key=evaluation_key(config, model, stage, method, constrained),
  )
  result = evaluate_agentic(
    parts.dataset,
    greedy_backend(model, parts.tokenizer, config, guard, constrained=constrained),
    peer=parts.sasrec,
    method=method,
    model=parts.model_label,
    seed=0,
    config=eval_config,
    user_sim=user_sim,
  )
  shutil.rmtree(resume_dir, ignore_errors=True)  # the row is complete: nothing left to resume
  row = dict(result.row)
  # `seed` is the evaluation's (greedy, so moot); `train_seed` tells the report which training run this is.
  row.update(
    {
      'stage': stage,
      'constrained': constrained,
      'windows_of_split': total,
      'train_seed': int(config.rl.seed),
      'user_f1_users': None if user_sim is None else len(user_sim.cases),
    }
  )
  return row


def evaluation_key(config, model: Decoder, stage: str, method: str, constrained: bool) -> str:
  """What a kept evaluation batch was played with: the agents' weights (the base's and the adapters' sums of
  |w|), the stage and method, and every setting that shapes the episodes or the F1. A batch kept under another key
  is never read."""
  adapters = sum(
    float(np.abs(np.asarray(leaf, np.float64)).sum()) for leaf in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
  )
  settings = {
    name: config[name].to_dict() if hasattr(config[name], 'to_dict') else config[name]
    for name in (
      'dataset',
      'model',
      'rollout',
      'recommender_max_new_tokens',
      'user_max_new_tokens',
      'prompt_buckets',
      'completion_buckets',
      'sasrec_workdir',
      'sasrec_seed',
      'sasrec_max_epochs',
      'eval',
    )
  }
  return json.dumps(
    {
      'stage': stage,
      'method': method,
      'constrained': bool(constrained),
      'base': repr(base_fingerprint(model)),
      'adapters': repr(adapters),
      'settings': settings,
    },
    sort_keys=True,
    default=str,
  )


def evaluate_val(
  config, parts: Components, model: Decoder, *, guard: 'PreemptionGuard | None' = None, iteration: int = 0
) -> dict[str, float]:
  """Greedy Hit@1, ValidRatio and average turns on the first `eval.val_windows` val windows (after RL iteration
  `iteration`, which only fault injection reads)."""
  indices = _first(config.eval.val_windows, len(parts.dataset.split('val')))
  backend = greedy_backend(model, parts.tokenizer, config, guard)
  faults.instrument_eval(backend, iteration)
  episodes = play_windows(
    parts.dataset,
    backend,
    peer=parts.sasrec,
    split='val',
    window_indices=indices,
    rollout=rollout_config(config),
    batch_size=config.eval.batch_size,
    seed=0,
  )
  metrics = episode_metrics(episodes)
  return {
    'val/hit_at_1': metrics['hit_at_1'],
    'val/valid_ratio': metrics['valid_ratio'],
    'val/average_turns': metrics['average_turns'],
    'val/user_valid_ratio': metrics['user_valid_ratio'],
  }


def row_metrics(row: dict[str, Any]) -> dict[str, Any]:
  """A test row's metrics as metrics.jsonl / TensorBoard names."""
  return {
    f'test/{key.replace("@", "_at_")}': row.get(key)
    for key in ('hit@1', 'valid_ratio', 'avg_turns', 'user_f1', 'click_rate')
  }


def base_fingerprint(model: Decoder) -> float:
  """The sum of |w| over the frozen base weights: a resume refuses a checkpoint trained on another base."""
  return float(
    sum(np.abs(np.asarray(leaf, np.float64)).sum() for leaf in jax.tree.leaves(nnx.state(model, BASE_PARAMS)))
  )


def user_sim_for(config, parts: Components) -> UserSimSet | None:
  if not config.eval.user_f1.enabled:
    return None
  sim = parts.user_sim or user_sim_set(parts.dataset, config.data_root or None, allow_download=config.allow_download)
  if config.eval.user_f1.num_users:
    sim = dataclasses.replace(sim, cases=sim.cases[: config.eval.user_f1.num_users])
  return sim


def with_paired_differences(rows: list[dict], *, reference: dict) -> list[dict]:
  """`rows`, each but `reference` with `hit@1_vs_<reference stage>`: its Hit@1 difference from `reference` over the
  same windows and the paired bootstrap 95% interval (`eval.metrics.paired_bootstrap`)."""
  name = f'hit@1_vs_{reference.get("stage", "reference")}'
  for row in rows:
    if row is not reference and row.get('window_indices') == reference.get('window_indices') is not None:
      row[name] = paired_bootstrap(row['window_hits'], reference['window_hits'])
  return rows


def zero_shot_rows(config, parts: Components, workdir: pathlib.Path, user_sim: UserSimSet | None) -> list[dict]:
  """[the bare base's test row] when `eval.zero_shot` is on and the base has no adapters yet (read back from
  `<workdir>/zero_shot.json` when an earlier invocation wrote it), else []."""
  if not config.eval.zero_shot or config.method == 'zero_shot' or parts.model.adapter_names:
    return []
  path = workdir / ZERO_SHOT_FILE
  if path.is_file():
    return [json.loads(path.read_text())]
  constrained = config.eval.zero_shot_constrained
  row = evaluate_rows(
    config,
    parts,
    parts.model,
    method='zero_shot+grammar' if constrained else 'zero_shot',
    stage='zero_shot',
    user_sim=user_sim,
    constrained=constrained,
  )
  write_json(path, row)
  return [row]


def write_json(path: pathlib.Path, value: Any) -> None:
  """Writes `path` atomically, from the primary process only (the others hold the same value)."""
  if not distributed.is_primary():
    return
  tmp = path.with_suffix(path.suffix + '.tmp')
  tmp.write_text(json.dumps(value, indent=2, default=str))
  tmp.replace(path)
