"""Reliability of `pipeline.experiment` under faults (`training.faults`): checkpoint manifests, corrupt and
half-written checkpoints, a full disk, SIGTERM, and SIGKILL at several points of real training processes whose
resumed runs must end bit-identical to an uninterrupted one."""

import errno
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest

from coars_jax.pipeline import experiment as ex
from coars_jax.training import faults
from tests.training import fault_suite
from tests.training.test_train_experiment import fresh_trainer


def test_fault_specs_parse_and_refuse_bad_ones():
  assert faults.parse('update:2') == faults.Fault(phase='update', iteration=2)
  assert faults.parse('rollout:3:term:2') == faults.Fault(phase='rollout', iteration=3, action='term', hit=2)
  assert faults.parse(faults.Fault(phase='sealed', iteration=2, action='corrupt').spec()).action == 'corrupt'
  for bad, message in (
    ('update', 'expected <phase>'),
    ('train:1', 'phase must be one of'),
    ('update:x', 'must be integers'),
    ('update:0', 'iteration must be an int >= 1'),
    ('update:1:enospc', "'enospc' applies to phase"),
    ('update:1:boom', 'action must be'),
  ):
    with pytest.raises(ValueError, match=message):
      faults.parse(bad)


def test_points_do_nothing_without_a_fault(monkeypatch):
  monkeypatch.delenv(faults.FAULT_ENV, raising=False)
  faults.active.cache_clear()
  try:
    faults.point('update', 1)  # would SIGKILL this test process if it fired
    assert faults.active() is None
  finally:
    faults.active.cache_clear()


def _files(folder: pathlib.Path) -> pathlib.Path:
  (folder / 'state' / 'd').mkdir(parents=True)
  (folder / 'state' / 'd' / 'chunk').write_bytes(bytes(range(256)) * 4)
  (folder / 'meta.json').write_text('{"iteration": 2}')
  return folder


def test_manifest_catches_truncated_changed_and_missing_files(tmp_path):
  folder = _files(tmp_path / '2')
  assert ex.checkpoint_problem(folder) == 'unsealed'
  ex.seal_checkpoint(folder)
  assert ex.checkpoint_problem(folder) is None
  manifest = json.loads((folder / ex.MANIFEST_FILE).read_text())
  assert sorted(manifest['files']) == ['meta.json', 'state/d/chunk']

  chunk = folder / 'state' / 'd' / 'chunk'
  original = chunk.read_bytes()
  chunk.write_bytes(original[:100])
  assert 'state/d/chunk is 100 bytes, its manifest says 1024' in ex.checkpoint_problem(folder)
  chunk.write_bytes(original[:-1] + b'\x00')  # same size, one byte changed
  assert 'another sha256' in ex.checkpoint_problem(folder)
  chunk.unlink()
  assert 'state/d/chunk is missing' in ex.checkpoint_problem(folder)
  (folder / ex.MANIFEST_FILE).write_text('{"files": ')
  assert 'manifest' in ex.checkpoint_problem(folder) and 'unreadable' in ex.checkpoint_problem(folder)


@pytest.fixture(scope='module')
def trainer(tmp_path_factory):
  return fresh_trainer(tmp_path_factory.mktemp('unused'))


def _save_steps(manager, trainer, steps):
  for step in steps:
    trainer.state.iteration = step
    ex.save_checkpoint(manager, trainer, {'best_val_hit_at_1': None, 'best_iteration': None}, None)


def _truncate_largest(folder: pathlib.Path) -> None:
  largest = max((p for p in (folder / 'state').rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
  with open(largest, 'r+b') as handle:
    handle.truncate(largest.stat().st_size // 2)


def test_resume_skips_corrupt_and_half_written_checkpoints(tmp_path, trainer, caplog):
  with ex.checkpoint_manager(tmp_path, keep=5) as manager:
    _save_steps(manager, trainer, [1, 2, 3])
    assert all(ex.checkpoint_problem(ex.step_folder(manager, s)) is None for s in (1, 2, 3))
    _truncate_largest(ex.step_folder(manager, 3))
    (tmp_path / ex.CHECKPOINT_DIR / '4').mkdir()  # a step folder without Orbax's contents: a botched copy
    (tmp_path / ex.CHECKPOINT_DIR / '4' / 'junk').write_text('x')
    manager.reload()
    assert manager.latest_step() == 4  # Orbax alone would pick it
    trainer.state.iteration = 0
    with caplog.at_level(logging.WARNING):
      meta = ex.restore_latest(manager, trainer)
    assert meta['trainer']['iteration'] == 2 and trainer.state.iteration == 2
    assert manager.all_steps() == [1, 2]
  warnings = caplog.text
  assert f'Skipping checkpoint {tmp_path / ex.CHECKPOINT_DIR / "3"}' in warnings and 'truncated' in warnings
  assert f'Skipping checkpoint {tmp_path / ex.CHECKPOINT_DIR / "4"}: Orbax could not read it' in warnings
  rejected = sorted(p.name for p in (tmp_path / ex.REJECTED_DIR).iterdir())
  assert rejected == ['3-0', '3-0.reason.txt', '4-0', '4-0.reason.txt']
  assert 'truncated' in (tmp_path / ex.REJECTED_DIR / '3-0.reason.txt').read_text()

  # Killed between Orbax's commit and the manifest: Orbax reads it, so it is used (with a warning).
  with ex.checkpoint_manager(tmp_path, keep=5) as manager:
    (ex.step_folder(manager, 2) / ex.MANIFEST_FILE).unlink()
    with caplog.at_level(logging.WARNING):
      assert ex.restore_latest(manager, trainer)['trainer']['iteration'] == 2
  assert 'has no manifest' in caplog.text

  # Nothing usable: a clear error naming each, and nothing is moved.
  with ex.checkpoint_manager(tmp_path, keep=5) as manager:
    for step in (1, 2):
      _truncate_largest(ex.step_folder(manager, step))
    with pytest.raises(ex.CheckpointError, match=r'no checkpoint in .* can be restored:\n  .*/2: .*\n  .*/1: '):
      ex.restore_latest(manager, trainer)
    assert manager.all_steps() == [1, 2]


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, trainer, monkeypatch):
  from orbax.checkpoint._src.path import atomicity

  async def full_disk(self):
    # Every item is written; the commit marker is the write that finds the disk full (a failure in the middle of
    # the items would leave their other writes running in this process, which a real run ends).
    (pathlib.Path(str(self.get())) / 'commit_success.txt').write_text('Checkpoint commit')
    raise OSError(errno.ENOSPC, 'No space left on device')

  with ex.checkpoint_manager(tmp_path, keep=3) as manager:
    _save_steps(manager, trainer, [1])
    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', full_disk)
    with pytest.raises(
      ex.CheckpointError,
      match=r'writing checkpoint 2 into .* failed \(OSError: \[Errno 28\] No '
      r'space left on device\); nothing of it will be used and the '
      r'previous checkpoint, iteration 1, is intact',
    ):
      _save_steps(manager, trainer, [2])
    monkeypatch.undo()
    assert manager.all_steps() == [1]
    assert ex.checkpoint_problem(ex.step_folder(manager, 1)) is None
  # The next start resumes from 1, and its manager removes the half-written step before it saves again.
  with ex.checkpoint_manager(tmp_path, keep=3) as manager:
    trainer.state.iteration = 0
    assert ex.restore_latest(manager, trainer)['trainer']['iteration'] == 1
    _save_steps(manager, trainer, [2])
  assert sorted(p.name for p in (tmp_path / ex.CHECKPOINT_DIR).iterdir()) == ['1', '2']


def test_preemption_guard_sets_a_flag_and_a_second_sigterm_ends_the_process():
  if threading.current_thread() is not threading.main_thread():
    pytest.skip('signals reach the main thread only; a SIGTERM here would end the test process')
  previous = signal.getsignal(signal.SIGTERM)
  with ex.PreemptionGuard() as guard:
    guard.check()
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.requested
    with pytest.raises(ex.Preempted):
      guard.check()
    backend = type('Backend', (), {'generate': lambda self, *a: 'text'})()
    with pytest.raises(ex.Preempted):
      guard.watch(backend).generate('user', [])
  assert signal.getsignal(signal.SIGTERM) == previous
  script = (
    'import os, signal, time\nfrom coars_jax.pipeline.experiment import PreemptionGuard\n'
    'with PreemptionGuard() as guard:\n  os.kill(os.getpid(), signal.SIGTERM)\n  print(guard.requested, '
    'flush=True)\n  os.kill(os.getpid(), signal.SIGTERM)\n  time.sleep(30)\n  print("survived")\n'
  )
  result = subprocess.run(
    [sys.executable, '-c', script],
    capture_output=True,
    text=True,
    timeout=120,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    cwd=fault_suite.REPO,
  )
  assert result.returncode == -signal.SIGTERM and result.stdout.split() == ['True']


# --- real processes: SIGKILL and SIGTERM during training, then a resume ------------------------------------------


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """An uninterrupted micro run in its own process, and the compilation cache the other processes share."""
  root = tmp_path_factory.mktemp('faults')
  cache = root / 'jax_cache'
  run = fault_suite.run_worker(root / 'reference', resume=False, fault=None, cache_dir=cache)
  assert run.finished(), run.stderr[-3000:]
  return fault_suite.digest(root / 'reference'), cache


@pytest.mark.faults
def test_runs_killed_in_a_rollout_scoring_an_update_and_a_checkpoint_write_resume_bit_identically(reference, tmp_path):
  digest, cache = reference
  # One workdir, each process a resume of the last: killed in iteration 1's rollout (before any checkpoint), in
  # iteration 2's scoring, while checkpoint 2 is written (before Orbax commits it), in iteration 3's update.
  kills = ['rollout:1:kill:2', 'scoring:2', 'checkpoint:2', 'update:3']
  result = fault_suite.run_scenario(tmp_path, kills, digest, cache, log=lambda line: None)
  assert result.fired == kills, [(r.fault, r.returncode, r.stderr[-1500:]) for r in result.runs]
  assert result.recovered, result.runs[-1].stderr[-3000:]
  assert result.lost == 0 and result.differed == []
  assert not list((tmp_path / ex.CHECKPOINT_DIR).glob('*tmp*'))  # the half-written checkpoint 2 was cleaned up


@pytest.mark.faults
def test_sigterm_checkpoints_exits_zero_and_resumes_bit_identically(reference, tmp_path):
  digest, cache = reference
  command = [sys.executable, '-m', 'tests.training.fault_worker', str(tmp_path)]
  process = subprocess.Popen(
    command,
    cwd=fault_suite.REPO,
    env=fault_suite.worker_env(cache, None),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  metrics = tmp_path / 'metrics.jsonl'
  deadline = time.monotonic() + 300
  while not (metrics.is_file() and '"iteration": 1' in metrics.read_text()) and time.monotonic() < deadline:
    assert process.poll() is None, process.communicate()[1][-3000:]
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  sent = time.monotonic()
  stdout, stderr = process.communicate(timeout=120)
  assert process.returncode == 0 and time.monotonic() - sent < 60, stderr[-3000:]
  assert json.loads(stdout.splitlines()[-1])['stages'] == ['before'] and 'Stopped on SIGTERM' in stderr
  steps = sorted(int(p.name) for p in (tmp_path / ex.CHECKPOINT_DIR).iterdir() if p.name.isdigit())
  assert steps and ex.checkpoint_problem(tmp_path / ex.CHECKPOINT_DIR / str(steps[-1])) is None

  resumed = fault_suite.run_worker(tmp_path, resume=True, fault=None, cache_dir=cache)
  assert resumed.finished(), resumed.stderr[-3000:]
  other = fault_suite.digest(tmp_path)
  assert fault_suite.differences(digest, other) == [] and fault_suite.lost_lines(digest, other) == 0
