"""Two processes on loopback, 4 fake CPU devices each, run one RL iteration on a (2,2,2) mesh spanning both; their
adapters, optimizer state and collective checkpoint equal a one-process run on 8 devices and on one device."""

import json
import os
import socket
import subprocess
import sys

from coars_jax.parallel import distributed
from tests.parallel.conftest import REPO

TOLERANCE = 1e-5


def free_port() -> int:
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    return probe.getsockname()[1]


def environment(devices: int, **extra: str) -> dict:
  return dict(
    os.environ,
    XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
    JAX_PLATFORMS='cpu',
    PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')])),
    **extra,
  )


def last_json(output: str) -> dict:
  return json.loads(output.strip().splitlines()[-1])


def run_two_hosts(workdir, timeout: int = 600) -> list[dict]:
  """Starts both processes of `multihost host`, joined through a coordinator on 127.0.0.1; their JSON reports."""
  address = f'127.0.0.1:{free_port()}'
  processes = []
  for process_id in range(2):
    env = environment(
      4,
      **{
        distributed.ENV_COORDINATOR: address,
        distributed.ENV_NUM_PROCESSES: '2',
        distributed.ENV_PROCESS_ID: str(process_id),
      },
    )
    processes.append(
      subprocess.Popen(
        [sys.executable, '-m', 'tests.parallel.multihost', 'host', str(workdir)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
    )
  outputs = []
  try:
    for process in processes:
      stdout, stderr = process.communicate(timeout=timeout)
      assert process.returncode == 0, stderr[-4000:]
      outputs.append(last_json(stdout))
  finally:
    for process in processes:  # one failed process leaves the other waiting on it at a collective
      if process.poll() is None:
        process.kill()
        process.communicate()
  return outputs


def test_two_processes_train_like_one_and_write_one_checkpoint(tmp_path):
  hosts = run_two_hosts(tmp_path)
  for index, report in enumerate(hosts):
    assert report['started'] and report['process'] == index and report['processes'] == 2
    assert report['devices'] == 8 and report['local_devices'] == 4
    assert report['mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 2} and report['mesh_processes'] == [0, 1]
    assert report['default_mesh'] == {'data': 8}  # every process's devices, not this process's 4
    # Rollouts run on the trainer's mesh, and the adapters are global arrays over both processes' devices.
    assert report['backend_mesh'] == report['mesh'] and report['adapter_spans_processes']
    assert report['metrics']['update/skipped'] is False and report['metrics']['update/loss_rows'] > 0
  assert hosts[0]['metrics'] == hosts[1]['metrics']
  # Process 0 alone is the primary and wrote the numpy copy; Orbax's checkpoint was written by both together.
  assert [report['primary'] for report in hosts] == [True, False]
  assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint', 'multihost.npz']

  result = subprocess.run(
    [sys.executable, '-m', 'tests.parallel.multihost', 'reference', str(tmp_path)],
    cwd=REPO,
    env=environment(8),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  reference = last_json(result.stdout)
  assert reference['devices'] == 8
  for name, run in reference['meshes'].items():
    # Same windows, seed and sampled tokens, so the same loss; adapters and Adam moments equal to float rounding.
    assert run['metrics']['windows'] == hosts[0]['metrics']['windows'], name
    assert run['metrics']['rollout/generated_tokens'] == hosts[0]['metrics']['rollout/generated_tokens'], name
    assert abs(run['metrics']['loss/total'] - hosts[0]['metrics']['loss/total']) < TOLERANCE, name
    assert run['max_diff'] < TOLERANCE, (name, run['max_diff'])
  restored = reference['restored']
  assert restored['mesh'] == {'data': 8} and restored['max_diff'] == 0.0
