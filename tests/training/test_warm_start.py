import functools
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from coars_jax import configlib
from coars_jax.agents.parsing import parse_recommender_output, parse_user_output
from coars_jax.agents.prompts import format_user_output, recommender_system_prompt, user_system_prompt
from coars_jax.agents.protocol import in_interval
from coars_jax.agents.trajectory import Trajectory
from coars_jax.data import candidate_list, synthetic
from coars_jax.models import BASE_PARAMS, Decoder, get_preset
from coars_jax.models import tokenizer as tokenizer_lib
from coars_jax.recsys import SASRec, SASRecConfig
from coars_jax.sampling import LengthBuckets, score
import coars_jax.training.warm_start as ws

DATASET = synthetic.synthetic_dataset()
# One prompt and one completion bucket: every batch of these tests has one shape, so each run compiles once.
BUCKETS = LengthBuckets(prompt=(512,), completion=(48,))


@functools.lru_cache(maxsize=None)
def small_tokenizer():
  """A 700-piece tokenizer from the synthetic titles, the protocol corpus and the system prompts: prompts of a few
  hundred tokens, so the micro model's programs stay small."""
  lines = tokenizer_lib.tokenizer_corpus([DATASET.catalog.titles], repeats=4)
  for text in (recommender_system_prompt(), user_system_prompt()):
    lines += [line for line in text.splitlines() if line]
  folder = tokenizer_lib.build_tokenizer(lines, tempfile.mkdtemp(prefix='warm-start-tokenizer-'), vocab_size=700)
  return tokenizer_lib.load_tokenizer(folder)


@functools.lru_cache(maxsize=None)
def micro_sasrec():
  return SASRec(
    SASRecConfig(num_items=DATASET.num_items, hidden=16, num_heads=2, num_blocks=1, dropout=0.0), rngs=nnx.Rngs(0)
  )


def micro_model(seed=0, width=64):
  config = get_preset(
    'tiny',
    vocab_size=len(small_tokenizer()),
    embed_dim=width,
    mlp_dim=2 * width,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=width // 4,
    max_position_embeddings=1024,
  )
  return Decoder(config, rngs=nnx.Rngs(seed))


def config(**overrides):
  fields = dict(
    num_dialogues=4,
    max_turns=2,
    steps=6,
    batch_size=4,
    learning_rate=1e-2,
    warmup_steps=1,
    buckets=BUCKETS,
    progress=False,
  )
  return ws.WarmStartConfig(**{**fields, **overrides})


@functools.lru_cache(maxsize=None)
def examples(num_dialogues=4, max_turns=2):
  windows = ws.draw_windows(DATASET, num_dialogues, seed=0)
  episodes = ws.scripted_dialogues(
    DATASET, micro_sasrec(), small_tokenizer(), windows, rollout=config(max_turns=max_turns).rollout
  )
  return ws.SFTExamples.from_trajectory(Trajectory.from_episodes(episodes))


def sasrec_ranking(split, index):
  """SASRec's order of a window's candidates, computed here from the model's raw scores."""
  windows = DATASET.split(split)
  scores = np.asarray(micro_sasrec()(windows.history[[index]], windows.lengths[[index]]))[0]
  candidates = candidate_list(DATASET, split, index, seed=0)
  return [int(c) for c in sorted(candidates, key=lambda item: (-scores[item], list(candidates).index(item)))]


# --- scripted dialogues ------------------------------------------------------------------------------------------


def test_scripted_dialogues_follow_the_script():
  windows = ws.draw_windows(DATASET, 8, seed=3)
  rollout = config(max_turns=5).rollout
  episodes = ws.scripted_dialogues(DATASET, micro_sasrec(), small_tokenizer(), windows, rollout=rollout, seed=3)
  assert [e.window_index for e in episodes] == list(windows)
  ended_on_target = 0
  for episode in episodes:
    ranking = sasrec_ranking('train', episode.window_index)
    target_rank = ranking.index(episode.target) + 1
    # Turn t names SASRec's t-th candidate, and the dialogue stops exactly when that is the target.
    assert [turn.item for turn in episode.turns] == ranking[: episode.num_turns]
    assert episode.num_turns == min(target_rank, 5)
    assert episode.peer_item == ranking[0]
    for turn in episode.turns:
      assert turn.recommender_parse.valid and turn.recommender_parse.match_rule == 'exact'
      assert turn.user_parse.valid and turn.user_parse.score_rule == 'stated'
      assert (turn.action == 'click') == (turn.item == episode.target)
      assert in_interval(turn.action, turn.acceptance_score)
      assert turn.action == ws.scripted_user_reaction(turn.item == episode.target, turn.peer_similarity)[0]
      # The recommender's rationale is built from the history titles.
      assert episode.history_titles[-1] in turn.recommender_parse.reason
    ended_on_target += episode.clicked
    assert episode.clicked == (target_rank <= 5) == episode.final_hit
  assert ended_on_target >= 1  # the draw exercises both endings
  assert ended_on_target < len(episodes)
  again = ws.scripted_dialogues(DATASET, micro_sasrec(), small_tokenizer(), windows, rollout=rollout, seed=3)
  assert [t.recommender.text + t.user.text for e in again for t in e.turns] == [
    t.recommender.text + t.user.text for e in episodes for t in e.turns
  ]


def test_shuffled_dialogues_name_the_hint_in_a_random_order():
  windows = ws.draw_windows(DATASET, 8, seed=3)
  rollout = config(max_turns=5, show_hint=True).rollout
  episodes = ws.scripted_dialogues(
    DATASET, micro_sasrec(), small_tokenizer(), windows, rollout=rollout, seed=3, shuffled=True
  )
  script = ws.dialogue_script(DATASET, micro_sasrec(), 'train', windows, rollout=rollout, shuffle_seed=3)
  differs = 0
  for row, episode in enumerate(episodes):
    order = script.ranked[row].tolist()
    candidates = candidate_list(DATASET, 'train', episode.window_index, seed=0)
    assert sorted(order) == sorted(int(c) for c in candidates)
    differs += order != sasrec_ranking('train', episode.window_index)
    target_rank = order.index(episode.target) + 1
    assert [turn.item for turn in episode.turns] == order[: episode.num_turns]
    assert episode.num_turns == min(target_rank, 5)
    for turn in episode.turns:
      # The hint names the item the scripted recommender then recommends, so its Item line copies the hint.
      prompt = turn.recommender.prompt_text
      assert f'in this dialogue:\nItem: {DATASET.catalog.titles[turn.item]}' in prompt
      assert turn.recommender_parse.valid
      assert turn.action == ws.scripted_user_reaction(turn.item == episode.target, turn.peer_similarity)[0]
  assert differs == len(episodes)
  with pytest.raises(ValueError, match='ScriptPeer'):
    ws.ScriptPeer(script).candidate_ranking(None, None, script.ranked[:2])


def test_scripted_user_reaction_maps_similarity_into_the_action_interval():
  assert ws.scripted_user_reaction(True, 1.0) == ('click', 1.0)
  assert ws.scripted_user_reaction(True, -1.0) == ('click', 0.75)
  assert ws.scripted_user_reaction(True, 0.0) == ('click', 0.87)
  assert ws.scripted_user_reaction(False, -1.0) == ('dislike', 0.0)
  assert ws.scripted_user_reaction(False, 0.0) == ('skip', 0.37)
  assert ws.scripted_user_reaction(False, 1.0) == ('star', 0.74)
  scores = [ws.scripted_user_reaction(False, q)[1] for q in np.linspace(-1, 1, 41)]
  assert scores == sorted(scores) and max(scores) < 0.75
  # The written message parses back to exactly the scripted reaction.
  message = format_user_output('fine', *ws.scripted_user_reaction(False, 0.3))
  parsed = parse_user_output(message)
  assert (parsed.action, parsed.score) == ws.scripted_user_reaction(False, 0.3)


def test_draw_windows_is_seeded_and_refuses_too_many():
  first = ws.draw_windows(DATASET, 10, seed=1)
  np.testing.assert_array_equal(first, ws.draw_windows(DATASET, 10, seed=1))
  assert len(set(first.tolist())) == 10 and not np.array_equal(first, ws.draw_windows(DATASET, 10, seed=2))
  with pytest.raises(ValueError, match='num_dialogues=10000 exceeds the 624 train windows'):
    ws.draw_windows(DATASET, 10_000, seed=0)


# --- batches -----------------------------------------------------------------------------------------------------


def test_batches_have_bucket_shapes_cover_every_row_and_mask_fillers():
  data = examples()
  buckets = LengthBuckets(prompt=(384, 512), completion=(48,))
  order = ws.batch_indices(data, 4, buckets, seed=0)
  shapes = ws.batch_shapes(data, buckets)
  groups = {tuple(s) for s in shapes}
  batches_per_epoch = sum(-(-int((shapes == g).all(1).sum()) // 4) for g in groups)
  epoch = [next(order) for _ in range(batches_per_epoch)]
  real = np.concatenate(epoch)
  assert sorted(real[real >= 0].tolist()) == list(range(len(data)))
  for rows in epoch:
    batch = ws.make_batch(data, rows, buckets, (0, 1))
    assert len({tuple(shapes[r]) for r in rows if r >= 0}) == 1  # a batch never mixes buckets
    assert batch['prompt_tokens'].shape == (4, shapes[rows[0]][0])
    assert batch['completion_tokens'].shape == (4, 48)
    np.testing.assert_array_equal(batch['completion_mask'].sum(1) > 0, rows >= 0)
    assert batch['prompt_mask'].any(1).all()
    np.testing.assert_array_equal(batch['adapter'], batch['agent'])
    for position, row in enumerate(rows):
      if row >= 0:
        np.testing.assert_array_equal(
          batch['completion_tokens'][position][batch['completion_mask'][position] > 0], data.completions[row]
        )


# --- loss and training -------------------------------------------------------------------------------------------


def randomized_adapters(model):
  # B starts at zero, which makes the gradient of every A zero and both adapters equal to the base; random values
  # make each adapter matter. numpy keeps eager jax from compiling one program per shape.
  rng = np.random.default_rng(5)
  state = nnx.state(model, nnx.LoRAParam)
  nnx.update(model, jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.3, x.dtype), state))
  return model


@nnx.jit
def loss_and_lora_grads(model, batch):
  grad_fn = nnx.value_and_grad(ws.sft_loss, argnums=nnx.DiffState(0, nnx.LoRAParam), has_aux=True)
  return grad_fn(model, batch)


def agent_slices(grads, index):
  return [np.asarray(leaf)[index] for leaf in jax.tree.leaves(grads)]


def test_each_agent_is_trained_on_its_own_tokens_through_its_own_adapter():
  data = examples()
  model = randomized_adapters(ws.prepare_model(micro_model(), config()))
  rows = np.arange(4)
  batch = ws.make_batch(data, rows, BUCKETS, ws.agent_adapters(model))
  assert sorted(batch['agent'].tolist()) == [0, 0, 1, 1]
  (loss, metrics), grads = loss_and_lora_grads(model, batch)

  # The loss is the mean over rows of each row's mean token NLL under its own adapter.
  log_probs = np.asarray(
    score(
      model,
      batch['prompt_tokens'],
      batch['prompt_mask'],
      batch['completion_tokens'],
      batch['completion_mask'],
      chunk_size=None,
      adapter=batch['adapter'],
    )
  )
  mask = batch['completion_mask'].astype(bool)
  row_loss = np.asarray([-log_probs[r][mask[r]].mean() for r in range(4)])
  np.testing.assert_allclose(float(loss), row_loss.mean(), rtol=1e-5)
  for index, agent in enumerate(('recommender', 'user')):
    np.testing.assert_allclose(float(metrics[f'loss_{agent}']), row_loss[batch['agent'] == index].mean(), rtol=1e-5)
  assert all(np.abs(g).sum() > 0 for g in agent_slices(grads, 0) + agent_slices(grads, 1))

  # With the user's tokens masked out, the user adapter gets no gradient and the recommender's is unchanged.
  no_user = dict(batch, completion_mask=batch['completion_mask'] * (batch['agent'] == 0)[:, None])
  (_, masked_metrics), masked = loss_and_lora_grads(model, no_user)
  assert all(np.all(g == 0) for g in agent_slices(masked, 1))
  assert int(masked_metrics['rows_user']) == 0
  # Only the recommender's rows remain, so the mean over rows gives each of them weight 1 / rows_recommender
  # instead of 1 / 4.
  for full, half in zip(agent_slices(grads, 0), agent_slices(masked, 0)):
    np.testing.assert_allclose(half, full * 4 / float(metrics['rows_recommender']), rtol=2e-3, atol=1e-7)

  # Changing the user adapter leaves the recommender's loss as it was.
  lora = nnx.state(model, nnx.LoRAParam)
  nnx.update(model, jax.tree.map(lambda x: x.at[1].add(0.5), lora))
  (_, shifted), _ = loss_and_lora_grads(model, batch)
  assert float(shifted['loss_recommender']) == pytest.approx(float(metrics['loss_recommender']), rel=1e-6)
  assert float(shifted['loss_user']) != pytest.approx(float(metrics['loss_user']), rel=1e-3)


def test_item_title_start_finds_the_title_tokens():
  tokenizer = small_tokenizer()
  data = examples().with_item_starts(tokenizer)
  for completion, agent, start in zip(data.completions, data.agent, data.item_start):
    text = tokenizer.decode(completion, skip_special_tokens=True)
    if agent == 1:
      assert start == -1
      continue
    title = text.split('\nItem:', 1)[1].strip()
    assert start > 0
    assert tokenizer.decode(completion[:start], skip_special_tokens=True).endswith('\nItem:')
    assert tokenizer.decode(completion[start:], skip_special_tokens=True).strip() == title
  no_item = np.asarray(tokenizer.encode('Reason: no item line', add_special_tokens=False))
  assert ws.item_title_start(tokenizer, no_item) == -1


def test_item_loss_weight_reweights_the_title_tokens_of_recommender_rows():
  tokenizer = small_tokenizer()
  data = examples().with_item_starts(tokenizer)
  model = randomized_adapters(ws.prepare_model(micro_model(), config()))
  rows = np.arange(4)
  plain = ws.make_batch(data, rows, BUCKETS, ws.agent_adapters(model))
  weighted = ws.make_batch(data, rows, BUCKETS, ws.agent_adapters(model), item_loss_weight=4.0)
  np.testing.assert_array_equal(plain['completion_weight'], plain['completion_mask'])
  mask = weighted['completion_mask'].astype(bool)
  for position, row in enumerate(rows):
    start = data.item_start[row]
    expected = np.where(np.arange(mask.shape[1]) >= start, 4.0, 1.0) if start >= 0 else np.ones(mask.shape[1])
    np.testing.assert_array_equal(weighted['completion_weight'][position], expected * mask[position])
  with pytest.raises(ValueError, match='item_start'):
    ws.make_batch(examples(), rows, BUCKETS, ws.agent_adapters(model), item_loss_weight=4.0)

  (loss, metrics), _ = loss_and_lora_grads(model, weighted)
  log_probs = np.asarray(
    score(
      model,
      weighted['prompt_tokens'],
      weighted['prompt_mask'],
      weighted['completion_tokens'],
      weighted['completion_mask'],
      chunk_size=None,
      adapter=weighted['adapter'],
    )
  )
  w = weighted['completion_weight']
  row_loss = -(log_probs * w).sum(1) / w.sum(1)
  np.testing.assert_allclose(float(loss), row_loss.mean(), rtol=1e-5)
  # User rows have no Item line, so their loss is the plain mean.
  (_, plain_metrics), _ = loss_and_lora_grads(model, plain)
  assert float(metrics['loss_user']) == pytest.approx(float(plain_metrics['loss_user']), rel=1e-6)
  assert float(metrics['loss_recommender']) != pytest.approx(float(plain_metrics['loss_recommender']), rel=1e-4)


def flat_values(model, filter_):
  return {path: np.array(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, filter_))}


def test_lora_only_training_lowers_the_loss_and_leaves_the_base_bit_identical():
  data = examples()
  model = ws.prepare_model(micro_model(), config())
  base_before, lora_before = flat_values(model, BASE_PARAMS), flat_values(model, nnx.LoRAParam)
  result = ws.train_sft(model, data, config(steps=8, train_base=False))
  losses = [h['loss'] for h in result.history]
  assert len(losses) == 8 and np.mean(losses[-2:]) < losses[0] - 0.1
  assert result.traces <= 1  # one shape, so at most one program (0 if an earlier test compiled it)
  base_after, lora_after = flat_values(model, BASE_PARAMS), flat_values(model, nnx.LoRAParam)
  assert base_after.keys() == base_before.keys()
  for path, value in base_before.items():
    np.testing.assert_array_equal(base_after[path], value, err_msg=str(path))
  assert any(not np.array_equal(lora_after[p], v) for p, v in lora_before.items())


def test_train_base_also_updates_the_base():
  data = examples()
  model = ws.prepare_model(micro_model(), config())
  base_before = flat_values(model, BASE_PARAMS)
  ws.train_sft(model, data, config(steps=2, train_base=True))
  base_after = flat_values(model, BASE_PARAMS)
  assert all(not np.array_equal(base_after[p], v) for p, v in base_before.items())


def test_save_and_load_round_trip(tmp_path):
  model = randomized_adapters(ws.prepare_model(micro_model(seed=4), config()))
  ws.save_warm_start(model, tmp_path / 'run', save_base=True, metadata={'note': 'x'})
  loaded, meta = ws.load_warm_start(tmp_path / 'run')
  assert meta['note'] == 'x' and meta['base_saved'] and loaded.adapter_names == ('recommender', 'user')
  for filter_ in (BASE_PARAMS, nnx.LoRAParam):
    expected, found = flat_values(model, filter_), flat_values(loaded, filter_)
    assert expected.keys() == found.keys()
    for path in expected:
      np.testing.assert_array_equal(found[path], expected[path])
  # Adapters alone go onto the base they were trained on.
  ws.save_warm_start(model, tmp_path / 'adapters_only', save_base=False)
  with pytest.raises(ValueError, match='holds adapters only'):
    ws.load_warm_start(tmp_path / 'adapters_only')
  onto, _ = ws.load_warm_start(tmp_path / 'adapters_only', base=micro_model(seed=4))
  for path, value in flat_values(model, nnx.LoRAParam).items():
    np.testing.assert_array_equal(flat_values(onto, nnx.LoRAParam)[path], value)
  with pytest.raises(FileNotFoundError, match='warm_start.json is missing'):
    ws.load_warm_start(tmp_path)


# --- configs -----------------------------------------------------------------------------------------------------


def test_configs_are_validated():
  with pytest.raises(ValueError, match='WarmStartConfig.batch_size must be an int >= 1'):
    ws.WarmStartConfig(batch_size=0)
  with pytest.raises(ValueError, match=r'WarmStartConfig.warmup_steps \(10\) must be smaller than steps \(5\)'):
    ws.WarmStartConfig(steps=5, warmup_steps=10)
  with pytest.raises(ValueError, match='WarmStartConfig.train_base must be a bool'):
    ws.WarmStartConfig(train_base=1)
  with pytest.raises(ValueError, match='needs one per agent'):
    ws.agent_adapters(micro_model())
  experiment = ws.default_config('synthetic_typo')
  with pytest.raises(configlib.ConfigError, match="Config field 'dataset'"):
    ws.validate(experiment)
  experiment = ws.default_config('movielens')
  experiment.warm_start.learning_rate = -1.0
  with pytest.raises(configlib.ConfigError, match='WarmStartConfig.learning_rate must be a positive number'):
    ws.validate(experiment)
  experiment = ws.default_config('movielens')
  experiment.warm_start.unknown = 1
  with pytest.raises(configlib.ConfigError, match="Unknown config field 'warm_start.unknown'"):
    ws.validate(experiment)
  assert isinstance(ws.default_config(), ml_collections.ConfigDict)


# --- end to end --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_warm_started_micro_model_speaks_the_protocol():
  """SFT on scripted dialogues teaches a random micro model (2 layers, width 64) the output formats.

  What 800 updates can promise on any CPU: every greedy user message parses, and every recommender message has the
  Reason / Item format with a title of the catalog on its Item line (formatted 1.0 and catalog title 1.0, measured
  in session 15). Which title it copies is not stable: the share naming one of the 20 candidates (ValidRatio) was
  0.667 on one machine and 0.167 on another with the same code, either side of the 0.4 that naming a random
  catalog title would give, because the micro model's training lands differently under another CPU's float
  rounding. So ValidRatio is printed, not asserted; SmolLM2's warm start is where candidate naming is measured.
  """
  model = micro_model()
  settings = ws.WarmStartConfig(
    num_dialogues=64,
    max_turns=2,
    steps=800,
    batch_size=8,
    learning_rate=5e-3,
    warmup_steps=10,
    train_base=True,
    buckets=BUCKETS,
    progress=False,
  )
  base_before = flat_values(model, BASE_PARAMS)
  result = ws.warm_start_agents(model, small_tokenizer(), DATASET, micro_sasrec(), settings)
  assert result.train.traces <= 1
  assert np.mean([h['loss'] for h in result.train.history[-20:]]) < 0.3 < result.train.history[0]['loss']
  assert any(not np.array_equal(flat_values(model, BASE_PARAMS)[p], v) for p, v in base_before.items())
  metrics, episodes = ws.evaluate_dialogues(
    model,
    small_tokenizer(),
    DATASET,
    micro_sasrec(),
    range(6),
    split='val',
    rollout=settings.rollout,
    recommender_max_new_tokens=result.max_new_tokens('recommender', margin=4),
    user_max_new_tokens=result.max_new_tokens('user', margin=4),
    buckets=BUCKETS,
  )
  turns = [t for e in episodes for t in e.turns]
  texts = [t.recommender.text for t in turns]
  parses = [t.recommender_parse for t in turns]
  formatted = np.mean([p.item_text is not None and p.reason != '' for p in parses])
  catalog = [parse_recommender_output(f'Item: {p.item_text}', DATASET.catalog.titles).valid for p in parses]
  print(f'micro warm start: formatted {formatted:.3f}, a catalog title {np.mean(catalog):.3f}, metrics {metrics}')
  assert metrics['user_valid_ratio'] >= 0.9, [t.user.text for t in turns]
  assert formatted >= 0.9, texts
  assert np.mean(catalog) >= 0.9, texts
