"""The CPU demo (`make demo`): CoARS with the `tiny` preset on LastFM, from nothing to the before/after table.

`python -m experiments.train --config=configs/demo_cpu.py` trains, in order and each only if its folder under
`runs/demo_cpu/` is empty: SASRec (seed 0, at most 15 epochs), the copy pre-training and SFT warm start of the
random tiny base, then a few CoARS iterations. It prints Hit@1, ValidRatio and the user-agent F1 on LastFM test
windows before and after CoARS. Sized for 15 minutes on 2 idle CPU cores (BUILD_NOTES.md has the measured
time); a rerun loads what exists (pass --config.resume=True to continue an interrupted RL stage). The full-size
runs are configs/<dataset>_tiny.py.
"""

from coars_jax.training.experiment import tiny_config


def get_config():
  config = tiny_config('lastfm', 'coars')
  config.workdir = 'runs/demo_cpu/coars'
  config.sasrec_workdir = 'runs/demo_cpu/sasrec'
  config.sasrec_max_epochs = 15
  config.warm_start.folder = 'runs/demo_cpu/warm_start'
  config.warm_start.copy_pretrain_steps = 200
  config.warm_start.num_dialogues = 128
  config.warm_start.steps = 80
  config.warm_start.warmup_steps = 10
  config.rl.iterations = 3
  config.rl.windows_per_iteration = 8
  config.rl.warmup_iterations = 0
  config.eval.every = 2
  config.eval.val_windows = 8
  config.eval.test_windows = 32
  config.eval.user_f1.num_users = 12
  config.checkpoint.every = 1
  config.resume = True  # a second `make demo` continues or re-evaluates instead of refusing the full workdir
  return config
