"""`pipeline.experiment`: config validation, and a run on the synthetic dataset with the micro decoder that is
stopped, resumed and compared with an uninterrupted run."""

import importlib
import json
import re

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from coars_jax import configlib
from coars_jax.eval.agentic import ROW_KEYS
from coars_jax.pipeline import experiment as ex
from coars_jax.training import warm_start as ws
from coars_jax.training.metrics import read_metrics
from tests.training.test_rl import BUCKETS, micro_base
from tests.training.test_warm_start import DATASET, micro_sasrec, small_tokenizer


def components() -> ex.Components:
  """A bare micro base: the run attaches fresh adapters (`lora.seed`), as for a pretrained backbone."""
  return ex.Components(
    dataset=DATASET, sasrec=micro_sasrec(), model=micro_base(seed=7), tokenizer=small_tokenizer(), model_label='micro'
  )


def micro_config(workdir, **overrides):
  config = ex.default_config('lastfm', 'tiny', 'coars')
  config.workdir = str(workdir)
  config.warm_start.enabled = False
  config.progress = False
  config.lora.rank = 4
  config.lora.alpha = 8.0
  config.rollout.max_turns = 2
  config.recommender_max_new_tokens = 16
  config.user_max_new_tokens = 16
  config.prompt_buckets = BUCKETS.prompt
  config.completion_buckets = BUCKETS.completion
  config.rl.iterations = 3
  config.rl.windows_per_iteration = 2
  config.rl.rows_per_microbatch = 4
  config.rl.learning_rate = 1e-3
  config.rl.warmup_iterations = 0
  config.eval.every = 2
  config.eval.val_windows = 2
  config.eval.test_windows = 2
  config.eval.batch_size = 2
  config.eval.user_f1.enabled = False
  config.checkpoint.every = 1
  config.checkpoint.keep = 2
  for field, value in overrides.items():
    group, _, name = field.rpartition('.')
    (config.get(group) if group else config)[name] = value
  return config


def fresh_trainer(workdir):
  config, parts = micro_config(workdir), components()
  return ex.make_trainer(config, parts, ex.prepare_agents(config, parts, workdir)[0])


def checkpoint_contents(workdir):
  trainer = fresh_trainer(workdir)
  return trainer, ex.read_checkpoint(workdir, trainer)


def test_resumed_run_matches_the_uninterrupted_run(tmp_path):
  whole, split = tmp_path / 'whole', tmp_path / 'split'
  rows = ex.run(micro_config(whole), components=components())
  assert ex.run(micro_config(split, stop_after=2), components=components())[0]['stage'] == 'before'
  assert not (split / ex.RESULTS_FILE).exists()
  resumed = ex.run(micro_config(split, resume=True), components=components())

  # Same step, same adapters, same optimizer state, same RNG and data position.
  (a, meta_a), (b, meta_b) = checkpoint_contents(whole), checkpoint_contents(split)
  assert meta_a == meta_b and meta_a['trainer']['iteration'] == 3 and meta_a['trainer']['next_window'] == 6
  tree_a, tree_b = a.checkpoint_tree(), b.checkpoint_tree()
  for left, right in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b), strict=True):
    np.testing.assert_array_equal(np.asarray(left), np.asarray(right))
  # The adapters actually trained, and a resumed metrics file reads as one run.
  initial = fresh_trainer(tmp_path / 'unused').checkpoint_tree()['adapters']
  assert any(
    not np.array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(tree_a['adapters']), jax.tree.leaves(initial))
  )
  records_a, records_b = read_metrics(whole), read_metrics(split)
  assert [r['iteration'] for r in records_a] == [r['iteration'] for r in records_b] == [0, 1, 2, 3, 3]
  assert 'test/hit_at_1' in records_a[0] and 'val/hit_at_1' in records_a[0] and records_a[-1]['stage'] == 'after'
  for left, right in zip(records_a, records_b):
    assert left.get('windows') == right.get('windows') and left.get('seed') == right.get('seed')
    assert left.get('loss/total') == right.get('loss/total')

  # Rows: before (the starting agents) and after, with the evaluation keys; identical across the two runs.
  assert [r['stage'] for r in rows] == ['before', 'after'] and rows[1]['method'] == 'coars'
  assert rows[0]['method'] == 'zero_shot' and all(key in rows[1] for key in ROW_KEYS)
  assert rows[1]['rl_episodes'] == 6
  for key in ('hit@1', 'valid_ratio', 'avg_turns'):
    assert resumed[1][key] == rows[1][key]
  saved = json.loads((whole / ex.RESULTS_FILE).read_text())
  assert [r['stage'] for r in saved] == ['before', 'after']

  # Checkpoints: the latest two, plus the best by val Hit@1 when it is older; exports load as warm starts.
  steps = sorted(int(p.name) for p in (whole / ex.CHECKPOINT_DIR).iterdir() if p.name.isdigit())
  assert steps[-2:] == [2, 3]
  final, meta = ws.load_warm_start(whole / ex.FINAL_DIR)
  assert meta['base_saved'] and meta['iteration'] == 3
  for left, right in zip(jax.tree.leaves(nnx.state(final, nnx.LoRAParam)), jax.tree.leaves(tree_a['adapters'])):
    np.testing.assert_array_equal(np.asarray(left), np.asarray(right))
  assert (whole / ex.BEST_DIR / ws.META_FILE).is_file()
  assert (whole / 'tensorboard').is_dir()
  with pytest.raises(FileExistsError, match='already holds checkpoints'):
    ex.run(micro_config(whole), components=components())


def test_zero_shot_only_evaluates(tmp_path):
  rows = ex.run(micro_config(tmp_path, method='zero_shot', **{'eval.test_windows': 1}), components=components())
  assert len(rows) == 1 and rows[0]['method'] == 'zero_shot' and rows[0]['num_windows'] == 1
  assert list(rows[0])[: len(ROW_KEYS)] == list(ROW_KEYS)
  assert not (tmp_path / ex.CHECKPOINT_DIR).exists()
  assert not (tmp_path / ex.EVAL_RESUME_DIR).exists()  # kept batches are dropped once the row is complete
  assert json.loads((tmp_path / ex.RESULTS_FILE).read_text())[0]['method'] == 'zero_shot'


def test_config_validation_names_the_field(tmp_path):
  config = micro_config(tmp_path)
  ex.validate(config)
  config.rl.lamda_sd = 0.2
  with pytest.raises(configlib.ConfigError, match=r"Unknown config field 'rl.lamda_sd'; did you mean 'rl.lambda_sd'"):
    ex.validate(config)
  with pytest.raises(configlib.ConfigError, match=r"Config field 'method': expected one of \('zero_shot'"):
    ex.validate(micro_config(tmp_path, method='coarse'))
  with pytest.raises(configlib.ConfigError, match='RLConfig.learning_rate must be a positive number, found -1.0'):
    ex.validate(micro_config(tmp_path, **{'rl.learning_rate': -1.0}))
  with pytest.raises(
    configlib.ConfigError,
    match=r"Config field 'rl.lambda_sd': expected 0.0 for "
    r"method='outcome_rl'",
  ):
    ex.validate(micro_config(tmp_path, method='outcome_rl', **{'rl.reward': 'outcome', 'rl.train_user_agent': False}))
  with pytest.raises(configlib.ConfigError, match=r"Config field 'rl.reward': expected 'interaction' or 'outcome'"):
    ex.validate(micro_config(tmp_path, **{'rl.reward': 'judge', 'rl.train_user_agent': False}))
  with pytest.raises(configlib.ConfigError, match=r"Config field 'eval.every': expected an int >= 0, found -1"):
    ex.validate(micro_config(tmp_path, **{'eval.every': -1}))
  with pytest.raises(configlib.ConfigError, match="Config field 'mesh'"):
    ex.validate(micro_config(tmp_path, **{'mesh.data': 64}))
  with pytest.raises(configlib.ConfigError, match="Config group 'warm_start': WarmStartConfig.steps"):
    ex.validate(micro_config(tmp_path, **{'warm_start.steps': 0}))
  assert (
    ex.row_label(micro_config(tmp_path, **{'rl.lambda_sd': 0.0, 'rl.train_user_agent': False}))
    == 'coars-no_sd-rec_only'
  )
  with pytest.raises(configlib.ConfigError, match='sharding_rules.vocab'):
    ex.validate(micro_config(tmp_path, **{'sharding_rules.vocab': 'model'}))


def test_sharding_rules_come_from_the_config(tmp_path):
  from coars_jax.parallel.rules import DEFAULT_RULES

  assert ex.sharding_rules(micro_config(tmp_path)) == DEFAULT_RULES
  rules = dict(
    ex.sharding_rules(micro_config(tmp_path, **{'sharding_rules.vocab': '', 'sharding_rules.embed': 'data,fsdp'}))
  )
  assert rules['vocab'] == () and rules['embed'] == ('data', 'fsdp') and rules['mlp'] == ('tensor',)


@pytest.mark.parametrize('name', ['lastfm_smollm2', 'movielens_smollm2', 'instruments_smollm2'])
def test_shipped_configs_validate_for_every_method(name):
  module = importlib.import_module(f'configs.{name}')
  for method in ex.METHODS:
    config = module.get_config(method)
    ex.validate(config)
    assert config.method == method and config.model == 'smollm2-135m'
  assert module.get_config('outcome_rl').rl.reward == 'outcome'
  assert module.get_config('judge_rl').rl.train_user_agent is False


def test_shipped_configs_validate_the_cpu_demo():
  config = importlib.import_module('configs.demo_cpu').get_config()  # CoARS only: it takes no argument
  ex.validate(config)
  assert config.method == 'coars' and config.model == 'smollm2-135m' and config.warm_start.enabled


def _leaves(config, prefix=''):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def test_every_field_is_type_checked_by_name(tmp_path):
  checked = 0
  for field, default in _leaves(micro_config(tmp_path)):
    wrong = (
      'yes'
      if isinstance(default, bool)
      else 1.5
      if isinstance(default, int)
      else float('inf')
      if isinstance(default, float)
      else 3
      if isinstance(default, str)
      else 'x'
    )
    config = micro_config(tmp_path)
    group, _, name = field.rpartition('.')
    target = config
    for part in group.split('.') if group else ():
      target = target[part]
    with target.ignore_type():
      target[name] = wrong
    with pytest.raises(configlib.ConfigError, match=re.escape(f"'{field}'")):
      ex.validate(config)
    checked += 1
  assert checked > 80


def test_ranges_and_names_the_generic_checks_miss(tmp_path):
  for overrides, message in (
    ({'dataset': 'netflix'}, "'dataset': expected one of"),
    ({'tokenizer_vocab_size': 100}, "'tokenizer_vocab_size': expected an int >= 265"),
    ({'prompt_buckets': (64, -1)}, "'prompt_buckets': expected a non-empty list"),
    ({'completion_buckets': (64, 32)}, 'prompt_buckets / completion_buckets'),
  ):
    with pytest.raises(configlib.ConfigError, match=re.escape(message)):
      ex.validate(micro_config(tmp_path, **overrides))
  config = micro_config(tmp_path)
  config.eval.user_f1.batching = 'rows'
  with pytest.raises(configlib.ConfigError, match=re.escape("'eval.user_f1.batching': expected one of")):
    ex.validate(config)


def test_a_run_writes_only_inside_its_workdir_and_the_two_shared_folders(tmp_path, monkeypatch):
  clone = tmp_path / 'clone'
  clone.mkdir()
  monkeypatch.chdir(clone)
  work = clone / 'runs' / 'x'
  ex.validate(micro_config(work, sasrec_workdir='runs/sasrec', **{'warm_start.folder': 'runs/warm'}))
  for overrides, message in (
    ({'config.workdir': '/'}, "'workdir': expected a folder of its own"),
    ({'config.workdir': '.'}, "'workdir': expected a folder of its own"),
    ({'sasrec_workdir': str(work)}, "'sasrec_workdir': expected a folder apart from the run's own outputs"),
    ({'sasrec_workdir': str(work / 'checkpoints' / 'sasrec')}, 'the run output <workdir>/checkpoints'),
    ({'warm_start.folder': str(work / 'best')}, 'the run output <workdir>/best'),
    ({'warm_start.folder': str(clone / 'runs')}, "'warm_start.folder': expected a folder that does not hold"),
    ({'data_root': 'a\x00b'}, "'data_root'"),
  ):
    config = micro_config(work, **{k: v for k, v in overrides.items() if k != 'config.workdir'})
    config.workdir = overrides.get('config.workdir', config.workdir)
    with pytest.raises(configlib.ConfigError, match=re.escape(message)):
      ex.validate(config)
  ex.validate(micro_config(work, **{'warm_start.folder': str(work / ex.WARM_START_DIR)}))  # the default place

  # A symlink inside the workdir that leads out of it is refused before anything is written.
  work.mkdir(parents=True)
  outside = tmp_path / 'elsewhere'
  outside.mkdir()
  (work / ex.CHECKPOINT_DIR).symlink_to(outside)
  with pytest.raises(ValueError, match=r'checkpoints resolves to .*elsewhere, outside the workdir'):
    ex.run_paths(work)
  with pytest.raises(ValueError, match='outside the workdir'):
    ex.run(micro_config(work), components=None)
  assert not (work / ex.CONFIG_FILE).exists() and list(outside.iterdir()) == []


def test_zero_shot_row_comes_first_and_rows_carry_paired_intervals(tmp_path):
  config = micro_config(tmp_path / 'run', **{'rl.iterations': 1, 'eval.every': 0, 'eval.zero_shot': True})
  rows = ex.run(config, components=components())
  assert [r['stage'] for r in rows] == ['zero_shot', 'before', 'after']
  zero, before, after = rows
  assert zero['method'] == 'zero_shot' and zero['constrained'] is False
  assert (tmp_path / 'run' / ex.ZERO_SHOT_FILE).is_file()
  assert zero['window_indices'] == before['window_indices'] == after['window_indices'] == [0, 1]
  for row in (zero, after):
    interval = row['hit@1_vs_before']
    assert interval['diff'] == pytest.approx(np.mean(row['window_hits']) - np.mean(before['window_hits']))
    assert interval['low'] <= interval['diff'] <= interval['high'] and interval['windows'] == 2
  assert 'hit@1_vs_before' not in before
  # A rerun reads the zero-shot row back instead of evaluating the base again.
  again = ex.run(
    micro_config(tmp_path / 'run', **{'rl.iterations': 1, 'eval.every': 0, 'eval.zero_shot': True, 'resume': True}),
    components=components(),
  )
  assert again[0]['wall_seconds'] == zero['wall_seconds']


def test_dry_run_plan_marks_each_stage(tmp_path):
  from coars_jax.data import instruments
  from coars_jax.pipeline import stages
  from tests.conftest import require_files

  root = require_files(instruments.RATINGS_FILE, instruments.META_FILE)
  config = micro_config(
    tmp_path / 'run',
    **{
      'dataset': 'instruments',
      'data_root': str(root),
      'sasrec_workdir': str(tmp_path / 'sasrec'),
      'sasrec_folds': 2,
      'warm_start.enabled': True,
      'warm_start.folder': str(tmp_path / 'ws'),
    },
  )
  plan = {s.name: s.status for s in stages.plan(config)}
  assert plan == {
    'SASRec (full)': 'to run',
    'SASRec (fold 0 of 2 split 0)': 'to run',
    'SASRec (fold 1 of 2 split 0)': 'to run',
    'warm start': 'to run',
    'test row before RL': 'to run',
    'RL: 3 iterations of 2 windows x 1 rollouts': 'to run',
    'test row after RL': 'to run',
  }
  run = tmp_path / 'run'
  (run / ex.CHECKPOINT_DIR / '2').mkdir(parents=True)
  (run / ex.BEFORE_FILE).write_text('{}')
  (tmp_path / 'ws').mkdir()
  (tmp_path / 'ws' / ws.META_FILE).write_text(json.dumps({'settings': {'steps': -1}}))
  plan = {s.name: s.status for s in stages.plan(config)}
  assert plan['RL: 3 iterations of 2 windows x 1 rollouts'] == 'done 2 of 3'
  assert plan['test row before RL'] == 'cached' and plan['warm start'] == 'conflict'
  text = stages.format_plan(config, stages.plan(config))
  assert text.startswith('Resolved config:') and '"lambda_sd": 0.1' in text and 'done 2 of 3' in text
