"""SASRec's side of the protocol, the only door from `agents` to `recsys`: the peer's top candidate (the hint and
the opinion p_t), its similarities q_t and its ranking of each candidate list, from one SASRec (`SASRecPeer`) or
a cross-fitted one bound to the windows' users (`bind_peer`)."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from coars_jax.recsys.peer import (
  candidate_ranking,
  candidate_scores,
  candidate_similarities,
  peer_opinion,
  top_candidate,
)
from coars_jax.recsys.sasrec import SASRec

__all__ = ['Peer', 'SASRecPeer', 'as_peer', 'bind_peer', 'peer_opinion']


class Peer(Protocol):
  """SASRec's side of the protocol, over a batch of windows (histories in the schema's padded layout)."""

  def top_candidates(self, history: np.ndarray, lengths: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """int[B]: the highest-scored item of each candidate list C (the hint, and the item p_t names)."""
    ...

  def candidate_similarities(self, history: np.ndarray, lengths: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """float[B, C]: q in [-1, 1] between each user and each of their candidates."""
    ...

  # Optional: `candidate_ranking(history, lengths, candidates) -> int[B, C]`, each list best first. With it the
  # hint moves on to the best candidate not yet recommended; without it the hint stays on the top candidate.


class SASRecPeer:
  """`Peer` from one trained SASRec (`recsys.SASRec`), via `recsys.peer`."""

  def __init__(self, model):
    self.model = model

  def candidate_scores(self, history, lengths, candidates):
    return np.asarray(
      candidate_scores(
        self.model, np.asarray(history, np.int32), np.asarray(lengths, np.int32), np.asarray(candidates, np.int32)
      )
    )

  def candidate_ranking(self, history, lengths, candidates):
    return candidate_ranking(self.model, history, lengths, candidates)

  def top_candidates(self, history, lengths, candidates):
    return np.asarray(
      top_candidate(
        self.model, np.asarray(history, np.int32), np.asarray(lengths, np.int32), np.asarray(candidates, np.int32)
      )
    )

  def candidate_similarities(self, history, lengths, candidates):
    return candidate_similarities(self.model, history, lengths, candidates)


def bind_peer(peer, split: str, users) -> Peer:
  """The `Peer` of windows of `split` with these users: a cross-fitted peer (`recsys.CrossFittedPeer`) serves
  each training window by its user's out-of-fold SASRec (METHOD.md section 2); a SASRec is wrapped in
  `SASRecPeer`; any other `Peer` serves every row itself."""
  if hasattr(peer, 'for_windows'):
    return peer.for_windows(split, np.asarray(users))
  return as_peer(peer)


def as_peer(peer):
  if isinstance(peer, SASRec):
    return SASRecPeer(peer)
  if not (hasattr(peer, 'top_candidates') and hasattr(peer, 'candidate_similarities')):
    raise TypeError(
      f'peer must be a recsys.SASRec or have top_candidates and candidate_similarities methods '
      f'(see episodes.Peer); found {type(peer).__name__}'
    )
  return peer
