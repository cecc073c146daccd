"""Full multi-turn rollout throughput: `python -m experiments.bench_rollout --model=tiny --output=FILE`.

Plays `--windows` evenly spaced windows of `--split` for up to `--max_turns` turns with both agents on one
backbone (zero-shot, no adapters; or a checkpoint's adapters with `--checkpoint`, folded into the weights with
`--merge_adapters`) and the dataset's trained SASRec as the peer (its checkpoint must exist under
`--sasrec_workdir`; nothing is trained). One warm-up rollout compiles; the fastest of `--repeats` timed rollouts
is reported: episodes/s, generated tokens/s, prefill tokens/s, and the share of the wall time spent outside the
LLM's jitted code, stage by stage (`coars_jax.agents.rollout_timing`). Prints a table and writes the JSON to --output.
"""

from absl import flags

from coars_jax.agents import rollout_timing
from coars_jax.data import DATASETS
from coars_jax.sampling import SamplingParams
from experiments import outputs
from experiments import cli

_MODEL = flags.DEFINE_enum('model', 'tiny', rollout_timing.MODELS, 'The backbone both agents share.')
_DATASET = flags.DEFINE_enum('dataset', 'lastfm', DATASETS, 'The dataset whose windows are played.')
_SPLIT = flags.DEFINE_enum('split', 'train', ['train', 'val', 'test'], 'The split the windows come from.')
_WINDOWS = flags.DEFINE_integer('windows', 64, 'Episodes per rollout, one per window, evenly spaced over the split.')
_MAX_TURNS = flags.DEFINE_integer('max_turns', 5, 'T_u: the most turns an episode runs.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed rollouts after the warm-up one; the fastest counts.')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 64, 'Token budget of each agent message.')
_TEMPERATURE = flags.DEFINE_float('temperature', 1.0, 'Sampling temperature (0 is greedy).')
_TOP_K = flags.DEFINE_integer('top_k', None, 'Top-k for sampling.')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Top-p for sampling.')
_CONSTRAINED = flags.DEFINE_bool(
  'constrained', False, "Decode under the agents' output grammars (LLMBackendConfig.constrained)."
)
_SEED = flags.DEFINE_integer('seed', 0, "The rollouts' sampling seed (every rollout uses it).")
_DATA_ROOT = flags.DEFINE_string('data_root', None, 'Dataset folder; default $COARS_DATA_DIR, then the cache.')
_SASREC_WORKDIR = flags.DEFINE_string(
  'sasrec_workdir', None, 'Folder of the trained SASRec checkpoints (seed_0 is used); default runs/sasrec_<dataset>.'
)
_CHECKPOINT = flags.DEFINE_string(
  'checkpoint', '', "Both agents' adapters from this warm start or RL export ('' = the bare base, no adapters)."
)
_MERGE = flags.DEFINE_bool('merge_adapters', False, "Fold each agent's adapter into its weights (evaluation's way).")
_OUTPUT = flags.DEFINE_string('output', None, 'Write the result as JSON to this file.')


def main(argv):
  del argv
  params = SamplingParams(temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value)
  agents = None
  if _CHECKPOINT.value:
    from coars_jax.eval import experiment as agentic_experiment  # the evaluation's checkpoint loader

    config = agentic_experiment.default_config(_DATASET.value)
    config.model, config.checkpoint = _MODEL.value, _CHECKPOINT.value
    if _DATA_ROOT.value:
      config.data_root = _DATA_ROOT.value
    agents = agentic_experiment.load_agents(config)
  result = rollout_timing.run_benchmark(
    _MODEL.value,
    dataset=_DATASET.value,
    split=_SPLIT.value,
    windows=_WINDOWS.value,
    max_turns=_MAX_TURNS.value,
    repeats=_REPEATS.value,
    max_new_tokens=_MAX_NEW_TOKENS.value,
    params=params,
    seed=_SEED.value,
    data_root=_DATA_ROOT.value,
    sasrec_workdir=_SASREC_WORKDIR.value,
    constrained=_CONSTRAINED.value,
    agents=agents,
    merge_adapters=_MERGE.value,
  )
  print(rollout_timing.format_table(result), flush=True)
  if _OUTPUT.value:
    outputs.write_json(_OUTPUT.value, result)


if __name__ == '__main__':
  cli.run(main)
