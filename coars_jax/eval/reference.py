"""The reference table: random, popularity and SASRec on the same candidate lists.

Every row is one (method, training seed) pair, averaged over the listed candidate seeds; the markdown view
adds the mean and spread over training seeds. Random and popularity do not train, but get a row per
training seed so that every row has the same keys (random's scores are seeded by both seeds).
"""

from __future__ import annotations

import csv
from typing import Mapping, Sequence

import numpy as np

from coars_jax.data import candidates as candidates_lib
from coars_jax.data import files, lastfm
from coars_jax.data.schema import Dataset
from coars_jax.eval import metrics
from coars_jax.recsys import peer as peer_lib
from coars_jax.recsys.sasrec import SASRec
from coars_jax.recsys.training import evaluate_per_seed

METRICS = ('hit@1', 'hit@5', 'ndcg@5')
METHODS = ('random', 'popularity', 'sasrec')


def popularity(dataset: Dataset) -> np.ndarray:
  """float32[num_items]: how often each item is the target of a training window."""
  return np.bincount(dataset.split('train').targets, minlength=dataset.num_items).astype(np.float32)


def _row(dataset: str, method: str, seed: int, candidate_seeds: Sequence[int], per_seed: list[dict]) -> dict:
  row = {'dataset': dataset, 'method': method, 'seed': int(seed), 'candidate_seeds': list(candidate_seeds)}
  for name in METRICS:
    values = [m[name] for m in per_seed]
    row[name] = float(np.mean(values))
    row[f'{name}_std_over_candidate_seeds'] = float(np.std(values))
  return row


def reference_rows(
  dataset: Dataset, models: Mapping[int, SASRec], candidate_seeds: Sequence[int], split: str = 'test'
) -> list[dict]:
  """Rows for random, popularity and each trained SASRec, on `split`'s candidate lists."""
  windows = dataset.split(split)
  cands, target_index = candidates_lib.candidate_stack(dataset, split, candidate_seeds)
  counts = popularity(dataset)
  rows = []
  for seed, model in sorted(models.items()):
    # One stream per (training seed, candidate seed): the training seed takes the window-index slot.
    random_scores = [
      candidates_lib.window_rng(dataset.name, split, seed, s, purpose='random_baseline').random(cands.shape[1:])
      for s in candidate_seeds
    ]
    rows.append(
      _row(
        dataset.name,
        'random',
        seed,
        candidate_seeds,
        [metrics.ranking_metrics(r, t) for r, t in zip(random_scores, target_index)],
      )
    )
    rows.append(
      _row(
        dataset.name,
        'popularity',
        seed,
        candidate_seeds,
        [metrics.ranking_metrics(counts[c], t) for c, t in zip(cands, target_index)],
      )
    )
    rows.append(
      _row(dataset.name, 'sasrec', seed, candidate_seeds, evaluate_per_seed(model, windows, cands, target_index))
    )
  return rows


def window_rows(
  dataset: Dataset, model: SASRec, candidate_seed: int, *, split: str = 'test', limit: int = 0
) -> list[dict]:
  """Random, popularity and SASRec on one candidate seed's lists of the first `limit` windows of `split` (0 = all),
  with each window's hit, so that they pair with agentic rows over the same windows."""
  windows = dataset.split(split)
  count = min(limit, len(windows)) if limit else len(windows)
  cands, target_index = candidates_lib.candidate_stack(dataset, split, (candidate_seed,))
  cands, target_index = cands[0, :count], target_index[0, :count]
  random_scores = candidates_lib.window_rng(dataset.name, split, 0, candidate_seed, purpose='random_baseline').random(
    cands.shape
  )
  sasrec = np.asarray(peer_lib.candidate_scores(model, windows.history[:count], windows.lengths[:count], cands))
  rows = []
  for method, scores in (('random', random_scores), ('popularity', popularity(dataset)[cands]), ('sasrec', sasrec)):
    hits = np.asarray(metrics.hit_at_k(metrics.target_rank(scores, target_index), 1))
    rows.append(
      {
        'dataset': dataset.name,
        'method': method,
        'split': split,
        'candidate_seed': int(candidate_seed),
        'num_windows': int(count),
        'windows_of_split': len(windows),
        'hit@1': float(hits.mean()),
        'window_indices': list(range(count)),
        'window_hits': [int(h) for h in hits],
      }
    )
  return rows


def summarize(rows: Sequence[dict]) -> list[dict]:
  """Per (dataset, method): mean and standard deviation over training seeds of each metric."""
  out = []
  keys = list(dict.fromkeys((r['dataset'], r['method']) for r in rows))
  for dataset, method in keys:
    group = [r for r in rows if r['dataset'] == dataset and r['method'] == method]
    summary = {'dataset': dataset, 'method': method, 'seeds': [r['seed'] for r in group]}
    for name in METRICS:
      values = [r[name] for r in group]
      summary[name] = float(np.mean(values))
      summary[f'{name}_std_over_seeds'] = float(np.std(values))
      summary[f'{name}_std_over_candidate_seeds'] = float(
        np.mean([r[f'{name}_std_over_candidate_seeds'] for r in group])
      )
    out.append(summary)
  return out


def format_markdown(rows: Sequence[dict]) -> str:
  """The summary table, then every per-seed row."""
  lines = ['| dataset | method | Hit@1 | Hit@5 | NDCG@5 | training seeds |', '|---|---|---|---|---|---|']
  for s in summarize(rows):
    cells = [
      f'{s[m]:.4f} ± {s[m + "_std_over_seeds"]:.4f} (cand. ± {s[m + "_std_over_candidate_seeds"]:.3f})' for m in METRICS
    ]
    lines.append(f'| {s["dataset"]} | {s["method"]} | ' + ' | '.join(cells) + f' | {s["seeds"]} |')
  lines += ['', '| dataset | method | seed | Hit@1 | Hit@5 | NDCG@5 |', '|---|---|---|---|---|---|']
  for r in rows:
    lines.append(
      f'| {r["dataset"]} | {r["method"]} | {r["seed"]} | ' + ' | '.join(f'{r[m]:.4f}' for m in METRICS) + ' |'
    )
  lines.append('')
  lines.append(
    'Values: mean over training seeds ± their standard deviation; "cand." is the mean standard '
    'deviation over candidate seeds within one training seed.'
  )
  return '\n'.join(lines)


def afl_prior_hit_at_1(data_root=None, *, allow_download: bool = True) -> float:
  """Hit@1 of AFL's shipped SASRec top-1 picks on the LastFM test windows (their own candidate lists)."""
  path = files.locate(lastfm.PRIOR_SASREC_FILE, data_root, allow_download=allow_download)
  with open(path, newline='', encoding='utf-8') as f:
    picks = list(csv.DictReader(f))
  return float(np.mean([row['generate'].strip() == row['real'].strip() for row in picks]))
