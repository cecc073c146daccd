"""Dataset statistics, as printed by `experiments.describe_data` and recorded in BUILD_NOTES.md."""

from __future__ import annotations

import numpy as np

from coars_jax.data.schema import Dataset


def describe(dataset: Dataset) -> dict:
  stats = {'dataset': dataset.name, 'items': dataset.num_items}
  users = set()
  for name, split in dataset.splits.items():
    stats[f'{name}_windows'] = len(split)
    stats[f'{name}_mean_history'] = round(float(np.mean(split.lengths)), 3) if len(split) else 0.0
    users.update(int(u) for u in np.unique(split.users))
  stats['users_with_windows'] = len(users)
  stats['interactions_known'] = int(sum(len(s) for s in dataset.user_sequences.values()))
  stats.update(dataset.notes)
  return stats


def format_description(stats: dict) -> str:
  width = max(len(k) for k in stats)
  return '\n'.join(f'{k:<{width}}  {v:,}' if isinstance(v, int) else f'{k:<{width}}  {v}' for k, v in stats.items())
