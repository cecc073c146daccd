"""The multi-turn loop of METHOD.md section 2: a batch of windows plays recommender-user dialogues turn by turn
together, each turn serving all still-live episodes with one batched call per agent, until the user clicks or T_u
turns have passed. Each agent's prompt grows append-only (`prompts`), so a backend reads earlier turns from its
cache."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from coars_jax.agents.backend import AgentBackend, Generation
from coars_jax.agents.episode import NO_ITEM, NO_ITEM_SHOWN, Episode, RolloutConfig, Turn, turn_seed
from coars_jax.agents.parsing import RecommenderParse, parse_recommender_output, parse_user_output
from coars_jax.agents.peer import bind_peer, peer_opinion
from coars_jax.agents.prompts import Memory, PromptConfig, recommender_messages, user_messages
from coars_jax.agents.protocol import RECOMMENDER, USER
from coars_jax.data.candidates import candidate_list
from coars_jax.data.schema import Dataset


def _shown(parse: RecommenderParse, text: str) -> tuple[str, str]:
  """(item title, reason) the user agent and the memory see for a recommender message.

  An invalid message is shown as written rather than hidden: the user reacts to what the recommender actually
  said, and the recommender's next turn sees in memory how that went. Neither can leak the target to the user
  beyond what the recommender wrote.
  """
  if parse.title is not None:
    title = parse.title
  elif parse.item_text:
    title = parse.item_text
  else:
    title = NO_ITEM_SHOWN
  reason = parse.reason
  if not reason and parse.item_text is None:
    reason = ' '.join(text.split())
  return title, reason


def run_episodes(
  dataset: Dataset,
  split: str,
  window_indices: Sequence[int],
  backend: AgentBackend,
  *,
  peer,
  config: RolloutConfig = RolloutConfig(),
  seed: int = 0,
  on_turn: Callable[[int], None] | None = None,
) -> list[Episode]:
  """Plays one episode per window, all turn by turn together (METHOD.md section 2).

  Turn t: one `backend.generate('recommender', ..., candidates=)` call for every live episode (with each
  episode's candidate titles, which a constrained backend restricts the item to), parsing; then one
  `backend.generate('user', ...)` call for the same episodes; then the memory grows by (m_rec_t, m_user_t).
  Episodes whose user clicked are finished and leave the later calls; the rest stop after T_u turns.

  Args:
    dataset: the windows and titles.
    split: 'train', 'val' or 'test'.
    window_indices: the windows to play, one episode each, in this order (repeats allowed, e.g. G rollouts of a
      sample for a group baseline; repeats draw different messages, since sampling differs per row).
    backend: `LLMBackend`, `ScriptedBackend` or anything with the `AgentBackend` method.
    peer: a `Peer` (e.g. `SASRecPeer`), a `recsys.SASRec` model (wrapped in `SASRecPeer`), or a
      `recsys.CrossFittedPeer`, bound to these windows' users (`bind_peer`).
    config: the protocol settings.
    seed: the rollout's sampling seed (`turn_seed` derives each call's).
    on_turn: called with t after turn t's two calls (progress bars tick per turn).
  Returns:
    The episodes in the order of `window_indices`.
  """
  if not isinstance(config, RolloutConfig):
    raise TypeError(f'config must be a RolloutConfig, found {type(config).__name__}')
  windows = dataset.split(split)
  indices = [int(i) for i in window_indices]
  if not indices:
    raise ValueError('window_indices is empty; give at least one window to play')
  out_of_range = [i for i in indices if not 0 <= i < len(windows)]
  if out_of_range:
    raise ValueError(
      f'window_indices {out_of_range[:5]} are outside split {split!r} of {dataset.name!r}, which '
      f'has {len(windows)} windows'
    )
  prompt_config = config.prompt or PromptConfig.for_dataset(dataset.name)
  titles = dataset.catalog.titles
  batch = len(indices)

  candidates = np.stack(
    [candidate_list(dataset, split, i, config.candidate_seed, config.num_candidates) for i in indices]
  ).astype(np.int32)
  history, lengths = windows.history[indices], windows.lengths[indices]
  peer = bind_peer(peer, split, windows.users[indices])
  peer_items = np.asarray(peer.top_candidates(history, lengths, candidates)).astype(np.int64)
  similarities = np.asarray(peer.candidate_similarities(history, lengths, candidates), np.float64)
  if peer_items.shape != (batch,) or similarities.shape != candidates.shape:
    raise ValueError(
      f'peer returned top candidates of shape {peer_items.shape} and similarities of shape '
      f'{similarities.shape}; expected ({batch},) and {candidates.shape}'
    )
  for row in range(batch):
    if peer_items[row] not in candidates[row]:
      raise ValueError(
        f'peer top candidate {int(peer_items[row])} of window {indices[row]} is not in its candidate '
        f'list; the hint and p_t must name a candidate'
      )

  ranking = None
  if config.show_hint and hasattr(peer, 'candidate_ranking'):
    ranking = np.asarray(peer.candidate_ranking(history, lengths, candidates)).astype(np.int64)
    if ranking.shape != candidates.shape or (ranking[:, 0] != peer_items).any():
      raise ValueError(
        f'peer candidate_ranking returned shape {ranking.shape} (expected {candidates.shape}) or a '
        f'first column that is not its top candidate'
      )

  def hint_item(e: int) -> int:
    if ranking is None:
      return int(peer_items[e])
    shown = {turn.item for turn in turns[e]}
    return int(next((item for item in ranking[e] if item not in shown), peer_items[e]))

  window_list = [windows.window(i) for i in indices]
  history_titles = [[titles[item] for item in window.history] for window in window_list]
  candidate_titles = [[titles[item] for item in row] for row in candidates]
  turns: list[list[Turn]] = [[] for _ in range(batch)]
  memories = [Memory() for _ in range(batch)]
  live = list(range(batch))

  try:
    for t in range(1, config.max_turns + 1):
      hints = {e: titles[hint_item(e)] if config.show_hint else None for e in live}
      rec_prompts = [
        recommender_messages(
          history_titles=history_titles[e],
          candidate_titles=candidate_titles[e],
          memory=memories[e],
          hint_title=hints[e],
          config=prompt_config,
        )
        for e in live
      ]
      rec_out = _checked(
        backend.generate(
          RECOMMENDER,
          rec_prompts,
          seed=turn_seed(seed, t, RECOMMENDER),
          episode_ids=live,
          turn=t,
          candidates=[candidate_titles[e] for e in live],
        ),
        len(live),
        RECOMMENDER,
      )
      rec_parses = [
        parse_recommender_output(g.text, candidate_titles[e], candidates[e].tolist(), config.parse)
        for e, g in zip(live, rec_out)
      ]
      shown = [_shown(p, g.text) for p, g in zip(rec_parses, rec_out)]

      user_prompts = [
        user_messages(
          history_titles=history_titles[e],
          recommended_title=title,
          recommender_reason=reason,
          memory=memories[e],
          peer_opinion=peer_opinion(titles[peer_items[e]]) if config.show_peer_opinion else None,
          config=prompt_config,
        )
        for e, (title, reason) in zip(live, shown)
      ]
      user_out = _checked(
        backend.generate(USER, user_prompts, seed=turn_seed(seed, t, USER), episode_ids=live, turn=t), len(live), USER
      )

      still_live = []
      for row, e in enumerate(live):
        rec_parse = rec_parses[row]
        user_parse = parse_user_output(user_out[row].text, config.parse)
        item = rec_parse.item_id if rec_parse.valid else NO_ITEM
        turn = Turn(
          turn=t,
          recommender=rec_out[row],
          user=user_out[row],
          recommender_parse=rec_parse,
          user_parse=user_parse,
          shown_title=shown[row][0],
          shown_reason=shown[row][1],
          item=item,
          hit=bool(item == window_list[e].target),
          acceptance_score=float(user_parse.score),
          peer_similarity=float(similarities[e, rec_parse.candidate_index]) if rec_parse.valid else 0.0,
          action=user_parse.action,
          hint_title=hints[e],
        )
        turns[e].append(turn)
        memories[e] = memories[e].append(turn.memory_entry)
        if not turn.clicked:
          still_live.append(e)
      live = still_live
      if on_turn is not None:
        on_turn(t)
      if not live:
        break
  finally:
    # Kept KV caches (`LLMBackendConfig.prefix_reuse`) must not outlive this rollout's parameters.
    if hasattr(backend, 'clear_prefixes'):
      backend.clear_prefixes()

  return [
    Episode(
      split=split,
      window_index=indices[e],
      user=window_list[e].user,
      history=window_list[e].history,
      history_titles=tuple(history_titles[e]),
      target=window_list[e].target,
      target_title=titles[window_list[e].target],
      candidates=tuple(candidates[e].tolist()),
      candidate_titles=tuple(candidate_titles[e]),
      peer_item=int(peer_items[e]),
      peer_title=titles[peer_items[e]],
      turns=tuple(turns[e]),
    )
    for e in range(batch)
  ]


def _checked(generations, expected: int, agent: str) -> list[Generation]:
  generations = list(generations)
  if len(generations) != expected:
    raise ValueError(f'the backend returned {len(generations)} {agent} messages for {expected} prompts')
  for index, generation in enumerate(generations):
    if not isinstance(generation, Generation):
      raise TypeError(
        f'the backend returned {type(generation).__name__} for {agent} prompt {index}; expected a Generation'
      )
  return generations
