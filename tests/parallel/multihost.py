"""The processes of `test_multihost`, run as `python -m tests.parallel.multihost MODE ...` with fake CPU devices.
Prints one JSON object on its last line.

MODE 'host' WORKDIR: one of two processes (4 fake devices each) joined by `parallel.distributed.initialize` from
the COARS_* environment. Together they build an `RLTrainer` of the micro decoder on a (data=2, fsdp=2, tensor=2)
mesh over all 8 devices, run one iteration (rollouts, rewards, teacher prompts, the update), save the trainer's
checkpoint arrays collectively with Orbax under WORKDIR/checkpoint, and the primary process alone writes the
adapters and optimizer state as numpy to WORKDIR/multihost.npz.
MODE 'reference' WORKDIR: one process with 8 fake devices runs the same iteration on the same (2,2,2) mesh and on
a single device, and restores the two-process checkpoint onto a (data=8) mesh; it reports the largest differences
from what the two processes wrote.
"""

import os
import sys

if sys.argv[1] == 'reference':
  os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import json  # noqa: E402
import pathlib  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from coars_jax import parallel  # noqa: E402
from coars_jax.parallel import distributed  # noqa: E402

MESH = {'data': 2, 'fsdp': 2, 'tensor': 2}
# Adam's first step moves an entry by about the step size whatever its gradient, so reduction-order noise on
# near-zero gradients would show at the step's scale: a small step keeps it below the 1e-5 being checked.
LEARNING_RATE = 1e-4


def one_iteration(mesh) -> tuple:
  """(trainer, metrics) after one RL iteration of the micro decoder on `mesh`."""
  from tests.training.test_rl import ROLLOUT, micro_model, rl_config
  from tests.training.test_warm_start import DATASET, micro_sasrec, small_tokenizer
  from coars_jax.training import rl

  trainer = rl.RLTrainer(
    micro_model(),
    small_tokenizer(),
    DATASET,
    micro_sasrec(),
    rl_config(learning_rate=LEARNING_RATE),
    rollout=ROLLOUT,
    mesh=mesh,
  )
  return trainer, trainer.iteration()


def flat(tree) -> dict[str, np.ndarray]:
  """Host copies of a checkpoint tree's arrays, keyed by their path."""
  leaves = jax.tree_util.tree_leaves_with_path(distributed.fetch(tree))
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def summary(metrics) -> dict:
  return {
    name: metrics[name]
    for name in (
      'update/skipped',
      'loss/total',
      'update/grad_norm',
      'update/loss_rows',
      'rollout/generated_tokens',
      'windows',
      'seed',
    )
  }


def max_difference(a: dict, b: dict) -> float:
  assert sorted(a) == sorted(b), (sorted(a)[:3], sorted(b)[:3])
  return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) for k in a)


def run_host(workdir: str) -> dict:
  settings = distributed.distributed_defaults()
  settings.enabled = True  # the coordinator, process count and id come from the COARS_* environment
  started = distributed.initialize(settings)
  mesh = parallel.make_mesh(MESH)
  trainer, metrics = one_iteration(mesh)
  tree = trainer.checkpoint_tree()
  parallel.save_sharded(pathlib.Path(workdir) / 'checkpoint', tree)  # every process writes its own shards
  arrays = flat(tree)
  if distributed.is_primary():
    np.savez(pathlib.Path(workdir) / 'multihost.npz', **arrays)
  distributed.barrier('multihost-npz-written')
  leaf = jax.tree.leaves(trainer.lora)[0]
  return {
    'started': started,
    'primary': distributed.is_primary(),
    'process': jax.process_index(),
    'processes': jax.process_count(),
    'devices': jax.device_count(),
    'local_devices': jax.local_device_count(),
    'mesh': dict(mesh.shape),
    'mesh_processes': sorted({device.process_index for device in mesh.devices.flat}),
    'default_mesh': dict(parallel.make_mesh().shape),
    'adapter_spans_processes': not leaf.is_fully_addressable,
    'backend_mesh': dict(trainer.backend.mesh.shape),
    'metrics': summary(metrics),
  }


def reference(workdir: str) -> dict:
  saved = dict(np.load(pathlib.Path(workdir) / 'multihost.npz'))
  results = {'devices': jax.device_count(), 'meshes': {}}
  trainer = None
  for name, mesh in (
    ('2x2x2', parallel.make_mesh(MESH)),
    ('1', parallel.make_mesh({'data': 1}, devices=jax.devices()[:1])),
  ):
    trainer, metrics = one_iteration(mesh)
    results['meshes'][name] = {
      'max_diff': max_difference(flat(trainer.checkpoint_tree()), saved),
      'metrics': summary(metrics),
    }
  # The two-process checkpoint, read by one process onto another mesh shape with that mesh's shardings.
  placing = parallel.Partitioning.create(parallel.make_mesh({'data': 8}))
  tree = trainer.checkpoint_tree()
  shardings = {
    'adapters': nnx.to_pure_dict(placing.state(trainer.lora)),
    'optimizer': {str(i): s for i, s in enumerate(jax.tree.leaves(placing.optimizer(trainer.opt_state, trainer.lora)))},
    'rng': placing.replicated(),
  }
  restored = parallel.restore_sharded(pathlib.Path(workdir) / 'checkpoint', tree, shardings)
  restored_leaf = jax.tree.leaves(restored['adapters'])[0]
  results['restored'] = {
    'max_diff': max_difference(flat(restored), saved),
    'mesh': dict(restored_leaf.sharding.mesh.shape),
  }
  return results


if __name__ == '__main__':
  mode, *arguments = sys.argv[1:]
  print(json.dumps({'host': run_host, 'reference': reference}[mode](*arguments)))
