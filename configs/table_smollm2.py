"""The results table of issue 15 on the research model: `python -m experiments.run_table
--config=configs/table_smollm2.py [--only=...] [--hours=H]`.

Three datasets; rows: the reference rows (SASRec, popularity, random), zero-shot (under the output grammars),
Reflexion memory and the warm start, then outcome-reward RL, judge-reward RL, CoARS and its five ablations. Every
RL row gets the same budget from the same warm start (`runs/table_smollm2/<dataset>/warm_start_sft`); 3 training
seeds for the main RL rows everywhere and for the ablations on LastFM, 1 for the ablations elsewhere. Every test
window and every user-simulation user. The budget is sized for the 2-core CPU; BUILD_NOTES.md has the measured
cost per cell. `configs/table_smollm2_gpu.py` is the same grid with a larger budget.
"""

from coars_jax.training import table


def get_config():
  config = table.table_defaults()
  config.name = 'table_smollm2'
  config.runs_root = 'runs/table_smollm2'
  config.results_root = 'results/table_smollm2'
  config.compilation_cache = 'runs/jax_cache'
  config.overrides = {
      'rl': {'iterations': 8, 'windows_per_iteration': 4, 'rollouts_per_window': 4, 'warmup_iterations': 1},
      'eval': {'every': 2, 'val_windows': 16, 'test_windows': 0, 'user_f1': {'num_users': 0}},
      'checkpoint': {'every': 1},
  }
  return config
