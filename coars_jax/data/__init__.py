"""Datasets in one schema: LastFM (AFL/LLaRA), MovieLens-100K (LLaRA windows) and Amazon Instruments 2014."""

from coars_jax.data import instruments, lastfm, movielens
from coars_jax.data.candidates import NUM_CANDIDATES, candidate_list, candidate_matrix
from coars_jax.data.errors import ChecksumError, DataError, MalformedDataError, MissingDataError
from coars_jax.data.files import DATA_DIR_ENV, candidate_roots, locate
from coars_jax.data.schema import MAX_HISTORY, TRAIN_POOLS, Dataset, ItemCatalog, Window, WindowSplit
from coars_jax.data.stats import describe, format_description
from coars_jax.data.user_sim import UserSimCase, UserSimSet, user_sim_set

LOADERS = {'lastfm': lastfm.load, 'movielens': movielens.load, 'instruments': instruments.load}
DATASETS = tuple(LOADERS)


def load_dataset(name: str, data_root=None, *, allow_download: bool = True) -> Dataset:
  """Loads a dataset by name from `data_root`, else `COARS_DATA_DIR`, else the per-user cache."""
  if name not in LOADERS:
    raise ValueError(f'Unknown dataset {name!r}; expected one of {DATASETS}')
  return LOADERS[name](data_root, allow_download=allow_download)


__all__ = [
  'TRAIN_POOLS',
  'ChecksumError',
  'DATASETS',
  'DATA_DIR_ENV',
  'DataError',
  'Dataset',
  'ItemCatalog',
  'MAX_HISTORY',
  'MalformedDataError',
  'MissingDataError',
  'NUM_CANDIDATES',
  'UserSimCase',
  'UserSimSet',
  'Window',
  'WindowSplit',
  'candidate_list',
  'candidate_matrix',
  'candidate_roots',
  'describe',
  'format_description',
  'dataset_titles',
  'load_dataset',
  'locate',
  'user_sim_set',
]


def dataset_titles(data_root=None, *, allow_download: bool = True) -> dict[str, tuple[str, ...]]:
  """The item titles of every dataset in `DATASETS`, in catalog order (what the tiny tokenizer is trained on)."""
  return {name: tuple(load_dataset(name, data_root, allow_download=allow_download).catalog.titles) for name in DATASETS}
