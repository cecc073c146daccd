import numpy as np
import pytest
from flax import nnx

from coars_jax.agents.episodes import RolloutConfig, ScriptedBackend, run_episodes
from coars_jax.data import candidate_list, synthetic
from coars_jax.data.schema import Dataset, ItemCatalog, Window, WindowSplit
from coars_jax.recsys import crossfit, experiment, peer
from coars_jax.recsys.sasrec import SASRec, SASRecConfig
from tests.training.test_warm_start import small_tokenizer

SYNTHETIC = synthetic.synthetic_dataset()


def random_walk_dataset(num_users=64, num_items=40, length=14, seed=0) -> Dataset:
  """Every user's sequence is random, so a training window's target can only be predicted by remembering that
  user's own sequence from their other windows: an in-sample SASRec can, an out-of-fold one cannot."""
  rng = np.random.default_rng(seed)
  sequences = {u: rng.permutation(num_items)[:length] for u in range(num_users)}
  catalog = ItemCatalog(tuple(f'Item {i}' for i in range(num_items)))
  n_train = int(num_users * 0.8)
  groups = {'train': range(n_train), 'val': range(n_train, n_train + 6), 'test': range(n_train + 6, num_users)}
  splits = {}
  for split, users in groups.items():
    windows = []
    for u in users:
      seq = [int(i) for i in sequences[u]]
      positions = range(1, length) if split == 'train' else [length - 1]
      windows += [Window(user=u, history=tuple(seq[max(0, p - 10) : p]), target=seq[p]) for p in positions]
    splits[split] = WindowSplit.from_windows(windows, catalog.pad_id)
  return Dataset(
    name='random_walk',
    catalog=catalog,
    splits=splits,
    user_items={u: frozenset(int(i) for i in s) for u, s in sequences.items()},
    user_sequences={u: s.astype(np.int32) for u, s in sequences.items()},
  )


def micro(seed):
  return SASRec(
    SASRecConfig(num_items=SYNTHETIC.num_items, hidden=16, num_heads=2, num_blocks=1, dropout=0.0), rngs=nnx.Rngs(seed)
  )


def test_user_folds_are_balanced_seeded_and_keep_a_user_whole():
  users = SYNTHETIC.split('train').users
  folds = crossfit.user_folds(users, 5, seed=0)
  assert set(folds) == set(np.unique(users).tolist())
  sizes = np.bincount(list(folds.values()), minlength=5)
  assert sizes.max() - sizes.min() <= 1
  assert folds == crossfit.user_folds(users, 5, seed=0)
  assert folds != crossfit.user_folds(users, 5, seed=1)
  with pytest.raises(ValueError, match='>= 2'):
    crossfit.user_folds(users, 1)
  with pytest.raises(ValueError, match='cannot fill'):
    crossfit.user_folds(users[:1], 2)


def test_held_out_dataset_drops_exactly_the_fold_users():
  spec = crossfit.FoldSpec(num_folds=3, fold=1, seed=4)
  held = crossfit.held_out_dataset(SYNTHETIC, spec)
  folds = crossfit.user_folds(SYNTHETIC.split('train').users, 3, seed=4)
  kept = set(held.split('train').users.tolist())
  assert kept == {u for u, f in folds.items() if f != 1}
  assert len(held.split('train')) == sum(folds[int(u)] != 1 for u in SYNTHETIC.split('train').users)
  for split in ('val', 'test'):
    assert held.split(split) is SYNTHETIC.split(split)
  with pytest.raises(ValueError, match='fold must be in'):
    crossfit.FoldSpec(num_folds=3, fold=3)


def test_cross_fitted_peer_serves_each_training_window_by_its_fold_model():
  full, fold_models = micro(100), [micro(0), micro(1)]
  train = SYNTHETIC.split('train')
  folds = crossfit.user_folds(train.users, 2, seed=0)
  cross = crossfit.CrossFittedPeer(full, fold_models, folds)
  rows = np.arange(0, len(train), 7)
  candidates = np.stack([candidate_list(SYNTHETIC, 'train', int(i), 0) for i in rows])
  history, lengths = train.history[rows], train.lengths[rows]
  bound = cross.for_windows('train', train.users[rows])
  scores = bound.candidate_scores(history, lengths, candidates)
  for position, row in enumerate(rows):
    model = fold_models[folds[int(train.users[row])]]
    expected = np.asarray(
      peer.candidate_scores(model, history[[position]], lengths[[position]], candidates[[position]])
    )[0]
    np.testing.assert_allclose(scores[position], expected, atol=1e-5)
  assert len(set(folds[int(u)] for u in train.users[rows])) == 2  # both fold models were used
  np.testing.assert_array_equal(
    bound.top_candidates(history, lengths, candidates), bound.candidate_ranking(history, lengths, candidates)[:, 0]
  )
  # Val windows get the full model, whatever their users.
  val = SYNTHETIC.split('val')
  val_candidates = np.stack([candidate_list(SYNTHETIC, 'val', i, 0) for i in range(len(val))])
  np.testing.assert_allclose(
    cross.for_windows('val', val.users).candidate_similarities(val.history, val.lengths, val_candidates),
    peer.candidate_similarities(full, val.history, val.lengths, val_candidates),
    atol=1e-5,
  )
  with pytest.raises(ValueError, match='bound to'):
    bound.candidate_scores(history[:2], lengths[:2], candidates[:2])


def test_run_episodes_shows_the_out_of_fold_peer_on_training_windows():
  full, fold_models = micro(100), [micro(0), micro(1)]
  train = SYNTHETIC.split('train')
  folds = crossfit.user_folds(train.users, 2, seed=0)
  cross = crossfit.CrossFittedPeer(full, fold_models, folds)
  windows = list(range(0, len(train), 9))
  backend = ScriptedBackend(small_tokenizer(), lambda agent, episode, turn, messages: 'Reason: ok\nItem: nothing')
  episodes = run_episodes(SYNTHETIC, 'train', windows, backend, peer=cross, config=RolloutConfig(max_turns=1))
  for episode in episodes:
    candidates = np.asarray([episode.candidates], np.int32)
    model = fold_models[folds[episode.user]]
    expected = int(
      peer.top_candidate(
        model, train.history[[episode.window_index]], train.lengths[[episode.window_index]], candidates
      )[0]
    )
    assert episode.peer_item == expected


@pytest.fixture(scope='module')
def random_walk_peers(tmp_path_factory):
  dataset = random_walk_dataset()
  config = experiment.default_config('lastfm')
  config.update({'workdir': str(tmp_path_factory.mktemp('sasrec')), 'progress': False})
  config.sasrec.update({'hidden': 32, 'num_heads': 2, 'num_blocks': 1, 'dropout': 0.0})
  config.train.update(
    {'learning_rate': 5e-3, 'batch_size': 64, 'max_epochs': 60, 'patience': 60, 'val_candidate_seeds': (0,)}
  )
  full, cross = experiment.train_or_load_peer(config, dataset, 0, num_folds=2, fold_seed=0)
  return dataset, config, full, cross


def test_out_of_fold_peer_removes_the_in_sample_oracle(random_walk_peers):
  # On random per-user sequences the full model's training-window hits come from remembering each user's own
  # sequence; the out-of-fold models never saw the user, so they fall to about chance (1 in 20).
  dataset, _, full, cross = random_walk_peers
  rates = experiment.peer_hit_rates(dataset, full, cross)
  assert rates['train_windows_scored'] == len(dataset.split('train'))
  assert rates['train_in_sample'] >= rates['train_out_of_fold'] + 0.3, rates
  assert rates['train_out_of_fold'] <= 0.2, rates


def test_checkpoints_are_reused_only_under_the_same_training_config(random_walk_peers, capsys):
  dataset, config, _, _ = random_walk_peers
  spec = crossfit.FoldSpec(num_folds=2, fold=1, seed=0)
  folder = experiment.checkpoint_folder(config, 0, spec)
  assert folder.name == 'seed_0_fold_1_of_2_split_0' and (folder / 'meta.json').is_file()
  stamp = (folder / 'meta.json').stat().st_mtime_ns
  capsys.readouterr()
  experiment.train_or_load(config, dataset, 0, spec)
  # Announced at default verbosity, with the folder.
  assert f'Reusing SASRec {dataset.name} seed 0 (fold 1 of 2 split 0) from {folder}' in capsys.readouterr().err
  assert (folder / 'meta.json').stat().st_mtime_ns == stamp
  other = config.copy_and_resolve_references()
  other.train.max_epochs = 1  # same model shape, another training config: must not be reused
  _, meta = experiment.train_or_load(other, dataset, 0, spec)
  announced = capsys.readouterr().err
  assert f'Training SASRec {dataset.name} seed 0' in announced and f'into {folder}' in announced
  assert 'trained with another dataset, model, training config or fold' in announced and meta['epochs_run'] == 1
  assert meta['fold'] == {'num_folds': 2, 'fold': 1, 'seed': 0}
  assert meta['train_windows'] == len(crossfit.held_out_dataset(dataset, spec).split('train'))


def test_last_per_user_pool_holds_each_users_last_window_and_draws_stay_in_it():
  from coars_jax.training.warm_start import draw_windows

  train = SYNTHETIC.split('train')
  pool = train.pool('last_per_user')
  assert len(pool) == len(np.unique(train.users))
  for index in pool:
    same_user = np.flatnonzero(train.users == train.users[index])
    assert index == same_user.max()
  np.testing.assert_array_equal(train.pool('all'), np.arange(len(train)))
  drawn = draw_windows(SYNTHETIC, 10, seed=0, pool='last_per_user')
  assert set(drawn.tolist()) <= set(pool.tolist()) and len(set(drawn.tolist())) == 10
  with pytest.raises(ValueError, match='exceeds'):
    draw_windows(SYNTHETIC, len(pool) + 1, seed=0, pool='last_per_user')
  with pytest.raises(ValueError, match='unknown window pool'):
    train.pool('first_per_user')
