"""The results table of issue 15 on one accelerator: the grid of `configs/table_smollm2.py` with a larger RL budget
and wider batches, its rows kept apart from the CPU's (`results/table_smollm2_gpu`, each row labelled with its
device). `python -m experiments.run_table --config=configs/table_smollm2_gpu.py`.

`--config=configs/table_smollm2_gpu.py:rehearsal` is the same code path at a tiny size (LastFM, the reference,
warm-start and CoARS rows, one seed, 1 iteration of 2 windows, 4 test windows, 2 F1 users) under
`runs/table_rehearsal`, to time and debug on the CPU before spending accelerator minutes.
"""

from coars_jax.pipeline import table


def get_config(size: str = ''):
  config = table.table_defaults()
  config.name = 'table_smollm2_gpu'
  config.runs_root = 'runs/table_smollm2_gpu'
  config.results_root = 'results/table_smollm2_gpu'
  config.compilation_cache = 'runs/jax_cache_gpu'
  config.overrides = {
    'rl': {
      'iterations': 24,
      'windows_per_iteration': 16,
      'rollouts_per_window': 4,
      'warmup_iterations': 2,
      'rows_per_microbatch': 64,
      'packed_tokens': 131072,  # the packed update's microbatch: 64 rows of 2,048 tokens
    },
    'eval': {
      'every': 4,
      'val_windows': 64,
      'test_windows': 0,
      'batch_size': 128,
      'user_f1': {'num_users': 0, 'batch_size': 256},
    },
    'checkpoint': {'every': 4},
  }
  if size == 'rehearsal':
    config.name = 'table_rehearsal'
    config.runs_root = 'runs/table_rehearsal'
    config.results_root = 'runs/table_rehearsal/results'  # never mixed into results/
    config.datasets = ('lastfm',)
    config.rows = ('reference', 'warm_start', 'coars')
    config.main_seeds = 1
    config.overrides = {
      'rl': {'iterations': 1, 'windows_per_iteration': 2, 'rollouts_per_window': 2, 'warmup_iterations': 0},
      'eval': {
        'every': 1,
        'val_windows': 2,
        'test_windows': 4,
        'batch_size': 4,
        'user_f1': {'num_users': 2, 'batch_size': 8},
      },
      'rollout': {'max_turns': 2},
      'warm_start': {'steps': 4, 'num_dialogues': 4, 'shuffled_dialogues': 0, 'warmup_steps': 1},
      'checkpoint': {'every': 1},
    }
  elif size:
    raise ValueError(f"configs/table_smollm2_gpu.py takes '' or 'rehearsal', found {size!r}")
  return config
