import pathlib

import pytest

from coars_jax import configlib
from coars_jax.recsys import experiment


def test_default_configs_validate():
  for dataset in ('lastfm', 'movielens', 'instruments'):
    experiment.validate(experiment.default_config(dataset))


def test_unknown_field_suggests_the_closest_name():
  config = experiment.default_config('lastfm')
  config.unlock()
  config.train_seed = (0,)
  with pytest.raises(configlib.ConfigError, match="'train_seed'; did you mean 'train_seeds'"):
    experiment.validate(config)
  config = experiment.default_config('lastfm')
  config.sasrec.unlock()
  config.sasrec.hiden = 3
  with pytest.raises(configlib.ConfigError, match="'sasrec.hiden'; did you mean 'sasrec.hidden'"):
    experiment.validate(config)


@pytest.mark.parametrize(
  'field, value, message',
  [
    ('dataset', 'netflix', "'dataset': expected one of"),
    ('split', 'train', "'split': expected one of"),
    ('candidate_seeds', (), "'candidate_seeds': expected a non-empty list"),
    ('train_seeds', (-1,), "'train_seeds': expected a non-empty list of integers >= 0"),
  ],
)
def test_bad_values_name_the_field(field, value, message):
  config = experiment.default_config('lastfm')
  config[field] = value
  with pytest.raises(configlib.ConfigError, match=message):
    experiment.validate(config)


def test_bad_nested_values_name_the_field():
  config = experiment.default_config('lastfm')
  config.train.learning_rate = -1.0
  with pytest.raises(configlib.ConfigError, match='learning_rate must be > 0'):
    experiment.validate(config)
  config = experiment.default_config('lastfm')
  config.sasrec.num_heads = 3
  with pytest.raises(configlib.ConfigError, match='num_heads'):
    experiment.validate(config)


def test_check_types_holds_every_field_to_its_defaults_kind():
  import ml_collections

  defaults = ml_collections.ConfigDict(
    {'steps': 1, 'rate': 0.5, 'on': True, 'name': 'x', 'sizes': (1,), 'group': {'scale': 1.0}}
  )
  configlib.check_types(ml_collections.ConfigDict({'steps': 2, 'rate': 3, 'group': {'scale': 2.0}}), defaults)
  for field, value, expected in (
    ('steps', 1.5, 'an int'),
    ('steps', True, 'an int'),
    ('rate', 'x', 'a finite number'),
    ('rate', float('inf'), 'a finite number'),
    ('on', 1, 'a bool'),
    ('name', 3, 'a string'),
    ('sizes', 'x', 'a list'),
    ('group.scale', float('nan'), 'a finite number'),
  ):
    config = ml_collections.ConfigDict(defaults.to_dict())
    group, _, name = field.rpartition('.')
    target = config[group] if group else config
    with target.ignore_type():
      target[name] = value
    with pytest.raises(configlib.ConfigError, match=rf"Config field '{field}': expected {expected}"):
      configlib.check_types(config, defaults)


def test_a_run_folder_is_not_a_shared_place(tmp_path, monkeypatch):
  cwd = tmp_path / 'clone'
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  assert configlib.require_folder('workdir', 'runs/x') == cwd / 'runs' / 'x'
  assert configlib.require_folder('warm_start.folder', '', allow_empty=True) is None
  for value, reason in (
    ('/', 'the file-system root'),
    ('.', 'the current directory'),
    ('..', 'a parent of the current directory'),
    ('runs/..', 'the current directory'),
    (str(pathlib.Path.home()), 'the home folder'),
  ):
    with pytest.raises(configlib.ConfigError, match=rf"'workdir': expected a folder of its own .*\({reason}"):
      configlib.require_folder('workdir', value)
  for value in ('', 'runs/\x00x', 'a\nb', 3):
    with pytest.raises(configlib.ConfigError, match="'workdir': expected a folder path"):
      configlib.require_folder('workdir', value)
