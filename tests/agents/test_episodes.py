import dataclasses
import functools
import tempfile

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coars_jax.agents import episodes as ep
from coars_jax.agents import peer as peer_lib
from coars_jax.agents import prompts as prompts_lib
from coars_jax.agents.episodes import (
  LLMBackend,
  LLMBackendConfig,
  RolloutConfig,
  ScriptedBackend,
  SASRecPeer,
  episode_metrics,
  run_episodes,
)
from coars_jax.agents.parsing import INVALID_SCORE
from coars_jax.agents.prompts import recommender_system_prompt, user_system_prompt
from coars_jax.agents.trajectory import Trajectory
from coars_jax.data import candidate_list, synthetic
from coars_jax.data.schema import ItemCatalog
from coars_jax.models import Decoder, LoRAConfig, add_lora, get_preset
from coars_jax.models import tokenizer as tokenizer_lib
from coars_jax.recsys import SASRec, SASRecConfig, peer_similarity, top_candidate
from coars_jax.parallel.mesh import make_mesh
from coars_jax.sampling import GREEDY, LengthBuckets, SamplingParams, score, trace_counts

DATASET = synthetic.synthetic_dataset()
SPLIT = 'test'


@functools.lru_cache(maxsize=None)
def small_tokenizer():
  """A 700-piece BPE tokenizer trained on the synthetic titles, the protocol corpus and the system prompts, so
  that a prompt is a few hundred tokens and the tiny model's programs stay small."""
  lines = tokenizer_lib.tokenizer_corpus([DATASET.catalog.titles], repeats=4)
  for text in (recommender_system_prompt(), user_system_prompt()):
    lines += [line for line in text.splitlines() if line]
  folder = tokenizer_lib.build_tokenizer(lines, tempfile.mkdtemp(prefix='episodes-tokenizer-'), vocab_size=700)
  return tokenizer_lib.load_tokenizer(folder)


class TablePeer:
  """A peer whose picks are known in advance: the 4th candidate, and q = (item % 7) / 10 - 0.3."""

  def top_candidates(self, history, lengths, candidates):
    return candidates[:, 3]

  def candidate_similarities(self, history, lengths, candidates):
    return similarity_of(candidates)


def similarity_of(items):
  return (np.asarray(items) % 7) / 10 - 0.3


def candidates_of(index, dataset=DATASET, split=SPLIT):
  return [int(i) for i in candidate_list(dataset, split, index, seed=0)]


def target_of(index, dataset=DATASET, split=SPLIT):
  return int(dataset.split(split).targets[index])


def non_target(index, position=0):
  """A candidate of window `index` that is not its target."""
  return [c for c in candidates_of(index) if c != target_of(index)][position]


def title(item):
  return DATASET.catalog.titles[item]


def rec(item_text, reason='fits the history'):
  return f'Reason: {reason}\nItem: {item_text}'


def user(action, score=None, reason='my reaction'):
  return f'Reason: {reason}\nAction: {action}' + ('' if score is None else f'\nScore: {score}')


def plan_backend(plan):
  """ScriptedBackend answering plan[episode][turn - 1] = (recommender text, user text)."""

  def respond(agent, episode, turn, messages):
    return plan[episode][turn - 1][0 if agent == 'recommender' else 1]

  return ScriptedBackend(small_tokenizer(), respond)


def stop_plan():
  """Three windows, T_u = 3: episode 0 clicks at turn 2, episode 1 never clicks, episode 2 clicks at turn 1."""
  skip = user('skip', 0.3)
  return {
    0: [(rec(title(non_target(0))), skip), (rec(title(target_of(0))), user('click', 0.9))],
    1: [(rec(title(non_target(1, t))), user('star', 0.6)) for t in range(3)],
    2: [(rec(title(target_of(2))), user('click', 0.8))],
  }


def stop_episodes():
  backend = plan_backend(stop_plan())
  episodes = run_episodes(DATASET, SPLIT, [0, 1, 2], backend, peer=TablePeer(), config=RolloutConfig(max_turns=3))
  return episodes, backend


def test_loop_stops_on_click_and_at_max_turns_and_drops_finished_episodes():
  episodes, backend = stop_episodes()
  assert [e.num_turns for e in episodes] == [2, 3, 1]
  assert [e.clicked for e in episodes] == [True, False, True]
  assert [e.final_hit for e in episodes] == [True, False, True]
  calls = [(c.agent, c.turn, c.episode_ids) for c in backend.calls]
  assert calls == [
    ('recommender', 1, (0, 1, 2)),
    ('user', 1, (0, 1, 2)),
    ('recommender', 2, (0, 1)),
    ('user', 2, (0, 1)),
    ('recommender', 3, (1,)),
    ('user', 3, (1,)),
  ]
  # Every call has its own seed, reproducible from (seed, t, agent).
  assert len({c.seed for c in backend.calls}) == 6
  assert backend.calls[0].seed == ep.turn_seed(0, 1, 'recommender')


def test_loop_ends_when_every_episode_clicked():
  plan = {e: [(rec(title(target_of(e))), user('click', 1))] for e in range(2)}
  backend = plan_backend(plan)
  episodes = run_episodes(DATASET, SPLIT, [0, 1], backend, peer=TablePeer(), config=RolloutConfig(max_turns=5))
  assert [e.num_turns for e in episodes] == [1, 1]
  assert len(backend.calls) == 2


def reward_plan():
  """One window through every parse case; returns (plan, the non-target item named at turn 1)."""
  other = non_target(0)
  plan = {
    0: [
      # A valid non-target named in lower case; the user's action and score disagree (the action wins).
      (rec(title(other).lower()), user('star', 0.9)),
      # A title outside C; a user message without any label.
      (rec('Not A Candidate'), "I don't know what to say"),
      # No labels at all; an action without a score.
      ('just some words', user('dislike')),
      # The target; a click ends the episode before T_u.
      (rec(title(target_of(0))), user('click', 0.95)),
    ]
  }
  return plan, other


def test_reward_inputs_follow_the_protocol():
  plan, other = reward_plan()
  (episode,) = run_episodes(
    DATASET, SPLIT, [0], plan_backend(plan), peer=TablePeer(), config=RolloutConfig(max_turns=5)
  )
  target = target_of(0)
  t1, t2, t3, t4 = episode.turns
  assert [t.turn for t in episode.turns] == [1, 2, 3, 4]
  assert (t1.item, t1.hit, t1.recommender_parse.valid, t1.recommender_parse.match_rule) == (
    other,
    False,
    True,
    'normalized',
  )
  assert t1.action == 'star' and t1.acceptance_score == float(np.nextafter(np.float32(0.75), np.float32(0)))
  assert t1.peer_similarity == pytest.approx(similarity_of(other))
  assert (t2.item, t2.hit, t2.recommender_parse.valid, t2.peer_similarity) == (ep.NO_ITEM, False, False, 0.0)
  assert (t2.user_parse.valid, t2.action, t2.acceptance_score) == (False, 'skip', INVALID_SCORE)
  assert (t3.item, t3.recommender_parse.valid, t3.peer_similarity) == (ep.NO_ITEM, False, 0.0)
  assert (t3.user_parse.valid, t3.action, t3.acceptance_score) == (True, 'dislike', 0.125)
  assert (t4.item, t4.hit, t4.action, t4.acceptance_score) == (target, True, 'click', 0.95)
  assert t4.peer_similarity == pytest.approx(similarity_of(target))
  assert (episode.final_item, episode.final_hit, episode.clicked) == (target, True, True)
  # An invalid recommender message is shown to the user as written.
  assert 'Recommended item: Not A Candidate\n' in t2.user.prompt_text
  assert "Recommended item: (no item named)\nRecommender's reason: just some words" in t3.user.prompt_text
  assert f'Recommended item: {title(other)}\n' in t1.user.prompt_text  # the candidate's title, not the lower case


def test_dialogues_are_append_only_token_for_token():
  """Each agent's prompt at turn t is its prompt at t-1, its own reply, then the new message: as text and as
  token ids (the reply's ids as sampled, the new message tokenised alone). Every earlier turn stays in it."""
  plan, other = reward_plan()
  (episode,) = run_episodes(
    DATASET, SPLIT, [0], plan_backend(plan), peer=TablePeer(), config=RolloutConfig(max_turns=5)
  )
  assert episode.num_turns == 4
  end = tokenizer_lib.end_of_turn_id(small_tokenizer())
  for agent in ('recommender', 'user'):
    for before, after in zip(episode.turns, episode.turns[1:]):
      earlier, later = getattr(before, agent), getattr(after, agent)
      head = np.concatenate([earlier.prompt_ids, earlier.completion_ids])
      np.testing.assert_array_equal(later.prompt_ids[: len(head)], head)
      assert later.prompt_text.startswith(earlier.prompt_text + earlier.text)
      assert earlier.completion_ids[-1] == end
  first = episode.memory().turns[0]
  assert (first.item_title, first.user_action, first.user_reason) == (title(other), 'star', 'my reaction')
  assert 'Turn 2: the user reacted to Not A Candidate.' in episode.turns[3].recommender.prompt_text
  assert episode.turns[3].user.prompt_text.count('The recommender now says:') == 4


SENTINEL = '\u2063TARGET-TITLE\u2063'


def _leak_run(titles, indices):
  dataset = dataclasses.replace(DATASET, catalog=ItemCatalog(tuple(titles)))

  def respond(agent, episode, turn, messages):
    window = indices[episode]
    if agent == 'user':
      return user('skip', 0.3)
    # Even episodes name the target at turn 3; otherwise a non-target that depends on the turn only.
    item = target_of(window) if (episode % 2 == 0 and turn == 3) else non_target(window, turn)
    return rec(titles[item])

  backend = ScriptedBackend(small_tokenizer(), respond)
  return run_episodes(dataset, SPLIT, indices, backend, peer=TablePeer(), config=RolloutConfig(max_turns=5))


def test_target_title_reaches_no_user_prompt_unless_shown():
  indices = list(range(len(DATASET.split(SPLIT))))
  real = list(DATASET.catalog.titles)
  counts = {'shown': 0, 'hidden': 0}
  for position, index in enumerate(indices):
    swapped = list(real)
    swapped[target_of(index)] = SENTINEL
    episode_real = _leak_run(real, indices)[position]
    episode_swapped = _leak_run(swapped, indices)[position]
    shown = {episode_real.peer_item}
    for turn_real, turn_swapped in zip(episode_real.turns, episode_swapped.turns, strict=True):
      shown.add(turn_real.item)
      text, text_swapped = turn_real.user.prompt_text, turn_swapped.user.prompt_text
      if target_of(index) in shown:
        counts['shown'] += 1
        assert SENTINEL in text_swapped
      else:
        counts['hidden'] += 1
        assert SENTINEL not in text_swapped and text == text_swapped, (index, turn_real.turn)
  assert counts['shown'] > 0 and counts['hidden'] > 0, counts


def test_hint_and_peer_opinion_follow_the_config():
  plan = {0: [(rec(title(target_of(0))), user('click', 0.9))]}
  peer_title = title(candidates_of(0)[3])
  (plain,) = run_episodes(DATASET, SPLIT, [0], plan_backend(plan), peer=TablePeer())
  (hinted,) = run_episodes(
    DATASET,
    SPLIT,
    [0],
    plan_backend(plan),
    peer=TablePeer(),
    config=RolloutConfig(show_hint=True, show_peer_opinion=False),
  )
  opinion = f'Peer opinion: People with a history like yours chose "{peer_title}".'
  assert 'Hint:' not in plain.turns[0].recommender.prompt_text and opinion in plain.turns[0].user.prompt_text
  assert f'in this dialogue:\nItem: {peer_title}' in hinted.turns[0].recommender.prompt_text
  assert 'Peer opinion' not in hinted.turns[0].user.prompt_text
  assert plain.peer_item == hinted.peer_item == candidates_of(0)[3]


class RankingPeer(TablePeer):
  """TablePeer that also ranks: candidates in reverse list order, except that the 4th comes first."""

  def candidate_ranking(self, history, lengths, candidates):
    candidates = np.asarray(candidates)
    rest = [c for c in range(candidates.shape[1] - 1, -1, -1) if c != 3]
    return candidates[:, [3] + rest]


def test_hint_moves_to_the_best_candidate_not_yet_recommended():
  ranked = [candidates_of(1)[3]] + [candidates_of(1)[c] for c in range(19, -1, -1) if c != 3]
  # Turn 1 recommends the hint (rank 1), turn 2 an item ranked below rank 2, turn 3 anything.
  plan = {
    0: [
      (rec(title(ranked[0])), user('skip', 0.3)),
      (rec(title(ranked[5])), user('skip', 0.3)),
      (rec(title(ranked[2])), user('skip', 0.3)),
    ]
  }
  plan[0] = [(r.replace(title(target_of(1)), title(non_target(1))), u) for r, u in plan[0]]
  (episode,) = run_episodes(
    DATASET, SPLIT, [1], plan_backend(plan), peer=RankingPeer(), config=RolloutConfig(show_hint=True, max_turns=3)
  )
  recommended = [turn.item for turn in episode.turns]
  expected = []
  for t in range(3):
    expected.append(next(item for item in ranked if item not in recommended[:t]))
  prompts = [turn.recommender.prompt_text for turn in episode.turns]
  for t, (prompt, item) in enumerate(zip(prompts, expected)):
    assert f'in this dialogue:\nItem: {title(item)}' in prompt, (t, title(item))
  assert expected[0] == ranked[0] and expected[1] == ranked[1]
  # A peer without a ranking keeps the top candidate as the hint on every turn.
  (static,) = run_episodes(
    DATASET, SPLIT, [1], plan_backend(plan), peer=TablePeer(), config=RolloutConfig(show_hint=True, max_turns=3)
  )
  assert all(f'in this dialogue:\nItem: {title(ranked[0])}' in turn.recommender.prompt_text for turn in static.turns)


def test_sasrec_peer_gives_top_candidate_and_cosine():
  model = SASRec(
    SASRecConfig(num_items=DATASET.num_items, hidden=16, num_heads=2, num_blocks=1, dropout=0.0), rngs=nnx.Rngs(0)
  )
  indices = [0, 1]
  plan = {e: [(rec(title(non_target(i))), user('click', 0.9))] for e, i in enumerate(indices)}
  episodes = run_episodes(DATASET, SPLIT, indices, plan_backend(plan), peer=model)
  windows = DATASET.split(SPLIT)
  history, lengths = windows.history[indices], windows.lengths[indices]
  candidates = np.stack([candidates_of(i) for i in indices]).astype(np.int32)
  np.testing.assert_array_equal([e.peer_item for e in episodes], top_candidate(model, history, lengths, candidates))
  # The same [B * C] call shape SASRecPeer makes, so the check reuses its compiled program.
  table = np.asarray(
    peer_similarity(model, np.repeat(history, 20, axis=0), np.repeat(lengths, 20), candidates.reshape(-1))
  ).reshape(2, 20)
  for row, episode in enumerate(episodes):
    column = candidates_of(indices[row]).index(episode.turns[0].item)
    assert episode.turns[0].peer_similarity == pytest.approx(float(table[row, column]), abs=1e-6)
    assert -1 <= episode.turns[0].peer_similarity <= 1
  assert isinstance(peer_lib.as_peer(model), SASRecPeer)


def test_metrics():
  episodes, _ = stop_episodes()
  metrics = episode_metrics(episodes)
  assert metrics['hit_at_1'] == pytest.approx(2 / 3)
  assert metrics['valid_ratio'] == 1.0 and metrics['average_turns'] == 2.0
  assert metrics['click_rate'] == pytest.approx(2 / 3)
  plan, _ = reward_plan()
  (episode,) = run_episodes(DATASET, SPLIT, [0], plan_backend(plan), peer=TablePeer())
  metrics = episode_metrics([episode])
  assert (metrics['valid_ratio'], metrics['user_valid_ratio'], metrics['hit_at_1']) == (0.5, 0.75, 1.0)


def test_configs_and_inputs_are_validated():
  with pytest.raises(ValueError, match='RolloutConfig.max_turns must be an int >= 1'):
    RolloutConfig(max_turns=0)
  with pytest.raises(ValueError, match='RolloutConfig.show_hint must be a bool'):
    RolloutConfig(show_hint=1)
  with pytest.raises(ValueError, match='LLMBackendConfig.user_max_new_tokens must be a positive int'):
    LLMBackendConfig(user_max_new_tokens=0)
  with pytest.raises(ValueError, match='batch_buckets must be None or strictly increasing'):
    LLMBackendConfig(batch_buckets=(4, 2))
  assert [LLMBackendConfig().padded_batch(n) for n in (1, 3, 4, 5)] == [1, 4, 4, 8]
  assert [LLMBackendConfig(batch_buckets=(2, 6)).padded_batch(n) for n in (1, 3, 7)] == [2, 6, 7]
  backend = plan_backend({})
  with pytest.raises(ValueError, match=r"window_indices \[99\] are outside split 'test'"):
    run_episodes(DATASET, SPLIT, [99], backend, peer=TablePeer())
  with pytest.raises(ValueError, match='window_indices is empty'):
    run_episodes(DATASET, SPLIT, [], backend, peer=TablePeer())
  with pytest.raises(TypeError, match='peer must be a recsys.SASRec or have top_candidates'):
    run_episodes(DATASET, SPLIT, [0], backend, peer=object())


# --- the real sampler on a tiny random decoder ---------------------------------------------------------------------

MAX_NEW_TOKENS = 6


@functools.lru_cache(maxsize=None)
def tiny_lora_model(vocab_size):
  config = get_preset(
    'tiny',
    vocab_size=vocab_size,
    embed_dim=32,
    mlp_dim=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=1024,
  )
  model = Decoder(config, rngs=nnx.Rngs(0))
  add_lora(model, LoRAConfig(rank=2, alpha=4.0), ['recommender', 'user'], rngs=nnx.Rngs(1))
  # B starts at zero, which would make both adapters the base model; random B makes the adapter choice matter.
  # Drawn with numpy: eager jax.random would compile one program per parameter shape.
  rng = np.random.default_rng(2)
  state = nnx.state(model, nnx.LoRAParam)
  nnx.update(model, jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.5, x.dtype), state))
  return model


def test_encode_prompts_matches_one_call_per_prompt():
  tokenizer = small_tokenizer()
  titles = DATASET.catalog.titles
  prompts = [
    prompts_lib.recommender_messages(history_titles=titles[1 : 1 + n], candidate_titles=titles[20:25])
    for n in (1, 3, 7)
  ]
  prompts.append(
    prompts_lib.user_messages(history_titles=titles[3:6], recommended_title=titles[9], recommender_reason='fits')
  )
  assert ep.encode_prompts(tokenizer, prompts) == [ep.encode_prompt(tokenizer, m) for m in prompts]
  assert ep.encode_prompts(tokenizer, []) == []


def test_llm_backend_runs_episodes_end_to_end_with_scorer_matching_log_probs():
  tokenizer = small_tokenizer()
  model = tiny_lora_model(len(tokenizer))
  sampling = SamplingParams(temperature=1.0)
  backend = LLMBackend(
    model,
    tokenizer,
    adapters={'recommender': 'recommender', 'user': 1},
    config=LLMBackendConfig(
      recommender_max_new_tokens=MAX_NEW_TOKENS,
      user_max_new_tokens=MAX_NEW_TOKENS,
      sampling=sampling,
      buckets=LengthBuckets(prompt=(512, 1024), completion=(8,)),
    ),
  )
  indices = [0, 1, 2]
  before = trace_counts()
  episodes = run_episodes(DATASET, SPLIT, indices, backend, peer=TablePeer(), config=RolloutConfig(max_turns=2), seed=3)
  # Both agents and both turns share one prefill and one decode program: adapters are traced per-row arrays and
  # every prompt fits the 512 bucket.
  after = trace_counts()
  assert all(after.get(name, 0) - before.get(name, 0) <= 1 for name in ('sampler.prefill', 'sampler.decode'))
  # A random model writes no valid answer, so nobody clicks and every call serves all three episodes.
  assert [(c.agent, c.turn, c.batch_size) for c in backend.calls] == [
    ('recommender', 1, 3),
    ('user', 1, 3),
    ('recommender', 2, 3),
    ('user', 2, 3),
  ]
  assert [e.num_turns for e in episodes] == [2, 2, 2]
  trajectory = Trajectory.from_episodes(episodes, pad_token_id=0)
  assert trajectory.num_segments == 12
  log_probs = trajectory.behaviour_log_probs
  assert np.isfinite(log_probs).all() and (log_probs <= 0).all()
  assert (log_probs[trajectory.completion_mask] < 0).all()
  assert (trajectory.completion_mask.sum(1) >= 1).all() and (trajectory.completion_mask.sum(1) <= MAX_NEW_TOKENS).all()
  for generation, text in ((t.recommender, t.recommender.text) for e in episodes for t in e.turns):
    assert tokenizer.decode(generation.completion_ids.tolist(), skip_special_tokens=True) == text

  # Rescore two segments of each agent: the scorer must give the behaviour log-probs under the same adapter and
  # different ones under the other agent's adapter.
  rows = np.flatnonzero(trajectory.episode < 2)[:4]  # episode 0's turns 1-2 (rec, user, rec, user)
  assert trajectory.agent[rows].tolist() == [0, 1, 0, 1]
  arrays = (
    trajectory.prompt_tokens[rows],
    trajectory.prompt_mask[rows],
    trajectory.completion_tokens[rows],
    trajectory.completion_mask[rows],
  )
  own = np.asarray([backend.adapter_ids[ep.AGENTS[a]] for a in trajectory.agent[rows]], np.int32)
  rescored = np.asarray(score(model, *arrays, params=sampling, adapter=own))
  np.testing.assert_allclose(rescored, log_probs[rows], atol=2e-4)
  swapped = np.asarray(score(model, *arrays, params=sampling, adapter=1 - own))
  assert np.abs(swapped - log_probs[rows])[trajectory.completion_mask[rows]].max() > 1e-2


def test_merged_adapters_give_the_adapted_agents_messages():
  """`merge_adapters` runs each agent as a plain decoder with its adapter folded in: the same greedy messages and
  log-probs (to float rounding) as the adapted model selecting adapters per row, for both agents, an agent on the
  base model, and grouped calls; the merged copies carry no adapters, and a mesh is refused."""
  tokenizer = small_tokenizer()
  model = tiny_lora_model(len(tokenizer))

  def backend(merge, adapters):
    config = LLMBackendConfig(
      recommender_max_new_tokens=MAX_NEW_TOKENS,
      user_max_new_tokens=MAX_NEW_TOKENS,
      sampling=GREEDY,
      buckets=LengthBuckets(prompt=(512, 1024), completion=(8,)),
      merge_adapters=merge,
    )
    return LLMBackend(model, tokenizer, adapters=adapters, config=config)

  user_messages = [
    prompts_lib.user_messages(history_titles=['a', 'b'], recommended_title=t, recommender_reason='r')
    for t in ('c', 'd', 'e')
  ]

  def same(first, second):
    np.testing.assert_array_equal(second.completion_ids, first.completion_ids)
    np.testing.assert_allclose(second.log_probs, first.log_probs, atol=1e-4)

  grouped = {}
  for adapters in ({'recommender': 'recommender', 'user': 'user'}, {'recommender': 'recommender'}):
    plain, merged = backend(False, adapters), backend(True, adapters)
    assert all(not m.adapter_names for m in merged._merged.values())
    runs = [
      run_episodes(DATASET, SPLIT, [0, 1, 2], b, peer=TablePeer(), config=RolloutConfig(max_turns=2), seed=3)
      for b in (plain, merged)
    ]
    turns = [[g for e in episodes for t in e.turns for g in (t.recommender, t.user)] for episodes in runs]
    assert len(turns[0]) == len(turns[1]) == 12
    for generation, merged_generation in zip(*turns):
      same(generation, merged_generation)
    grouped[len(adapters)] = [
      b.generate_grouped('user', [user_messages], seed=0, rows_per_group=4, num_groups=1)[0] for b in (plain, merged)
    ]
    for generation, merged_generation in zip(*grouped[len(adapters)]):
      same(generation, merged_generation)
  # The user's adapter changes its log-probs (else the comparisons above could not fail).
  adapted, base = grouped[2][0], grouped[1][0]
  assert max(np.abs(a.log_probs[:1] - b.log_probs[:1]).max() for a, b in zip(adapted, base)) > 1e-3
  with pytest.raises(ValueError, match='merge_adapters runs unsharded only'):
    LLMBackend(model, tokenizer, config=LLMBackendConfig(merge_adapters=True), mesh=make_mesh())


def test_llm_backend_validates_adapters():
  tokenizer = small_tokenizer()
  # The constructor reads only the model's vocab size and adapter names, so stand-ins test it without building.
  plain = types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=len(tokenizer)), adapter_names=())
  assert LLMBackend(plain, tokenizer).adapter_array('user', 3) is None
  with pytest.raises(ValueError, match='the model has no LoRA adapters'):
    LLMBackend(plain, tokenizer, adapters={'user': 'user'})
  with pytest.raises(ValueError, match='vocab_size is 10'):
    LLMBackend(types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=10), adapter_names=()), tokenizer)
  adapted = tiny_lora_model(len(tokenizer))
  np.testing.assert_array_equal(LLMBackend(adapted, tokenizer).adapter_array('user', 2), [-1, -1])
  np.testing.assert_array_equal(
    LLMBackend(adapted, tokenizer, adapters={'recommender': 'user'}).adapter_array('recommender', 1), [1]
  )
  with pytest.raises(ValueError, match=r"adapters\['user'\]='critic' is not one of"):
    LLMBackend(adapted, tokenizer, adapters={'user': 'critic'})
  with pytest.raises(ValueError, match=r"adapters\['user'\] must be an adapter name, an index in \[-1, 2\)"):
    LLMBackend(adapted, tokenizer, adapters={'user': 2})
  with pytest.raises(ValueError, match='adapters has keys'):
    LLMBackend(adapted, tokenizer, adapters={'judge': 0})


def test_prefix_reuse_gives_the_same_greedy_episodes_and_prefills_less():
  """From turn 2 on, each agent's prompt repeats its previous one up to the memory; the backend reads that part
  from the previous call's cache. Greedy episodes are the same as with every prompt prefilled whole."""
  tokenizer = small_tokenizer()
  model = tiny_lora_model(len(tokenizer))
  episodes, backends = [], []
  for reuse in (False, True):
    backend = LLMBackend(
      model,
      tokenizer,
      adapters={'recommender': 'recommender', 'user': 'user'},
      config=LLMBackendConfig(
        recommender_max_new_tokens=MAX_NEW_TOKENS,
        user_max_new_tokens=MAX_NEW_TOKENS,
        sampling=SamplingParams(),
        buckets=LengthBuckets(prompt=(512, 1024), completion=(8,)),
        prefix_reuse=reuse,
      ),
    )
    episodes.append(
      run_episodes(DATASET, SPLIT, [0, 1, 2], backend, peer=TablePeer(), config=RolloutConfig(max_turns=3), seed=3)
    )
    backends.append(backend)
  full, reused = episodes
  assert [e.num_turns for e in full] == [e.num_turns for e in reused] == [3, 3, 3]
  for a, b in zip(full, reused):
    for ta, tb in zip(a.turns, b.turns):
      for agent in ('recommender', 'user'):
        ga, gb = getattr(ta, agent), getattr(tb, agent)
        assert ga.prompt_text == gb.prompt_text
        np.testing.assert_array_equal(ga.completion_ids, gb.completion_ids)
        np.testing.assert_allclose(ga.log_probs, gb.log_probs, atol=1e-4)
  assert backends[0].prefill_tokens['reused'] == 0
  stats = backends[1].prefill_tokens
  assert stats['prefilled'] + stats['reused'] == backends[0].prefill_tokens['prefilled']
  # Turn t >= 2 reads the whole previous prompt and reply from the cache but the reply's last token (never fed
  # back to the model), and prefills only that token and the new message.
  expected = sum(
    len(getattr(p, a).prompt_ids) + len(getattr(p, a).completion_ids) - 1
    for e in reused
    for p in e.turns[:-1]
    for a in ('recommender', 'user')
  )
  assert stats['reused'] == expected
  new = stats['prefilled'] - sum(
    len(getattr(e.turns[0], a).prompt_ids) for e in reused for a in ('recommender', 'user')
  )
  assert 0 < new < stats['reused'] / 3  # the new messages are short beside the dialogue they extend
  assert not backends[1]._last_prompts  # the kept caches are dropped when the rollout ends
