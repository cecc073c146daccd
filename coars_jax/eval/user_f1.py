"""User-agent F1 (AFL protocol, METHOD.md section 6): the user agent judges each item of a user-simulation case
(`data.user_sim_set`: true future items and as many never-seen items) as a single-turn recommendation with an
empty memory; click or star is a positive prediction, and precision, recall and F1 against the labels are reported
micro-averaged over all judgements with the macro average over users beside them. The metric itself is a pure
function of per-user label and prediction lists (`f1_scores`); `evaluate_user_f1` builds the prompts, batches them
through the backend's user agent and parses the answers (an invalid answer reads as a skip, so a negative).

F1 alone cannot show discrimination on a 1:1 set: a user that accepts everything gets P = 1/2, R = 1, F1 = 2/3. So
the result also reports the AUC of the user agent's acceptance score s over all judgements (`roc_auc`), its accept
rate, the accept-all F1 of the set, and, when the peer can score items, SASRec's own AUC on the same items and the
F1 of a user that accepts SASRec's top k of each case's 2k items (`top_k_predictions`).

The module keeps the protocol itself: `UserF1Config`, the judgement prompts (`judgement_prompts`), the backend calls
(`judgement_calls`), the peer's scores (`peer_scores`) and `evaluate_user_f1`. The metric functions live in
`user_f1_metrics` and the result records (`Judgement`, `UserF1Result`) in `user_f1_result`; both are re-exported
here (import from this module).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import numpy as np
import tqdm

from coars_jax.agents.episodes import USER, AgentBackend, Generation, SASRecPeer, turn_seed
from coars_jax.agents.parsing import ParseConfig, parse_user_output
from coars_jax.agents.prompts import Message, PromptConfig, user_messages
from coars_jax.agents.protocol import single_line
from coars_jax.data.schema import MAX_HISTORY, Dataset
from coars_jax.data.user_sim import UserSimSet
from coars_jax.eval.user_f1_metrics import f1_scores, roc_auc, top_k_predictions
from coars_jax.eval.user_f1_result import Judgement, UserF1Result
from coars_jax.recsys.peer import peer_opinion

__all__ = [
  'NEUTRAL_REASON',
  'Judgement',
  'UserF1Config',
  'UserF1Result',
  'evaluate_user_f1',
  'f1_scores',
  'judgement_calls',
  'judgement_prompts',
  'peer_scores',
  'roc_auc',
  'shared_prefix_calls',
  'top_k_predictions',
]

# What the user agent is told about why each item is recommended. It is the same sentence for every item, true
# future or random, so the reason carries no information about the label: the F1 measures the user agent's own
# judgement of the item against the history, as AFL's single-turn protocol does (its user sees no rationale).
NEUTRAL_REASON = 'This {noun} is recommended to you; decide whether it suits your taste.'
BATCHINGS = ('shared_prefix', 'rounds', 'flat')


@dataclasses.dataclass(frozen=True, kw_only=True)
class UserF1Config:
  """How the user agent's judgements are asked for.

  Attributes:
    recommender_reason: the rationale r shown with every item; '{noun}' is replaced by the dataset's item noun.
      One sentence for all items, so it cannot hint at the label (default `NEUTRAL_REASON`).
    show_peer_opinion: whether each prompt carries a peer opinion p naming SASRec's top item among the case's
      items (as the episode protocol names SASRec's top candidate). Off by default: SASRec favours the true future
      items, so p would hand the user agent a recommender's answer, and the F1 would measure SASRec as much as
      the agent. Turn it on to judge a user agent under the exact input layout it was trained with.
    batch_size: judgements per backend call; None sends every judgement of the set in one call. A real model
      may need a bound (an LLM backend pads a call to a power of two rows).
    batching: how the judgements are grouped into backend calls:
      'shared_prefix' (default): each call holds every judgement of a few users, and a backend that offers
        `generate_grouped` (an unsharded `LLMBackend`) prefills each user's system message and history (the bulk
        of every prompt) once and reads it once per decode step for all of that user's items
        (`sampling.generate_shared_prefix`). Users are taken from most judgements to fewest; a call holds
        max(1, batch_size // R) users of R rows, R = its largest user's judgements rounded up to a multiple of 4
        (`shared_prefix_calls`). A backend without `generate_grouped` (a scripted one, one on a mesh) runs 'rounds'.
      'rounds': each call holds the k-th judgement of each user of a group of at most `batch_size` users, logged
        as turn k + 1 with the case as the episode id, so that an `LLMBackend` with prefix reuse reads each user's
        history from the previous round's cache and prefills only the item and reason; every decode step still
        reads each row's whole history.
      'flat': batches of `batch_size` judgements in set order, each prompt prefilled whole.
      Greedy outputs of the three equal each other's to float rounding.
    prompt: the wording; None takes `PromptConfig.for_dataset(dataset.name)`, as episodes do.
    parse: parser tolerance for the user's answers.
  """

  recommender_reason: str = NEUTRAL_REASON
  show_peer_opinion: bool = False
  batch_size: int | None = None
  batching: str = 'shared_prefix'
  prompt: PromptConfig | None = None
  parse: ParseConfig = ParseConfig()

  def __post_init__(self):
    if not isinstance(self.recommender_reason, str) or not single_line(self.recommender_reason):
      raise ValueError(f'UserF1Config.recommender_reason must be a non-empty str, found {self.recommender_reason!r}')
    if not isinstance(self.show_peer_opinion, bool):
      raise ValueError(f'UserF1Config.show_peer_opinion must be a bool, found {self.show_peer_opinion!r}')
    if self.batching not in BATCHINGS:
      raise ValueError(f'UserF1Config.batching must be one of {BATCHINGS}, found {self.batching!r}')
    if self.batch_size is not None and (
      isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1
    ):
      raise ValueError(f'UserF1Config.batch_size must be None or an int >= 1, found {self.batch_size!r}')
    if self.prompt is not None and not isinstance(self.prompt, PromptConfig):
      raise TypeError(f'UserF1Config.prompt must be a PromptConfig or None, found {type(self.prompt).__name__}')
    if not isinstance(self.parse, ParseConfig):
      raise TypeError(f'UserF1Config.parse must be a ParseConfig, found {type(self.parse).__name__}')


def _case_batches(dataset: Dataset, sim_set: UserSimSet):
  """(case indices, history, lengths, items) per distinct case size: a peer takes a rectangular [B, C] candidate
  array, and cases hold 2k items with k varying by user, so one peer call per size."""
  by_size: dict[int, list[int]] = {}
  for index, case in enumerate(sim_set.cases):
    by_size.setdefault(len(case.items), []).append(index)
  for rows in by_size.values():
    history = np.full((len(rows), MAX_HISTORY), dataset.catalog.pad_id, np.int32)
    lengths = np.zeros((len(rows),), np.int32)
    for row, index in enumerate(rows):
      items = sim_set.cases[index].history[-MAX_HISTORY:]
      history[row, : len(items)] = items
      lengths[row] = len(items)
    yield rows, history, lengths, np.asarray([sim_set.cases[i].items for i in rows], np.int32)


def peer_scores(dataset: Dataset, sim_set: UserSimSet, peer) -> list[list[float]]:
  """SASRec's score of each item of each case given the case's history, via `peer.candidate_scores` (a
  `recsys.SASRec` wrapped in `episodes.SASRecPeer`, or any object with that method), one call per case size."""
  if not hasattr(peer, 'top_candidates'):
    peer = SASRecPeer(peer)  # a bare SASRec model, as evaluate_user_f1 accepts it
  if not hasattr(peer, 'candidate_scores'):
    raise TypeError(f'peer_scores needs a recsys.SASRec or a peer with candidate_scores; found {type(peer).__name__}')
  out: list[list[float]] = [[] for _ in sim_set.cases]
  for rows, history, lengths, candidates in _case_batches(dataset, sim_set):
    scores = np.asarray(peer.candidate_scores(history, lengths, candidates), np.float64)
    if scores.shape != candidates.shape:
      raise ValueError(f'the peer scored {scores.shape} items for {candidates.shape} candidates')
    for row, index in enumerate(rows):
      out[index] = [float(s) for s in scores[row]]
  return out


def _peer_items(dataset: Dataset, sim_set: UserSimSet, peer) -> list[int]:
  """SASRec's top item among each case's items, one peer call per distinct case size."""
  tops = [0] * len(sim_set.cases)
  for rows, history, lengths, candidates in _case_batches(dataset, sim_set):
    picks = np.asarray(peer.top_candidates(history, lengths, candidates)).reshape(-1)
    for row, index in enumerate(rows):
      if int(picks[row]) not in sim_set.cases[index].items:
        raise ValueError(f'peer top item {int(picks[row])} of user-sim case {index} is not one of its items')
      tops[index] = int(picks[row])
  return tops


def judgement_prompts(
  dataset: Dataset, sim_set: UserSimSet, *, config: UserF1Config = UserF1Config(), peer=None
) -> list[tuple[int, int, list[Message]]]:
  """(case index, item position, user-agent prompt) for every item of every case, case by case.

  Each prompt is `prompts.user_messages` with the case's history, the item as the recommended title, the config's
  reason, an empty memory and (when configured) the peer opinion; nothing else, so the label cannot reach it.
  """
  if sim_set.dataset != dataset.name:
    raise ValueError(
      f'the user-sim set is for dataset {sim_set.dataset!r} but the dataset is {dataset.name!r}; '
      f'build it with data.user_sim_set(dataset)'
    )
  if config.show_peer_opinion and peer is None:
    raise ValueError(
      'UserF1Config.show_peer_opinion is on but no peer was given; pass peer= (a SASRec or a '
      'Peer) or turn the peer opinion off'
    )
  prompt_config = config.prompt or PromptConfig.for_dataset(dataset.name)
  reason = config.recommender_reason.replace('{noun}', prompt_config.item_noun)
  titles = dataset.catalog.titles
  peer_items = _peer_items(dataset, sim_set, peer) if config.show_peer_opinion else None
  out = []
  for index, case in enumerate(sim_set.cases):
    history_titles = [titles[item] for item in case.history]
    opinion = peer_opinion(titles[peer_items[index]]) if peer_items is not None else None
    for position, item in enumerate(case.items):
      out.append(
        (
          index,
          position,
          user_messages(
            history_titles=history_titles,
            recommended_title=titles[item],
            recommender_reason=reason,
            peer_opinion=opinion,
            config=prompt_config,
          ),
        )
      )
  return out


def judgement_calls(
  prompts: Sequence[tuple[int, int, list[Message]]], config: UserF1Config
) -> list[tuple[int, list[int], list[int]]]:
  """The backend calls of an F1 evaluation in 'rounds' or 'flat' batching, as (turn, indices into `prompts`,
  episode ids); see `UserF1Config.batching`."""
  size = config.batch_size or len(prompts)
  if config.batching == 'flat':
    return [
      (1, list(range(begin, min(begin + size, len(prompts)))), list(range(begin, min(begin + size, len(prompts)))))
      for begin in range(0, len(prompts), size)
    ]
  by_case = _by_case(prompts)
  cases = list(by_case)
  calls = []
  for begin in range(0, len(cases), size):
    group = cases[begin : begin + size]
    for position in range(max(len(by_case[case]) for case in group)):
      live = [case for case in group if position < len(by_case[case])]
      calls.append((position + 1, [by_case[case][position] for case in live], live))
  return calls


def _by_case(prompts: Sequence[tuple[int, int, list[Message]]]) -> dict[int, list[int]]:
  by_case: dict[int, list[int]] = {}
  for index, (case, _, _) in enumerate(prompts):
    by_case.setdefault(case, []).append(index)
  return by_case


def shared_prefix_calls(
  prompts: Sequence[tuple[int, int, list[Message]]], config: UserF1Config
) -> list[tuple[int, int, list[list[int]]]]:
  """The calls of 'shared_prefix' batching as (rows per group, groups per call, each user's indices into
  `prompts`); see `UserF1Config.batching`. Calls of one rows-per-group size share one shape."""
  by_case = _by_case(prompts)
  cases = sorted(by_case, key=lambda case: (-len(by_case[case]), case))
  calls, begin = [], 0
  while begin < len(cases):
    rows = -(-len(by_case[cases[begin]]) // 4) * 4
    groups = max(1, (config.batch_size or len(prompts)) // rows)
    members = [c for c in cases[begin : begin + groups] if -(-len(by_case[c]) // 4) * 4 == rows]
    calls.append((rows, groups, [by_case[c] for c in members]))
    begin += len(members)
  return calls


def _calls(backend: AgentBackend, prompts: Sequence[tuple[int, int, list[Message]]], config: UserF1Config, seed: int):
  """Runs the backend calls of `config.batching`, yielding (indices into `prompts`, their generations) per call."""
  if config.batching == 'shared_prefix' and getattr(backend, 'shares_prefixes', False):
    for call, (rows, groups, members) in enumerate(shared_prefix_calls(prompts, config)):
      out = backend.generate_grouped(
        USER,
        [[prompts[i][2] for i in indices] for indices in members],
        seed=turn_seed(seed, call + 1, USER),
        rows_per_group=rows,
        num_groups=groups,
      )
      if len(out) != len(members):
        raise ValueError(f'the backend returned {len(out)} groups of user messages for {len(members)} users')
      yield [i for indices in members for i in indices], [g for group in out for g in group]
    return
  for call, (turn, indices, episode_ids) in enumerate(judgement_calls(prompts, config)):
    prompt_lists = [prompts[i][2] for i in indices]
    seed_c = turn_seed(seed, call + 1, USER)
    yield indices, list(backend.generate(USER, prompt_lists, seed=seed_c, episode_ids=episode_ids, turn=turn))


def evaluate_user_f1(
  dataset: Dataset,
  sim_set: UserSimSet,
  backend: AgentBackend,
  *,
  config: UserF1Config = UserF1Config(),
  peer=None,
  seed: int = 0,
  progress: bool = False,
) -> UserF1Result:
  """Runs the user-agent F1 protocol: every judgement through the backend's user agent, in the calls
  `config.batching` lays out (`shared_prefix_calls` through `backend.generate_grouped`, else `judgement_calls`
  through `backend.generate`).

  Args:
    dataset: the titles (the set's item ids index its catalog).
    sim_set: `data.user_sim_set(dataset, ...)`.
    backend: any `AgentBackend`; only its user agent is called.
    config: prompt and batching settings.
    peer: a `recsys.SASRec` or a `Peer` (e.g. `episodes.SASRecPeer`), needed when `config.show_peer_opinion` is
      on. When it has `candidate_scores` (SASRec and `SASRecPeer` do), each judgement also records SASRec's score
      of its item, from which the result reports SASRec's AUC and top-half F1 on the same set.
    seed: sampling seed; call c uses `episodes.turn_seed(seed, c + 1, 'user')`.
    progress: a tqdm bar that ticks per judgement.
  """
  if not isinstance(config, UserF1Config):
    raise TypeError(f'config must be a UserF1Config, found {type(config).__name__}')
  if not sim_set.cases:
    raise ValueError(
      f'the user-sim set of {sim_set.dataset!r} has no cases ({sim_set.users_left_out} users left '
      f'out); there is nothing to judge'
    )
  if peer is not None and not hasattr(peer, 'top_candidates'):
    peer = SASRecPeer(peer)  # a bare SASRec model, accepted as run_episodes accepts it
  start = time.perf_counter()
  prompts = judgement_prompts(dataset, sim_set, config=config, peer=peer)
  generations: list[Generation | None] = [None] * len(prompts)
  bar = tqdm.tqdm(
    total=len(prompts),
    desc=f'user F1 {dataset.name}{" with p_t" if config.show_peer_opinion else ""}',
    unit='judgement',
    disable=not progress,
    dynamic_ncols=True,
  )
  try:
    for indices, out in _calls(backend, prompts, config, seed):
      if len(out) != len(indices):
        raise ValueError(f'the backend returned {len(out)} user messages for {len(indices)} prompts')
      for index, generation in zip(indices, out):
        generations[index] = generation
      bar.update(len(indices))
  finally:
    bar.close()
    clear = getattr(backend, 'clear_prefixes', None)
    if clear is not None:
      clear()  # no kept cache outlives this evaluation
  scores = peer_scores(dataset, sim_set, peer) if hasattr(peer, 'candidate_scores') else None
  judgements = []
  for (index, position, _), generation in zip(prompts, generations):
    case = sim_set.cases[index]
    judgements.append(
      Judgement(
        case=index,
        user=case.user,
        item=case.items[position],
        label=case.labels[position],
        generation=generation,
        parse=parse_user_output(generation.text, config.parse),
        peer_score=None if scores is None else scores[index][position],
      )
    )
  labels = [list(case.labels) for case in sim_set.cases]
  predictions = [[] for _ in sim_set.cases]
  for judgement in judgements:
    predictions[judgement.case].append(judgement.positive)
  return UserF1Result(
    scores=f1_scores(labels, predictions),
    judgements=tuple(judgements),
    num_users=len(sim_set.cases),
    users_left_out=sim_set.users_left_out,
    wall_seconds=time.perf_counter() - start,
  )
