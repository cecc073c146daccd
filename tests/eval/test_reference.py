import numpy as np
import pytest

from coars_jax.data import lastfm
from coars_jax.data.synthetic import synthetic_dataset
from coars_jax.eval import reference
from coars_jax.recsys.sasrec import SASRec, SASRecConfig
from flax import nnx
from tests.conftest import require_files


def test_rows_have_the_documented_keys_and_sane_values():
  dataset = synthetic_dataset(num_users=400, num_items=200)
  models = {s: SASRec(SASRecConfig(num_items=dataset.num_items, hidden=8), rngs=nnx.Rngs(s)) for s in (0, 1)}
  rows = reference.reference_rows(dataset, models, candidate_seeds=[0, 1, 2], split='test')
  assert [(r['method'], r['seed']) for r in rows] == [(m, s) for s in (0, 1) for m in reference.METHODS]
  for row in rows:
    assert {'dataset', 'method', 'hit@1', 'hit@5', 'ndcg@5', 'seed', 'candidate_seeds'} <= set(row)
    assert row['candidate_seeds'] == [0, 1, 2]
    assert 0.0 <= row['hit@1'] <= row['hit@5'] <= 1.0
  random_hit1 = np.mean([r['hit@1'] for r in rows if r['method'] == 'random'])
  assert 0.0 < random_hit1 < 0.15  # 1/20 in expectation over 40 windows x 3 seeds x 2 training seeds
  summary = reference.summarize(rows)
  assert [s['method'] for s in summary] == list(reference.METHODS)
  table = reference.format_markdown(rows)
  assert '| synthetic | sasrec |' in table and table.count('\n| synthetic |') == 3 + 6


def test_popularity_counts_training_targets():
  dataset = synthetic_dataset()
  counts = reference.popularity(dataset)
  assert counts.sum() == len(dataset.split('train'))
  assert counts[dataset.split('train').targets[0]] >= 1


def test_afl_prior_reproduces_the_published_0_279():
  root = require_files(lastfm.PRIOR_SASREC_FILE)
  assert reference.afl_prior_hit_at_1(root, allow_download=False) == pytest.approx(34 / 122)
  assert round(34 / 122, 3) == 0.279
