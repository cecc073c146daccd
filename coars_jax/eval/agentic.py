"""Evaluation of an agentic recommender on val or test windows (METHOD.md section 6): plays the windows' episodes
in batches (plain `run_episodes`, or the Reflexion memory baseline's chains), aggregates Hit@1 (final item i_T =
target i*), ValidRatio, average turns and click rate, adds the user agent's F1 when a user-simulation set is
given, and returns one JSON-ready row per (dataset, method, model, seed) with a markdown view over rows.
`evaluate_agentic` is the entry point; everything it reports is also reachable from its result for inspection.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import os
import pathlib
import time
from typing import Any, Sequence

import numpy as np
import tqdm

from coars_jax.agents.episodes import AgentBackend, Episode, RolloutConfig, episode_metrics, run_episodes
from coars_jax.agents.reflexion import ReflexionConfig, ReflexionRun, batch_seed, run_reflexion_episodes
from coars_jax.data.schema import Dataset
from coars_jax.data.user_sim import UserSimSet
from coars_jax.eval.user_f1 import UserF1Config, UserF1Result, evaluate_user_f1

# The keys every row has, in the order the JSON shows them; extras follow.
ROW_KEYS = ('dataset', 'method', 'model', 'hit@1', 'valid_ratio', 'avg_turns', 'user_f1', 'seed')
# (row key, column header) of the markdown summary. User precision and AUC sit beside the F1 because F1 alone cannot
# show discrimination on the 1:1 sets (accepting everything scores 2/3).
TABLE_METRICS = (
  ('hit@1', 'Hit@1'),
  ('valid_ratio', 'ValidRatio'),
  ('avg_turns', 'avg turns'),
  ('click_rate', 'click rate'),
  ('user_f1', 'user F1 (micro)'),
  ('user_f1_macro', 'user F1 (macro)'),
  ('user_precision', 'user P'),
  ('user_auc', 'user AUC'),
)
# The prefix of the user-agent keys of the F1 pass without the peer opinion p_t (`user_f1_both_peer_settings`).
NO_PEER_PREFIX = 'no_peer_'


@dataclasses.dataclass(frozen=True, kw_only=True)
class AgenticEvalConfig:
  """What `evaluate_agentic` plays and how.

  Attributes:
    split: 'val' or 'test'.
    window_indices: the windows to play; None plays every window of the split.
    batch_size: episodes per `run_episodes` call (the rows of each batched generation); a real model's memory
      bounds it.
    rollout: the dialogue protocol (T_u, candidate seed, hint, peer opinion, wording, parsing).
    reflexion: None plays each window on its own (zero-shot or trained agents); a `ReflexionConfig` plays the
      Reflexion memory baseline, whose prior episodes are not counted in the metrics.
    user_f1: how the user-agent F1 is asked for; it runs only when a user-simulation set is given.
    user_f1_both_peer_settings: run the F1 twice on the same set and seed: with the peer opinion p_t from the
      peer (the input layout the user agent is trained on; its keys are the row's main `user_*` keys, the
      headline) and without it (its `user_*` keys prefixed `no_peer_`), overriding `user_f1.show_peer_opinion`.
      False runs one pass as `user_f1.show_peer_opinion` says. The row's `user_f1_peer_opinion` records which
      setting the main keys used.
    progress: tqdm bars.
    resume_dir: a folder where each finished batch of episodes and each finished F1 pass is kept (as JSON), keyed
      by `resume_key` and what the batch plays; a rerun with the same key loads them instead of playing them again,
      so an evaluation killed part way resumes after its last finished batch. None keeps nothing. Reflexion
      evaluations are not kept.
    resume_key: names the agents and settings being evaluated (the caller's fingerprint of the model and config);
      batches kept under another key are never read.
  """

  split: str = 'test'
  window_indices: tuple[int, ...] | None = None
  batch_size: int = 64
  rollout: RolloutConfig = RolloutConfig()
  reflexion: ReflexionConfig | None = None
  user_f1: UserF1Config = UserF1Config()
  user_f1_both_peer_settings: bool = False
  progress: bool = True
  resume_dir: str | None = None
  resume_key: str = ''

  def __post_init__(self):
    if self.split not in ('val', 'test'):
      raise ValueError(f"AgenticEvalConfig.split must be 'val' or 'test', found {self.split!r}")
    if self.window_indices is not None:
      indices = tuple(self.window_indices)
      if not indices or any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0 for i in indices):
        raise ValueError(
          f'AgenticEvalConfig.window_indices must be None or a non-empty sequence of ints >= 0, '
          f'found {self.window_indices!r}'
        )
      object.__setattr__(self, 'window_indices', tuple(int(i) for i in indices))
    if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
      raise ValueError(f'AgenticEvalConfig.batch_size must be an int >= 1, found {self.batch_size!r}')
    for name, kind in (('rollout', RolloutConfig), ('user_f1', UserF1Config)):
      if not isinstance(getattr(self, name), kind):
        raise TypeError(
          f'AgenticEvalConfig.{name} must be a {kind.__name__}, found {type(getattr(self, name)).__name__}'
        )
    if self.reflexion is not None and not isinstance(self.reflexion, ReflexionConfig):
      raise TypeError(
        f'AgenticEvalConfig.reflexion must be a ReflexionConfig or None, found {type(self.reflexion).__name__}'
      )
    for name in ('user_f1_both_peer_settings', 'progress'):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f'AgenticEvalConfig.{name} must be a bool, found {getattr(self, name)!r}')


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class AgenticEvalResult:
  """The outcome of `evaluate_agentic`.

  Attributes:
    row: the JSON-ready row (`ROW_KEYS` first, then extras).
    episodes: the counted episodes, in window order.
    user_f1: the F1 result with every judgement (the row's main `user_*` keys), or None when no
      user-simulation set was given.
    reflexion: the Reflexion run with its chains and prior episodes, or None for plain episodes.
    user_f1_no_peer: the F1 pass without p_t when `user_f1_both_peer_settings` is on, else None.
  """

  row: dict
  episodes: tuple[Episode, ...]
  user_f1: UserF1Result | None
  reflexion: ReflexionRun | None
  user_f1_no_peer: UserF1Result | None = None


def _encode(value: Any) -> Any:
  """A JSON-ready form of `value` that `_decode` rebuilds exactly: the package's dataclasses, numpy arrays and
  scalars, tuples, lists, dicts and plain values. Data only: nothing in it names code to run."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    kind = type(value)
    return {
      '__dataclass__': f'{kind.__module__}:{kind.__qualname__}',
      'fields': {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init},
    }
  if isinstance(value, np.ndarray):
    return {'__ndarray__': value.dtype.str, 'shape': list(value.shape), 'data': value.ravel().tolist()}
  if isinstance(value, np.generic):
    return {'__npscalar__': value.dtype.str, 'value': value.item()}
  if isinstance(value, tuple):
    return {'__tuple__': [_encode(v) for v in value]}
  if isinstance(value, list):
    return [_encode(v) for v in value]
  if isinstance(value, dict):
    return {'__dict__': [[_encode(k), _encode(v)] for k, v in value.items()]}
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise TypeError(f'cannot keep a {type(value).__name__} in an evaluation resume file')


def _decode(value: Any) -> Any:
  """The inverse of `_encode`; a dataclass is rebuilt only when it is one of this package's (`coars_jax.*`)."""
  if isinstance(value, list):
    return [_decode(v) for v in value]
  if not isinstance(value, dict):
    return value
  if '__dataclass__' in value:
    module, _, name = value['__dataclass__'].partition(':')
    if module != 'coars_jax' and not module.startswith('coars_jax.'):
      raise ValueError(f'an evaluation resume file names {value["__dataclass__"]!r}, outside coars_jax')
    kind = importlib.import_module(module)
    for part in name.split('.'):
      kind = getattr(kind, part)
    if not (isinstance(kind, type) and dataclasses.is_dataclass(kind)):
      raise ValueError(f'an evaluation resume file names {value["__dataclass__"]!r}, which is not a dataclass')
    return kind(**{k: _decode(v) for k, v in value['fields'].items()})
  if '__ndarray__' in value:
    return np.asarray(value['data'], dtype=np.dtype(value['__ndarray__'])).reshape(value['shape'])
  if '__npscalar__' in value:
    return np.dtype(value['__npscalar__']).type(value['value'])
  if '__tuple__' in value:
    return tuple(_decode(v) for v in value['__tuple__'])
  if '__dict__' in value:
    return {_decode(k): _decode(v) for k, v in value['__dict__']}
  raise ValueError(f'an evaluation resume file holds an unknown object with keys {sorted(value)[:5]}')


class ResumeStore:
  """Finished pieces of an evaluation on disk (`AgenticEvalConfig.resume_dir`): each value is kept as JSON
  (`_encode`, data only) under a hash of the store's key and the piece's own description, written atomically."""

  def __init__(self, folder: str | os.PathLike, key: str):
    self.folder, self.key = pathlib.Path(folder), str(key)

  def _path(self, *parts: Any) -> pathlib.Path:
    digest = hashlib.sha256(repr((self.key,) + parts).encode()).hexdigest()[:32]
    return self.folder / f'{digest}.json'

  def get(self, *parts: Any) -> Any | None:
    path = self._path(*parts)
    if not path.is_file():
      return None
    return _decode(json.loads(path.read_text(encoding='utf-8')))

  def put(self, value: Any, *parts: Any) -> None:
    path = self._path(*parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix('.tmp')
    tmp.write_text(json.dumps(_encode(value)), encoding='utf-8')
    tmp.replace(path)


def play_windows(
  dataset: Dataset,
  backend: AgentBackend,
  *,
  peer,
  split: str,
  window_indices: Sequence[int],
  rollout: RolloutConfig = RolloutConfig(),
  batch_size: int = 64,
  seed: int = 0,
  progress: bool = False,
  store: ResumeStore | None = None,
) -> list[Episode]:
  """`run_episodes` over the windows in batches of `batch_size`; batch b samples with `batch_seed(seed, b)`, so
  a rerun with the same batch size draws the same messages. With `store`, a batch kept by an earlier run of the
  same key is loaded instead of played, and each played batch is kept."""
  indices = [int(i) for i in window_indices]
  episodes: list[Episode] = []
  starts = range(0, len(indices), batch_size)
  # Ticks per turn of each batch (T_u per batch; a batch whose episodes all end early skips its remaining turns).
  bar = tqdm.tqdm(
    total=len(starts) * rollout.max_turns,
    desc=f'episodes {dataset.name} {split}',
    unit='turn',
    disable=not progress,
    dynamic_ncols=True,
  )
  with bar:
    for batch, begin in enumerate(starts):
      played = []
      chunk = indices[begin : begin + batch_size]
      piece = ('episodes', dataset.name, split, tuple(chunk), batch_seed(seed, batch), repr(rollout))
      kept = store.get(*piece) if store is not None else None
      if kept is None:
        kept = run_episodes(
          dataset,
          split,
          chunk,
          backend,
          peer=peer,
          config=rollout,
          seed=batch_seed(seed, batch),
          on_turn=lambda t: (played.append(t), bar.update(1)),
        )
        if store is not None:
          store.put(kept, *piece)
      episodes += kept
      bar.update(rollout.max_turns - len(played))
      bar.set_postfix(windows=f'{min(begin + batch_size, len(indices))}/{len(indices)}')
  return episodes


def evaluate_agentic(
  dataset: Dataset,
  backend: AgentBackend,
  *,
  peer,
  method: str,
  model: str,
  seed: int = 0,
  config: AgenticEvalConfig = AgenticEvalConfig(),
  user_sim: UserSimSet | None = None,
) -> AgenticEvalResult:
  """Plays the configured windows and (with `user_sim`) the user-agent F1, and returns one report row.

  Args:
    dataset: the windows and titles.
    backend: the agents (`agents.LLMBackend` with the method's adapters, or any `AgentBackend`).
    peer: a `Peer` or a trained `recsys.SASRec` (peer opinion p_t, similarity q_t, hint).
    method: the row's method name ('zero-shot', 'reflexion', 'coars', ...); free text for the table.
    model: the row's backbone name (e.g. a preset or checkpoint name); free text for the table.
    seed: the sampling seed of the run, recorded in the row.
    config: what to play and how.
    user_sim: `data.user_sim_set(dataset, data_root)`; None leaves the F1 out (its row values are None).
  """
  if not isinstance(config, AgenticEvalConfig):
    raise TypeError(f'config must be an AgenticEvalConfig, found {type(config).__name__}')
  for name, value in (('method', method), ('model', model)):
    if not (isinstance(value, str) and value.strip()):
      raise ValueError(f'{name} must be a non-empty str naming the row, found {value!r}')
  indices = (
    list(config.window_indices) if config.window_indices is not None else list(range(len(dataset.split(config.split))))
  )
  start = time.perf_counter()
  reflexion = None
  store = ResumeStore(config.resume_dir, config.resume_key) if config.resume_dir else None
  if config.reflexion is None:
    episodes = play_windows(
      dataset,
      backend,
      peer=peer,
      split=config.split,
      window_indices=indices,
      rollout=config.rollout,
      batch_size=config.batch_size,
      seed=seed,
      progress=config.progress,
      store=store,
    )
  else:
    reflexion = run_reflexion_episodes(
      dataset,
      config.split,
      indices,
      backend,
      peer=peer,
      config=config.reflexion,
      rollout=config.rollout,
      seed=seed,
      batch_size=config.batch_size,
      progress=config.progress,
    )
    episodes = list(reflexion.episodes)
  episode_seconds = time.perf_counter() - start
  f1 = no_peer_f1 = None
  f1_config = config.user_f1
  if config.user_f1_both_peer_settings:
    f1_config = dataclasses.replace(config.user_f1, show_peer_opinion=True)

  def user_f1(f1_settings):
    piece = ('user_f1', dataset.name, repr(user_sim), seed, repr(f1_settings))
    kept = store.get(*piece) if store is not None else None
    if kept is None:
      kept = evaluate_user_f1(
        dataset, user_sim, backend, config=f1_settings, peer=peer, seed=seed, progress=config.progress
      )
      if store is not None:
        store.put(kept, *piece)
    return kept

  if user_sim is not None:
    f1 = user_f1(f1_config)
    if config.user_f1_both_peer_settings:
      # Same set and seed as the main pass, so the two F1s differ only by p_t.
      no_peer_f1 = user_f1(dataclasses.replace(config.user_f1, show_peer_opinion=False))

  metrics = episode_metrics(episodes)
  row = {
    'dataset': dataset.name,
    'method': method,
    'model': model,
    'hit@1': metrics['hit_at_1'],
    'valid_ratio': metrics['valid_ratio'],
    'avg_turns': metrics['average_turns'],
    'user_f1': None if f1 is None else f1.scores['micro_f1'],
    'seed': int(seed),
    'split': config.split,
    'num_windows': len(episodes),
    'click_rate': metrics['click_rate'],
    'user_valid_ratio': metrics['user_valid_ratio'],
    'max_turns': config.rollout.max_turns,
    'candidate_seed': config.rollout.candidate_seed,
    'show_hint': config.rollout.show_hint,
    'prior_episodes': 0 if reflexion is None else reflexion.num_prior_episodes,
    'episode_seconds': episode_seconds,
    # Per window, in `window_indices` order: what paired comparisons between rows resample (`paired_bootstrap`).
    'window_indices': [int(i) for i in indices],
    'window_hits': [int(e.final_hit) for e in episodes],
  }
  if f1 is not None:
    row['user_f1_peer_opinion'] = f1_config.show_peer_opinion
    row.update(f1.as_dict())
  if no_peer_f1 is not None:
    # Only the user agent's keys: the set's references (accept-all, SASRec) are the same in both passes.
    row.update({NO_PEER_PREFIX + key: value for key, value in no_peer_f1.as_dict().items() if key.startswith('user_')})
  row['wall_seconds'] = time.perf_counter() - start
  return AgenticEvalResult(
    row=row, episodes=tuple(episodes), user_f1=f1, reflexion=reflexion, user_f1_no_peer=no_peer_f1
  )


def _cell(values: Sequence[float | None]) -> str:
  present = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
  if not present:
    return '—'
  if len(present) == 1:
    return f'{present[0]:.4f}'
  return f'{np.mean(present):.4f} ± {np.std(present):.4f}'


def format_markdown(rows: Sequence[dict]) -> str:
  """A summary per (dataset, method, model), mean ± standard deviation over seeds, then every row; a metric a row
  does not have (the F1 when no user-simulation set was given) shows as '—'."""
  if not rows:
    raise ValueError('format_markdown needs at least one row')
  headers = ' | '.join(header for _, header in TABLE_METRICS)
  rule = '|---' * (len(TABLE_METRICS) + 4) + '|'
  lines = [f'| dataset | method | model | {headers} | seeds |', rule]
  groups = list(dict.fromkeys((r['dataset'], r['method'], r['model']) for r in rows))
  for dataset, method, model in groups:
    group = [r for r in rows if (r['dataset'], r['method'], r['model']) == (dataset, method, model)]
    cells = ' | '.join(_cell([r.get(key) for r in group]) for key, _ in TABLE_METRICS)
    lines.append(f'| {dataset} | {method} | {model} | {cells} | {[r["seed"] for r in group]} |')
  lines += ['', f'| dataset | method | model | seed | {headers} |', rule]
  for r in rows:
    cells = ' | '.join(_cell([r.get(key)]) for key, _ in TABLE_METRICS)
    lines.append(f'| {r["dataset"]} | {r["method"]} | {r["model"]} | {r["seed"]} | {cells} |')
  lines += [
    '',
    'Values: mean ± standard deviation over sampling seeds; Hit@1 counts the final item i_T; '
    'user F1 treats click and star as positive; user P is its micro precision and user AUC ranks the '
    'judgements by the acceptance score s (accepting everything gets F1 2/3 and P 1/2; a constant s gets '
    'AUC 1/2).',
  ]
  return '\n'.join(lines)
