"""The results report: aggregation over seeds, duplicate handling, missing rows, and the written files."""

import json

import numpy as np
import pytest

from coars_jax.eval import report


def _row(method, seed, hit, f1=None, **extra):
  return {
    'dataset': 'lastfm',
    'method': method,
    'model': 'tiny',
    'seed': seed,
    'hit@1': hit,
    'user_f1': f1,
    'valid_ratio': 1.0,
    'avg_turns': 2.0,
    'source': f'{method}_{seed}.json',
    **extra,
  }


def test_cells_are_mean_and_population_std_over_seeds():
  rows = [_row('coars', 0, 0.1, 0.5), _row('coars', 1, 0.2, 0.7), _row('coars', 2, 0.6, 0.6)]
  cells = report.aggregate(rows, 'lastfm', 'tiny')['coars']
  assert cells['seeds'] == [0, 1, 2]
  assert cells['hit@1'].mean == pytest.approx(0.3)
  assert cells['hit@1'].std == pytest.approx(np.sqrt(((0.2) ** 2 + 0.1**2 + 0.3**2) / 3))
  assert cells['user_f1'].format() == '0.600 ± 0.082'
  assert report.Cell((0.25,)).format() == '0.250'
  assert report.Cell(()).format() == '–'


def test_rows_are_ordered_filtered_by_model_and_grammar_rows_are_separate():
  rows = [
    _row('coars', 0, 0.3),
    _row('sasrec', 0, 0.4, model=None),
    _row('warm_start', 0, 0.1),
    _row('warm_start', 0, 0.2, constrained=True, model='tiny+constrained'),
    _row('zero_shot', 0, 0.0, model='smollm2-135m'),
    {**_row('coars', 0, 0.9), 'dataset': 'movielens'},
  ]
  table = report.aggregate(rows, 'lastfm', 'tiny')
  assert list(table) == ['sasrec', 'warm_start', 'warm_start+grammar', 'coars']
  assert table['warm_start+grammar']['hit@1'].mean == pytest.approx(0.2)
  text = report.format_table(table)
  assert '| Warm start (SFT) + grammar | 0.200 |' in text
  missing = report.missing_rows(table)
  assert 'Random' in missing and 'CoARS' not in missing and 'Warm start (SFT)' not in missing


def test_the_same_result_seen_twice_counts_once_and_a_conflict_raises():
  before = _row('warm_start', 0, 0.1)
  table = report.aggregate([before, {**before, 'source': 'other.json'}], 'lastfm', 'tiny')
  assert table['warm_start']['seeds'] == [0] and len(table['warm_start']['hit@1'].values) == 1
  with pytest.raises(ValueError, match='warm_start seed 0'):
    report.aggregate([before, {**before, 'hit@1': 0.5, 'source': 'other.json'}], 'lastfm', 'tiny')


def test_training_seed_wins_over_the_evaluation_seed():
  rows = [_row('coars', 0, 0.1, train_seed=1), _row('coars', 0, 0.3, train_seed=2)]
  assert report.aggregate(rows, 'lastfm', 'tiny')['coars']['seeds'] == [1, 2]


def test_read_rows_names_the_bad_file(tmp_path):
  good, bad = tmp_path / 'good.json', tmp_path / 'bad.json'
  good.write_text(json.dumps([{'dataset': 'lastfm', 'method': 'random', 'hit@1': 0.05}]))
  bad.write_text(json.dumps([{'hit@1': 0.05}]))
  assert report.read_rows([good])[0]['source'] == str(good)
  with pytest.raises(ValueError, match='bad.json'):
    report.read_rows([good, bad])
  bad.write_text('{not json')
  with pytest.raises(ValueError, match='not valid JSON'):
    report.read_rows([bad])


def test_write_report_draws_curves_from_run_folders(tmp_path):
  for seed in (0, 1):
    run = tmp_path / 'runs' / f'train_coars_{seed}'
    run.mkdir(parents=True)
    (run / 'config.json').write_text(
      json.dumps({'dataset': 'lastfm', 'method': 'coars', 'label': '', 'rl': {'seed': seed}})
    )
    lines = [{'iteration': i, 'val/hit_at_1': 0.1 * i + seed, 'reward/recommender': -1.0 + i} for i in range(3)]
    (run / 'metrics.jsonl').write_text(''.join(json.dumps(line) + '\n' for line in lines))
  runs = report.read_curves(sorted((tmp_path / 'runs').iterdir()))
  assert [run['seed'] for run in runs] == [0, 1]
  assert runs[1]['points']['val/hit_at_1'] == [(0, 1.0), (1, 1.1), (2, 1.2)]
  output = report.write_report([_row('coars', 0, 0.3), _row('coars', 1, 0.5)], runs, tmp_path / 'out' / 'README.md')
  text = output.read_text()
  assert '| CoARS | 0.400 ± 0.100 |' in text
  assert '![lastfm learning curves](lastfm_curves.png)' in text
  png = tmp_path / 'out' / 'lastfm_curves.png'
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_report_shows_every_model_keeps_the_preamble_and_skips_unevaluated_records(tmp_path):
  rows = [
    _row('sasrec', 0, 0.4),
    _row('zero_shot', 0, 0.1, model='smollm2-135m'),
    _row('warm_start', 0, 0.2, model='tiny'),
    {'dataset': 'lastfm', 'method': 'warm_start', 'stage': 'before', 'evaluated': False, 'model': 'tiny'},
  ]
  for row in rows:
    row.setdefault('source', 'x.json')
  output = report.write_report(rows, [], tmp_path / 'README.md', preamble='Budgets and caveats.')
  text = output.read_text()
  assert text.startswith('# Results\n\nBudgets and caveats.')
  assert '## lastfm, smollm2-135m' in text and '## lastfm, tiny' in text
  tiny = text.split('## lastfm, tiny')[1]
  assert 'Warm start (SFT) | 0.200' in tiny and 'SASRec | 0.400' in tiny and 'Zero-shot' not in tiny
  only = report.write_report(rows, [], tmp_path / 'only.md', model='tiny').read_text()
  assert '## lastfm, tiny' in only and 'smollm2-135m' not in only
