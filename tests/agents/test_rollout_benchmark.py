"""Smoke test of the rollout benchmark (`coars_jax.agents.rollout_timing`) on the synthetic dataset with a micro model:
the figures must be consistent with each other and with the episodes; speed is not checked."""

import json

import numpy as np
import pytest

from coars_jax.agents import rollout_timing
from coars_jax.agents import chat_tokens, dialogue_loop, llm_backend, parsing
from coars_jax.agents.episodes import LLMBackendConfig, RolloutConfig
from coars_jax.models.tokenizer import render_chat
from coars_jax.sampling import LengthBuckets, SamplingParams
from coars_jax.sampling import sampler
from tests.agents.test_episodes import DATASET, SPLIT, TablePeer, small_tokenizer, tiny_lora_model

MAX_NEW_TOKENS = 6
# The jitted programs as imported, before any measurement wrapped them.
PREFILL, DECODE = sampler._prefill, sampler._decode


@pytest.fixture(scope='module')
def measured():
  tokenizer = small_tokenizer()
  model = tiny_lora_model(len(tokenizer))
  config = LLMBackendConfig(
    recommender_max_new_tokens=MAX_NEW_TOKENS,
    user_max_new_tokens=MAX_NEW_TOKENS,
    sampling=SamplingParams(temperature=1.0),
    buckets=LengthBuckets(prompt=(512, 1024), completion=(8,)),
  )
  summary, episodes = rollout_timing.measure_rollouts(
    model,
    tokenizer,
    DATASET,
    TablePeer(),
    split=SPLIT,
    window_indices=[0, 1, 2, 3],
    rollout=RolloutConfig(max_turns=2),
    backend_config=config,
    adapters={'recommender': 'recommender', 'user': 1},
    repeats=2,
    seed=3,
  )
  return summary, episodes, tokenizer


def test_summary_is_consistent_with_the_episodes(measured):
  summary, episodes, _ = measured
  json.dumps(summary)  # the script writes it as JSON
  assert summary['episodes'] == len(episodes) == summary['windows'] == 4
  assert summary['turns'] == sum(e.num_turns for e in episodes)
  assert summary['messages'] == 2 * summary['turns']
  generated = sum(t.recommender.completion_ids.size + t.user.completion_ids.size for e in episodes for t in e.turns)
  prompt = sum(t.recommender.prompt_ids.size + t.user.prompt_ids.size for e in episodes for t in e.turns)
  assert summary['generated_tokens'] == generated > 0
  assert summary['prompt_tokens'] == prompt > 0
  assert summary['recommender_generated_tokens'] + summary['user_generated_tokens'] == generated
  # The sampler's own count (real rows of each call) agrees with the episodes'.
  assert sum(c['generated_tokens'] for c in summary['calls']) == generated
  assert sum(c['prompt_tokens'] for c in summary['calls']) == prompt
  # One call per agent per turn, with the live episodes of that turn.
  assert summary['generate_calls'] == len(summary['calls']) == 2 * max(e.num_turns for e in episodes)
  assert sum(c['live'] for c in summary['calls']) == summary['messages']
  assert all(c['padded_batch'] >= c['live'] for c in summary['calls'])
  assert summary['padded_prompt_tokens'] >= prompt
  assert summary['repeats_replayed_same_tokens'] and summary['timed_compiles'] == 0
  assert summary['stage_calls']['llm_prefill'] == summary['stage_calls']['llm_decode'] == summary['generate_calls']
  assert summary['stage_calls']['detokenize'] == summary['messages']
  # Every prompt is rendered once; a prompt that extends its dialogue also renders the new message's text once.
  appended = sum(e.num_turns - 1 for e in episodes) * 2
  assert summary['stage_calls']['chat_template'] == summary['messages'] + appended
  assert summary['stage_calls']['tokenize'] == summary['generate_calls']  # one batched tokenizer call each
  assert summary['stage_calls']['parse'] == summary['messages']
  assert summary['stage_calls']['peer'] == 2


def test_rates_and_shares_add_up(measured):
  summary, _, _ = measured
  wall = summary['wall_seconds']
  assert wall == min(summary['wall_seconds_all_repeats']) > 0
  assert summary['episodes_per_s'] == pytest.approx(summary['episodes'] / wall)
  assert summary['generated_tokens_per_s'] == pytest.approx(summary['generated_tokens'] / wall)
  seconds, shares = summary['seconds'], summary['shares']
  assert set(seconds) == set(shares) == set(rollout_timing.STAGES)
  assert all(value >= 0 for value in seconds.values())
  assert sum(seconds.values()) == pytest.approx(wall, rel=1e-9)
  assert sum(shares.values()) == pytest.approx(1.0, abs=1e-9)
  jit = seconds['llm_prefill'] + seconds['llm_decode']
  assert summary['jit_seconds'] == pytest.approx(jit)
  assert summary['outside_jit_share'] == pytest.approx(1 - jit / wall)
  assert sum(summary['outside_jit_shares'].values()) == pytest.approx(1.0)
  assert summary['meets_target'] == (summary['outside_jit_share'] <= rollout_timing.TARGET_OUTSIDE_JIT_SHARE)
  assert summary['prefill_tokens_per_s'] == pytest.approx(summary['prompt_tokens'] / seconds['llm_prefill'])
  assert summary['decode_tokens_per_s'] == pytest.approx(summary['generated_tokens'] / seconds['llm_decode'])
  calls = summary['calls']
  assert sum(c['prefill_seconds'] for c in calls) == pytest.approx(seconds['llm_prefill'])
  assert sum(c['decode_seconds'] for c in calls) == pytest.approx(seconds['llm_decode'])


def test_wrappers_are_removed_afterwards(measured):
  _, _, tokenizer = measured
  assert llm_backend.generate is sampler.generate
  assert chat_tokens.render_chat is render_chat
  assert dialogue_loop.parse_user_output is parsing.parse_user_output
  assert 'decode' not in vars(tokenizer)
  assert sampler._prefill is PREFILL and sampler._decode is DECODE


def test_stage_timer_charges_nested_time_once():
  timer = rollout_timing.StageTimer()
  inner = timer.wrap('inner', lambda: sum(range(20000)))
  outer = timer.wrap('outer', lambda: [inner() for _ in range(3)])
  outer()
  assert timer.calls == {'inner': 3, 'outer': 1}
  assert timer.seconds['inner'] > 0 and timer.seconds['outer'] >= 0


def test_evenly_spaced_windows():
  assert rollout_timing.evenly_spaced(3, 11) == [0, 5, 10]
  assert rollout_timing.evenly_spaced(1, 4) == [0]
  assert len(set(rollout_timing.evenly_spaced(64, 122))) == 64
  with pytest.raises(ValueError, match='only 2'):
    rollout_timing.evenly_spaced(3, 2)
  np.testing.assert_array_equal(rollout_timing.evenly_spaced(4, 4), [0, 1, 2, 3])


def test_load_sasrec_peer_reads_a_checkpoint_of_any_training_settings_and_never_trains(tmp_path):
  """A benchmark's peer is whatever SASRec of the dataset's model a workdir holds (a capped-epoch one too); a
  missing checkpoint or another model is refused with a one-line error instead of a training run."""
  from flax import nnx

  from coars_jax.data.synthetic import synthetic_dataset
  from coars_jax.recsys import checkpoint
  from coars_jax.recsys import experiment as sasrec_experiment
  from coars_jax.recsys.sasrec import SASRec

  dataset = synthetic_dataset(num_users=20, num_items=30, sequence_length=12)
  config = sasrec_experiment.model_config(sasrec_experiment.default_config(dataset.name), dataset.num_items)
  with pytest.raises(FileNotFoundError, match='no trained SASRec checkpoint'):
    rollout_timing.load_sasrec_peer(dataset, workdir=str(tmp_path))
  model = SASRec(config, rngs=nnx.Rngs(3))
  # Trained with other settings than the defaults (2 epochs): train_or_load would retrain it; the benchmark reads it.
  meta = {'dataset': dataset.name, 'seed': 0, 'train_config': {'max_epochs': 2}}
  checkpoint.save_sasrec(tmp_path / 'seed_0', model, meta)
  loaded = rollout_timing.load_sasrec_peer(dataset, workdir=str(tmp_path))
  for (path, want), (_, got) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(loaded))):
    np.testing.assert_array_equal(np.asarray(got.get_value()), np.asarray(want.get_value()), err_msg=str(path))
  other = SASRec(sasrec_experiment.model_config(sasrec_experiment.default_config(dataset.name), 31), rngs=nnx.Rngs(3))
  checkpoint.save_sasrec(tmp_path / 'seed_0', other, meta)
  with pytest.raises(ValueError, match='another model config'):
    rollout_timing.load_sasrec_peer(dataset, workdir=str(tmp_path))
