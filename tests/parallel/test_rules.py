"""The logical-axis rules table: defaults, config overrides, and errors that name the field."""

import pytest

from coars_jax.models.logical_axes import AXIS_NAMES
from coars_jax.parallel import rules


def test_default_rules_cover_every_logical_axis_once():
  table = dict(rules.DEFAULT_RULES)
  assert sorted(table) == sorted(AXIS_NAMES) and len(rules.DEFAULT_RULES) == len(AXIS_NAMES)
  assert table['batch'] == ('data', 'fsdp') and table['embed'] == ('fsdp',)
  assert all(table[name] == ('tensor',) for name in ('heads', 'kv_heads', 'mlp', 'vocab'))
  assert all(table[name] == () for name in ('length', 'head_dim', 'adapter', 'lora_rank'))


def test_config_entries_override_the_defaults_name_by_name():
  table = dict(rules.make_rules({'embed': None, 'mlp': ['fsdp', 'tensor'], 'batch': 'data'}))
  assert table['embed'] == () and table['mlp'] == ('fsdp', 'tensor') and table['batch'] == ('data',)
  assert table['heads'] == ('tensor',)  # untouched
  assert rules.make_rules() == rules.DEFAULT_RULES


@pytest.mark.parametrize(
  'table, message',
  [
    ({'hidden': 'tensor'}, r"sharding_rules: unknown logical axis 'hidden'"),
    (
      {'mlp': 'model'},
      r"sharding_rules.mlp: expected mesh axes from \('data', 'fsdp', 'tensor'\) or None, "
      r"found 'model'",
    ),
    ({'batch': ['data', 'data']}, r'sharding_rules.batch: a mesh axis may appear once per logical axis'),
  ],
)
def test_bad_rules_name_the_field(table, message):
  with pytest.raises(ValueError, match=message):
    rules.make_rules(table)


def test_duplicate_logical_axes_are_refused():
  with pytest.raises(ValueError, match="logical axis 'embed' has more than one rule"):
    rules.validate_rules((('embed', 'fsdp'), ('embed', None)))
