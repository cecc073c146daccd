"""`pipeline.table`: the grid, cell selection, per-cell configs, and a micro table run cell by cell: one warm start
shared by every RL cell, row files with the device and budget, a stopped cell resumed from its checkpoint, and the
report built from the rows."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coars_jax import configlib
from coars_jax.data import synthetic
from coars_jax.eval import table_report
from coars_jax.pipeline import experiment as ex
from coars_jax.pipeline import table as table_lib
from coars_jax.training import warm_start as ws
from coars_jax.training.metrics import read_metrics
from tests.training.test_rl import micro_base
from tests.training.test_warm_start import BUCKETS, micro_sasrec, small_tokenizer

# The synthetic windows under a real dataset name, as the table configs name datasets.
DATASET = synthetic.synthetic_dataset(name='lastfm')
MICRO = {
  'progress': False,
  'lora': {'rank': 4, 'alpha': 8.0},
  'rollout': {'max_turns': 2},
  'recommender_max_new_tokens': 16,
  'user_max_new_tokens': 16,
  'prompt_buckets': (*BUCKETS.prompt, 1024),
  'completion_buckets': BUCKETS.completion,
  'rl': {
    'iterations': 2,
    'windows_per_iteration': 2,
    'rollouts_per_window': 2,
    'rows_per_microbatch': 4,
    'learning_rate': 1e-3,
    'warmup_iterations': 0,
  },
  'eval': {'every': 1, 'val_windows': 2, 'test_windows': 3, 'batch_size': 4, 'user_f1': {'enabled': False}},
  'warm_start': {'steps': 2, 'num_dialogues': 2, 'batch_size': 2, 'warmup_steps': 0},
  'checkpoint': {'every': 1, 'keep': 2},
}


def micro_table(tmp_path, rows=('reference', 'zero_shot', 'warm_start', 'coars', 'coars-no_sd')):
  table = table_lib.table_defaults()
  table.name, table.base, table.model = 'micro', 'default', 'tiny'
  table.datasets, table.rows = ('lastfm',), rows
  table.main_seeds, table.ablation_seeds = 2, {'lastfm': 1}
  table.zero_shot_constrained = False
  table.runs_root, table.results_root = str(tmp_path / 'runs'), str(tmp_path / 'results')
  table.overrides = MICRO
  return table


def components(config):
  """Fresh parts per cell, as `load_components` reads them by name: the model's arrays are copies (the warm start's
  update donates its inputs, and `micro_base` clones share arrays with a cached model)."""
  del config
  model = micro_base(seed=7)
  nnx.update(model, jax.tree.map(lambda x: jnp.array(x, copy=True), nnx.state(model)))
  return ex.Components(
    dataset=DATASET, sasrec=micro_sasrec(), model=model, tokenizer=small_tokenizer(), model_label='micro'
  )


def test_grid_seeds_order_and_selection(tmp_path):
  table = micro_table(tmp_path, rows=table_lib.ALL_ROWS)
  table.datasets = ('lastfm', 'movielens')
  table.ablation_seeds = {'lastfm': 3, 'movielens': 1}
  cells = table_lib.grid(table)
  names = [c.name for c in cells]
  # Rows that train nothing get one cell; main RL rows main_seeds; ablations per dataset.
  assert names.count('lastfm/warm_start/seed_0') == 1 and 'lastfm/warm_start/seed_1' not in names
  assert {c.seed for c in cells if c.row == 'coars-no_sd' and c.dataset == 'lastfm'} == {0, 1, 2}
  assert {c.seed for c in cells if c.row == 'coars-no_sd' and c.dataset == 'movielens'} == {0}
  assert {c.seed for c in cells if c.row == 'coars'} == {0, 1}
  # Seed 0 of every row comes before any seed 1, and the warm start before every RL row.
  lastfm = [c for c in cells if c.dataset == 'lastfm']
  assert max(i for i, c in enumerate(lastfm) if c.seed == 0) < min(i for i, c in enumerate(lastfm) if c.seed == 1)
  assert names.index('lastfm/warm_start/seed_0') < names.index('lastfm/outcome_rl/seed_0')
  assert [c.name for c in table_lib.select(cells, ['lastfm/coars'])] == ['lastfm/coars/seed_0', 'lastfm/coars/seed_1']
  assert {c.row for c in table_lib.select(cells, ['coars-*'])} == set(table_lib.ABLATION_ROWS)
  assert [c.name for c in table_lib.select(cells, ['movielens/coars/seed_1'])] == ['movielens/coars/seed_1']
  with pytest.raises(ValueError, match="--only='cors' matches no cell"):
    table_lib.select(cells, ['cors'])


def test_cell_configs_share_one_warm_start_and_budget(tmp_path):
  table = micro_table(tmp_path)
  table_lib.validate_table(table)
  configs = {c.row: table_lib.cell_config(table, c) for c in table_lib.grid(table) if c.seed == 0}
  folders = {configs[name].warm_start.folder for name in ('warm_start', 'coars', 'coars-no_sd')}
  assert len(folders) == 1
  assert not configs['zero_shot'].warm_start.enabled and configs['coars'].warm_start.enabled
  assert configs['warm_start'].label == 'warm_start' and configs['warm_start'].method == 'zero_shot'
  assert not configs['coars'].eval.before and configs['coars-no_sd'].rl.lambda_sd == 0.0
  assert configs['coars'].rl.iterations == configs['coars-no_sd'].rl.iterations == 2
  assert len({c.workdir for c in configs.values()}) == len(configs)
  bad = micro_table(tmp_path)
  bad.overrides = {'rl': {'iterationz': 3}}
  with pytest.raises(configlib.ConfigError, match='overrides.rl.iterationz: not a field'):
    table_lib.validate_table(bad)
  bad = micro_table(tmp_path, rows=('coars', 'corse'))
  with pytest.raises(configlib.ConfigError, match="Config field 'rows'"):
    table_lib.validate_table(bad)


def test_micro_table_runs_resumes_and_reports(tmp_path):
  table = micro_table(tmp_path)
  cells = table_lib.grid(table)
  table_lib.write_grid(table, cells)
  by_name = {c.name: c for c in cells}
  # A stopped RL cell writes no row file, and continues from its checkpoint when run again.
  stopped = table_lib.run_cell(
    table, by_name['lastfm/coars/seed_1'], components=components, overrides={'stop_after': 1}
  )
  assert not stopped.finished and not table_lib.results_file(table, stopped.cell).exists()
  warm_meta = tmp_path / 'runs' / 'lastfm' / 'warm_start_sft' / ws.META_FILE
  trained_at = warm_meta.stat().st_mtime
  for cell in cells:
    result = table_lib.run_cell(table, cell, components=components)
    assert result.finished, cell.name
  assert warm_meta.stat().st_mtime == trained_at  # one warm start, trained by the first cell that needed it
  resumed = json.loads(table_lib.results_file(table, by_name['lastfm/coars/seed_1']).read_text())[0]
  assert resumed['cell_wall_seconds'] >= stopped.seconds
  workdir = tmp_path / 'runs' / 'lastfm' / 'coars' / 'seed_1'
  assert [r['iteration'] for r in read_metrics(workdir) if 'loss/total' in r] == [1, 2]
  # Every evaluation wrote a sample of its iteration's dialogues with the token credit A (experiments.view).
  samples = sorted((workdir / 'trajectories').glob('iteration_*.jsonl'))
  assert [p.name for p in samples] == ['iteration_000001.jsonl', 'iteration_000002.jsonl']
  first = json.loads(samples[-1].read_text().splitlines()[0])
  assert first['iteration'] == 2 and any(turn['recommender'].get('credit') for turn in first['turns'])

  done = table_lib.finished_seconds(table, cells)
  assert set(done) == set(cells)
  assert table_lib.estimate(table_lib.Cell('lastfm', 'judge_rl', 0), done) > 0
  for cell in cells:
    rows = json.loads(table_lib.results_file(table, cell).read_text())
    assert all(r['cell'] == cell.name and r['platform'] == 'cpu' and r['device'].startswith('cpu') for r in rows)
    if cell.kind == 'reference':
      assert [r['method'] for r in rows] == ['random', 'popularity', 'sasrec']
    if cell.kind == 'rl':
      assert rows[0]['rl_episodes'] == 8 and rows[0]['train_seed'] == cell.seed
      assert table_lib.results_file(table, cell).with_suffix('.metrics.jsonl').is_file()
    assert all(len(r['window_hits']) == 3 for r in rows)

  report = table_report.read_table(tmp_path / 'results')
  assert {r['row'] for r in report['rows']} == {
    'random',
    'popularity',
    'sasrec',
    'zero_shot',
    'warm_start',
    'coars',
    'coars-no_sd',
  }
  text = '\n'.join(table_report.table_sections(report, tmp_path / 'results'))
  assert '| CoARS | 2 |' in text and 'Self-distillation adds (CoARS vs lambda_SD = 0): **' in text
  assert 'Missing' not in text and (tmp_path / 'results' / 'micro_cpu_lastfm_curves.png').is_file()
  assert len(report['curves']) == 3 and all(c['points']['val/hit_at_1'] for c in report['curves'])
  # Each RL row pairs with the warm start over the same three windows.
  coars = [r for r in report['rows'] if r['row'] == 'coars']
  warm = [r for r in report['rows'] if r['row'] == 'warm_start']
  assert table_report.compare(coars, warm)['windows'] == 3
  assert np.isfinite(coars[0]['hit@1'])


def test_committed_headline_names_its_folder_rows_and_claims(tmp_path):
  """What `make demo` prints after its own rows: the committed table's rows and "What holds", labelled with the
  folder they come from; a folder with nothing in it says so."""
  from coars_jax.eval import table_report

  assert 'none yet' in table_report.committed_headline(tmp_path / 'absent')
  folder = tmp_path / 'study' / 'lastfm'
  folder.mkdir(parents=True)
  row = {
    'dataset': 'lastfm',
    'method': 'warm_start',
    'row': 'warm_start',
    'hit@1': 0.25,
    'valid_ratio': 0.9,
    'avg_turns': 3.0,
    'window_indices': [0, 1],
    'window_hits': [1, 0],
    'num_windows': 2,
    'windows_of_split': 122,
    'cell': 'lastfm/warm_start/seed_0',
  }
  (folder / 'warm_start__seed_0.json').write_text(json.dumps([row]))
  text = table_report.committed_headline(tmp_path / 'study')
  assert 'Committed results' in text and 'not what this command just ran' in text and str(tmp_path / 'study') in text
  assert '0.250' in text and 'What holds:' in text and 'not tested' in text  # CoARS's rows are missing
