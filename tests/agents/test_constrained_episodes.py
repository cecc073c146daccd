"""`LLMBackendConfig(constrained=True)`: a random tiny decoder plays whole episodes whose every message parses
(ValidRatio 1 for both agents), and the scorer, given the same constraints, recomputes the behaviour log-probs."""

import numpy as np
import pytest

from coars_jax.agents.episodes import LLMBackend, LLMBackendConfig, RolloutConfig, episode_metrics, run_episodes
from coars_jax.agents.output_constraints import recommender_constraint, user_constraint
from coars_jax.agents.trajectory import Trajectory
from coars_jax.sampling import LengthBuckets, SamplingParams, score
from tests.agents.test_episodes import DATASET, SPLIT, TablePeer, small_tokenizer, tiny_lora_model

MAX_NEW_TOKENS = 24
SAMPLING = SamplingParams(temperature=1.0)


def constrained_backend(constrained=True):
  tokenizer = small_tokenizer()
  return LLMBackend(
    tiny_lora_model(len(tokenizer)),
    tokenizer,
    adapters={'recommender': 'recommender', 'user': 'user'},
    config=LLMBackendConfig(
      recommender_max_new_tokens=MAX_NEW_TOKENS,
      user_max_new_tokens=MAX_NEW_TOKENS,
      sampling=SAMPLING,
      buckets=LengthBuckets(prompt=(512, 1024), completion=(32,)),
      constrained=constrained,
    ),
  )


def test_constrained_episodes_are_all_valid_and_rescore_exactly():
  backend = constrained_backend()
  indices = [0, 1, 2, 3]
  episodes = run_episodes(DATASET, SPLIT, indices, backend, peer=TablePeer(), config=RolloutConfig(max_turns=2), seed=5)
  metrics = episode_metrics(episodes)
  assert metrics['valid_ratio'] == 1.0 and metrics['user_valid_ratio'] == 1.0
  turns = [turn for episode in episodes for turn in episode.turns]
  assert all(t.recommender_parse.match_rule == 'exact' and t.recommender.finished and t.user.finished for t in turns)
  assert all(t.item in episode.candidates for episode in episodes for t in episode.turns)

  # RL needs the scorer's log-probs under the same constraint: rebuild it per segment from the episode's candidates.
  tokenizer, model = backend.tokenizer, backend.model
  trajectory = Trajectory.from_episodes(episodes, pad_token_id=backend.special.pad_id)
  options = dict(max_new_tokens=MAX_NEW_TOKENS, vocab_size=model.config.vocab_size, classes=backend.token_classes())
  for agent in (0, 1):
    rows = np.flatnonzero(trajectory.agent == agent)
    if agent == 0:
      titles = [episodes[trajectory.episode[row]].candidate_titles for row in rows]
      constraint = recommender_constraint(tokenizer, titles, **options)
    else:
      constraint = user_constraint(tokenizer, len(rows), **options)
    adapter = np.full((len(rows),), backend.adapter_ids['recommender' if agent == 0 else 'user'], np.int32)
    arrays = (
      trajectory.prompt_tokens[rows],
      trajectory.prompt_mask[rows],
      trajectory.completion_tokens[rows],
      trajectory.completion_mask[rows],
    )
    rescored = np.asarray(score(model, *arrays, params=SAMPLING, adapter=adapter, constraint=constraint))
    np.testing.assert_allclose(rescored, trajectory.behaviour_log_probs[rows], atol=1e-4)
    unconstrained = np.asarray(score(model, *arrays, params=SAMPLING, adapter=adapter))
    assert (unconstrained <= rescored + 1e-4).all()  # masking only removes mass from the other tokens
    assert (rescored - unconstrained)[trajectory.completion_mask[rows]].max() > 0.1


def test_constrained_recommender_calls_need_the_candidates():
  backend = constrained_backend()
  prompts = [[{'role': 'user', 'content': 'Recommend one.'}]]
  with pytest.raises(ValueError, match="need each prompt's candidate titles"):
    backend.generate('recommender', prompts, seed=0, episode_ids=[0], turn=1)
  with pytest.raises(ValueError, match='1 prompts but 2 candidate lists'):
    backend.generate('recommender', prompts, seed=0, episode_ids=[0], turn=1, candidates=[['Item 1'], ['Item 2']])
  with pytest.raises(ValueError, match='LLMBackendConfig.constrained must be a bool'):
    LLMBackendConfig(constrained=1)
  assert LLMBackendConfig().constrained is False
