"""The token credit sample (`training.credit_sample`) and the viewer (`eval.viewer`, `experiments.view`): A per token
equals Eq. 10 computed directly, the page carries every dialogue, and headless Chromium renders it (text asserted,
filters applied)."""

import json
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from coars_jax.coars import credit
from coars_jax.eval import viewer
from coars_jax.sampling.buckets import left_pad, right_pad
from coars_jax.training import credit_sample
from tests.training.test_rl import rl_config, trainer

CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
ROOT = pathlib.Path(__file__).resolve().parents[2]


def _direct_credit(run, record):
  """{segment: A per token} by Eq. 10 directly, on the model as it is now (teacher on x + d, student on x, one
  scorer call per side), for every segment of the first two episodes that carries a teacher prompt."""
  trajectory = record.trajectory
  rows = [
    int(r)
    for r in np.flatnonzero(trajectory.completion_mask.any(axis=1) & (trajectory.episode < 2))
    if record.teacher_ids is not None and len(record.teacher_ids[r])
  ]
  assert rows
  prompts = [trajectory.prompt_tokens[r][trajectory.prompt_mask[r]] for r in rows]
  teachers = [np.asarray(record.teacher_ids[r]) for r in rows]
  completions = [trajectory.completion_tokens[r][trajectory.completion_mask[r]] for r in rows]
  x, x_mask = left_pad(prompts, 1024, run.pad_id)
  t, t_mask = left_pad(teachers, 1024, run.pad_id)
  y, y_mask = right_pad(completions, 16, run.pad_id)
  both = credit.teacher_student_log_probs(
    run.model,
    jnp.asarray(x),
    jnp.asarray(x_mask),
    jnp.asarray(t),
    jnp.asarray(t_mask),
    jnp.asarray(y),
    jnp.asarray(y_mask),
    adapter=jnp.asarray(run.adapter_of_agent[trajectory.agent[rows]]),
    pad_token_id=run.pad_id,
  )
  expected = np.asarray(
    credit.token_advantages(both.teacher, both.student, jnp.asarray(y_mask), clip=run.config.advantage_clip)
  )
  return {row: expected[position, : len(completions[position])] for position, row in enumerate(rows)}


def _sampled_run(**overrides):
  """A trainer after one iteration with a credit sample of 2 episodes; `expected` holds Eq. 10 computed directly
  before the update (the parameters that sampled the rollout), `carried` the segments that carried loss."""
  run = trainer(rl_config(**overrides))
  run.credit_episodes = 2
  record = run.record(run.play())
  run.expected = _direct_credit(run, record)
  run.carried = set(np.flatnonzero(run._rewards(record.trajectory, None, record.groups)[3]).tolist())
  run.learn_record(record)
  run.sample, run.sampled_record = run.last_credit_sample, record  # later iterations replace those
  return run


@pytest.fixture(scope='module')
def sampled():
  return _sampled_run()


def _assert_credit_is_eq_10(run):
  records, trajectory = run.sample, run.sampled_record.trajectory
  assert len(records) == 2
  checked = 0
  for row, expected in run.expected.items():
    turn = records[trajectory.episode[row]]['turns'][trajectory.turn[row] - 1]
    message = turn['recommender' if trajectory.agent[row] == 0 else 'user']
    assert len(message['tokens']) == len(expected) and message['reward'] is not None
    if row in run.carried:
      # The update's own A (its first epoch, before it changed the adapters) is Eq. 10 on every token.
      np.testing.assert_allclose(message['credit'], expected, atol=2e-4)
      assert all(abs(a) <= run.config.advantage_clip for a in message['credit'])
      checked += 1
    else:
      assert message['credit'] is None  # the update did not weigh it, so nothing was scored for it
  assert checked > 0


def test_credit_sample_is_the_updates_own_eq_10_on_every_token(sampled):
  _assert_credit_is_eq_10(sampled)
  # Only iterations that ask for it carry it.
  sampled.credit_episodes = 0
  sampled.iteration()
  assert sampled.last_credit_sample is None


def test_non_finite_credit_is_shown_as_none_and_the_sample_still_writes(sampled, tmp_path):
  """An update the step skipped can leave NaN in A; the sample shows no credit there, and its JSON (which refuses
  NaN) is still written."""
  trajectory = sampled.sampled_record.trajectory
  row = sorted(sampled.carried & set(sampled.expected))[0]
  slots = np.asarray([[row]])
  token_credit = np.full((1, 1, trajectory.completion_tokens.shape[1]), np.nan, np.float32)
  records = credit_sample.credit_sample(
    sampled.sampled_record, None, token_credit, slots, tokenizer=sampled.tokenizer, episodes=2
  )
  message = records[trajectory.episode[row]]['turns'][trajectory.turn[row] - 1][
    'recommender' if trajectory.agent[row] == 0 else 'user'
  ]
  assert message['credit'] is None and len(message['tokens']) > 0
  assert credit_sample.write_sample(tmp_path / 'run', 1, records).is_file()
  token_credit[:] = 0.25
  records = credit_sample.credit_sample(
    sampled.sampled_record, None, token_credit, slots, tokenizer=sampled.tokenizer, episodes=2
  )
  message = records[trajectory.episode[row]]['turns'][trajectory.turn[row] - 1][
    'recommender' if trajectory.agent[row] == 0 else 'user'
  ]
  assert message['credit'] == [0.25] * len(message['tokens'])


def test_credit_sample_of_the_per_turn_update_maps_each_row_back_to_its_message():
  _assert_credit_is_eq_10(_sampled_run(packed_update=False))


def test_page_carries_every_dialogue_and_the_summary(sampled, tmp_path):
  path = credit_sample.write_sample(tmp_path / 'run', 3, sampled.sample)
  assert path.name == 'iteration_000003.jsonl'
  records = viewer.load(tmp_path / 'run')
  assert len(records) == 2 and all(r['iteration'] == 3 for r in records)
  stats = viewer.summary(records)
  assert stats['dialogues'] == 2 and stats['tokens_with_credit'] > 0 and stats['iterations'] == [3]
  page = viewer.render_html(records, title='micro </script> test')
  data = json.loads(
    page.split('<script type="application/json" id="data">')[1].split('</script>')[0].replace('<\\/', '</')
  )
  assert len(data['records']) == 2 and '<title>micro &lt;/script&gt; test</title>' in page
  with pytest.raises(FileNotFoundError, match='holds neither'):
    viewer.load(tmp_path)
  (tmp_path / 'bad.jsonl').write_text('{"a": 1}\n')
  with pytest.raises(ValueError, match='not an episode record'):
    viewer.load(tmp_path / 'bad.jsonl')


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; .ci/run does)")
def test_headless_chromium_renders_the_page(sampled, tmp_path):
  credit_sample.write_sample(tmp_path / 'run', 1, sampled.sample)
  result = subprocess.run(
    [sys.executable, '-m', 'experiments.view', f'--input={tmp_path / "run"}', f'--output={tmp_path / "view.html"}'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  flags = [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    f'--user-data-dir={tmp_path / "profile"}',
  ]
  dom = subprocess.run(
    [CHROMIUM, *flags, '--dump-dom', (tmp_path / 'view.html').as_uri()], capture_output=True, text=True, timeout=120
  ).stdout
  # The script ran: the dialogues, the filter count and per-token credit spans exist in the rendered DOM.
  assert 'Showing 2 of 2 dialogues' in dom
  assert '<summary>#1 ' in dom and '<summary>#2 ' in dom and '<summary>#3 ' not in dom
  assert 'title="A = ' in dom and 'iteration 1 ·' in dom
  first = sampled.sample[0]
  assert first['target_title'].replace('&', '&amp;') in dom
  shot = tmp_path / 'view.png'
  subprocess.run(
    [CHROMIUM, *flags, f'--screenshot={shot}', '--window-size=1200,1400', (tmp_path / 'view.html').as_uri()],
    capture_output=True,
    timeout=120,
  )
  assert shot.is_file() and shot.stat().st_size > 10_000
