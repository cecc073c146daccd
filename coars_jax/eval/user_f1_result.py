"""What a user-agent F1 evaluation returns: `Judgement` (one item of one user-simulation case, with the user
agent's message, its parse and SASRec's score of the item) and `UserF1Result` (every judgement with the set's F1
scores, plus what is derived from them: the user agent's AUC and accept rate, the accept-all and SASRec
references, the per-case counts a bootstrap resamples, and the flat `as_dict` row a report takes). The numbers come
from `eval.user_f1_metrics`; `eval.user_f1` builds the result (`evaluate_user_f1`) and re-exports these names.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from coars_jax.agents.episodes import Generation
from coars_jax.agents.parsing import UserParse
from coars_jax.agents.protocol import POSITIVE_ACTIONS
from coars_jax.eval.user_f1_metrics import f1_scores, roc_auc, top_k_predictions


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Judgement:
  """One item of one case, as the user agent judged it.

  Attributes:
    case: the index of the case in `UserSimSet.cases`; `user` its user id.
    item: the item id judged; `label` whether it is a true future item.
    generation: the user agent's message with its prompt.
    parse: the parsed answer (invalid reads as a skip at s = .375).
    peer_score: SASRec's score of the item given the case's history (the peer's `candidate_scores`); None when no
      peer that can score items was given.
  """

  case: int
  user: int
  item: int
  label: bool
  generation: Generation
  parse: UserParse
  peer_score: float | None = None

  @property
  def positive(self) -> bool:
    return self.parse.action in POSITIVE_ACTIONS


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class UserF1Result:
  """The F1 of one user agent on one user-simulation set.

  Attributes:
    scores: `f1_scores` over the cases.
    judgements: every judgement, case by case, in item order.
    num_users: the cases judged; `users_left_out` the users the set left out (k < 1).
    wall_seconds: time spent generating and parsing.
  """

  scores: dict[str, float]
  judgements: tuple[Judgement, ...]
  num_users: int
  users_left_out: int
  wall_seconds: float

  @property
  def num_invalid(self) -> int:
    return sum(not j.parse.valid for j in self.judgements)

  def _labels(self) -> list[list[bool]]:
    labels = [[] for _ in range(self.num_users)]
    for judgement in self.judgements:
      labels[judgement.case].append(judgement.label)
    return labels

  def _auc(self, scores: Sequence[float]) -> float | None:
    # None rather than an error for a set with one class (no real set: each case holds k >= 1 of each), so a
    # hand-cut set still reports its F1.
    labels = [j.label for j in self.judgements]
    return roc_auc(labels, scores) if 0 < sum(labels) < len(labels) else None

  @property
  def user_auc(self) -> float | None:
    """The AUC of the user agent's acceptance score s (invalid answers at .375) against the labels."""
    return self._auc([j.parse.score for j in self.judgements])

  @property
  def accept_rate(self) -> float:
    """The share of judgements the user agent accepted (click or star)."""
    return float(np.mean([j.positive for j in self.judgements]))

  @property
  def accept_all_scores(self) -> dict[str, float]:
    """`f1_scores` of a user that accepts every item: the floor F1 must beat (2/3 on a 1:1 set)."""
    labels = self._labels()
    return f1_scores(labels, [[True] * len(case) for case in labels])

  @property
  def has_peer_scores(self) -> bool:
    return all(j.peer_score is not None for j in self.judgements)

  @property
  def sasrec_auc(self) -> float | None:
    """The AUC of SASRec's score on the same judgements; None without peer scores."""
    return self._auc([j.peer_score for j in self.judgements]) if self.has_peer_scores else None

  @property
  def sasrec_top_half_scores(self) -> dict[str, float] | None:
    """`f1_scores` of a user that, per case, accepts the top k of the case's items by SASRec score, k being the
    number of true future items. The protocol fixes k (it draws k negatives for the k positives, so k is half the
    case), not the labels: the rule is set before looking at which items are true and nothing is fit to them.
    None without peer scores."""
    if not self.has_peer_scores:
      return None
    labels, scores = self._labels(), [[] for _ in range(self.num_users)]
    for judgement in self.judgements:
      scores[judgement.case].append(judgement.peer_score)
    return f1_scores(labels, [top_k_predictions(s, sum(l)) for l, s in zip(labels, scores)])

  def case_counts(self) -> list[list[int]]:
    """[true positives, false positives, false negatives] of each case, in case order."""
    counts = [[0, 0, 0] for _ in range(self.num_users)]
    for judgement in self.judgements:
      if judgement.positive:
        counts[judgement.case][0 if judgement.label else 1] += 1
      elif judgement.label:
        counts[judgement.case][2] += 1
    return counts

  def as_dict(self) -> dict:
    """The numbers for a report row (the user agent's prefixed `user_` so they sit beside episode metrics; the
    set's references `accept_all_*` and `sasrec_*`, the latter None without peer scores)."""
    accept_all, top_half = self.accept_all_scores, self.sasrec_top_half_scores
    return {
      'user_f1': self.scores['micro_f1'],
      'user_precision': self.scores['micro_precision'],
      'user_recall': self.scores['micro_recall'],
      'user_f1_macro': self.scores['macro_f1'],
      'user_precision_macro': self.scores['macro_precision'],
      'user_recall_macro': self.scores['macro_recall'],
      'user_auc': self.user_auc,
      'user_accept_rate': self.accept_rate,
      'user_f1_judgements': len(self.judgements),
      'user_f1_invalid': self.num_invalid,
      'user_f1_users': self.num_users,
      'user_f1_users_left_out': self.users_left_out,
      'user_f1_seconds': self.wall_seconds,
      # Per case [true positives, false positives, false negatives]: a paired bootstrap over users resamples these
      'user_f1_cases': self.case_counts(),
      'accept_all_f1': accept_all['micro_f1'],
      'accept_all_precision': accept_all['micro_precision'],
      'sasrec_auc': self.sasrec_auc,
      'sasrec_top_half_f1': None if top_half is None else top_half['micro_f1'],
      'sasrec_top_half_precision': None if top_half is None else top_half['micro_precision'],
      'sasrec_top_half_recall': None if top_half is None else top_half['micro_recall'],
    }
