from coars_jax.data import instruments, lastfm, user_sim
from coars_jax.data.synthetic import synthetic_dataset
from tests.conftest import require_files


def _check_case(dataset, case, known):
  assert len(case.items) == len(case.labels) == 2 * sum(case.labels)
  assert len(set(case.items)) == len(case.items)
  negatives = {i for i, label in zip(case.items, case.labels) if not label}
  assert not negatives & known


def test_split_protocol_on_synthetic():
  dataset = synthetic_dataset(num_users=40, num_items=60, sequence_length=14)
  sim = user_sim.split_user_sim(dataset, seed=0)
  assert len(sim) == len(set(dataset.split('test').users.tolist())) and sim.users_left_out == 0
  for case in sim.cases:
    sequence = dataset.user_sequences[case.user].tolist()
    k = min(10, len(sequence) // 2)
    positives = [i for i, label in zip(case.items, case.labels) if label]
    assert sorted(positives) == sorted(sequence[-k:])
    assert list(case.history) == sequence[:-k][-10:]
    _check_case(dataset, case, dataset.user_items[case.user])
  assert user_sim.split_user_sim(dataset, seed=0) == sim
  assert user_sim.split_user_sim(dataset, seed=1) != sim


def test_short_sequences_are_left_out_and_counted():
  dataset = synthetic_dataset(num_users=40, num_items=60, sequence_length=1)
  sim = user_sim.split_user_sim(dataset)
  assert len(sim) == 0 and sim.users_left_out == len(set(dataset.split('test').users.tolist()))


def test_lastfm_uses_afls_60_users():
  root = require_files(lastfm.ITEM_FILE, *lastfm.SPLIT_FILES.values(), lastfm.STATS_FILE, lastfm.USER_SIM_FILE)
  dataset = lastfm.load(root, allow_download=False)
  sim = user_sim.lastfm_user_sim(dataset, root, allow_download=False)
  assert len(sim) == 60 and sim.users_left_out == 0
  first = sim.cases[0]
  assert first.user == 772 and first.history == (1546, 3431, 2029, 2471, 1514, 1978, 4378, 1637, 2268, 966)
  assert sorted(i for i, l in zip(first.items, first.labels) if l) == sorted([1390, 545, 1018])
  for case in sim.cases:
    _check_case(dataset, case, set())
  assert max(sum(c.labels) for c in sim.cases) == 10


def test_instruments_test_users():
  root = require_files(instruments.RATINGS_FILE, instruments.META_FILE)
  dataset = instruments.load(root, allow_download=False)
  sim = user_sim.user_sim_set(dataset)
  assert len(sim) + sim.users_left_out == 143
  for case in sim.cases:
    _check_case(dataset, case, dataset.user_items[case.user])
