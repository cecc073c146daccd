"""`Partitioning`: the rules' specs and their fallback on abstract meshes (no devices needed), then the one code
path of sampler, scorer and RL update checked on 8 fake devices against the single-device results."""

import jax
import optax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from coars_jax.models import Decoder, LoRAConfig, add_lora, get_preset
from coars_jax.models.kv_cache import init_cache
from coars_jax.parallel import Partitioning, make_rules
from tests.parallel.conftest import run_on_eight_devices
from tests.tolerances import decoder_sums, gamma, step_bound

# Log-probs, scores and the loss (magnitudes up to about 6, where one float32 ulp is 4.8e-7): about 20 ulps, and
# 10x the largest difference measured.
ATOL = 1e-5
# The update is compared leaf by leaf by norm-relative errors (`tests.tolerances.update_errors`), not entry by entry:
# sharding reorders the float32 sums of the backward pass, which moves single gradient entries near zero by amounts
# no absolute tolerance bounds (Adam's first step then turns them into up to 2 x the learning rate: adapter_diff
# reached 1.6e-5 against the old atol of 1e-5 on one machine), while a leaf's norm moves by the rounding of its
# sums. The tiny preset with multi_device's 512-token vocabulary on 20 positions x 8 rows: n = 6384,
# grad_error <= 7.6e-4 (measured <= 4.1e-6 on 2-core x86), step_error <= 1.5e-3 (measured <= 5.5e-6).
# `test_a_wrong_update_fails_the_comparison` checks that they still reject a wrong update.
GRAD_RTOL = gamma(decoder_sums(get_preset('tiny', vocab_size=512), length=20, positions=8 * 20))
STEP_RTOL = step_bound(GRAD_RTOL)


def partitioning(data, fsdp, tensor, rules=None) -> Partitioning:
  return Partitioning.create(AbstractMesh((data, fsdp, tensor), ('data', 'fsdp', 'tensor')), rules)


def test_specs_follow_the_rules_by_logical_name():
  placing = partitioning(2, 2, 2)
  assert placing.spec(('embed', 'mlp'), (256, 768)) == P('fsdp', 'tensor')
  assert placing.spec(('adapter', 'embed', 'lora_rank'), (2, 256, 4)) == P(None, 'fsdp')
  assert placing.spec(('batch', 'length', 'kv_heads', 'head_dim'), (8, 12, 2, 64)) == P(
    ('data', 'fsdp'), None, 'tensor'
  )
  assert placing.spec(('adapter', 'lora_rank'), (2, 4)) == P()  # whole: no trailing Nones
  assert placing.spec(None, (3, 4)) == P() and placing.spec(('embed',), (3, 4)) == P()  # no or wrong names


def test_a_dimension_the_mesh_does_not_divide_falls_back_to_fewer_axes_then_whole():
  tensor8 = partitioning(1, 1, 8)
  # kv_heads=2 and heads=4 on tensor=8: replicated on that dimension, the other dimensions unchanged.
  assert tensor8.spec(('embed', 'kv_heads', 'head_dim'), (256, 2, 64)) == P()
  assert tensor8.spec(('heads', 'head_dim', 'embed'), (4, 64, 256)) == P()
  assert tensor8.spec(('embed', 'mlp'), (256, 768)) == P(None, 'tensor')
  # batch ('data', 'fsdp') on 2 rows over data=2 x fsdp=4: the minor axis is dropped first.
  assert partitioning(2, 4, 1).spec(('batch', 'length'), (2, 16)) == P('data')
  assert partitioning(2, 4, 1).spec(('batch', 'length'), (3, 16)) == P()
  # Axes of size 1 are left out, so a one-device mesh replicates everything.
  assert partitioning(1, 1, 1).spec(('batch', 'embed', 'mlp'), (8, 256, 768)) == P()


def test_a_mesh_axis_splits_one_dimension_only():
  placing = partitioning(2, 2, 2, make_rules({'vocab': 'fsdp'}))
  assert placing.spec(('vocab', 'embed'), (512, 256)) == P('fsdp')  # embed would reuse fsdp: kept whole
  assert placing.spec(('batch', 'length', 'embed'), (8, 4, 256)) == P(('data', 'fsdp'))


def test_activation_rules_keep_batch_axes_off_other_names_and_fall_back_by_size():
  rules = dict(partitioning(2, 2, 2).activation_rules())
  assert rules['batch'] == ('data', 'fsdp') and rules['embed'] is None and rules['mlp'] == 'tensor'
  sized = dict(partitioning(1, 1, 8).activation_rules({'batch': 8, 'heads': 4, 'kv_heads': 2, 'mlp': 768}))
  assert sized['heads'] is None and sized['kv_heads'] is None and sized['mlp'] == 'tensor'
  assert sized['batch'] is None  # data and fsdp have size 1


def test_partitioning_is_hashable_and_validates_its_rules():
  assert hash(partitioning(2, 2, 2)) == hash(partitioning(2, 2, 2))
  with pytest.raises(ValueError, match="unknown logical axis 'hidden'"):
    partitioning(2, 2, 2, (('hidden', 'tensor'),))


def test_abstract_state_optimizer_and_cache_shardings():
  config = get_preset(
    'tiny', vocab_size=64, embed_dim=32, mlp_dim=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8
  )

  def build():
    return add_lora(
      Decoder(config, rngs=nnx.Rngs(0)), LoRAConfig(rank=4, alpha=8.0), ['recommender', 'user'], rngs=nnx.Rngs(1)
    )

  _, lora, frozen = nnx.split(nnx.eval_shape(build), nnx.LoRAParam, ...)
  placing = partitioning(2, 2, 2)
  specs = {path: v.get_value().spec for path, v in nnx.to_flat_state(placing.state(frozen))}
  assert specs[('layers', 0, 'mlp', 'gate_proj', 'kernel')] == P('fsdp', 'tensor')
  assert specs[('layers', 0, 'attention', 'o_proj', 'kernel')] == P('tensor', None, 'fsdp')
  assert specs[('token_embedding', 'embedding')] == P('tensor', 'fsdp')
  adam = jax.eval_shape(optax.adam(1e-3).init, lora)
  moments = placing.optimizer(adam, lora)[0]
  lora_specs = [s.spec for s in jax.tree.leaves(placing.state(lora))]
  assert [s.spec for s in jax.tree.leaves(moments.mu)] == [s.spec for s in jax.tree.leaves(moments.nu)] == lora_specs
  assert moments.count.spec == P() and P(None, 'fsdp') in lora_specs
  cache = placing.cache(jax.eval_shape(lambda: init_cache(config, 8, 16)))
  assert cache.keys[0].spec == cache.values[0].spec == P(('data', 'fsdp'), 'tensor')  # [B, kv_heads, slots, D]
  assert cache.segment_ids.spec == P(('data', 'fsdp')) and cache.end_index.spec == P()


MESHES = ('8x1x1', '2x4x1', '2x2x2', '1x1x8')


@pytest.fixture(scope='module')
def eight_devices():
  """The tiny preset's shape with both adapters: greedy generation, scoring and one RL update, unsharded and on
  each mesh (see tests/parallel/multi_device.py)."""
  return run_on_eight_devices('equality')


def test_the_reference_run_is_decisive(eight_devices):
  assert eight_devices['devices'] == 8
  # Greedy choices won by at least 1e-3 nats, so equal tokens are not a tie broken the same way by chance.
  assert eight_devices['greedy_margin'] > 1e-3
  # The update moved every adapter leaf, by far more than the tolerance.
  assert eight_devices['adapter_change'] > 5 * ATOL


@pytest.mark.parametrize('wrong', ('learning_rate_x1.01', 'row_0_missing', 'layers_0_1_swapped'))
def test_a_wrong_update_fails_the_comparison(eight_devices, wrong):
  """The tolerances still catch real errors: a learning rate 1% off, one device's rows (a shard) left out, or one
  layer's gradient applied to another, each compared with the reference update as the meshes are."""
  errors = eight_devices['wrong_updates'][wrong]
  assert errors['step_error'] > 5 * STEP_RTOL, errors
  if wrong != 'learning_rate_x1.01':  # the same gradient, only the step size wrong
    assert errors['grad_error'] > 5 * GRAD_RTOL, errors


@pytest.mark.parametrize('mesh', MESHES)
def test_sharded_runs_equal_the_single_device_run(eight_devices, mesh):
  run = eight_devices['meshes'][mesh]
  assert run['mesh'] == dict(zip(('data', 'fsdp', 'tensor'), map(int, mesh.split('x'))))
  assert run['tokens_equal'] and run['repeat_tokens_equal']
  assert not run['retraced_on_repeat']  # the sharded programs are reused, not rebuilt, on the next call
  for key in ('sampler_log_prob_diff', 'score_diff', 'loss_diff'):
    assert run[key] <= ATOL, (key, run[key])
  assert run['grad_error'] <= GRAD_RTOL, (run['grad_error'], run['adam_mu_diff'])
  assert run['step_error'] <= STEP_RTOL, (run['step_error'], run['adapter_diff'])
  assert run['grad_norm_diff'] <= ATOL * max(1.0, eight_devices['reference_grad_norm'])


def shard_is_smaller(placement) -> bool:
  return (
    all(s <= g for s, g in zip(placement['shard_shape'], placement['shape']))
    and placement['shard_shape'] != placement['shape']
  )


def test_placements_on_2x2x2_are_what_the_rules_say(eight_devices):
  run = eight_devices['meshes']['2x2x2']
  placed = run['placements']
  assert placed['gate_kernel']['spec'] == ['fsdp', 'tensor']  # [embed, mlp]
  assert placed['gate_kernel']['shard_shape'] == [128, 384] and placed['gate_kernel']['devices'] == 8
  assert placed['k_kernel']['spec'] == ['fsdp', 'tensor'] and placed['k_kernel']['shard_shape'] == [128, 1, 64]
  assert placed['embedding']['spec'] == ['tensor', 'fsdp']  # [vocab, embed]
  assert placed['gate_lora_a']['spec'] == [None, 'fsdp'] and placed['gate_lora_b']['spec'] == [None, None, 'tensor']
  assert placed['gate_lora_a_adam_mu'] == placed['gate_lora_a']  # Adam's moments live where their adapter lives
  for name in ('gate_kernel', 'k_kernel', 'q_kernel', 'embedding', 'gate_lora_a', 'gate_lora_b'):
    assert shard_is_smaller(placed[name]), name
  assert run['cache_keys_spec'] == [['data', 'fsdp'], 'tensor']  # the head-major cache: [B, kv_heads, slots, D]
  assert run['tokens_spec'] == run['scores_spec'] == [['data', 'fsdp']]


def test_placements_fall_back_where_the_mesh_does_not_divide(eight_devices):
  placed = eight_devices['meshes']['1x1x8']['placements']
  # kv_heads=2 and heads=4 cannot be split 8 ways: those kernels stay whole; mlp=768 is split.
  assert placed['k_kernel']['spec'] == [] and placed['q_kernel']['spec'] == []
  assert placed['gate_kernel']['spec'] == [None, 'tensor'] and placed['gate_kernel']['shard_shape'] == [256, 96]
  assert eight_devices['meshes']['1x1x8']['cache_keys_spec'] == []
  fsdp = eight_devices['meshes']['2x4x1']
  assert fsdp['placements']['gate_kernel']['spec'] == ['fsdp'] and fsdp['tokens_spec'] == [['data', 'fsdp']]
  data = eight_devices['meshes']['8x1x1']
  assert all(p['spec'] == [] for p in data['placements'].values()) and data['tokens_spec'] == ['data']
