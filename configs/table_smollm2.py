"""The results table of issue 15 on the research model: `python -m experiments.run_table
--config=configs/table_smollm2.py[:lastfm_study] [--only=...] [--hours=H]`.

Three datasets; rows: the reference rows (SASRec, popularity, random), zero-shot (under the output grammars),
Reflexion memory and the warm start, then outcome-reward RL, judge-reward RL, CoARS and its five ablations. Every
RL row gets the same budget from the same warm start (`runs/table_smollm2/<dataset>/warm_start_sft`); 3 training
seeds for the main RL rows everywhere and for the ablations on LastFM, 1 for the ablations elsewhere. Every test
window and every user-simulation user. The budget is sized for the 2-core CPU; BUILD_NOTES.md has the measured
cost per cell. `configs/table_smollm2_gpu.py` is the same grid with a larger budget.

`:lastfm_study` (issue 22) is the LastFM study sized for the 2-core CPU: the reference, zero-shot (under the grammars),
warm-start, outcome-RL, judge-RL and CoARS rows and the ablations without self-distillation and with the outcome
reward; seed 0 of every row, then a second seed of CoARS and outcome RL; one RL budget of 16 iterations x 4 windows
x 4 rollouts = 256 training episodes per RL row; every test window and every F1 user, F1 with and without p_t.
"""

from coars_jax.pipeline import table


STUDY_ROWS = (
  'reference',
  'warm_start',
  'zero_shot',
  'outcome_rl',
  'judge_rl',
  'coars',
  'coars-no_sd',
  'coars-outcome_reward',
)


def get_config(variant: str = ''):
  if variant == 'lastfm_study':
    return lastfm_study()
  if variant:
    raise ValueError(f"configs/table_smollm2.py: unknown variant {variant!r}; expected '' or 'lastfm_study'")
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


# The recipe choices of the study's pilot (`experiments.pilot`, val windows only): the table's recipe, rollouts under
# the output grammars, a 3x learning rate, and a cooler sampling temperature.
PILOT_ARMS = {
  'base': {},
  'constrained': {'rl': {'constrained': True}},
  'lr_3e-4': {'rl': {'learning_rate': 3e-4}},
  'temperature_07': {'sampling': {'temperature': 0.7}},
}


def lastfm_study():
  config = table.table_defaults()
  config.name = 'table_smollm2_lastfm_study'
  config.datasets = ('lastfm',)
  config.rows = STUDY_ROWS
  config.main_seeds = 2
  config.row_seeds = {'judge_rl': 1, 'coars-no_sd': 1, 'coars-outcome_reward': 1}
  config.runs_root = 'runs/lastfm_study'
  config.results_root = 'results/table_lastfm_study'
  config.overrides = {
    'rl': {'iterations': 16, 'windows_per_iteration': 4, 'rollouts_per_window': 4, 'warmup_iterations': 1},
    'eval': {'every': 4, 'val_windows': 16, 'test_windows': 0, 'user_f1': {'num_users': 0, 'also_without_peer': True}},
    'checkpoint': {'every': 1},
  }
  config.pilot = {'row': 'coars', 'iterations': 4, 'arms': PILOT_ARMS}
  return config
