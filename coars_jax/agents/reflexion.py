"""The Reflexion-style memory baseline (METHOD.md section 8): episodes of the same user are played one after
another, each finished episode is summarised as a short text reflection (what was recommended, how the user
reacted, whether the session succeeded), and the reflections of a user's earlier episodes are appended as an extra
section to the prompts of that user's later episodes; nothing is trained. Evaluation users of every dataset here
have a single evaluation window and no training windows (LastFM and MovieLens hold them out, Instruments splits
users 8:1:1), so a user's earlier episodes are played on "prior windows" cut from the user's own history: the
window's history h = (x_1..x_L) gives prior windows (x_1..x_{L-j}) -> x_{L-j+1} for j = P..1, oldest first, all
before the target, so they reveal nothing the history does not. Users with several evaluation windows play them
in split order after the priors, each seeing the reflections of all the ones before.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np
import tqdm

from coars_jax.agents.episodes import RECOMMENDER, USER, AgentBackend, Episode, Generation, RolloutConfig, run_episodes
from coars_jax.agents.prompts import Message
from coars_jax.agents.protocol import format_score
from coars_jax.data.schema import Dataset, Window, WindowSplit

# The split name prior windows are played under. Candidate lists are seeded by split name and index
# (`data.candidates.window_rng`), so the priors need one of the schema's split names; 'train' is free because
# evaluation runs on val or test, and the priors live in a copy of the dataset, never in the caller's.
PRIOR_SPLIT = 'train'
SECTION_TITLE = 'Reflections on earlier sessions with this user, oldest first'


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReflexionConfig:
  """The memory baseline's settings.

  Attributes:
    num_prior_episodes: P, the prior episodes played on windows cut from the history before a user's first
      evaluation window (fewer when the history is too short; see `min_prior_history`). 0 plays only the
      evaluation windows, so single-window users get no reflections at all.
    min_prior_history: the fewest history items a prior window may have; shorter prefixes are not played.
    max_reflections: how many of the most recent earlier episodes' reflections a prompt shows; None shows all.
    show_to_user: whether the user agent's prompts also carry the reflections (the recommender's always do).
      Off by default: the baseline is a memory for the recommender, and a user agent that reads its own past
      reactions would change the stopping behaviour the comparison with zero-shot agents relies on.
  """

  num_prior_episodes: int = 3
  min_prior_history: int = 3
  max_reflections: int | None = None
  show_to_user: bool = False

  def __post_init__(self):
    for name, least in (('num_prior_episodes', 0), ('min_prior_history', 1)):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f'ReflexionConfig.{name} must be an int >= {least}, found {value!r}')
    if self.max_reflections is not None and (
      isinstance(self.max_reflections, bool) or not isinstance(self.max_reflections, int) or self.max_reflections < 1
    ):
      raise ValueError(f'ReflexionConfig.max_reflections must be None or an int >= 1, found {self.max_reflections!r}')
    if not isinstance(self.show_to_user, bool):
      raise ValueError(f'ReflexionConfig.show_to_user must be a bool, found {self.show_to_user!r}')


def _quoted(title: str) -> str:
  return '"' + ' '.join(str(title).split()) + '"'


def reflection_text(episode: Episode, number: int) -> str:
  """The one-paragraph summary of a finished episode that later episodes of its user see.

  It names each recommended item with the user's action and score, and whether the final item i_T was the item the
  user actually chose next. It never names that item itself: a failed session says only that the last pick was
  wrong, so a reflection adds no title beyond those the dialogue showed.
  """
  steps = []
  for turn in episode.turns:
    item = _quoted(turn.shown_title) + ('' if turn.recommender_parse.valid else ' (not a candidate)')
    steps.append(f'{item} (user: {turn.action}, score {format_score(turn.acceptance_score)})')
  last = _quoted(episode.turns[-1].shown_title)
  if episode.final_hit:
    outcome = f'success: {last} was the item the user chose next.'
  elif episode.clicked:
    outcome = f'failure: the user clicked {last}, but it was not the item they chose next.'
  else:
    outcome = f'failure: the user accepted nothing, and {last} was not the item they chose next.'
  return f'Session {number}: the recommender suggested ' + ', then '.join(steps) + f'. Outcome: {outcome}'


def reflection_section(reflections: Sequence[str]) -> str:
  """The prompt section holding earlier episodes' reflections; '' when there are none."""
  if not reflections:
    return ''
  return (
    f'{SECTION_TITLE}:\n'
    + '\n'.join(reflections)
    + '\nUse them: what the user rejected before is unlikely to suit them now.'
  )


def with_section(messages: Sequence[Message], section: str) -> list[Message]:
  """A copy of chat `messages` whose FIRST user message ends with `section` (unchanged when it is ''): the
  reflections are fixed for an episode, so they sit with the other fixed data and every later turn's prompt still
  starts with the earlier one (`prompts`: append-only dialogues)."""
  messages = [dict(m) for m in messages]
  if not section:
    return messages
  for message in messages:
    if message.get('role') == 'user':
      message['content'] = f'{message["content"]}\n\n{section}'
      return messages
  raise ValueError('the prompt has no user message to append the reflections to')


class _ReflectingBackend:
  """Wraps a backend so that the prompts of row e of a `run_episodes` call end with `sections[e]`."""

  def __init__(self, inner: AgentBackend, sections: Sequence[str], show_to_user: bool):
    self.inner, self.sections = inner, list(sections)
    self.agents = (RECOMMENDER, USER) if show_to_user else (RECOMMENDER,)

  def generate(self, agent: str, prompts, *, seed: int, episode_ids, turn: int, candidates=None) -> list[Generation]:
    if agent in self.agents:
      prompts = [with_section(messages, self.sections[e]) for messages, e in zip(prompts, episode_ids, strict=True)]
    extra = {} if candidates is None else {'candidates': candidates}  # recommender calls carry the candidates
    return self.inner.generate(agent, prompts, seed=seed, episode_ids=episode_ids, turn=turn, **extra)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class ReflexionStep:
  """One episode of a user's chain.

  Attributes:
    user: the user id.
    position: its place in the user's chain, from 0.
    evaluated: True for an evaluation window (it counts in the metrics), False for a prior window cut from the
      history; a prior episode's `split` is `PRIOR_SPLIT` and its `window_index` indexes `ReflexionRun.priors`.
    episode: the dialogue.
    shown_reflections: the section appended to this episode's prompts ('' for a chain's first episode).
    reflection: this episode's own summary (`reflection_text`), shown to the user's later episodes.
  """

  user: int
  position: int
  evaluated: bool
  episode: Episode
  shown_reflections: str
  reflection: str


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class ReflexionRun:
  """The outcome of `run_reflexion_episodes`.

  Attributes:
    episodes: the evaluation episodes, in the order of the window indices given.
    chains: user id -> that user's steps, oldest first.
    priors: the prior windows, as played (the rows prior episodes' `window_index` points to).
  """

  episodes: tuple[Episode, ...]
  chains: Mapping[int, tuple[ReflexionStep, ...]]
  priors: WindowSplit

  @property
  def num_prior_episodes(self) -> int:
    return len(self.priors)


def prior_windows(window: Window, config: ReflexionConfig) -> list[Window]:
  """The prior windows cut from `window`'s history, oldest first (see the module docstring)."""
  length = len(window.history)
  count = max(0, min(config.num_prior_episodes, length - config.min_prior_history))
  return [
    Window(user=window.user, history=window.history[: length - j], target=window.history[length - j])
    for j in range(count, 0, -1)
  ]


def batch_seed(seed: int, *keys: int) -> int:
  """A sampling seed for one batch of a larger run, a function of the run's seed and the batch's keys only."""
  return int(np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(1)[0] & 0x7FFFFFFF)


def run_reflexion_episodes(
  dataset: Dataset,
  split: str,
  window_indices: Sequence[int],
  backend: AgentBackend,
  *,
  peer,
  config: ReflexionConfig = ReflexionConfig(),
  rollout: RolloutConfig = RolloutConfig(),
  seed: int = 0,
  batch_size: int | None = None,
  progress: bool = False,
) -> ReflexionRun:
  """Plays each user's chain (prior windows, then evaluation windows) in order, with reflections in the prompts.

  Chains run side by side, aligned on their last episode: stage s plays every chain's episode that falls in it,
  so all single-window users' evaluation episodes share the last stage and its batched calls. Within a stage,
  prior and evaluation windows are played in separate `run_episodes` calls (of at most `batch_size` episodes),
  since they come from different splits. Evaluation windows keep the candidate lists and peer signals a plain
  `run_episodes` call would give them; prior windows draw negatives outside the user's known items and every
  item of the user's evaluation windows, so no prior dialogue can name a later target.

  Args:
    dataset: the windows and titles.
    split: 'val' or 'test'.
    window_indices: the evaluation windows, each at most once.
    backend: any `AgentBackend`.
    peer: a `Peer` or a `recsys.SASRec`, as for `run_episodes`.
    config: the memory settings.
    rollout: the dialogue protocol (T_u, candidates, hint, peer opinion).
    seed: the run's sampling seed; each call uses `batch_seed(seed, stage, kind, chunk)`.
    batch_size: the most episodes per `run_episodes` call; None puts a whole stage's windows of one kind in one.
    progress: show a tqdm bar over the calls.
  """
  if not isinstance(config, ReflexionConfig):
    raise TypeError(f'config must be a ReflexionConfig, found {type(config).__name__}')
  if split == PRIOR_SPLIT:
    raise ValueError(
      f'the Reflexion baseline evaluates val or test windows; split {split!r} is where its prior windows are played'
    )
  if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
    raise ValueError(f'batch_size must be None or an int >= 1, found {batch_size!r}')
  indices = [int(i) for i in window_indices]
  if not indices:
    raise ValueError('window_indices is empty; give at least one window to play')
  if len(set(indices)) != len(indices):
    repeated = sorted({i for i in indices if indices.count(i) > 1})
    raise ValueError(f"window_indices repeats {repeated[:5]}; each window is one episode of its user's chain")
  windows = dataset.split(split)
  out_of_range = [i for i in indices if not 0 <= i < len(windows)]
  if out_of_range:
    raise ValueError(
      f'window_indices {out_of_range[:5]} are outside split {split!r} of {dataset.name!r}, which '
      f'has {len(windows)} windows'
    )

  # Chains: per user (in order of first appearance), the prior windows of the first evaluation window, then the
  # evaluation windows in split order, which every loader writes in time order.
  evaluated_by_user: dict[int, list[int]] = {}
  for index in indices:
    evaluated_by_user.setdefault(int(windows.users[index]), []).append(index)
  prior_list: list[Window] = []
  chains_spec: dict[int, list[tuple[bool, int]]] = {}  # user -> [(evaluated, window index in its split)]
  for user, own in evaluated_by_user.items():
    own.sort()
    priors = prior_windows(windows.window(own[0]), config)
    chains_spec[user] = [(False, len(prior_list) + k) for k in range(len(priors))] + [(True, i) for i in own]
    prior_list += priors
  prior_split = WindowSplit.from_windows(prior_list, dataset.catalog.pad_id)
  # Later targets are kept out of prior candidate lists by adding each user's evaluation items to their known
  # items in the copy that plays the priors; the evaluation windows are played on the caller's dataset unchanged.
  user_items = dict(dataset.user_items)
  for user, own in evaluated_by_user.items():
    extra = {item for i in own for item in windows.window(i).history} | {int(windows.targets[i]) for i in own}
    user_items[user] = frozenset(user_items.get(user, frozenset())) | frozenset(extra)
  prior_dataset = dataclasses.replace(
    dataset, splits={**dataset.splits, PRIOR_SPLIT: prior_split}, user_items=user_items
  )

  stages = max(len(spec) for spec in chains_spec.values())
  steps: dict[int, list[ReflexionStep]] = {user: [] for user in chains_spec}
  plan = []  # (stage, kind, [(user, window index)]) per run_episodes call
  for stage in range(stages):
    for kind, evaluated in enumerate((False, True)):
      rows = [
        (user, spec[stage - (stages - len(spec))][1])
        for user, spec in chains_spec.items()
        if stage >= stages - len(spec) and spec[stage - (stages - len(spec))][0] == evaluated
      ]
      size = batch_size or max(len(rows), 1)
      for chunk, begin in enumerate(range(0, len(rows), size)):
        plan.append((stage, kind, chunk, rows[begin : begin + size]))

  for stage, kind, chunk, rows in tqdm.tqdm(plan, desc=f'Reflexion {dataset.name} {split}', disable=not progress):
    evaluated = kind == 1
    sections = []
    for user, _ in rows:
      earlier = [step.reflection for step in steps[user]]
      if config.max_reflections is not None:
        earlier = earlier[-config.max_reflections :]
      sections.append(reflection_section(earlier))
    wrapped = _ReflectingBackend(backend, sections, config.show_to_user)
    episodes = run_episodes(
      dataset if evaluated else prior_dataset,
      split if evaluated else PRIOR_SPLIT,
      [index for _, index in rows],
      wrapped,
      peer=peer,
      config=rollout,
      seed=batch_seed(seed, stage, kind, chunk),
    )
    for (user, _), section, episode in zip(rows, sections, episodes, strict=True):
      number = len(steps[user]) + 1
      steps[user].append(
        ReflexionStep(
          user=user,
          position=number - 1,
          evaluated=evaluated,
          episode=episode,
          shown_reflections=section,
          reflection=reflection_text(episode, number),
        )
      )

  by_window = {step.episode.window_index: step.episode for chain in steps.values() for step in chain if step.evaluated}
  return ReflexionRun(
    episodes=tuple(by_window[i] for i in indices),
    chains={user: tuple(chain) for user, chain in steps.items()},
    priors=prior_split,
  )
