"""`eval.table_report`: paired intervals over seeds, the "What holds" verdicts, missing cells and platforms, and the
user-F1 bootstrap; on rows whose answers are known by construction."""

import json

import numpy as np
import pytest

from coars_jax.eval import metrics, table_report

WINDOWS = 40


def row(name, hits, *, seed=0, platform='cpu', dataset='lastfm', cases=None, **extra):
  hits = [int(h) for h in hits]
  found = {
    'dataset': dataset,
    'method': name,
    'row': name,
    'train_seed': seed,
    'platform': platform,
    'device': f'{platform}: test',
    'cell': f'{dataset}/{name}/seed_{seed}',
    'hit@1': float(np.mean(hits)),
    'valid_ratio': 1.0,
    'avg_turns': 2.0,
    'num_windows': len(hits),
    'windows_of_split': len(hits),
    'window_indices': list(range(len(hits))),
    'window_hits': hits,
    'cell_wall_seconds': 600.0,
  }
  if cases is not None:
    tp, fp, fn = np.asarray(cases).sum(axis=0)
    found.update(
      {
        'user_f1': float(metrics.micro_f1(np.array([tp, fp, fn]))),
        'user_precision': tp / (tp + fp),
        'user_recall': tp / (tp + fn),
        'user_f1_cases': [list(map(int, c)) for c in cases],
      }
    )
  return {**found, **extra}


def write(root, rows, grid=None):
  for r in rows:
    path = root / r['dataset'] / f'{r["row"]}__seed_{r["train_seed"]}.json'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([r]))
  if grid is not None:
    (root / 'grid.json').write_text(json.dumps(grid))
  return table_report.read_table(root)


def test_window_rates_average_the_seeds_per_window():
  windows, rates = table_report.window_rates([row('coars', [1, 0, 1, 0]), row('coars', [1, 1, 0, 0], seed=1)])
  assert windows == (0, 1, 2, 3)
  np.testing.assert_allclose(rates, [1.0, 0.5, 0.5, 0.0])
  # Seeds measured on different windows cannot be pooled.
  other = row('coars', [1, 0, 1], seed=2)
  assert table_report.window_rates([row('coars', [1, 0, 1, 0]), other]) is None


def test_verdicts_follow_the_interval():
  better = [row('coars', [1] * WINDOWS)]
  worse = [row('outcome_rl', [0] * WINDOWS)]
  same = [row('outcome_rl', [1, 0] * (WINDOWS // 2))]
  found = table_report.compare(better, worse)
  assert found['diff'] == pytest.approx(1.0) and found['low'] == pytest.approx(1.0)
  assert table_report.verdict(found, []).startswith('**supported**')
  assert table_report.verdict(table_report.compare(worse, better), []).startswith('**contradicted**')
  # Equal rows: the interval is centred on 0, so the claim is not supported.
  tie = table_report.compare(same, same)
  assert tie['diff'] == 0 and tie['low'] <= 0 <= tie['high']
  assert table_report.verdict(tie, []).startswith('**not supported**')
  assert table_report.verdict(None, ['Outcome-reward RL']).startswith('not tested: no rows for Outcome-reward RL')


def test_f1_comparison_resamples_users():
  rng = np.random.default_rng(0)
  good = rng.integers(3, 6, size=(30, 3)) * np.array([1, 0, 0]) + np.array([0, 1, 1])  # many TP, few errors
  bad = np.tile([1, 4, 4], (30, 1))
  found = metrics.paired_bootstrap_f1(good, bad)
  assert found['low'] > 0 and found['users'] == 30
  assert found['diff'] == pytest.approx(metrics.micro_f1(good.sum(0)) - metrics.micro_f1(bad.sum(0)))
  same = metrics.paired_bootstrap_f1(bad, bad)
  assert same['diff'] == same['low'] == same['high'] == 0
  with pytest.raises(ValueError, match='same users'):
    metrics.paired_bootstrap_f1(good, bad[:3])


def test_table_sections_keep_platforms_apart_and_list_missing_cells(tmp_path):
  hits = np.random.default_rng(1).integers(0, 2, size=WINDOWS)
  cases = [[2, 1, 1]] * 10
  rows = [
    row('warm_start', hits, cases=cases),
    row('outcome_rl', hits),
    row('outcome_rl', hits, seed=1),
    row('coars', np.ones(WINDOWS), cases=[[3, 0, 0]] * 10),
    row('coars', np.ones(WINDOWS), seed=1, cases=[[3, 0, 0]] * 10),
    row('coars', np.zeros(WINDOWS), platform='gpu', seed=5),
  ]  # its own file, as from another machine
  grid = {
    'table': 'micro',
    'model': 'm',
    'budget': {'iterations': 2, 'windows_per_iteration': 2, 'rollouts_per_window': 2, 'episodes': 8},
    'cells': [
      {'dataset': 'lastfm', 'row': name, 'seed': seed}
      for name, seed in (
        ('warm_start', 0),
        ('reflexion', 0),
        ('outcome_rl', 0),
        ('outcome_rl', 1),
        ('coars', 0),
        ('coars', 1),
        ('coars-no_sd', 0),
      )
    ],
  }
  table = write(tmp_path / 'micro', rows, grid)
  text = '\n'.join(table_report.table_sections(table, tmp_path))
  cpu, gpu = text.split('### lastfm, on gpu')
  assert '### lastfm, on cpu' in cpu and 'cpu: test' in cpu and 'gpu: test' in gpu
  coars_line = next(line for line in cpu.splitlines() if line.startswith('| CoARS |'))
  # 2 seeds, Hit@1 1.000 ± 0.000, and intervals against both references over the same windows.
  assert '| 2 | 1.000 ± 0.000 |' in coars_line and coars_line.count('[') == 2
  assert 'CoARS beats outcome-reward RL on Hit@1: **supported**' in cpu
  assert 'Reflexion) on Hit@1: not tested: no rows for Reflexion memory' in cpu
  assert "The user agent's F1 improves (CoARS vs the warm start): **supported**" in cpu
  assert 'Missing (2 cells, not estimated): reflexion/seed_0, coars-no_sd/seed_0.' in cpu
  # The GPU section has its one row, compared with nothing from the CPU.
  assert 'CoARS beats outcome-reward RL on Hit@1: not tested' in gpu
  assert '8 episodes' in text
