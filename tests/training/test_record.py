"""The rollout record is the one hand-off from acting to learning: an update from a record saved to disk and loaded
in a fresh trainer, with no backend, no episodes and no SASRec, equals the live update bit for bit."""

import numpy as np
import pytest
from flax import nnx

from coars_jax.agents.record import RolloutRecord
from coars_jax.agents.trajectory import read_jsonl
from tests.training.test_rl import rl_config, trainer, values


@pytest.mark.parametrize('overrides', [{}, {'reward': 'judge', 'train_user_agent': False}], ids=['coars', 'judge'])
def test_an_update_from_a_saved_record_equals_the_live_update_bit_for_bit(tmp_path, overrides):
  live = trainer(rl_config(**overrides))
  played = live.play()
  record = live.record(played)
  folder = record.save(tmp_path / 'record')
  live_metrics = live.learn_record(record)
  assert live_metrics['update/loss_rows'] > 0 and live_metrics['update/skipped'] is False

  replay = trainer(rl_config(**overrides))
  replay.backend = replay.sasrec = None  # the record alone must suffice
  loaded = RolloutRecord.load(folder)
  assert len(read_jsonl(folder / 'episodes.jsonl')) == len(played.episodes)
  replay_metrics = replay.learn_record(loaded)

  for name, value in live.last_batch.items():
    np.testing.assert_array_equal(replay.last_batch[name], value, err_msg=name)
  ours, theirs = values(replay.model, nnx.LoRAParam), values(live.model, nnx.LoRAParam)
  assert ours.keys() == theirs.keys()
  for path, value in theirs.items():
    np.testing.assert_array_equal(ours[path], value, err_msg=str(path))
  for name in ('loss/total', 'update/grad_norm', 'reward/recommender', 'reward/user', 'advantage/mean'):
    assert replay_metrics[name] == live_metrics[name], name
  if overrides:
    assert loaded.judge_ids is not None and loaded.teacher_ids is not None
  else:
    assert loaded.judge_ids is None and len(loaded.teacher_ids) == loaded.trajectory.num_segments


def test_a_record_checks_its_parts(tmp_path):
  live = trainer(rl_config())
  record = live.record(live.play())
  with pytest.raises(ValueError, match='one entry per episode'):
    RolloutRecord(trajectory=record.trajectory, windows=record.windows, groups=record.groups[:1], seed=0, seconds=0.0)
  with pytest.raises(FileNotFoundError, match='holds no rollout record'):
    RolloutRecord.load(tmp_path)
