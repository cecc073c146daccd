import numpy as np
import pytest

from coars_jax.recsys import checkpoint, peer
from coars_jax.recsys.sasrec import SASRecConfig
from coars_jax.data.candidates import candidate_stack
from coars_jax.recsys.training import SASRecTrainConfig, evaluate_per_seed, mean_metrics, train_sasrec


@pytest.fixture(scope='module')
def trained():
  from coars_jax.data.synthetic import synthetic_dataset

  dataset = synthetic_dataset(num_users=80, num_items=40, sequence_length=14)
  result = train_sasrec(
    dataset,
    SASRecConfig(num_items=dataset.num_items, hidden=32, dropout=0.1),
    SASRecTrainConfig(learning_rate=5e-3, batch_size=64, max_epochs=40, patience=40, val_candidate_seeds=(0, 1)),
    seed=0,
    progress=False,
  )
  return dataset, result


def test_learns_the_synthetic_walk(trained):
  dataset, result = trained
  cands, target_index = candidate_stack(dataset, 'test', [0, 1, 2])
  test = mean_metrics(evaluate_per_seed(result.model, dataset.split('test'), cands, target_index))
  assert test['hit@1'] >= 0.9, test
  assert result.history[-1]['train_loss'] < result.history[0]['train_loss']
  assert result.best_val['hit@1'] == max(h['hit@1'] for h in result.history) or result.best_val['ndcg@5'] == max(
    h['ndcg@5'] for h in result.history
  )


def test_training_is_reproducible(trained):
  dataset, result = trained
  config = SASRecConfig(num_items=dataset.num_items, hidden=32, dropout=0.1)
  train = SASRecTrainConfig(learning_rate=5e-3, batch_size=64, max_epochs=2, patience=40, val_candidate_seeds=(0,))
  a = train_sasrec(dataset, config, train, seed=3, progress=False)
  b = train_sasrec(dataset, config, train, seed=3, progress=False)
  windows = dataset.split('test')
  np.testing.assert_array_equal(a.model(windows.history, windows.lengths), b.model(windows.history, windows.lengths))


def test_checkpoint_round_trip(trained, tmp_path):
  dataset, result = trained
  folder = checkpoint.save_sasrec(tmp_path / 'ckpt', result.model, {'dataset': dataset.name, 'seed': 0})
  assert checkpoint.is_complete(folder)
  model, meta = checkpoint.load_sasrec(folder)
  assert meta['dataset'] == dataset.name and meta['model_config']['num_items'] == dataset.num_items
  windows = dataset.split('test')
  np.testing.assert_array_equal(model(windows.history, windows.lengths), result.model(windows.history, windows.lengths))


def test_incomplete_checkpoint_is_not_loaded(tmp_path):
  (tmp_path / 'params').mkdir()
  assert not checkpoint.is_complete(tmp_path)
  with pytest.raises(FileNotFoundError, match='meta.json'):
    checkpoint.load_sasrec(tmp_path)


def test_peer_signals(trained):
  dataset, result = trained
  windows = dataset.split('test')
  cands, _ = candidate_stack(dataset, 'test', [0])
  top = np.asarray(peer.top_candidate(result.model, windows.history, windows.lengths, cands[0]))
  logits = np.asarray(result.model(windows.history, windows.lengths))
  expected = cands[0][np.arange(len(windows)), np.argmax(np.take_along_axis(logits, cands[0], axis=1), axis=1)]
  np.testing.assert_array_equal(top, expected)
  q = np.asarray(peer.peer_similarity(result.model, windows.history, windows.lengths, windows.targets))
  user = np.asarray(result.model.encode(windows.history, windows.lengths))
  item = np.asarray(result.model.item_embeddings())[windows.targets]
  cosine = np.sum(user * item, 1) / np.linalg.norm(user, axis=1) / np.linalg.norm(item, axis=1)
  np.testing.assert_allclose(q, cosine, atol=1e-5)
  assert np.all(np.abs(q) <= 1.0)
  assert 'Item 3' in peer.peer_opinion(dataset.catalog.title(3))
