"""LoRA adapters on one frozen base: identity at init, isolation between named adapters, per-row adapter
choice in one batch, KV-cache decode, merging for export, optimizer updates that touch adapters only, and
the base weights held once however many adapters there are."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from coars_jax.models import (
  ADAPTERS_OFF,
  BASE_PARAMS,
  Decoder,
  DecoderConfig,
  LoRAConfig,
  add_lora,
  init_cache,
  load_hf_checkpoint,
  merge_lora,
  save_hf_checkpoint,
)
from coars_jax.models import lora
from coars_jax.models.lora import LORA_AXIS_NAMES, TARGET_MODULES, adapted_linears, targeted_linears
from coars_jax.models.logical_axes import AXIS_NAMES
from tests.tolerances import decoder_sums, gamma, relative_error

CONFIG = DecoderConfig(
  architecture='qwen3',
  vocab_size=64,
  embed_dim=32,
  mlp_dim=48,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  qkv_bias=True,
  out_bias=True,
  qk_norm=True,
  tie_word_embeddings=False,
)
LORA = LoRAConfig(rank=4, alpha=8.0)
NAMES = ('recommender', 'user')
RECOMMENDER, USER = 0, 1

# Both jitted: eager and jitted runs of the same model differ in the last float32 bit.
forward = nnx.jit(lambda model, tokens, positions, adapter_ids: model(tokens, positions, adapter=adapter_ids)[0])
base_forward = nnx.jit(lambda model, tokens, positions: model(tokens, positions)[0])


def _model(lora_config=LORA, seed=0):
  return add_lora(Decoder(CONFIG, rngs=nnx.Rngs(seed)), lora_config, NAMES, rngs=nnx.Rngs(seed + 100))


def _perturb_b(model, index, seed):
  """Random B for adapter `index` on every projection (B starts at zero, which hides most mistakes)."""
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  for _, linear in adapted_linears(model):
    b = linear.lora.b.get_value()
    linear.lora.b.set_value(b.at[index].set(0.2 * jax.random.normal(next(keys), b.shape[1:], b.dtype)))


def _batch(batch=3, length=6, seed=0):
  tokens = np.random.default_rng(seed).integers(1, CONFIG.vocab_size, size=(batch, length)).astype(np.int32)
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
  return jnp.asarray(tokens), jnp.asarray(positions)


def _ids(*values):
  return jnp.asarray(values, jnp.int32)


def test_config_validates_fields():
  with pytest.raises(ValueError, match=r"unknown module names \['qkv'\]; valid names are \('q_proj'"):
    LoRAConfig(rank=2, alpha=4.0, target_modules=('q_proj', 'qkv'))
  with pytest.raises(ValueError, match='LoRAConfig.rank: expected a positive int, found 0'):
    LoRAConfig(rank=0, alpha=4.0)
  with pytest.raises(ValueError, match='LoRAConfig.dropout'):
    LoRAConfig(rank=2, alpha=4.0, dropout=1.0)
  with pytest.raises(TypeError):
    LoRAConfig(2, 4.0)  # keyword-only
  config = LoRAConfig(rank=4, alpha=2.0, target_modules=['v_proj', 'down_proj'])
  assert config.scaling == 0.5 and config.target_modules == ('v_proj', 'down_proj')
  assert LoRAConfig.from_dict(config.to_dict()) == config


def test_adapter_params_are_lora_params_with_logical_axes():
  model = _model(LoRAConfig(rank=4, alpha=8.0, target_modules=('q_proj', 'o_proj', 'up_proj')))
  lora_state = dict(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))
  assert len(lora_state) == CONFIG.num_layers * 3 * 2  # a and b per targeted projection
  for path, variable in lora_state.items():
    assert type(variable) is nnx.LoRAParam, path
    names = variable.get_metadata()['out_sharding']
    assert len(names) == variable.get_value().ndim and set(names) <= set(AXIS_NAMES + LORA_AXIS_NAMES), path
  q = model.layers[0].attention.q_proj.lora
  chex.assert_shape(q.a.get_value(), (2, CONFIG.embed_dim, 4))
  chex.assert_shape(q.b.get_value(), (2, 4, CONFIG.num_heads, CONFIG.head_dim))
  assert q.a.get_metadata()['out_sharding'] == ('adapter', 'embed', 'lora_rank')
  assert q.b.get_metadata()['out_sharding'] == ('adapter', 'lora_rank', 'heads', 'head_dim')
  o = model.layers[1].attention.o_proj.lora
  assert o.a.get_metadata()['out_sharding'] == ('adapter', 'heads', 'head_dim', 'lora_rank')
  assert model.layers[0].attention.k_proj.lora is None  # not targeted


def test_zero_initialised_adapters_give_the_base_logits():
  base = Decoder(CONFIG, rngs=nnx.Rngs(0))
  tokens, positions = _batch()
  base_logits = np.asarray(base_forward(base, tokens, positions))
  model = add_lora(base, LORA, NAMES, rngs=nnx.Rngs(1))
  assert np.abs(np.asarray(model.layers[0].mlp.up_proj.lora.a.get_value())).max() > 0  # A is random, B is 0
  off = np.asarray(forward(model, tokens, positions, _ids(-1, -1, -1)))
  # Against a separately compiled base graph XLA may fuse differently (last-bit differences); within one
  # graph a zero delta is exact.
  np.testing.assert_allclose(off, base_logits, atol=1e-6, rtol=0)
  for ids in (_ids(RECOMMENDER, RECOMMENDER, RECOMMENDER), _ids(USER, USER, USER)):
    np.testing.assert_array_equal(np.asarray(forward(model, tokens, positions, ids)), off)
  np.testing.assert_array_equal(np.asarray(base_forward(model, tokens, positions)), base_logits)


def test_perturbing_one_adapter_changes_only_that_adapter():
  model = _model()
  tokens, positions = _batch()
  before = {
    name: np.asarray(forward(model, tokens, positions, _ids(*[index] * 3)))
    for name, index in (('recommender', RECOMMENDER), ('user', USER), ('off', ADAPTERS_OFF))
  }
  _perturb_b(model, USER, seed=1)
  after = {
    name: np.asarray(forward(model, tokens, positions, _ids(*[index] * 3)))
    for name, index in (('recommender', RECOMMENDER), ('user', USER), ('off', ADAPTERS_OFF))
  }
  assert np.abs(after['user'] - before['user']).max() > 1e-3
  np.testing.assert_array_equal(after['recommender'], before['recommender'])
  np.testing.assert_array_equal(after['off'], before['off'])
  np.testing.assert_allclose(np.asarray(base_forward(model, tokens, positions)), before['off'], atol=1e-6, rtol=0)


def test_adapter_by_name_equals_adapter_by_index():
  model = _model()
  _perturb_b(model, RECOMMENDER, seed=2)
  tokens, positions = _batch()
  by_name = np.asarray(model(tokens, positions, adapter='recommender')[0])
  by_index = np.asarray(model(tokens, positions, adapter=_ids(RECOMMENDER, RECOMMENDER, RECOMMENDER))[0])
  np.testing.assert_array_equal(by_name, by_index)


def test_mixed_rows_in_one_batch_equal_separate_calls():
  model = _model()
  _perturb_b(model, RECOMMENDER, seed=3)
  _perturb_b(model, USER, seed=4)
  tokens, positions = _batch(batch=4)
  mixed = np.asarray(forward(model, tokens, positions, _ids(USER, ADAPTERS_OFF, RECOMMENDER, USER)))
  separate = {
    index: np.asarray(forward(model, tokens, positions, _ids(*[index] * 4)))
    for index in (RECOMMENDER, USER, ADAPTERS_OFF)
  }
  for row, index in enumerate((USER, ADAPTERS_OFF, RECOMMENDER, USER)):
    np.testing.assert_allclose(mixed[row], separate[index][row], atol=1e-6, rtol=0)
  assert np.abs(separate[USER] - separate[RECOMMENDER]).max() > 1e-3  # the rows really differ


def test_one_compilation_serves_every_adapter_and_the_reference():
  model = _model()
  traces = []

  @nnx.jit
  def step(model, tokens, positions, adapter_ids):
    traces.append(1)
    return model(tokens, positions, adapter=adapter_ids)[0]

  tokens, positions = _batch(batch=2)
  for ids in (_ids(0, 0), _ids(1, 1), _ids(-1, -1), _ids(1, 0)):
    step(model, tokens, positions, ids)
  assert len(traces) == 1


def test_kv_cache_decode_with_adapters_equals_full_forward():
  model = _model()
  _perturb_b(model, RECOMMENDER, seed=5)
  _perturb_b(model, USER, seed=6)
  ids = _ids(RECOMMENDER, USER, ADAPTERS_OFF)
  tokens, positions = _batch(batch=3, length=7, seed=7)
  full = np.asarray(forward(model, tokens, positions, ids))
  off = np.asarray(forward(model, tokens, positions, _ids(-1, -1, -1)))
  assert np.abs(full[:2] - off[:2]).max() > 1e-3  # the adapters act on this batch

  cached_forward = nnx.jit(
    lambda model, tokens, positions, cache, ids: model(tokens, positions, None, cache, adapter=ids)
  )
  cache = init_cache(CONFIG, batch=3, max_len=8)
  logits, cache = cached_forward(model, tokens[:, :4], positions[:, :4], cache, ids)
  pieces = [np.asarray(logits)]
  for step in range(4, 7):
    logits, cache = cached_forward(model, tokens[:, step : step + 1], positions[:, step : step + 1], cache, ids)
    pieces.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-5, rtol=0)


def test_merged_weights_give_the_adapter_logits(tmp_path):
  model = _model()
  _perturb_b(model, RECOMMENDER, seed=8)
  _perturb_b(model, USER, seed=9)
  merged = merge_lora(model, 'user')
  # Untargeted parameters are shared with the adapted model, not copied (checked before any nnx.jit call,
  # which writes fresh output buffers back into the model).
  merged_q, adapted_q = merged.layers[0].attention.q_proj, model.layers[0].attention.q_proj
  assert merged.token_embedding.embedding.get_value() is model.token_embedding.embedding.get_value()
  assert merged_q.bias.get_value() is adapted_q.bias.get_value()
  assert merged_q.kernel.get_value() is not adapted_q.kernel.get_value()

  tokens, positions = _batch()
  for name, index in (('recommender', RECOMMENDER), ('user', USER)):
    merged = merge_lora(model, name)
    assert not merged.adapter_names and not nnx.state(merged, nnx.LoRAParam)
    adapter_logits = np.asarray(forward(model, tokens, positions, _ids(*[index] * 3)))
    np.testing.assert_allclose(np.asarray(merged(tokens, positions)[0]), adapter_logits, atol=1e-5, rtol=0)
    assert np.abs(np.asarray(merged(tokens, positions)[0]) - np.asarray(model(tokens, positions)[0])).max() > 1e-3

  # The merged model is what the HF export takes; reloading it gives the adapter's logits again.
  save_hf_checkpoint(model, tmp_path / 'merged', merge_adapter='user')
  reloaded = load_hf_checkpoint(tmp_path / 'merged')
  np.testing.assert_allclose(
    np.asarray(reloaded(tokens, positions)[0]),
    np.asarray(forward(model, tokens, positions, _ids(USER, USER, USER))),
    atol=1e-5,
    rtol=0,
  )


def test_optimizer_on_lora_params_leaves_the_base_bit_identical():
  model = _model()
  base_before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, BASE_PARAMS)))
  lora_before = {
    path: np.array(variable.get_value()) for path, variable in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
  }
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
  lora_size = sum(x.size for x in lora_before.values())
  assert sum(x.size for x in jax.tree.leaves(optimizer.opt_state) if x.ndim) == 2 * lora_size  # Adam mu, nu

  tokens, positions = _batch(batch=2)
  ids = _ids(RECOMMENDER, RECOMMENDER)  # a recommender-only batch: the user adapter must not move

  @nnx.jit
  def train_step(model, optimizer):
    def loss_fn(model):
      logits = model(tokens, positions, adapter=ids)[0]
      return -jnp.mean(jax.nn.log_softmax(logits)[..., 3])

    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)
    return grads

  grads = train_step(model, optimizer)
  for path, variable in nnx.to_flat_state(grads):
    assert type(variable) is nnx.LoRAParam, path  # no gradient was even computed for the base

  base_after = nnx.to_pure_dict(nnx.state(model, BASE_PARAMS))
  jax.tree.map(np.testing.assert_array_equal, base_after, base_before)
  lora_after = nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
  assert len(lora_after) == len(lora_before)
  for path, variable in lora_after:
    after, before = np.asarray(variable.get_value()), lora_before[path]
    np.testing.assert_array_equal(after[USER], before[USER], err_msg=str(path))
    if path[-1] == 'b':  # with B = 0, dL/dA = 0 on the first step; B of the used adapter must move
      assert np.abs(after[RECOMMENDER] - before[RECOMMENDER]).max() > 0, path


def test_base_kernels_are_held_once_and_not_copied():
  base = Decoder(CONFIG, rngs=nnx.Rngs(0))
  kernels_before = {path: linear.kernel.get_value() for path, linear in targeted_linears(base, TARGET_MODULES)}
  base_ids_before = {id(x) for x in jax.tree.leaves(nnx.state(base, nnx.Param))}
  model = add_lora(base, LORA, NAMES, rngs=nnx.Rngs(1))
  assert model is base
  for path, linear in targeted_linears(model, TARGET_MODULES):
    assert linear.kernel.get_value() is kernels_before[path], path
  assert {id(x) for x in jax.tree.leaves(nnx.state(model, BASE_PARAMS))} == base_ids_before

  # Two adapters cost their A and B only: one stack per projection, nothing base-sized.
  lora_size = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
  E, F, H, K, D, r = CONFIG.embed_dim, CONFIG.mlp_dim, CONFIG.num_heads, CONFIG.num_kv_heads, CONFIG.head_dim, 4
  per_layer = r * ((E + H * D) + 2 * (E + K * D) + (H * D + E) + 2 * (E + F) + (F + E))
  assert lora_size == len(NAMES) * CONFIG.num_layers * per_layer


def test_dropout_is_off_in_a_deterministic_view_and_on_otherwise():
  model = _model(LoRAConfig(rank=4, alpha=8.0, dropout=0.5))
  _perturb_b(model, USER, seed=10)
  reference = _model()
  nnx.update(reference, nnx.state(model, nnx.Param))
  tokens, positions = _batch()
  ids = _ids(USER, USER, ADAPTERS_OFF)
  evaluated = np.asarray(nnx.view(model, deterministic=True)(tokens, positions, adapter=ids)[0])
  np.testing.assert_allclose(evaluated, np.asarray(reference(tokens, positions, adapter=ids)[0]), atol=1e-6)
  trained = np.asarray(model(tokens, positions, adapter=ids)[0])
  assert np.abs(trained[:2] - evaluated[:2]).max() > 1e-3
  np.testing.assert_array_equal(trained[2], evaluated[2])  # rows without an adapter see no dropout


def test_bad_adapter_choices_are_reported():
  model = _model()
  tokens, positions = _batch(batch=2)
  with pytest.raises(ValueError, match=r"adapter must be one of \('recommender', 'user'\), found 'critic'"):
    model(tokens, positions, adapter='critic')
  with pytest.raises(ValueError, match=r'must lie in \[-1, 2\).*found values in \[0, 2\]'):
    model(tokens, positions, adapter=_ids(0, 2))
  with pytest.raises(ValueError, match=r'integer \[2\]'):
    model(tokens, positions, adapter=_ids(0, 1, 1))
  with pytest.raises(ValueError, match='has no LoRA adapters'):
    Decoder(CONFIG, rngs=nnx.Rngs(0))(tokens, positions, adapter='user')
  with pytest.raises(ValueError, match='already has adapters'):
    add_lora(model, LORA, ('critic',), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='distinct non-empty strings'):
    add_lora(Decoder(CONFIG, rngs=nnx.Rngs(0)), LORA, ('user', 'user'), rngs=nnx.Rngs(0))


def test_bfloat16_base_keeps_float32_adapters_and_bfloat16_activations():
  config = CONFIG.replace(param_dtype='bfloat16', compute_dtype='bfloat16')
  model = add_lora(Decoder(config, rngs=nnx.Rngs(0)), LORA, NAMES, rngs=nnx.Rngs(1))
  chex.assert_type(model.layers[0].attention.q_proj.kernel.get_value(), jnp.bfloat16)
  chex.assert_type(model.layers[0].attention.q_proj.lora.b.get_value(), jnp.float32)
  _perturb_b(model, USER, seed=11)
  tokens, positions = _batch()
  logits = forward(model, tokens, positions, _ids(USER, ADAPTERS_OFF, USER))
  chex.assert_type(logits, jnp.bfloat16)
  logits = np.asarray(logits, np.float32)
  assert np.isfinite(logits).all() and np.abs(logits[0] - logits[1]).max() > 1e-2


# --- adapters on chosen layers ---------------------------------------------------------------------------------

DEEP = DecoderConfig(
  architecture='llama', vocab_size=64, embed_dim=32, mlp_dim=48, num_layers=6, num_heads=4, num_kv_heads=2, head_dim=8
)


def test_layer_specs_resolve_to_indices():
  from coars_jax.models.lora import layer_indices

  assert layer_indices('all', 30) == tuple(range(30))
  assert layer_indices('top_third', 30) == tuple(range(20, 30))
  assert layer_indices('top_half', 5) == (3, 4)
  assert layer_indices('top:4', 30) == (26, 27, 28, 29)
  assert layer_indices('2-4', 30) == (2, 3, 4)
  assert layer_indices('7, 1', 30) == (1, 7)
  for bad in ('', 'top:0', '4-2', 'bottom', '1,1', '-1'):
    with pytest.raises(ValueError, match='LoRAConfig.layers'):
      LoRAConfig(rank=2, alpha=4.0, layers=bad)
  with pytest.raises(ValueError, match='names layer 9 of a 6-layer model'):
    add_lora(Decoder(DEEP, rngs=nnx.Rngs(0)), LoRAConfig(rank=2, alpha=4.0, layers='9'), NAMES, rngs=nnx.Rngs(1))
  assert LoRAConfig.from_dict({'rank': 2, 'alpha': 4.0}).layers == 'all'  # checkpoints from before the field


def _grad_of_top_adapters(model, tokens, positions, weights):
  """d/d(adapters) of a fixed linear function of the logits, as {path: grad} for the adapted layers >= 4."""

  def loss(lora, rest):
    logits = nnx.merge(graphdef, lora, rest)(tokens, positions, adapter=_ids(RECOMMENDER, USER, RECOMMENDER))[0]
    return jnp.sum(logits * weights)

  graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
  grads = jax.jit(jax.grad(loss))(lora, rest)
  return {path: value.get_value() for path, value in nnx.to_flat_state(grads) if path[1] >= 4}


def test_adapters_on_top_layers_get_the_gradients_of_the_full_backward_pass():
  """Adapters on layers 4-5 only: the backward pass stops at layer 4, and their gradients equal those of the same
  adapters in a model adapted on every layer (lower adapters at B = 0, so the function is the same), whose
  backward pass runs through all six layers."""
  top = add_lora(
    Decoder(DEEP, rngs=nnx.Rngs(0)), LoRAConfig(rank=4, alpha=8.0, layers='top:2'), NAMES, rngs=nnx.Rngs(1)
  )
  assert {path.split('.')[1] for path, _ in adapted_linears(top)} == {'4', '5'}
  assert all(linear.lora is None for _, linear in targeted_linears(top, TARGET_MODULES, range(4)))
  assert top.lowest_adapted_layer == 4
  _perturb_b(top, RECOMMENDER, seed=3)
  _perturb_b(top, USER, seed=4)
  full = add_lora(Decoder(DEEP, rngs=nnx.Rngs(0)), LoRAConfig(rank=4, alpha=8.0), NAMES, rngs=nnx.Rngs(1))
  assert full.lowest_adapted_layer == 0
  top_state = dict(nnx.to_flat_state(nnx.state(top, nnx.LoRAParam)))
  for path, variable in nnx.to_flat_state(nnx.state(full, nnx.LoRAParam)):
    if path in top_state:
      variable.set_value(top_state[path].get_value())
  tokens, positions = _batch(batch=3, length=7, seed=5)
  np.testing.assert_allclose(
    forward(top, tokens, positions, _ids(0, 1, 0)), forward(full, tokens, positions, _ids(0, 1, 0)), atol=1e-5
  )
  weights = jax.random.normal(jax.random.key(6), (3, 7, DEEP.vocab_size))
  ours = _grad_of_top_adapters(top, tokens, positions, weights)
  reference = _grad_of_top_adapters(full, tokens, positions, weights)
  assert ours.keys() == reference.keys() and len(ours) == 2 * 7 * 2  # 2 layers x 7 projections x (a, b)
  # The two graphs compute the same function with their float32 sums fused and ordered differently, so single
  # entries near zero differ by more than an entrywise tolerance can promise (3.5e-6 on 0.0095 on one machine),
  # while each leaf's norm moves by rounding only: gamma(n) with n = 879 (tests/tolerances.py) is 1.0e-4;
  # measured <= 7.3e-7 on 2-core x86.
  bound = gamma(decoder_sums(DEEP, length=7, positions=3 * 7))
  for path in ours:
    assert float(jnp.abs(ours[path]).max()) > 0, path
    assert relative_error(ours[path], reference[path]) <= bound, path
  # Strict enough for real errors: the gradient without one token's term (min 0.18 per leaf), another layer's
  # gradient (about 1), the gradient scaled by 1.01 (1e-2), each fails on every leaf.
  missing_token = _grad_of_top_adapters(full, tokens, positions, weights.at[0, -1].set(0.0))
  for path in ours:
    other_layer = (path[0], 9 - path[1]) + path[2:]  # layer 4 <-> 5
    for wrong in (missing_token[path], ours[other_layer], 1.01 * ours[path]):
      assert relative_error(wrong, reference[path]) > 10 * bound, path
  # Merging an adapter touches the adapted layers only.
  merged = merge_lora(top, 'recommender')
  np.testing.assert_array_equal(merged.layers[0].mlp.up_proj.kernel[...], top.layers[0].mlp.up_proj.kernel[...])
  assert not np.array_equal(merged.layers[5].mlp.up_proj.kernel[...], top.layers[5].mlp.up_proj.kernel[...])


def test_rematerialised_layers_give_the_same_values_and_gradients():
  model = _model()
  _perturb_b(model, RECOMMENDER, seed=7)
  tokens, positions = _batch(batch=2, length=5, seed=8)
  weights = jax.random.normal(jax.random.key(9), (2, 5, CONFIG.vocab_size))
  graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

  def loss(lora, remat):
    logits = nnx.merge(graphdef, lora, rest)(tokens, positions, adapter=_ids(0, 1), remat=remat)[0]
    return jnp.sum(logits * weights)

  plain = jax.jit(jax.value_and_grad(loss), static_argnums=1)(lora, False)
  remat = jax.jit(jax.value_and_grad(loss), static_argnums=1)(lora, True)
  np.testing.assert_allclose(plain[0], remat[0], rtol=1e-5)
  # Another graph, other float32 sum orders: leaf by leaf norm-relative, gamma(n) with n = 356 (tests/tolerances.py)
  # is 4.2e-5 (measured <= 1.9e-6 on 2-core x86), where an entrywise atol would not bound entries near zero.
  bound = gamma(decoder_sums(CONFIG, length=5, positions=2 * 5))
  plain_grads, remat_grads = dict(nnx.to_flat_state(plain[1])), dict(nnx.to_flat_state(remat[1]))
  assert plain_grads.keys() == remat_grads.keys()
  for path, value in plain_grads.items():
    assert relative_error(remat_grads[path].get_value(), value.get_value()) <= bound, path
  # A wrong layer's gradient fails it.
  wrong = plain_grads[('layers', 1) + path[2:]] if path[1] == 0 else plain_grads[('layers', 0) + path[2:]]
  assert relative_error(wrong.get_value(), value.get_value()) > 10 * bound


def test_extend_lora_adds_identity_adapters_and_keeps_the_old_ones():
  from coars_jax.models.lora import extend_lora

  model = add_lora(
    Decoder(DEEP, rngs=nnx.Rngs(0)), LoRAConfig(rank=4, alpha=8.0, layers='top:2'), NAMES, rngs=nnx.Rngs(1)
  )
  _perturb_b(model, USER, seed=2)
  tokens, positions = _batch(batch=2, length=5, seed=3)
  before = forward(model, tokens, positions, _ids(1, 0))
  kept = np.array(model.layers[5].mlp.up_proj.lora.b.get_value())
  extend_lora(model, 'all', rngs=nnx.Rngs(4))
  assert model.lowest_adapted_layer == 0 and len(list(adapted_linears(model))) == 6 * 7
  np.testing.assert_allclose(forward(model, tokens, positions, _ids(1, 0)), before, atol=1e-6)
  np.testing.assert_array_equal(model.layers[5].mlp.up_proj.lora.b.get_value(), kept)
  with pytest.raises(ValueError, match='drop adapted layers'):
    extend_lora(model, 'top:1', rngs=nnx.Rngs(5))


@pytest.mark.parametrize('out_shape', [(12,), (3, 4)])
def test_up_projection_gradient_equals_autodiff_and_copies_no_token_major_gradient(out_shape):
  """`up_project`'s custom VJP is the contraction's own gradient (same products, so equal to float rounding), and
  its compiled gradient for b no longer copies the output's gradient transposed (the copy the VJP exists to avoid)."""
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  projected = jax.random.normal(keys[0], (2, 7, 3, 4))
  b = jax.random.normal(keys[1], (3, 4, *out_shape))
  weight = jax.random.normal(keys[2], (2, 7, *out_shape))

  def plain(projected, b):
    return jax.lax.dot_general(projected, b, (((2, 3), (0, 1)), ((), ())))

  def objective(up):
    return lambda projected, b: jnp.sum(jnp.sin(up(projected, b)) * weight)

  chex.assert_trees_all_close(lora.up_project(projected, b), plain(projected, b), rtol=1e-6, atol=1e-6)
  ours = jax.grad(objective(lora.up_project), argnums=(0, 1))(projected, b)
  reference = jax.grad(objective(plain), argnums=(0, 1))(projected, b)
  # Scale: the gradients are sums of 7-14 products of unit normals; float32 reordering moves them by ~1e-6.
  chex.assert_trees_all_close(ours, reference, rtol=1e-5, atol=1e-5)
  wrong = jax.grad(objective(lambda p, b: plain(p, b * 1.001)), argnums=1)(projected, b)
  assert not np.allclose(wrong, reference[1], rtol=1e-5, atol=1e-5)

  big_projected, big_b = jnp.ones((1, 2048, 2, 8)), jnp.ones((2, 8, 1536))
  big_out = jnp.ones((1, 2048, 1536))

  def transposed_copies(up):
    text = jax.jit(jax.grad(lambda b, p, g: jnp.sum(up(p, b) * g))).lower(big_b, big_projected, big_out)
    return [line for line in text.compile().as_text().splitlines() if ' copy(' in line and '1536,1,2048' in line]

  assert transposed_copies(plain), 'the autodiff baseline no longer copies: this test has lost its point'
  assert not transposed_copies(lora.up_project)


def test_up_project_vjp_flag_chooses_the_baseline_with_the_same_adapter_gradients(monkeypatch):
  """`lora.UP_PROJECT_VJP` (read at trace time; the benchmark's autodiff baseline when False) changes how b's
  gradient is formed, not its value: a model's adapter gradients agree either way (reordered float32 sums)."""
  model = add_lora(Decoder(DEEP, rngs=nnx.Rngs(0)), LoRAConfig(rank=4, alpha=8.0), NAMES, rngs=nnx.Rngs(1))
  _perturb_b(model, USER, seed=2)
  tokens, positions = _batch(batch=2, length=5, seed=3)
  graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)

  def gradient():
    def loss(params, rest):
      logits = nnx.merge(graphdef, params, rest)(tokens, positions, adapter=_ids(1, 0))[0]
      return jnp.sum(jnp.square(logits))

    return jax.jit(jax.grad(loss))(params, rest)  # a fresh jit each time: the flag is read when tracing

  ours = gradient()
  monkeypatch.setattr(lora, 'UP_PROJECT_VJP', False)
  baseline = gradient()
  norm = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(baseline))
  assert norm > 0
  # Scale: float32 sums over a 5-layer model's few hundred products reorder by ~1e-6 of the largest entry.
  chex.assert_trees_all_close(ours, baseline, rtol=1e-4, atol=1e-5 * norm)
