"""The CoARS ablations (`experiment.ABLATIONS`): each changes exactly one field of the coars config, is picked by the
config files' argument as 'coars-<name>', is labelled by `row_label`, and (for the outcome reward) changes the reward
alone: both agents' segments and every turn stay in the loss, while the outcome-RL baseline keeps its terminal,
recommender-only rows."""

import importlib

import ml_collections
import numpy as np
import pytest

from coars_jax.pipeline import experiment as ex
from coars_jax.training import rl

CONFIG_FILES = ('lastfm_smollm2', 'movielens_smollm2', 'instruments_smollm2')


def flat(config, prefix=''):
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def differing(a, b) -> dict:
  a, b = flat(a), flat(b)
  assert set(a) == set(b)
  return {key: (a[key], b[key]) for key in a if a[key] != b[key] or type(a[key]) is not type(b[key])}


@pytest.mark.parametrize('name', list(ex.ABLATIONS))
def test_each_ablation_changes_exactly_one_field(name):
  coars = ex.default_config('lastfm', 'tiny', 'coars')
  ablated = ex.with_ablation(coars, name)
  ((field, (before, after)),) = differing(coars, ablated).items()
  assert {field: after} == ex.ABLATIONS[name] and before != after
  assert flat(coars) == flat(ex.default_config('lastfm', 'tiny', 'coars'))  # the input is not modified
  assert ex.row_label(ablated) == f'coars-{name}' and ex.row_label(coars) == 'coars'
  ex.validate(ablated)


@pytest.mark.parametrize('module', CONFIG_FILES)
def test_config_files_pick_an_ablation_by_argument(module):
  get_config = importlib.import_module(f'configs.{module}').get_config
  coars = get_config('coars')
  for name, fields in ex.ABLATIONS.items():
    config = get_config(f'coars-{name}')
    ex.validate(config)
    diff = differing(coars, config)
    # Besides the ablation's one field, only the default workdir differs (each run writes its own folder).
    assert diff.pop('workdir') == (coars.workdir, f'{coars.workdir}-{name}')
    assert {field: after for field, (_, after) in diff.items()} == fields
    assert config.method == 'coars' and ex.row_label(config) == f'coars-{name}'


def test_bad_ablation_names_are_refused():
  with pytest.raises(ValueError, match=r"unknown ablation 'no_kl'; expected one of \('outcome_reward'"):
    ex.default_config('lastfm', 'tiny', 'coars-no_kl')
  with pytest.raises(ValueError, match='apply to coars only'):
    ex.default_config('lastfm', 'tiny', 'outcome_rl-no_sd')
  with pytest.raises(ValueError, match="applies to method='coars'"):
    ex.with_ablation(ex.default_config('lastfm', 'tiny', 'judge_rl'), 'no_sd')


def two_episodes():
  """Rollout rows of two episodes (windows 0 and 1): A has 2 turns and a final hit, with an invalid user message at
  turn 1; B has 1 turn, a miss the user starred (which the interaction reward would exclude). Plus 2 padding rows."""
  real = np.array([1] * 6 + [0] * 2, bool)
  return {
    'hit': np.array([0, 0, 1, 1, 0, 0, 0, 0], bool),
    'acceptance_score': np.array([0.375, 0.375, 0.9, 0.9, 0.6, 0.6, 0, 0], np.float32),
    'peer_similarity': np.zeros(8, np.float32),
    'action': np.array([1, 1, 3, 3, 2, 2, 0, 0], np.int32),
    'turn': np.array([1, 1, 2, 2, 1, 1, 1, 1], np.int32),
    'agent': np.array([0, 1] * 4, np.int32),
    'valid': np.array([1, 0, 1, 1, 1, 1, 1, 1], bool),
    'final_hit': np.array([1, 1, 1, 1, 0, 0, 0, 0], bool),
    'last_turn': np.array([2, 2, 2, 2, 1, 1, 1, 1], np.int32),
    'judge_probability': np.zeros(8, np.float32),
    'group': np.array([0, 0, 0, 0, 1, 1, 0, 0], np.int32),
    'real': real,
  }


def rewards_of(method: str):
  settings = ex.rl_config(ex.default_config('lastfm', 'tiny', method))
  return settings, tuple(np.asarray(a) for a in rl.rollout_rewards(two_episodes(), **settings.reward_options()))


def test_outcome_reward_under_coars_keeps_user_segments_and_every_turn():
  settings, (reward, _, included) = rewards_of('coars-outcome_reward')
  assert settings.train_user_agent and settings.lambda_sd == 0.1  # nothing else changed
  # Every real segment of both agents is included (the excluded starred miss too: that rule belongs to Eq. 7-8).
  np.testing.assert_array_equal(included, two_episodes()['real'])
  # Both agents get 2 hit_T - 1 on the final turn, 0 on earlier turns; the invalid user message gets the penalty.
  np.testing.assert_array_equal(reward, [0, -1, 1, 1, -1, -1, 0, 0])
  assert settings.max_loss_rows(max_turns=2) == settings.episodes_per_iteration * 2 * 2


def test_outcome_rl_baseline_rewards_are_unchanged():
  # The baseline: the final recommender turn only, +-1, the user neither rewarded nor penalised, one row per episode.
  settings, (reward, weight, included) = rewards_of('outcome_rl')
  np.testing.assert_array_equal(included, [0, 0, 1, 0, 1, 0, 0, 0])
  np.testing.assert_array_equal(reward, [0, 0, 1, 0, -1, 0, 0, 0])
  np.testing.assert_array_equal(weight, reward)
  assert settings.max_loss_rows(max_turns=5) == settings.episodes_per_iteration
