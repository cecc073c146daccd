"""The user-agent F1 in rounds against flat batches, on the research model:
`python -m experiments.bench_user_f1 [--dataset=lastfm] [--users=8] [--checkpoint=<adapters folder>]
[--output=results/bench/user_f1_lastfm.json]`.

Both passes judge the same users' items greedily with the same backend settings; the flat baseline
(`UserF1Config(share_history=False)`) prefills every prompt whole, the rounds (`share_history=True`, the default)
read each user's history from the previous round's cache. Prints and writes wall time, prompt tokens prefilled and
reused, and whether the judgements agree. The first pass of each mode includes its compilation, so each mode runs
twice and the second time is the one compared.
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
  for name, share in (('flat', False), ('rounds', True)):
    for attempt in ('first (with compilation)', 'second'):
      backend = LLMBackend(
        model,
        tokenizer,
        adapters=adapters,
        config=LLMBackendConfig(
          user_max_new_tokens=64, sampling=GREEDY, buckets=LengthBuckets(prompt=(512, 1024, 2048), completion=(64, 128))
        ),
      )
      start = time.perf_counter()
      result = evaluate_user_f1(
        dataset,
        sim,
        backend,
        peer=sasrec,
        seed=0,
        config=UserF1Config(batch_size=_BATCH.value, show_peer_opinion=True, share_history=share),
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
        f'{name:>6} {attempt:<24} {seconds:7.1f} s  prefilled {backend.prefill_tokens["prefilled"]:>7}  '
        f'reused {backend.prefill_tokens["reused"]:>7}  calls {len(backend.calls):>3}  F1 '
        f'{result.scores["micro_f1"]:.3f}',
        flush=True,
      )
  flat, rounds = results.pop('flat'), results.pop('rounds')
  agree = sum(a.positive == b.positive for a, b in zip(flat.judgements, rounds.judgements))
  same_text = sum(a.generation.text == b.generation.text for a, b in zip(flat.judgements, rounds.judgements))
  speedup = results['flat/second']['seconds'] / max(results['rounds/second']['seconds'], 1e-9)
  summary = {
    'dataset': _DATASET.value,
    'users': len(sim.cases),
    'judgements': len(flat.judgements),
    'checkpoint': _CHECKPOINT.value or None,
    'batch_size': _BATCH.value,
    'passes': results,
    'speedup_second_pass': round(speedup, 2),
    'same_decision': agree,
    'same_text': same_text,
  }
  print(
    f'rounds vs flat (second passes): {speedup:.2f}x; {agree}/{len(flat.judgements)} same decisions, '
    f'{same_text} identical messages'
  )
  if _OUTPUT.value:
    path = pathlib.Path(_OUTPUT.value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2))
    print(f'Wrote {path.absolute()}')


if __name__ == '__main__':
  cli.run(main)
