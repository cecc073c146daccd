"""The 8-fake-device half of the tests in this folder, run as `python -m tests.parallel.multi_device MODE` in a
fresh process (the device count is fixed when jax starts, and the pytest process has already started it with one
device). Prints one JSON object on its last line, which the pytest side asserts on.

MODE 'equality': the tiny preset's shape (random init, float32, adapters 'recommender' and 'user' with random B) is
run once unsharded and once on each of the meshes (data, fsdp, tensor) = (8,1,1), (2,4,1), (2,2,2), (1,1,8):
greedy generation, scoring of the generated completions, and one RL update step; the differences from the
single-device results and the placements of a few arrays are reported, and so are the same differences for three
deliberately wrong single-device updates (see `wrong_updates`), which the tolerances must reject.
MODE 'checkpoint' FOLDER: adapters and optimizer state saved with Orbax under FOLDER on (8,1,1) are restored onto
(2,2,2) with the target shardings; an `RLTrainer` built on (2,2,2) is checked to hold its arrays where the rules
say.
"""

import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from coars_jax import parallel  # noqa: E402
from coars_jax.models import Decoder, LoRAConfig, add_lora, get_preset  # noqa: E402
from coars_jax.models.kv_cache import init_cache  # noqa: E402
from coars_jax.models.lora import adapted_linears  # noqa: E402
from coars_jax.sampling import GREEDY, LengthBuckets, generate, left_pad, score, trace_counts  # noqa: E402
from coars_jax.sampling.model_inputs import inference_view  # noqa: E402
from coars_jax.sampling.scoring import MODEL_DISTRIBUTION  # noqa: E402
from coars_jax.training import rl  # noqa: E402
from tests.tolerances import update_errors  # noqa: E402

MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8))
VOCAB = 512
ROWS = 8
BUCKETS = LengthBuckets(prompt=(8, 16), completion=(4,))
ADAPTER = np.array([0, 1, 0, 1, -1, 0, 1, 0], np.int32)  # per row: recommender, user, or the base (-1)
SETTINGS = rl.StepSettings(
  lambda_sd=0.1,
  advantage_clip=1.0,
  kl_coef=0.0,
  score_params=MODEL_DISTRIBUTION,
  chunk_size=None,
  pad_token_id=0,
  max_grad_norm=1.0,
  weight_decay=0.0,
)
# Adam's first step moves every entry by about the step size whatever the gradient's scale, so entries whose gradient
# is near Adam's epsilon turn float rounding into differences of a few percent of the step; at 1e-4 those stay below
# 1e-5 while every adapter entry still moves by about 1e-4. Gradients are compared directly through Adam's first
# moment (0.1 g after one step).
LEARNING_RATE = 1e-4


def mesh_of(shape):
  return parallel.make_mesh(dict(zip(parallel.KNOWN_AXES, shape)))


def tiny_model(seed: int = 0) -> Decoder:
  """The tiny preset (4 layers, width 256, 4 heads, 2 kv heads) with a 512-token vocabulary, both adapters attached
  and their B drawn at random so that each adapter changes the outputs."""
  model = Decoder(get_preset('tiny', vocab_size=VOCAB, eos_token_ids=(), pad_token_id=0), rngs=nnx.Rngs(seed))
  add_lora(model, LoRAConfig(rank=4, alpha=8.0), ['recommender', 'user'], rngs=nnx.Rngs(seed + 1))
  rng = np.random.default_rng(seed + 2)
  for _, linear in adapted_linears(model):
    b = linear.lora.b.get_value()
    linear.lora.b.set_value(jnp.asarray(0.3 * rng.standard_normal(b.shape), b.dtype))
  return model


def host(tree):
  return jax.tree.map(np.asarray, tree)


def max_difference(a, b) -> float:
  return max(
    float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def swap_layers(tree, first: int, second: int):
  """`tree` (a pure dict of adapters or moments) with the leaves of two layers exchanged."""
  layers = dict(tree['layers'])
  layers[first], layers[second] = layers[second], layers[first]
  return dict(tree, layers=layers)


def wrong_updates(model, mesh, batch, lora_before, ref_lora, ref_mu) -> dict:
  """`update_errors` of three deliberately wrong updates against the reference: the step scaled by 1.01 (a learning
  rate 1% off), the rows of one device of the 8x1x1 mesh left out (row 0 not included: a missing shard), and the
  gradients and steps of layers 0 and 1 exchanged (a wrong layer's gradient)."""
  scaled = jax.tree.map(lambda new, old: old + 1.01 * (new - old), ref_lora, lora_before)
  missing = dict(batch, included=batch['included'].copy())
  missing['included'][0, 0] = False
  missing_lora, missing_mu, _, _ = run_update(model, mesh, missing)
  return {
    'learning_rate_x1.01': update_errors(scaled, ref_mu, ref_lora, ref_mu, lora_before),
    'row_0_missing': update_errors(missing_lora, missing_mu, ref_lora, ref_mu, lora_before),
    'layers_0_1_swapped': update_errors(
      swap_layers(ref_lora, 0, 1),
      swap_layers(ref_mu, 0, 1),
      ref_lora,
      ref_mu,
      swap_layers(lora_before, 0, 1),
      lora_before,
    ),
  }


def spec_list(spec) -> list:
  """A `PartitionSpec` as JSON: one entry per dimension, None, a mesh axis, or a list of mesh axes."""
  return [list(entry) if isinstance(entry, tuple) else entry for entry in spec]


def describe(array) -> dict:
  """Spec, global shape and the shape of one addressable shard of a placed array."""
  return {
    'spec': spec_list(array.sharding.spec),
    'shape': list(array.shape),
    'shard_shape': list(array.addressable_shards[0].data.shape),
    'devices': len(array.sharding.device_set),
  }


def update_batch(generated, rng) -> dict:
  """One microbatch (K = 1) of the update step built from the generated rows: student prompt x, completion y, a
  teacher prompt x + d (x followed by 4 random tokens), random rewards; agent = the adapter used."""
  prompt_tokens, prompt_mask = generated.prompt_tokens, generated.prompt_mask
  completion_tokens = np.asarray(generated.tokens)
  completion_mask = np.asarray(generated.mask).astype(np.int32)
  teachers = [
    list(row[mask != 0]) + list(rng.integers(1, VOCAB, size=4)) for row, mask in zip(prompt_tokens, prompt_mask)
  ]
  teacher_tokens, teacher_mask = left_pad(teachers, BUCKETS.prompt_length(max(map(len, teachers))), 0)
  agent = np.where(ADAPTER < 0, 0, ADAPTER).astype(np.int32)
  batch = {
    'prompt_tokens': prompt_tokens,
    'prompt_mask': prompt_mask,
    'completion_tokens': completion_tokens,
    'completion_mask': completion_mask,
    'adapter': agent,
    'agent': agent,
    'reward': rng.standard_normal(ROWS).astype(np.float32),
    'included': np.ones(ROWS, bool),
    'teacher_prompt_tokens': teacher_tokens,
    'teacher_prompt_mask': teacher_mask,
  }
  return {key: np.asarray(value)[None] for key, value in batch.items()}


def run_update(model: Decoder, mesh, batch) -> tuple[dict, dict, dict, dict]:
  """One update step on `mesh`: (new adapters, Adam's first moments, metrics, placements) as host values."""
  graphdef, lora, frozen = nnx.split(inference_view(model), nnx.LoRAParam, ...)
  placing = parallel.Partitioning.create(mesh)
  lora = placing.put(lora, placing.state(lora))
  frozen = placing.put(frozen, placing.state(frozen))
  init = SETTINGS.make_optimizer().init
  opt_state = jax.jit(init, out_shardings=placing.optimizer(jax.eval_shape(init, lora), lora))(lora)
  step = rl.build_update_step(graphdef, SETTINGS, mesh, True)
  new_lora, new_opt_state, metrics = step(
    lora, frozen, opt_state, batch, np.float32(4.0), np.ones(2, np.float32), np.float32(LEARNING_RATE)
  )
  frozen_flat = dict(nnx.to_flat_state(frozen))
  lora_flat = dict(nnx.to_flat_state(new_lora))
  mu = dict(nnx.to_flat_state(new_opt_state[1].mu))
  prefix = ('layers', 0, 'mlp', 'gate_proj')
  placements = {
    'gate_kernel': describe(frozen_flat[prefix + ('kernel',)].get_value()),
    'k_kernel': describe(frozen_flat[('layers', 0, 'attention', 'k_proj', 'kernel')].get_value()),
    'q_kernel': describe(frozen_flat[('layers', 0, 'attention', 'q_proj', 'kernel')].get_value()),
    'embedding': describe(frozen_flat[('token_embedding', 'embedding')].get_value()),
    'gate_lora_a': describe(lora_flat[prefix + ('lora', 'a')].get_value()),
    'gate_lora_b': describe(lora_flat[prefix + ('lora', 'b')].get_value()),
    'gate_lora_a_adam_mu': describe(mu[prefix + ('lora', 'a')].get_value()),
  }
  return (host(nnx.to_pure_dict(new_lora)), host(nnx.to_pure_dict(new_opt_state[1].mu)), host(metrics), placements)


def equality() -> dict:
  rng = np.random.default_rng(0)
  model = tiny_model()
  prompts = [list(rng.integers(1, VOCAB, size=n)) for n in (3, 5, 8, 4, 6, 7, 2, 8)]
  common = dict(max_new_tokens=4, params=GREEDY, buckets=BUCKETS, eos_token_ids=(), adapter=ADAPTER)
  start = time.perf_counter()
  reference = generate(model, prompts, **common)
  ref_scores = np.asarray(
    score(model, reference.prompt_tokens, reference.prompt_mask, reference.tokens, reference.mask, adapter=ADAPTER)
  )
  batch = update_batch(reference, rng)
  lora_before = host(nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))
  single = parallel.make_mesh({'data': 1}, devices=jax.devices()[:1])
  ref_lora, ref_mu, ref_metrics, _ = run_update(model, single, batch)
  # How decided the greedy choices are: the smallest gap between the two best logits along the generated rows.
  logits, _ = model(
    jnp.asarray(np.concatenate([reference.prompt_tokens, np.asarray(reference.tokens)], 1)),
    jnp.asarray(
      np.maximum(np.cumsum(np.concatenate([reference.prompt_mask, np.ones((ROWS, 4))], 1), 1) - 1, 0).astype(np.int32)
    ),
    jnp.asarray(np.concatenate([reference.prompt_mask, np.ones((ROWS, 4), np.int32)], 1)),
    adapter=jnp.asarray(ADAPTER),
  )
  top2 = np.sort(np.asarray(logits)[:, -5:-1], axis=-1)[..., -2:]
  results = {
    'devices': jax.device_count(),
    'reference_seconds': time.perf_counter() - start,
    'greedy_margin': float((top2[..., 1] - top2[..., 0]).min()),
    'adapter_change': max_difference(ref_lora, lora_before),
    'adapter_min_change': min(
      float(np.abs(new - old).min()) for new, old in zip(jax.tree.leaves(ref_lora), jax.tree.leaves(lora_before))
    ),
    'adam_mu_max': max(float(np.abs(leaf).max()) for leaf in jax.tree.leaves(ref_mu)),
    'reference_loss': float(ref_metrics['loss']),
    'reference_grad_norm': float(ref_metrics['grad_norm']),
    'wrong_updates': wrong_updates(model, single, batch, lora_before, ref_lora, ref_mu),
    'meshes': {},
  }
  for shape in MESHES:
    start = time.perf_counter()
    mesh = mesh_of(shape)
    sharded = parallel.shard_model(nnx.clone(model), mesh)
    out = generate(sharded, prompts, mesh=mesh, **common)
    traces = dict(trace_counts())
    again = generate(sharded, prompts, mesh=mesh, **common)
    retraced = dict(trace_counts()) != traces
    scores = score(
      sharded,
      reference.prompt_tokens,
      reference.prompt_mask,
      reference.tokens,
      reference.mask,
      adapter=ADAPTER,
      mesh=mesh,
    )
    new_lora, mu, metrics, placements = run_update(sharded, mesh, batch)
    placing = parallel.Partitioning.create(mesh)
    cache_spec = placing.cache(jax.eval_shape(lambda: init_cache(model.config, ROWS, 12))).keys[0].spec
    results['meshes']['x'.join(map(str, shape))] = {
      'mesh': dict(mesh.shape),
      'tokens_equal': bool(np.array_equal(np.asarray(out.tokens), np.asarray(reference.tokens))),
      'repeat_tokens_equal': bool(np.array_equal(np.asarray(again.tokens), np.asarray(reference.tokens))),
      'retraced_on_repeat': retraced,
      'sampler_log_prob_diff': max_difference(out.log_probs, reference.log_probs),
      'score_diff': max_difference(scores, ref_scores),
      'adapter_diff': max_difference(new_lora, ref_lora),
      'adam_mu_diff': max_difference(mu, ref_mu),
      **update_errors(new_lora, mu, ref_lora, ref_mu, lora_before),
      'loss_diff': abs(float(metrics['loss']) - float(ref_metrics['loss'])),
      'grad_norm_diff': abs(float(metrics['grad_norm']) - float(ref_metrics['grad_norm'])),
      'tokens_spec': spec_list(out.tokens.sharding.spec),
      'scores_spec': spec_list(scores.sharding.spec),
      'cache_keys_spec': spec_list(cache_spec),
      'placements': placements,
      'seconds': time.perf_counter() - start,
    }
  return results


def checkpoint(workdir: str) -> dict:
  model = tiny_model()
  source, target = mesh_of((8, 1, 1)), mesh_of((2, 2, 2))
  _, lora, _ = nnx.split(inference_view(model), nnx.LoRAParam, ...)
  tx = SETTINGS.make_optimizer()
  rng = np.random.default_rng(3)
  # Moments filled with random values, so a restore that mixed up leaves or shards could not pass.
  opt_state = jax.tree.map(
    lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x + 7,
    tx.init(lora),
  )

  def tree_and_shardings(mesh):
    placing = parallel.Partitioning.create(mesh)
    lora_shardings, opt_shardings = placing.state(lora), placing.optimizer(opt_state, lora)
    tree = {
      'adapters': nnx.to_pure_dict(lora),
      'optimizer': {str(i): leaf for i, leaf in enumerate(jax.tree.leaves(opt_state))},
    }
    shardings = {
      'adapters': nnx.to_pure_dict(lora_shardings),
      'optimizer': {str(i): s for i, s in enumerate(jax.tree.leaves(opt_shardings))},
    }
    return tree, shardings

  tree, source_shardings = tree_and_shardings(source)
  saved = jax.device_put(tree, source_shardings)
  folder = os.path.join(workdir, 'step_1')
  parallel.save_sharded(folder, saved)
  _, target_shardings = tree_and_shardings(target)
  restored = parallel.restore_sharded(folder, tree, target_shardings)
  flat_restored = jax.tree_util.tree_leaves_with_path(restored)
  flat_target = jax.tree.leaves(target_shardings)
  gate_a = restored['adapters']['layers'][0]['mlp']['gate_proj']['lora']['a']
  results = {
    'leaves': len(flat_restored),
    'max_diff': max_difference(restored, tree),
    'shardings_match': all(leaf.sharding == sharding for (_, leaf), sharding in zip(flat_restored, flat_target)),
    'source_spec': spec_list(saved['adapters']['layers'][0]['mlp']['gate_proj']['lora']['a'].sharding.spec),
    'source_mesh': dict(saved['adapters']['layers'][0]['mlp']['gate_proj']['lora']['a'].sharding.mesh.shape),
    'gate_lora_a': describe(gate_a),
    'restored_mesh': dict(gate_a.sharding.mesh.shape),
  }
  results['trainer'] = trainer_placements(target)
  return results


def trainer_placements(mesh) -> dict:
  """Where an `RLTrainer` built on `mesh` keeps the base, the adapters and the Adam moments after one iteration
  (a cheap one: outcome reward, recommender only, with the teacher pass)."""
  from tests.training.test_rl import micro_model, rl_config, ROLLOUT
  from tests.training.test_warm_start import DATASET, micro_sasrec, small_tokenizer

  config = rl_config(reward='outcome', lambda_sd=0.1, train_user_agent=False)
  trainer = rl.RLTrainer(micro_model(), small_tokenizer(), DATASET, micro_sasrec(), config, rollout=ROLLOUT, mesh=mesh)
  metrics = trainer.iteration()
  prefix = ('layers', 0, 'mlp', 'gate_proj')
  frozen = dict(nnx.to_flat_state(trainer.frozen))
  lora = dict(nnx.to_flat_state(trainer.lora))
  mu = dict(nnx.to_flat_state(trainer.opt_state[1].mu))
  model_kernel = trainer.model.layers[0].mlp.gate_proj.kernel.get_value()
  return {
    'gate_kernel': describe(frozen[prefix + ('kernel',)].get_value()),
    'gate_lora_a': describe(lora[prefix + ('lora', 'a')].get_value()),
    'gate_lora_a_adam_mu': describe(mu[prefix + ('lora', 'a')].get_value()),
    'model_shares_placed_kernel': model_kernel is frozen[prefix + ('kernel',)].get_value(),
    'iteration': {
      name: metrics[name] for name in ('update/skipped', 'loss/total', 'update/grad_norm', 'update/loss_rows')
    },
  }


if __name__ == '__main__':
  mode, *arguments = sys.argv[1:]
  print(json.dumps({'equality': equality, 'checkpoint': checkpoint}[mode](*arguments)))
