"""The CPU demo (`make demo`): CoARS on the research model, SmolLM2-135M-Instruct with LoRA agents, on LastFM.

`python -m experiments.train --config=configs/demo_cpu.py` runs, each stage only if its folder under
`runs/demo_cpu/` does not hold it yet: SASRec (the full model for val and test, and 2 user folds whose out-of-fold
models serve the training windows), the zero-shot row of the bare base (decoded under the output grammars), the SFT
warm start of both adapters and its row, 2 CoARS iterations of 4 windows, and the CoARS row, all on the same 8
LastFM test windows with at most 3 turns (Hit@1 with paired intervals, ValidRatio, turns, user F1 on 2 users). It is
`configs/lastfm_smollm2.py` scaled down for about 15 minutes on 2 idle cores (BUILD_NOTES.md has the measured
time); a rerun loads what exists (`resume` is on).
"""

from coars_jax.pipeline.experiment import smollm2_config


def get_config():
  config = smollm2_config('lastfm', 'coars')
  config.workdir = 'runs/demo_cpu/coars'
  config.sasrec_workdir = 'runs/demo_cpu/sasrec'
  config.sasrec_max_epochs = 5
  config.sasrec_folds = 2
  config.warm_start.folder = 'runs/demo_cpu/warm_start'
  config.warm_start.num_dialogues = 24
  config.warm_start.shuffled_dialogues = 8
  config.warm_start.steps = 24
  config.warm_start.warmup_steps = 2
  config.rollout.max_turns = 3  # T_u = 3 instead of 5: every turn re-reads the whole prompt on 2 cores (issue 14)
  config.rl.iterations = 2
  config.rl.windows_per_iteration = 4
  config.rl.warmup_iterations = 0
  config.eval.every = 0  # no val evaluations: the demo's rows are the test rows
  config.eval.test_windows = 8
  config.eval.zero_shot = True
  config.eval.zero_shot_constrained = True  # unconstrained, the base echoes its prompt to the token budget every turn
  config.eval.user_f1.num_users = 2
  config.eval.batch_size = 8
  config.eval.user_f1.batch_size = 8  # the episodes' batch: the F1 calls reuse their compiled programs
  config.eval.user_f1.also_without_peer = False  # the demo's F1 is with p_t only (the research configs do both)
  config.checkpoint.every = 1
  config.resume = True  # a second `make demo` continues or re-evaluates instead of refusing the full workdir
  return config
