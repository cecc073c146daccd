"""The training experiment behind `python -m experiments.train --config=configs/<dataset>_<model>.py[:method]`:
SASRec (trained or loaded) -> the agents (the SFT warm start, trained or loaded; or fresh adapters on the base)
-> RL iterations (`training.rl.RLTrainer`) with periodic greedy val evaluation, Orbax checkpoints and
metrics -> a greedy test evaluation with the user-agent F1, written as rows to `<workdir>/results.json`.

Methods (`METHODS`): 'zero_shot' and 'reflexion' train nothing and are evaluated only; 'outcome_rl', 'judge_rl'
and 'coars' run the same RL loop with the same budget (iterations x windows x rollouts) and differ only in the
reward, lambda_SD and which adapters learn, fields `validate` checks against the method. A checkpoint holds the
adapters, the optimizer state, the RNG key and the data position, so `resume=True` continues exactly as if the
run had never stopped; the final and best (by val Hit@1) adapters are also exported in the warm-start folder
format that `experiments.evaluate --checkpoint=` reads.

Preemption: SIGTERM stops the run at its next safe point (between generation calls, or after the update in flight)
with a checkpoint, and `run` returns normally. A checkpoint is sealed by a manifest of its files' sizes and sha256
once Orbax has committed it; a resume restores the newest checkpoint that verifies and sets the others aside under
`<workdir>/checkpoints_rejected`, so a SIGKILL at any moment, a truncated file or a full disk costs at most the
iterations since the last good checkpoint, never a wrong resume.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Any

import ml_collections
import numpy as np
import tqdm

from coars_jax.announce import announce
from coars_jax.models.decoder import Decoder
from coars_jax.parallel import distributed, planner
from coars_jax.parallel.mesh import make_mesh, mesh_shape_from_config
from coars_jax.training import credit_sample, faults, rl

# Checkpoints and preemption live in their own modules; their names stay importable from here.
from coars_jax.training.checkpointing import (
  BEST_METRIC,  # noqa: F401
  CHECKPOINT_DIR,  # noqa: F401
  MANIFEST_FILE,  # noqa: F401
  REJECTED_DIR,  # noqa: F401
  CheckpointError,  # noqa: F401
  checkpoint_manager,  # noqa: F401
  checkpoint_problem,  # noqa: F401
  export_adapters,  # noqa: F401
  read_checkpoint,  # noqa: F401
  restore_checkpoint,  # noqa: F401
  restore_latest,  # noqa: F401
  save_checkpoint,  # noqa: F401
  seal_checkpoint,  # noqa: F401
  step_folder,  # noqa: F401
)
from coars_jax.training.metrics import MetricsWriter, json_value
from coars_jax.training.preemption import Preempted, PreemptionGuard, guarded_iteration  # noqa: F401

# The run's config, checks, components and evaluations live in their own modules; their names stay importable
# from here.
from coars_jax.pipeline.run_config import (  # noqa: F401
  ABLATION_SEPARATOR,
  ABLATIONS,
  BEFORE_FILE,
  BEST_DIR,
  buckets,
  CONFIG_FILE,
  default_config,
  EVAL_RESUME_DIR,
  FINAL_DIR,
  lora_config,
  METHOD_FIELDS,
  METHODS,
  parse_method,
  reflexion_config,
  RESULTS_FILE,
  rl_config,
  rollout_config,
  row_label,
  RUN_OUTPUTS,
  run_paths,
  sampling_params,
  sharding_rules,
  smollm2_config,
  TRAINED_METHODS,
  warm_start_config,
  WARM_START_DIR,
  with_ablation,
  ZERO_SHOT_FILE,
)
from coars_jax.pipeline.run_validation import (  # noqa: F401
  validate,
)
from coars_jax.pipeline.run_components import (  # noqa: F401
  Components,
  load_components,
  prepare_agents,
  SFT_SECONDS_PER_ROW,
  warm_start_key,
)
from coars_jax.pipeline.run_evaluation import (  # noqa: F401
  base_fingerprint,
  evaluate_rows,
  evaluate_val,
  evaluation_key,
  greedy_backend,
  row_metrics,
  user_sim_for,
  with_paired_differences,
  write_json,
  zero_shot_rows,
)


# --- the run -----------------------------------------------------------------------------------------------------


def make_trainer(config, parts: Components, model: Decoder) -> rl.RLTrainer:
  return rl.RLTrainer(
    model,
    parts.tokenizer,
    parts.dataset,
    parts.peer,
    rl_config(config),
    rollout=rollout_config(config),
    mesh=make_mesh(mesh_shape_from_config(config.mesh)),
    rules=sharding_rules(config),
  )


def run(config: ml_collections.ConfigDict, *, components: Components | None = None) -> list[dict[str, Any]]:
  """The whole experiment (see the module docstring); returns the rows it also writes to results.json (only the
  'before' row, or none, when it stops early: `stop_after` or SIGTERM)."""
  validate(config)
  if config.plan.device or config.plan.device_memory_gib:
    planner.check(config)  # refuses a run that cannot fit, before any weights are read
  workdir = pathlib.Path(config.workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  run_paths(workdir)
  write_json(workdir / CONFIG_FILE, config.to_dict())
  parts = components or load_components(config)
  user_sim = user_sim_for(config, parts)
  zero_shot = zero_shot_rows(config, parts, workdir, user_sim)
  model, origin = prepare_agents(config, parts, workdir)
  label = row_label(config)
  save_base = parts.save_base or bool(origin.get('base_saved'))

  if config.method not in TRAINED_METHODS:
    row = evaluate_rows(config, parts, model, method=label, stage='after', user_sim=user_sim)
    row['start'] = origin['stage']
    write_json(workdir / RESULTS_FILE, zero_shot + [row])
    return zero_shot + [row]

  trainer = make_trainer(config, parts, model)
  faults.instrument_trainer(trainer)
  settings = trainer.config
  budget = {
    'iterations': settings.iterations,
    'windows_per_iteration': settings.windows_per_iteration,
    'rollouts_per_window': settings.rollouts_per_window,
    'episodes': settings.iterations * settings.episodes_per_iteration,
  }
  progress: dict[str, Any] = {
    'best_val_hit_at_1': None,
    'best_iteration': None,
    'base_fingerprint': base_fingerprint(model),
  }
  with checkpoint_manager(workdir, config.checkpoint.keep) as manager, PreemptionGuard() as guard:
    guard.watch(trainer.backend)
    if manager.all_steps() and not config.resume:
      raise FileExistsError(
        f'{workdir / CHECKPOINT_DIR} already holds checkpoints (latest: iteration '
        f'{manager.latest_step()}); pass --config.resume=True to continue that run, or choose '
        f'another --config.workdir'
      )
    meta = restore_latest(manager, trainer) if config.resume else None
    resumed = meta is not None
    if config.resume and not resumed:
      # A first run of a config that always resumes (the demo, the table's cells) has nothing to say here.
      announce(f'No checkpoint to resume in {workdir / CHECKPOINT_DIR}; starting from iteration 0')
    pending = None
    if resumed:
      if not np.isclose(meta['base_fingerprint'], progress['base_fingerprint'], rtol=1e-12, atol=0):
        raise ValueError(
          f'the base model differs from the one the checkpoint in {workdir} was trained on (its '
          f'warm start {origin.get("folder")} or backbone changed); resuming would mix two runs'
        )
      progress = {k: meta[k] for k in progress}
      pending = meta.get('pending_record')
      announce(f'Resumed {workdir} at iteration {trainer.state.iteration}')
    saved = trainer.state.iteration if resumed else None  # the step of the newest checkpoint
    # A pending record's line is written again when its evaluation finishes, so an earlier copy is dropped.
    keep_up_to = None if not resumed else trainer.state.iteration - (pending is not None)

    with MetricsWriter(workdir, keep_up_to=keep_up_to) as writer:
      before_path = workdir / BEFORE_FILE
      if resumed:
        if not before_path.is_file():
          raise FileNotFoundError(
            f'{before_path} is missing: it holds the row of the agents this run started '
            f'from, written before its first checkpoint; restore it or start a new workdir'
          )
        before = json.loads(before_path.read_text())
      else:
        try:
          if config.eval.before:
            before = evaluate_rows(
              config, parts, model, method=origin['stage'], stage='before', user_sim=user_sim, guard=guard
            )
            start_record = row_metrics(before)
          else:
            before = {'dataset': config.dataset, 'method': origin['stage'], 'stage': 'before', 'evaluated': False}
            start_record = {}
          write_json(before_path, before)
          if config.eval.every:
            start_record.update(evaluate_val(config, parts, model, guard=guard))
            progress.update(best_val_hit_at_1=start_record['val/hit_at_1'], best_iteration=0)
            export_adapters(
              model, workdir / BEST_DIR, save_base=save_base, metadata={'method': label, 'iteration': 0, **start_record}
            )
        except Preempted:
          logging.warning('Stopped on SIGTERM before the first RL iteration; nothing to resume from')
          return []
        writer.write(0, start_record)
      first = trainer.state.iteration
      last = settings.iterations if not config.stop_after else min(settings.iterations, first + config.stop_after)

      def conclude(metrics: dict[str, Any]) -> None:
        """The rest of an iteration: its val evaluation (when due), the best export, its metrics line, then its
        checkpoint. The line comes first: a kill between the two replays the iteration from an older checkpoint,
        which drops the line, while the other order would lose it."""
        nonlocal saved
        number = trainer.state.iteration
        val_hit = None
        if config.eval.every and (number % config.eval.every == 0 or number == settings.iterations):
          start = time.perf_counter()
          try:
            val = evaluate_val(config, parts, model, guard=guard, iteration=number)
          except Preempted:
            if saved != number:
              save_checkpoint(manager, trainer, progress, None, pending_record=json_value(metrics))
              saved = number
            raise
          metrics.update(val, **{'time/eval_seconds': time.perf_counter() - start})
          val_hit = val['val/hit_at_1']
          if progress['best_val_hit_at_1'] is None or val_hit > progress['best_val_hit_at_1']:
            progress.update(best_val_hit_at_1=val_hit, best_iteration=number)
            export_adapters(
              model, workdir / BEST_DIR, save_base=save_base, metadata={'method': label, 'iteration': number, **val}
            )
        if trainer.last_credit_sample and distributed.is_primary():
          credit_sample.write_sample(workdir, number, trainer.last_credit_sample)
        writer.write(number, metrics)
        faults.point('metrics', number)
        due = val_hit is not None or number % config.checkpoint.every == 0 or number == last or guard.requested
        if due and saved != number:
          save_checkpoint(manager, trainer, progress, val_hit)
          saved = number

      if first < last:
        announce(
          f'Training {label} (RL iterations {first + 1} to {last} of {settings.iterations}, '
          f'{settings.windows_per_iteration} windows x {settings.rollouts_per_window} rollouts each) into '
          f'{workdir}: '
          + ('resumed from its checkpoint' if resumed else 'a new run')
          + '; SmolLM2 on 2 CPU cores takes about 17 min per iteration of 16 five-turn episodes (BUILD_NOTES Part 13), '
          'the bar shows the ETA'
        )
      bar = tqdm.tqdm(
        total=settings.iterations,
        initial=first,
        desc=f'RL {label}',
        disable=not (config.progress and distributed.is_primary()),
        dynamic_ncols=True,
      )
      try:
        if pending is not None:
          conclude(pending)
        while trainer.state.iteration < last and not guard.requested:
          upcoming = trainer.state.iteration + 1
          evaluated = bool(config.eval.every) and upcoming % config.eval.every == 0
          trainer.credit_episodes = config.eval.trajectory_sample if evaluated or upcoming == settings.iterations else 0
          metrics = guarded_iteration(trainer)
          conclude(metrics)
          bar.update(1)
          bar.set_postfix(
            loss=f'{metrics.get("loss/total", float("nan")):.3f}',
            hit=f'{metrics["rollout/hit_at_1"]:.2f}',
            valid=f'{metrics["rollout/valid_ratio"]:.2f}',
          )
      except Preempted:
        pass
      finally:
        bar.close()

      if guard.requested:
        if saved != trainer.state.iteration:
          save_checkpoint(manager, trainer, progress, None)
        logging.warning(
          'Stopped on SIGTERM after RL iteration %d of %d with a checkpoint; resume with --config.resume=True',
          trainer.state.iteration,
          settings.iterations,
        )
        return zero_shot + [before]
      if trainer.state.iteration < settings.iterations:
        logging.info(
          'Stopped after iteration %d of %d (stop_after=%d); resume with --config.resume=True',
          trainer.state.iteration,
          settings.iterations,
          config.stop_after,
        )
        return zero_shot + [before]
      try:
        export_adapters(
          model,
          workdir / FINAL_DIR,
          save_base=save_base,
          metadata={'method': label, 'iteration': trainer.state.iteration, 'budget': budget},
        )
        after = evaluate_rows(config, parts, model, method=label, stage='after', user_sim=user_sim, guard=guard)
      except Preempted:
        logging.warning(
          'Stopped on SIGTERM during the final test evaluation; the last checkpoint holds every '
          'iteration, resume with --config.resume=True to evaluate'
        )
        return zero_shot + [before]
      after.update(
        {
          'checkpoint': str(workdir / FINAL_DIR),
          'best_checkpoint': str(workdir / BEST_DIR),
          **{f'rl_{k}': v for k, v in budget.items()},
          **{k: v for k, v in progress.items() if k != 'base_fingerprint'},
        }
      )
      writer.write(trainer.state.iteration, {'stage': 'after', **row_metrics(after)})
  rows = zero_shot + [before, after]
  if before.get('window_hits') is not None:
    rows = with_paired_differences(rows, reference=before)
  write_json(workdir / RESULTS_FILE, rows)
  return rows
