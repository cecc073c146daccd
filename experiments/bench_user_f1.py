"""The user-agent F1 under each batching of `UserF1Config.batching`, on the research model:
`python -m experiments.bench_user_f1 [--dataset=lastfm] [--users=8] [--batch_size=16]
[--modes=flat,rounds,shared_prefix] [--checkpoint=<adapters folder>] [--output=results/bench/user_f1_lastfm.json]`.

Every mode judges the same users' items greedily with the same backend settings (64-token verdicts, the peer
opinion shown): 'flat' prefills every prompt whole, 'rounds' reads each user's history from the previous round's
cache, 'shared_prefix' prefills each user's history once and reads it once per decode step for all of the user's
items. Prints and writes wall time, prompt tokens prefilled and reused, and how many judgements agree with the
first mode's. The first pass of each mode includes its compilation, so each mode runs twice and the second time is
the one compared (the first named mode is the baseline).
"""

import json
import pathlib
import time

from absl import flags

from coars_jax.agents.episodes import LLMBackend, LLMBackendConfig
from coars_jax.data import load_dataset, user_sim_set
from coars_jax.data.user_sim import UserSimSet
from coars_jax.eval import experiment as agentic_experiment
from coars_jax.eval.user_f1 import UserF1Config, evaluate_user_f1
from coars_jax.recsys import experiment as sasrec_experiment
from coars_jax.sampling import GREEDY, LengthBuckets
from experiments import cli

_DATASET = flags.DEFINE_enum('dataset', 'lastfm', ('lastfm', 'movielens', 'instruments'), 'Dataset.')
_USERS = flags.DEFINE_integer('users', 8, 'The first this many users of the user-simulation set.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', '', "An adapters folder (warm start or RL); '' = the bare base.")
_BATCH = flags.DEFINE_integer('batch_size', 16, 'Judgements (flat) or users (rounds) per call.')
_MODES = flags.DEFINE_list(
  'modes', ['flat', 'rounds', 'shared_prefix'], 'Batchings to time; the first is the baseline.'
)
_OUTPUT = flags.DEFINE_string('output', '', 'Write the measurements as JSON here.')


def main(argv):
  del argv
  config = agentic_experiment.default_config(_DATASET.value)
  config.model, config.checkpoint = 'smollm2-135m', _CHECKPOINT.value
  agentic_experiment.validate(config)
  dataset = load_dataset(_DATASET.value)
  sasrec, _ = sasrec_experiment.train_or_load(
    sasrec_experiment.peer_config(_DATASET.value, workdir=f'runs/sasrec_{_DATASET.value}', max_epochs=20), dataset, 0
  )
  model, tokenizer, adapters = agentic_experiment.load_agents(config)
  full = user_sim_set(dataset)
  sim = UserSimSet(dataset=full.dataset, cases=full.cases[: _USERS.value], users_left_out=0)
  results = {}
  for name in _MODES.value:
    for attempt in ('first (with compilation)', 'second'):
      backend = LLMBackend(
        model,
        tokenizer,
        adapters=adapters,
        config=LLMBackendConfig(
          user_max_new_tokens=64,
          sampling=GREEDY,
          buckets=LengthBuckets(prompt=(512, 1024, 2048), completion=(64, 128)),
          merge_adapters=True,
        ),
      )
      start = time.perf_counter()
      result = evaluate_user_f1(
        dataset,
        sim,
        backend,
        peer=sasrec,
        seed=0,
        config=UserF1Config(batch_size=_BATCH.value, show_peer_opinion=True, batching=name),
      )
      seconds = time.perf_counter() - start
      results[f'{name}/{attempt}'] = {
        'seconds': round(seconds, 1),
        **backend.prefill_tokens,
        'f1': result.scores['micro_f1'],
        'calls': len(backend.calls),
      }
      results[name] = result
      print(
        f'{name:>13} {attempt:<24} {seconds:7.1f} s  prefilled {backend.prefill_tokens["prefilled"]:>7}  '
        f'reused {backend.prefill_tokens["reused"]:>7}  calls {len(backend.calls):>3}  F1 '
        f'{result.scores["micro_f1"]:.3f}',
        flush=True,
      )
  base_name = _MODES.value[0]
  base = results[base_name]
  summary = {
    'dataset': _DATASET.value,
    'users': len(sim.cases),
    'judgements': len(base.judgements),
    'checkpoint': _CHECKPOINT.value or None,
    'batch_size': _BATCH.value,
    'baseline': base_name,
    'passes': {k: v for k, v in results.items() if '/' in k},
  }
  for name in _MODES.value[1:]:
    other = results[name]
    agree = sum(a.positive == b.positive for a, b in zip(base.judgements, other.judgements))
    same_text = sum(a.generation.text == b.generation.text for a, b in zip(base.judgements, other.judgements))
    speedup = results[f'{base_name}/second']['seconds'] / max(results[f'{name}/second']['seconds'], 1e-9)
    summary[name] = {'speedup_second_pass': round(speedup, 2), 'same_decision': agree, 'same_text': same_text}
    print(
      f'{name} vs {base_name} (second passes): {speedup:.2f}x; {agree}/{len(base.judgements)} same decisions, '
      f'{same_text} identical messages'
    )
  if _OUTPUT.value:
    path = pathlib.Path(_OUTPUT.value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2))
    print(f'Wrote {path.absolute()}')


if __name__ == '__main__':
  cli.run(main)
