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


@pytest.mark.parametrize('field, value, message', [
    ('dataset', 'netflix', "'dataset': expected one of"),
    ('split', 'train', "'split': expected one of"),
    ('candidate_seeds', (), "'candidate_seeds': expected a non-empty list"),
    ('train_seeds', (-1,), "'train_seeds': expected a non-empty list of integers >= 0"),
])
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
