"""`experiments.pilot`: each arm runs the first iterations of the pilot row's seed-0 cell with its own fields, judged
on val windows only (no test evaluation), and a second call reads a finished arm back instead of rerunning it."""

import json

import pytest

from coars_jax import configlib
from coars_jax.pipeline import table as table_lib
from coars_jax.training.metrics import read_metrics
from experiments import pilot
from tests.training.test_table import components, micro_table


def pilot_table(tmp_path):
  table = micro_table(tmp_path, rows=('warm_start', 'coars'))
  table.pilot = {'row': 'coars', 'iterations': 1, 'arms': {'base': {}, 'hot': {'sampling': {'temperature': 2.0}}}}
  return table


def test_arm_overrides_stop_after_the_pilot_with_a_val_evaluation(tmp_path):
  table = pilot_table(tmp_path)
  overrides = pilot.arm_overrides(table, 'hot', tmp_path / 'w')
  assert overrides == {
    'sampling': {'temperature': 2.0},
    'workdir': str(tmp_path / 'w'),
    'stop_after': 1,
    'eval': {'every': 1},
  }


def test_a_resumed_arm_runs_only_the_pilot_iterations_it_lacks(tmp_path):
  """`stop_after` counts one invocation's iterations: an arm resumed after 2 of a 4-iteration pilot runs 2 more,
  not 4 (which ran iterations 3 to 6 before this was fixed)."""
  table = pilot_table(tmp_path)
  table.pilot.iterations = 4
  assert pilot.arm_overrides(table, 'base', tmp_path / 'w', done=2)['stop_after'] == 2
  assert pilot.arm_overrides(table, 'base', tmp_path / 'w')['stop_after'] == 4


def test_validate_table_names_a_bad_arm_field(tmp_path):
  table = pilot_table(tmp_path)
  table_lib.validate_table(table)
  table.pilot.arms = {'bad': {'rl': {'learning_ratez': 1e-3}}}
  with pytest.raises(configlib.ConfigError, match='pilot.arms.bad.rl.learning_ratez: not a field'):
    table_lib.validate_table(table)
  table = pilot_table(tmp_path)
  table.pilot.row = 'warm_start'
  with pytest.raises(configlib.ConfigError, match="'pilot.row'"):
    table_lib.validate_table(table)


def test_summarize_reads_val_before_and_after_and_each_iteration():
  lines = [
    {'iteration': 0, 'val/hit_at_1': 0.25, 'val/valid_ratio': 0.5},
    {'iteration': 1, 'rollout/hit_at_1': 0.1, 'time/rollout_seconds': 3.0, 'time/update_seconds': 2.0},
    {'iteration': 2, 'rollout/hit_at_1': 0.3, 'val/hit_at_1': 0.5, 'val/valid_ratio': 0.75},
    {'iteration': 3, 'rollout/hit_at_1': 0.9},  # past the pilot: not read
  ]
  summary = pilot.summarize('base', {}, lines, 2)
  assert summary['iterations_done'] == 2
  assert summary['val_before']['val/hit_at_1'] == 0.25 and summary['val_after']['val/valid_ratio'] == 0.75
  assert [row['rollout/hit_at_1'] for row in summary['iterations']] == [0.1, 0.3]


def test_pilot_runs_each_arm_on_val_only_and_reads_finished_arms_back(tmp_path):
  table = pilot_table(tmp_path)
  summaries, output = pilot.run_pilot(table, ['base', 'hot'], 'lastfm', components=components)
  assert [s['arm'] for s in summaries] == ['base', 'hot'] and all(s['iterations_done'] == 1 for s in summaries)
  root = tmp_path / 'runs' / 'lastfm' / 'pilot'
  for summary in summaries:
    workdir = root / summary['arm']
    lines = read_metrics(workdir)
    assert [line['iteration'] for line in lines] == [0, 1] and 'val/hit_at_1' in lines[1]
    assert not (workdir / 'results.json').exists()  # stopped after the pilot: no test row
    assert json.loads((workdir / 'config.json').read_text())['eval']['before'] is False
  # Greedy val before RL reads the same warm start in every arm; the arms' rollouts differ in their temperature.
  assert summaries[0]['val_before'] == summaries[1]['val_before']
  hot = json.loads((root / 'hot' / 'config.json').read_text())
  assert hot['sampling']['temperature'] == 2.0
  assert json.loads((root / 'base' / 'config.json').read_text())['sampling']['temperature'] == 1.0
  kept = json.loads(output.read_text())
  assert set(kept['arms']) == {'base', 'hot'} and kept['pilot_iterations'] == 1
  # No row file: the pilot is not a table cell.
  assert not table_lib.results_file(table, table_lib.Cell('lastfm', 'coars', 0)).exists()
  before = (root / 'base' / 'metrics.jsonl').stat().st_mtime
  again, _ = pilot.run_pilot(table, ['base'], 'lastfm', components=components)
  assert again[0] == summaries[0] and (root / 'base' / 'metrics.jsonl').stat().st_mtime == before
