import dataclasses
import json

import chex
import numpy as np
import pytest

from coars_jax.agents.episodes import RolloutConfig, episode_metrics, run_episodes
from coars_jax.agents.protocol import ACTIONS
from coars_jax.agents.trajectory import Trajectory, episode_record, read_jsonl, to_jsonl
from coars_jax.sampling import LengthBuckets
from tests.agents.test_episodes import DATASET, SPLIT, TablePeer, plan_backend, reward_plan, stop_episodes

PAD = 0


@pytest.fixture(scope='module')
def stopped():
  episodes, _ = stop_episodes()
  return episodes, Trajectory.from_episodes(episodes, pad_token_id=PAD)


@pytest.fixture(scope='module')
def mixed():
  plan, _ = reward_plan()
  episodes = run_episodes(DATASET, SPLIT, [0], plan_backend(plan), peer=TablePeer(), config=RolloutConfig())
  return episodes, Trajectory.from_episodes(episodes, pad_token_id=PAD)


def _generations(episodes):
  return [g for e in episodes for t in e.turns for g in (t.recommender, t.user)]


def test_shapes_dtypes_and_segment_order(stopped):
  episodes, trajectory = stopped
  generations = _generations(episodes)
  segments = len(generations)
  assert segments == 2 * (2 + 3 + 1) == trajectory.num_segments
  prompt_length = max(g.prompt_ids.size for g in generations)
  completion_length = max(g.completion_ids.size for g in generations)
  chex.assert_shape([trajectory.prompt_tokens, trajectory.prompt_mask], (segments, prompt_length))
  chex.assert_shape(
    [trajectory.completion_tokens, trajectory.completion_mask, trajectory.behaviour_log_probs],
    (segments, completion_length),
  )
  chex.assert_type(
    [trajectory.prompt_tokens, trajectory.completion_tokens, trajectory.agent, trajectory.action], np.int32
  )
  chex.assert_type([trajectory.prompt_mask, trajectory.completion_mask, trajectory.hit, trajectory.valid], bool)
  chex.assert_type(
    [trajectory.behaviour_log_probs, trajectory.acceptance_score, trajectory.peer_similarity], np.float32
  )
  assert trajectory.episode.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2]
  assert trajectory.turn.tolist() == [1, 1, 2, 2, 1, 1, 2, 2, 3, 3, 1, 1]
  assert trajectory.agent.tolist() == [0, 1] * 6
  assert trajectory.window_index.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2]
  assert trajectory.num_turns.tolist() == [2, 3, 1]
  assert trajectory.clicked.tolist() == [True, False, True] and trajectory.final_hit.tolist() == [True, False, True]
  assert trajectory.final_item.tolist() == [e.final_item for e in episodes]
  assert trajectory.target.tolist() == [e.target for e in episodes]


def test_tokens_sit_where_the_masks_say(stopped):
  episodes, trajectory = stopped
  for row, generation in enumerate(_generations(episodes)):
    np.testing.assert_array_equal(trajectory.prompt_tokens[row][trajectory.prompt_mask[row]], generation.prompt_ids)
    np.testing.assert_array_equal(
      trajectory.completion_tokens[row][trajectory.completion_mask[row]], generation.completion_ids
    )
    # Left padding for prompts, right padding for completions.
    assert trajectory.prompt_mask[row, -1] and trajectory.completion_mask[row, 0]
    assert (trajectory.prompt_tokens[row][~trajectory.prompt_mask[row]] == PAD).all()
    assert trajectory.prompt_texts[row] == generation.prompt_text
    assert trajectory.completion_texts[row] == generation.text
  assert (trajectory.behaviour_log_probs == 0).all()  # the script's log-probs


def test_each_agent_loss_mask_covers_exactly_its_own_generated_tokens(stopped):
  episodes, trajectory = stopped
  recommender, user = trajectory.loss_mask('recommender'), trajectory.loss_mask('user')
  assert not (recommender & user).any()
  np.testing.assert_array_equal(recommender | user, trajectory.completion_mask)
  turns = [t for e in episodes for t in e.turns]
  assert recommender.sum() == sum(t.recommender.completion_ids.size for t in turns)
  assert user.sum() == sum(t.user.completion_ids.size for t in turns)
  for index, turn in enumerate(turns):
    rec_row, user_row = 2 * index, 2 * index + 1
    np.testing.assert_array_equal(
      trajectory.completion_tokens[rec_row][recommender[rec_row]], turn.recommender.completion_ids
    )
    np.testing.assert_array_equal(trajectory.completion_tokens[user_row][user[user_row]], turn.user.completion_ids)
    assert not recommender[user_row].any() and not user[rec_row].any()
    # The recommender's message is part of the user's prompt; it lies in the prompt array, which no mask covers.
    assert turn.recommender_parse.title in trajectory.prompt_texts[user_row]
  with pytest.raises(ValueError, match='agent must be one of'):
    trajectory.loss_mask('critic')


def test_per_turn_fields_follow_the_episodes(mixed):
  (episode,), trajectory = mixed
  turns = episode.turns
  for index, turn in enumerate(turns):
    for row in (2 * index, 2 * index + 1):
      assert trajectory.hit[row] == turn.hit and trajectory.item[row] == turn.item
      assert trajectory.acceptance_score[row] == np.float32(turn.acceptance_score)
      assert trajectory.peer_similarity[row] == np.float32(turn.peer_similarity)
      assert ACTIONS[trajectory.action[row]] == turn.action
  assert trajectory.valid.tolist() == [True, True, False, False, False, True, True, True]
  assert trajectory.action.tolist() == [2, 2, 1, 1, 0, 0, 3, 3]
  assert trajectory.item[2] == -1 and trajectory.peer_similarity[2] == 0
  # The clipped star score stays inside star's interval in float32.
  assert trajectory.acceptance_score[0] < np.float32(0.75)
  assert trajectory.metrics() == pytest.approx(episode_metrics([episode]))


def test_buckets_pad_to_fixed_widths(stopped):
  episodes, trajectory = stopped
  bucketed = Trajectory.from_episodes(
    episodes, pad_token_id=PAD, buckets=LengthBuckets(prompt=(256, 512, 1024), completion=(16, 32, 64))
  )
  assert bucketed.prompt_tokens.shape[1] in (256, 512, 1024) and bucketed.completion_tokens.shape[1] in (16, 32, 64)
  assert bucketed.prompt_tokens.shape[1] >= trajectory.prompt_tokens.shape[1]
  np.testing.assert_array_equal(bucketed.completion_mask.sum(1), trajectory.completion_mask.sum(1))
  np.testing.assert_array_equal(bucketed.prompt_mask.sum(1), trajectory.prompt_mask.sum(1))


def test_construction_checks_its_arrays(stopped):
  _, trajectory = stopped
  fields = {name: getattr(trajectory, name) for name in trajectory.__dataclass_fields__}
  with pytest.raises(AssertionError):
    Trajectory(**{**fields, 'hit': trajectory.hit.astype(np.int32)})
  bad_mask = trajectory.completion_mask.copy()
  bad_mask[0, 0] = False
  with pytest.raises(ValueError, match='not right-padded'):
    Trajectory(**{**fields, 'completion_mask': bad_mask})
  with pytest.raises(ValueError, match='needs at least one episode'):
    Trajectory.from_episodes([])


def test_jsonl_round_trip(stopped, mixed, tmp_path):
  episodes, trajectory = stopped
  path = tmp_path / 'episodes.jsonl'
  assert to_jsonl(trajectory, path) == 3
  records = read_jsonl(path)
  assert records == json.loads(json.dumps(list(trajectory.records)))
  assert to_jsonl(episodes, tmp_path / 'from_episodes.jsonl') == 3
  assert (tmp_path / 'from_episodes.jsonl').read_text() == path.read_text()
  lines = path.read_text().splitlines()
  assert len(lines) == 3 and all(json.loads(line)['split'] == SPLIT for line in lines)
  first = records[0]
  assert (first['window_index'], first['num_turns'], first['clicked'], first['final_hit']) == (0, 2, True, True)
  assert first['target_title'] == episodes[0].target_title
  turn = first['turns'][1]
  assert turn['recommender']['completion'] == episodes[0].turns[1].recommender.text
  assert turn['recommender']['title'] == episodes[0].target_title and turn['hit'] is True
  assert turn['user']['action'] == 'click' and turn['user']['score'] == 0.9
  assert turn['user']['prompt'] == episodes[0].turns[1].user.prompt_text

  (invalid,), _ = mixed
  record = episode_record(invalid)
  assert record['turns'][1]['recommender']['valid'] is False
  assert record['turns'][1]['recommender']['shown_title'] == 'Not A Candidate'
  assert record['turns'][1]['user']['valid'] is False and record['turns'][1]['user']['score'] == 0.375

  broken = tmp_path / 'broken.jsonl'
  broken.write_text(lines[0] + '\n{"oops"\n')
  with pytest.raises(ValueError, match='broken.jsonl, line 2: not a JSON episode record'):
    read_jsonl(broken)


def test_a_lone_surrogate_or_control_character_in_a_message_is_written_and_read_back(stopped, tmp_path):
  # An API's JSON can carry a lone surrogate, which UTF-8 cannot encode: writing the record must neither fail nor
  # change the text.
  from coars_jax.agents.record import RolloutRecord

  _, trajectory = stopped
  odd = 'Item: \ud800Muse\x00\udfff\ufffd\x1b'
  records = [json.loads(json.dumps(record)) for record in trajectory.records]
  records[0]['turns'][0]['recommender']['completion'] = odd
  odd_trajectory = dataclasses.replace(
    trajectory, completion_texts=(odd,) + trajectory.completion_texts[1:], records=tuple(records)
  )
  path = tmp_path / 'episodes.jsonl'
  to_jsonl(odd_trajectory, path)
  assert read_jsonl(path)[0]['turns'][0]['recommender']['completion'] == odd
  record = RolloutRecord(
    trajectory=odd_trajectory, windows=np.arange(3), groups=np.arange(3, dtype=np.int32), seed=0, seconds=0.0
  )
  loaded = RolloutRecord.load(record.save(tmp_path / 'record'))
  assert loaded.trajectory.completion_texts == odd_trajectory.completion_texts
  assert loaded.trajectory.records[0]['turns'][0]['recommender']['completion'] == odd
