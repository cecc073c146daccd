"""The RL trainer on the synthetic dataset with a micro decoder (2 layers, width 32) and the small test tokenizer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coars_jax.agents.episodes import AGENTS, RolloutConfig, encode_prompt
from coars_jax.agents.trajectory import Trajectory
from coars_jax.coars.reference import REFERENCE_HEADER
from coars_jax.models import BASE_PARAMS, Decoder, LoRAConfig, add_lora, get_preset
from coars_jax.models.lora import adapted_linears
from coars_jax.parallel.mesh import DATA_AXIS
from coars_jax.sampling import LengthBuckets, SamplingParams, score, trace_counts
from coars_jax.sampling import packed as packed_lib
from coars_jax.training import rl, update_step
from coars_jax.training import warm_start as ws
from tests.tolerances import decoder_sums, gamma, step_bound, update_errors
from tests.training.test_warm_start import DATASET, micro_sasrec, small_tokenizer

# Student prompts of 2-turn synthetic dialogues fit 512 tokens, teacher prompts x + d 1024.
BUCKETS = LengthBuckets(prompt=(512, 1024), completion=(16,))
ROLLOUT = RolloutConfig(max_turns=2)


@functools.lru_cache(maxsize=None)
def _micro_base(seed: int) -> Decoder:
  config = get_preset(
    'tiny',
    vocab_size=len(small_tokenizer()),
    embed_dim=32,
    mlp_dim=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=2048,
  )
  return Decoder(config, rngs=nnx.Rngs(seed))


def micro_base(seed: int = 0) -> Decoder:
  """2 layers, width 32, no adapters; a fresh copy each call (eager initialisation costs a second per model)."""
  return nnx.clone(_micro_base(seed))


def micro_model(seed: int = 0) -> Decoder:
  """`micro_base` with both agents' adapters, their B random (so each adapter changes the scores)."""
  model = add_lora(micro_base(seed), LoRAConfig(rank=4, alpha=8.0), list(AGENTS), rngs=nnx.Rngs(seed + 1))
  rng = np.random.default_rng(seed + 2)  # numpy draws: eager jax.random would compile a program per shape
  for _, linear in adapted_linears(model):
    b = linear.lora.b.get_value()
    linear.lora.b.set_value(jnp.asarray(0.3 * rng.standard_normal(b.shape), b.dtype))
  return model


def rl_config(**overrides) -> rl.RLConfig:
  fields = dict(
    iterations=4,
    windows_per_iteration=2,
    recommender_max_new_tokens=16,
    user_max_new_tokens=16,
    buckets=BUCKETS,
    rows_per_microbatch=4,
    learning_rate=1e-3,
    warmup_iterations=0,
  )
  return rl.RLConfig(**{**fields, **overrides})


def trainer(config: rl.RLConfig, seed: int = 0) -> rl.RLTrainer:
  return rl.RLTrainer(micro_model(seed), small_tokenizer(), DATASET, micro_sasrec(), config, rollout=ROLLOUT)


def values(model, filter_) -> dict:
  return {path: np.array(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, filter_))}


def first_moment(opt_state):
  """Adam's first moment of the adapters in a trainer's optimizer state (after one step: 0.1 x the gradient)."""
  return next(s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, 'mu')) if hasattr(s, 'mu')).mu


def assert_same_update(run, reference, what=''):
  """`run` and `reference` made one update each from `micro_model()`'s adapters, and agree as `tests.tolerances`
  says updates computed with sums in another order can: gradients (through Adam's first moment) within gamma(n) of
  the decoder's sums, and steps weighted by the gradient within `step_bound` (an unweighted per-entry comparison
  cannot promise anything below 2 lr where a gradient entry is ~1e-8)."""
  before = nnx.state(micro_model(), nnx.LoRAParam)
  errors = update_errors(
    nnx.state(run.model, nnx.LoRAParam),
    first_moment(run.opt_state),
    nnx.state(reference.model, nnx.LoRAParam),
    first_moment(reference.opt_state),
    before,
  )
  bound = gamma(decoder_sums(run.model.config, 1040, 4 * 528))  # rows of up to 1,040 tokens, 4 x 528 positions
  assert errors['grad_error'] <= bound and errors['step_error'] <= step_bound(bound), (what, errors, bound)


def step_and_reward_traces() -> tuple[int, int]:
  counts = trace_counts()
  return counts.get(rl.STEP_TRACE_NAME, 0), counts.get(rl.REWARDS_TRACE_NAME, 0)


@pytest.fixture(scope='module')
def coars_run():
  """Two CoARS iterations (interaction reward, lambda_SD 0.1, both agents) with snapshots around each."""
  run = trainer(rl_config())
  snapshots = [(values(run.model, BASE_PARAMS), values(run.model, nnx.LoRAParam), step_and_reward_traces())]
  metrics = []
  for _ in range(2):
    metrics.append(run.iteration())
    snapshots.append((values(run.model, BASE_PARAMS), values(run.model, nnx.LoRAParam), step_and_reward_traces()))
  return run, snapshots, metrics


def test_iteration_trains_both_adapters_and_nothing_else(coars_run):
  run, snapshots, metrics = coars_run
  (base_0, lora_0, _), (base_1, lora_1, _) = snapshots[0], snapshots[1]
  first = metrics[0]
  assert first['update/skipped'] is False and np.isfinite(first['loss/total'])
  assert first['rollout/episodes'] == 2 and first['update/loss_rows'] > 0
  assert first['reward/recommender_segments'] > 0 and first['reward/user_segments'] > 0
  # Packed: each agent's dialogue is one sequence; the microbatches run are those the packing filled.
  assert first['update/microbatches'] == first['update/packed_microbatches'] >= 1
  assert first['update/packed_dialogues'] == 2 * first['rollout/episodes']  # both agents of both episodes
  assert 0 <= first['update/padding'] < 1
  assert first['update/learning_rate'] == pytest.approx(1e-3)
  assert set(base_0) == set(base_1)
  for path, value in base_0.items():
    np.testing.assert_array_equal(base_1[path], value, err_msg=str(path))
  for index, agent in enumerate(AGENTS):  # the adapters are stacked on axis 0 in AGENTS order
    assert any(not np.array_equal(lora_1[p][index], v[index]) for p, v in lora_0.items()), agent
  # The step runs on the configured mesh: parameters replicated over the 'data' axis.
  leaf = jax.tree.leaves(run.lora)[0]
  assert leaf.sharding.mesh.axis_names == (DATA_AXIS,) and leaf.sharding.spec == jax.sharding.PartitionSpec()
  assert run.optimizer_count() == 2 and run.state.iteration == 2 and run.state.next_window == 4


def test_second_iteration_compiles_no_new_update_or_reward_program(coars_run):
  _, snapshots, metrics = coars_run
  before, after_first, after_second = (s[2] for s in snapshots)
  assert after_first[0] - before[0] <= 1 and after_first[1] - before[1] <= 1
  assert after_second == after_first
  assert metrics[1]['update/skipped'] is False
  assert metrics[1]['windows'] != metrics[0]['windows']  # the data stream moved on


def test_recommender_only_leaves_the_user_adapter_bit_identical():
  run = trainer(rl_config(train_user_agent=False))
  lora_0, base_0 = values(run.model, nnx.LoRAParam), values(run.model, BASE_PARAMS)
  metrics = run.iteration()
  lora_1 = values(run.model, nnx.LoRAParam)
  assert metrics['reward/user_segments'] == 0 and metrics['reward/recommender_segments'] > 0
  for path, value in lora_0.items():
    np.testing.assert_array_equal(lora_1[path][1], value[1], err_msg=str(path))
  assert any(not np.array_equal(lora_1[p][0], v[0]) for p, v in lora_0.items())
  for path, value in base_0.items():
    np.testing.assert_array_equal(values(run.model, BASE_PARAMS)[path], value)


def test_judge_rl_rewards_the_final_recommender_turn_with_the_base_models_judgement():
  run = trainer(rl_config(reward='judge', lambda_sd=0.0, train_user_agent=False))
  metrics = run.iteration()
  assert 0.0 < metrics['reward/judge_probability'] < 1.0
  # One rewarded segment per episode (the final recommender turn), none for the user.
  assert metrics['update/loss_rows'] == 2 and metrics['reward/user_segments'] == 0
  assert metrics['update/skipped'] is False

  # The judge is the base model: the adapters do not change its p.
  episodes = ws.scripted_dialogues(DATASET, micro_sasrec(), small_tokenizer(), [0, 5], rollout=ROLLOUT)
  judge = functools.partial(
    rl.judge_probabilities,
    tokenizer=small_tokenizer(),
    episodes=episodes,
    answers=('Yes', 'No'),
    buckets=BUCKETS,
    dataset_name=DATASET.name,
  )
  before = judge(run.model)
  lora = nnx.state(run.model, nnx.LoRAParam)
  nnx.update(run.model, jax.tree.map(lambda x: x + 1.0, lora))
  np.testing.assert_allclose(judge(run.model), before, rtol=1e-6)
  assert before.shape == (2,) and np.all((before > 0) & (before < 1))


@pytest.fixture
def fresh_step_cache():
  rl.build_update_step.cache_clear()
  yield
  rl.build_update_step.cache_clear()


def test_nonfinite_updates_are_skipped_then_stop_the_run(monkeypatch, fresh_step_cache):
  real = update_step.coars_objective

  def nan_objective(model, batch, **kwargs):
    loss, metrics = real(model, batch, **kwargs)
    return loss * jnp.nan, metrics

  monkeypatch.setattr(update_step, 'coars_objective', nan_objective)
  run = trainer(rl_config(max_consecutive_nonfinite=2, lambda_sd=0.0))
  lora_0 = values(run.model, nnx.LoRAParam)
  metrics = run.iteration()
  assert metrics['update/skipped'] is True and 'loss' in metrics['update/nonfinite_metrics']
  assert run.state.consecutive_nonfinite == 1 and run.optimizer_count() == 0
  for path, value in values(run.model, nnx.LoRAParam).items():
    np.testing.assert_array_equal(value, lora_0[path])
  windows = rl.windows_at(len(DATASET.split('train')), 0, 2, 2).tolist()
  with pytest.raises(
    rl.NonFiniteUpdateError,
    match=r'RL iteration 2: non-finite loss.*max_consecutive_nonfinite'
    r' = 2',
  ) as error:
    run.iteration()
  assert str(windows) in str(error.value)


def test_rollout_rewards_group_baseline_centres_within_window_and_agent():
  # Two windows x two rollouts, one turn each: rows (episode, agent) = (0,r) (0,u) (1,r) (1,u) ... plus padding.
  hit = np.array([1, 1, 0, 0, 0, 0, 1, 1, 0, 0], bool)
  real = np.array([1] * 8 + [0, 0], bool)
  rows = {
    'hit': hit,
    'acceptance_score': np.array([0.9, 0.9, 0.2, 0.2, 0.4, 0.4, 0.8, 0.8, 0, 0], np.float32),
    'peer_similarity': np.zeros(10, np.float32),
    'action': np.array([3, 3, 0, 0, 1, 1, 3, 3, 0, 0], np.int32),
    'turn': np.ones(10, np.int32),
    'agent': np.array([0, 1] * 5, np.int32),
    'valid': np.ones(10, bool),
    'final_hit': hit,
    'last_turn': np.ones(10, np.int32),
    'judge_probability': np.zeros(10, np.float32),
    'group': np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 0], np.int32),
    'real': real,
  }
  common = dict(kind='interaction', gamma=0.9, alpha=0.1, assign='final', signed=True)
  reward, weight, included = (np.asarray(a) for a in rl.rollout_rewards(rows, group_baseline=False, **common))
  np.testing.assert_array_equal(weight, reward)
  np.testing.assert_array_equal(included, real)
  _, centred, _ = (np.asarray(a) for a in rl.rollout_rewards(rows, group_baseline=True, **common))
  for group in (0, 1):
    for agent in (0, 1):
      mine = real & (rows['group'] == group) & (rows['agent'] == agent)
      np.testing.assert_allclose(centred[mine], reward[mine] - reward[mine].mean(), rtol=1e-6)
  assert np.all(reward[~real] == 0)


def test_teacher_prompts_rebuild_the_student_prompt_and_append_d():
  tokenizer = small_tokenizer()
  episodes = ws.scripted_dialogues(DATASET, micro_sasrec(), tokenizer, [1, 2, 3], rollout=ROLLOUT)
  trajectory = Trajectory.from_episodes(episodes)
  rows = np.arange(trajectory.num_segments)
  teachers = rl.teacher_prompts(
    tokenizer, episodes, trajectory, rows, ranks=None, rollout=ROLLOUT, dataset_name=DATASET.name
  )
  assert len(teachers) == len(rows)
  for row, ids in zip(rows, teachers):
    episode = episodes[trajectory.episode[row]]
    agent, turn = AGENTS[trajectory.agent[row]], int(trajectory.turn[row])
    student = rl.student_messages(episode, turn, agent, rollout=ROLLOUT, dataset_name=DATASET.name)
    text, student_ids = encode_prompt(tokenizer, student)
    assert text == trajectory.prompt_texts[row]
    teacher_text = tokenizer.decode(ids)
    assert REFERENCE_HEADER in teacher_text and episode.target_title in teacher_text
    assert len(ids) > len(student_ids)
    # d goes inside the last user message: everything before that message's content is unchanged.
    assert teacher_text.startswith(tokenizer.decode(student_ids[: len(student_ids) // 2]))
  # The ablation's d: the same prompts, with no turn's sampled reaction in d.
  omitted = rl.teacher_prompts(
    tokenizer, episodes, trajectory, rows, ranks=None, rollout=ROLLOUT, dataset_name=DATASET.name, omit_samples=True
  )
  for ids, full in zip(omitted, teachers):
    d = tokenizer.decode(ids).split(REFERENCE_HEADER)[1]
    assert 'reacted' not in d and 'reacted' in tokenizer.decode(full).split(REFERENCE_HEADER)[1]


def test_rewards_read_each_segments_validity(coars_run):
  # The trainer passes `Trajectory.valid` to the reward: a user message that did not parse gets R_user = -1 and
  # stays in the loss; the recommender's row of that turn keeps its reward.
  run = coars_run[0]
  episodes = ws.scripted_dialogues(DATASET, micro_sasrec(), small_tokenizer(), [1, 2], rollout=ROLLOUT)
  trajectory = Trajectory.from_episodes(episodes)
  groups = np.arange(len(episodes))
  reward, _, included, _ = run._rewards(trajectory, None, groups)
  user = int(np.flatnonzero(trajectory.agent == 1)[0])
  rec = int(
    np.flatnonzero(
      (trajectory.agent == 0)
      & (trajectory.episode == trajectory.episode[user])
      & (trajectory.turn == trajectory.turn[user])
    )[0]
  )
  assert reward[user] != -1.0
  trajectory.valid[user] = False
  penalised, _, penalised_included, _ = run._rewards(trajectory, None, groups)
  assert penalised[user] == -1.0 and penalised_included[user]
  np.testing.assert_array_equal(np.delete(penalised, user), np.delete(reward, user))
  assert penalised[rec] == reward[rec] and penalised_included[rec] == included[rec]


def test_outcome_rl_baseline_update_is_terminal_and_the_coars_ablation_keeps_every_turn():
  # The baseline (recommender only, lambda_SD = 0): one row per episode, the final recommender turn, R = +-1.
  baseline = trainer(rl_config(reward='outcome', lambda_sd=0.0, train_user_agent=False))
  metrics = baseline.iteration()
  assert metrics['update/loss_rows'] == 2 and metrics['reward/user_segments'] == 0
  batch = {
    key: np.asarray(value).reshape(-1)
    for key, value in baseline.last_batch.items()
    if key in ('reward', 'agent', 'included')
  }
  assert set(np.abs(batch['reward'][batch['included']]).tolist()) == {1.0}
  assert set(batch['agent'][batch['included']].tolist()) == {0}
  # CoARS with the outcome reward: every segment of both agents carries loss (self-distillation on each turn).
  ablation = trainer(rl_config(reward='outcome'))
  metrics = ablation.iteration()
  segments = metrics['reward/recommender_segments'] + metrics['reward/user_segments']
  assert metrics['reward/user_segments'] > 0 and metrics['update/loss_rows'] == segments
  assert segments == 2 * metrics['rollout/episodes'] * metrics['rollout/average_turns']
  assert metrics['update/skipped'] is False


def test_windows_stream_is_resumable_and_each_epoch_is_a_permutation():
  whole = rl.windows_at(10, 3, 0, 25)
  np.testing.assert_array_equal(np.concatenate([rl.windows_at(10, 3, 0, 7), rl.windows_at(10, 3, 7, 18)]), whole)
  for epoch in range(2):
    assert sorted(whole[10 * epoch : 10 * (epoch + 1)].tolist()) == list(range(10))
  assert not np.array_equal(whole[:10], whole[10:20])


def test_ppo_epochs_update_several_times_per_rollout_and_start_at_ratio_one():
  plain = trainer(rl_config())
  plain.iteration()
  # One epoch with the clip on: rho = pi_S / pi_old is 1 up to rounding (pi_old is the rollout's own log-probs),
  # where the clipped objective's gradient equals the plain one.
  clipped = trainer(rl_config(ppo_epsilon=0.2))
  clipped.iteration()
  batch = clipped.last_batch
  assert batch['behaviour_log_probs'].shape == batch['completion_tokens'].shape
  assert np.all(batch['behaviour_log_probs'][batch['completion_mask'] == 0] == 0)
  assert np.all(batch['behaviour_log_probs'][batch['completion_mask'] != 0] < 0)
  plain_lora = values(plain.model, nnx.LoRAParam)
  # rho = 1 up to the rounding of pi_old (the sampler's decode and the scorer add in different orders).
  assert_same_update(clipped, plain, 'ppo')
  # Two epochs: two optimizer updates on the same rollout, the second moving the adapters further.
  twice = trainer(rl_config(ppo_epsilon=0.2, ppo_epochs=2))
  metrics = twice.iteration()
  assert twice.optimizer_count() == 2 and twice.state.iteration == 1
  assert metrics['update/skipped'] is False
  assert metrics['update/learning_rate'] == pytest.approx(1e-3)
  twice_lora = values(twice.model, nnx.LoRAParam)
  assert any(not np.allclose(twice_lora[p], v, atol=1e-5) for p, v in plain_lora.items())


def test_constrained_rollouts_are_scored_under_each_segments_own_grammar():
  # The grammar needs room for the head, a reason line, the longest title and the Score line.
  # One row per turn, so that the batch's rows can be rescored directly (the packed path is compared with it on
  # constrained rollouts in `test_one_packed_forward_per_dialogue_equals_one_row_per_turn`).
  run = trainer(
    rl_config(
      constrained=True,
      ppo_epsilon=0.2,
      recommender_max_new_tokens=32,
      user_max_new_tokens=32,
      buckets=LengthBuckets(prompt=(512, 1024), completion=(32,)),
      packed_update=False,
    )
  )
  before = nnx.clone(run.model)  # with its own buffers: the update step donates the trainer's adapters
  nnx.update(before, jax.tree.map(lambda x: jnp.array(np.asarray(x)), nnx.state(before, nnx.LoRAParam)))
  metrics = run.iteration()
  assert metrics['update/skipped'] is False and np.isfinite(metrics['loss/total'])
  assert metrics['rollout/valid_ratio'] == 1.0  # every Item line names a candidate
  batch = {key: np.asarray(value).reshape((-1,) + np.shape(value)[2:]) for key, value in run.last_batch.items()}
  rows = int(metrics['update/loss_rows'])
  agents = batch['agent'][:rows]
  assert set(agents.tolist()) == {0, 1}
  # Recommender rows carry their episode's 20 candidates, user rows the four actions.
  assert set(batch['constraint_choice_lengths'][:rows][agents == 0].astype(bool).sum(1).tolist()) == {20}
  assert set(batch['constraint_choice_lengths'][:rows][agents == 1].astype(bool).sum(1).tolist()) == {4}
  # Scored under the rebuilt grammars with the parameters that sampled them, the completions get the
  # sampler's own (constrained) log-probs back.
  grammar = rl.microbatch_constraint({k: jnp.asarray(batch[k][:rows]) for k in rl.CONSTRAINT_KEYS})
  scores = np.asarray(
    score(
      before,
      batch['prompt_tokens'][:rows],
      batch['prompt_mask'][:rows],
      batch['completion_tokens'][:rows],
      batch['completion_mask'][:rows],
      chunk_size=None,
      adapter=batch['adapter'][:rows],
      constraint=grammar,
    )
  )
  mask = batch['completion_mask'][:rows] != 0
  np.testing.assert_allclose(scores[mask], batch['behaviour_log_probs'][:rows][mask], atol=2e-4)
  free = np.asarray(
    score(
      before,
      batch['prompt_tokens'][:rows],
      batch['prompt_mask'][:rows],
      batch['completion_tokens'][:rows],
      batch['completion_mask'][:rows],
      chunk_size=None,
      adapter=batch['adapter'][:rows],
    )
  )
  assert np.abs(free[mask] - scores[mask]).max() > 1e-2  # the grammar changes the distribution


def test_rl_config_is_validated():
  with pytest.raises(ValueError, match=r"RLConfig.reward must be one of \('interaction', 'outcome', 'judge'\)"):
    rl_config(reward='hit')
  with pytest.raises(ValueError, match="RLConfig.train_user_agent must be False with reward='judge'"):
    rl_config(reward='judge')
  with pytest.raises(ValueError, match=r'RLConfig.invalid_user_reward must be a finite number <= 0'):
    rl_config(invalid_user_reward=0.5)
  with pytest.raises(ValueError, match='RLConfig.reference_omits_samples must be a bool'):
    rl_config(reference_omits_samples=1)
  with pytest.raises(ValueError, match='RLConfig.rows_per_microbatch must be an int >= 1'):
    rl_config(rows_per_microbatch=0)
  with pytest.raises(ValueError, match=r'RLConfig.lambda_sd must be a number in \[0.0, inf\]'):
    rl_config(lambda_sd=-0.1)
  with pytest.raises(ValueError, match='ppo_epochs = 3 needs ppo_epsilon > 0'):
    rl_config(ppo_epochs=3)
  with pytest.raises(ValueError, match='ppo_epsilon must be a number in'):
    rl_config(ppo_epsilon=1.5)
  with pytest.raises(ValueError, match='ppo_epsilon needs sampling by temperature alone'):
    rl_config(ppo_epsilon=0.2, sampling=SamplingParams(temperature=1.0, top_k=5))
  # K is sized for the longest possible rollout: E x T_u segments per trained agent (E for the baselines' terminal
  # rewards; every turn of both agents for CoARS's outcome-reward ablation, which keeps self-distillation on them).
  assert rl_config().num_microbatches(max_turns=2) == 2
  outcome_rl = dict(reward='outcome', lambda_sd=0.0, train_user_agent=False, windows_per_iteration=9)
  assert rl_config(**outcome_rl).num_microbatches(5) == 3
  assert rl_config(reward='outcome', windows_per_iteration=9).num_microbatches(5) == 9 * 5 * 2 // 4 + 1


def test_student_prompts_rebuild_the_moving_hint_of_every_turn():
  # With the hint on, x_rec_t names the peer's best candidate not yet recommended, which moves after turn 1; the
  # trainer's rebuilt prompts must show each turn's own hint (the rebuild check in teacher_prompts raises if not).
  tokenizer = small_tokenizer()
  rollout = RolloutConfig(max_turns=3, show_hint=True)
  episodes = ws.scripted_dialogues(
    DATASET, micro_sasrec(), tokenizer, list(range(0, 60, 6)), rollout=rollout, shuffled=True, seed=1
  )
  trajectory = Trajectory.from_episodes(episodes)
  assert any(turn.hint_title != episode.turns[0].hint_title for episode in episodes for turn in episode.turns[1:])
  rows = np.arange(trajectory.num_segments)
  teachers = rl.teacher_prompts(
    tokenizer, episodes, trajectory, rows, ranks=None, rollout=rollout, dataset_name=DATASET.name
  )
  assert len(teachers) == len(rows)


def test_the_cheap_update_switches_reproduce_the_naive_update():
  """The teacher read from the student's cache and the rematerialised backward pass change how much is computed,
  not what: from the same seed, the rollout, the loss, the gradient norm and the updated adapters match the naive
  update (a second pass over x + d, no remat) to float rounding."""
  naive = trainer(rl_config(teacher_reuses_student_cache=False, remat=False, packed_update=False))
  cheap = trainer(rl_config(packed_update=False))
  assert cheap.settings.teacher_cache and cheap.settings.remat and not naive.settings.teacher_cache
  first, second = naive.iteration(), cheap.iteration()
  assert first['windows'] == second['windows'] and first['update/loss_rows'] == second['update/loss_rows'] > 0
  assert 'teacher_suffix_tokens' in cheap.last_batch and 'teacher_prompt_tokens' in naive.last_batch
  # The suffix is much shorter than the whole teacher prompt: that is the saving.
  assert cheap.last_batch['teacher_suffix_mask'].sum() < 0.6 * naive.last_batch['teacher_prompt_mask'].sum()
  for name in ('loss/total', 'update/grad_norm', 'advantage/mean', 'advantage/std', 'loss/recommender', 'loss/user'):
    assert second[name] == pytest.approx(first[name], rel=1e-4, abs=1e-6), name
  assert_same_update(cheap, naive, 'cheap')


@pytest.mark.parametrize('constrained, student_block_sparse', [(False, True), (True, True), (False, False)])
def test_one_packed_forward_per_dialogue_equals_one_row_per_turn(
  constrained, student_block_sparse, monkeypatch, request
):
  """The packed update (each agent's dialogue forwarded once, several per row, the teacher segments reading the
  student's keys and values) computes the same loss and gradient as one row per turn, on the same record: the
  log-probs are the same sums in another order, so they agree to float32 rounding (1e-4 relative on the loss and
  the gradient norm; the adapters after one Adam step as `assert_same_update` says). `student_block_sparse` False:
  the student's differentiated pass uses the dense softmax instead of the block-sparse attention (the default)."""
  if student_block_sparse != packed_lib.BLOCK_SPARSE_STUDENT:  # read at trace time: clear the compiled steps
    monkeypatch.setattr(packed_lib, 'BLOCK_SPARSE_STUDENT', student_block_sparse)
    for clear in (jax.clear_caches, rl.build_update_step.cache_clear):
      clear()
      request.addfinalizer(clear)
  options = (
    dict(
      constrained=True,
      recommender_max_new_tokens=32,
      user_max_new_tokens=32,
      buckets=LengthBuckets(prompt=(512, 1024), completion=(32,)),
    )
    if constrained
    else {}
  )
  played = trainer(rl_config(packed_update=False, rows_per_microbatch=2, **options))
  played.iteration()
  record = played.last_record
  per_turn = trainer(rl_config(packed_update=False, rows_per_microbatch=2, **options))
  packed = trainer(rl_config(packed_tokens=1024, **options))
  first, second = per_turn.learn_record(record), packed.learn_record(record)
  assert 'dialogue_tokens' in packed.last_batch and 'prompt_tokens' not in packed.last_batch
  stats = packed.last_packing
  assert first['update/loss_rows'] == second['update/loss_rows'] > 0
  # Each dialogue is forwarded once: fewer student tokens than the per-turn rows' real prompts and replies.
  per_turn_real = int(per_turn.last_batch['prompt_mask'].sum() + per_turn.last_batch['completion_mask'].sum())
  assert stats.student_real < per_turn_real
  for name in (
    'loss/total',
    'update/grad_norm',
    'advantage/mean',
    'advantage/std',
    'loss/recommender',
    'loss/user',
    'advantage/abs_mean_recommender',
    'advantage/abs_mean_user',
  ):
    if name in first:
      assert second[name] == pytest.approx(first[name], rel=1e-4, abs=1e-6), name
  assert_same_update(packed, per_turn, 'packed')
