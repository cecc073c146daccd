"""The user-agent F1's numbers as pure functions of labels, predictions and scores: `f1_scores` (precision, recall
and F1 of per-user label and prediction lists, micro-averaged over all judgements with the macro average over
users beside them), `roc_auc` (the Mann-Whitney AUC of a score against binary labels, ties counting 1/2) and
`top_k_predictions` (the accept-the-top-k rule behind the SASRec reference). Nothing here knows about prompts,
backends or datasets; `eval.user_f1` re-exports its public names.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _ratio(numerator: float, denominator: float) -> float:
  # A user for whom nothing was predicted positive has no precision; counting it as 0 (sklearn's zero_division=0)
  # charges an agent that rejects everything rather than dropping the user from the macro average.
  return float(numerator / denominator) if denominator else 0.0


def _f1(precision: float, recall: float) -> float:
  return _ratio(2 * precision * recall, precision + recall)


def roc_auc(labels: Sequence[bool], scores: Sequence[float]) -> float:
  """The area under the ROC curve of `scores` against binary `labels` (the Mann-Whitney U over n+ n- pairs):

    AUC = 1 / (n+ n-) * sum_{i: label} sum_{j: not label} ([s_i > s_j] + [s_i = s_j] / 2),

  so a tie counts 1/2: 0.5 is chance (and what any constant score gets), 1 ranks every positive above every
  negative. Computed from mid-ranks (tied scores share their average rank) in O(n log n) rather than over pairs.

  Raises:
    ValueError: shapes differ, a label is not boolean, a score is not finite, or only one class is present (the
      AUC is then undefined).
  """
  labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
  if labels.ndim != 1 or labels.shape != scores.shape:
    raise ValueError(
      f'roc_auc needs two equal-length 1-d sequences, found labels {labels.shape} and scores {scores.shape}'
    )
  if not np.isin(labels, (0, 1)).all():
    raise ValueError('roc_auc labels must be booleans (or 0/1)')
  if not np.isfinite(scores).all():
    raise ValueError('roc_auc scores must be finite numbers')
  labels = labels.astype(bool)
  positives = int(labels.sum())
  negatives = len(labels) - positives
  if not positives or not negatives:
    raise ValueError(
      f'roc_auc needs both classes but found {positives} positives and {negatives} negatives; the '
      f'AUC is undefined with one class'
    )
  order = np.argsort(scores, kind='stable')
  ordered = scores[order]
  starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
  counts = np.diff(np.r_[starts, len(ordered)])
  ranks = np.empty(len(ordered), np.float64)
  ranks[order] = np.repeat(starts + (counts + 1) / 2, counts)  # 1-based mid-ranks: a tie's pairs count 1/2
  u = ranks[labels].sum() - positives * (positives + 1) / 2
  return float(u / (positives * negatives))


def top_k_predictions(scores: Sequence[float], k: int) -> list[bool]:
  """Accepts the k highest-scored items of one case. Ties go to the earlier item in the case's order, which
  carries no label (`data.user_sim` shuffles each case's items)."""
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 1 or isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= len(scores):
    raise ValueError(
      f'top_k_predictions needs a 1-d score list and 0 <= k <= its length, found k={k!r} for shape {scores.shape}'
    )
  accepted = np.zeros(len(scores), bool)
  accepted[np.argsort(-scores, kind='stable')[:k]] = True
  return accepted.tolist()


def f1_scores(labels: Sequence[Sequence[bool]], predictions: Sequence[Sequence[bool]]) -> dict[str, float]:
  """Precision, recall and F1 of positive predictions against labels, micro and macro.

  Args:
    labels: per user, whether each item is a true future item.
    predictions: per user, whether the user agent accepted each item (click or star); same shapes as `labels`.
  Returns:
    micro_precision, micro_recall, micro_f1: from the true/false positive and false negative counts summed over
      every judgement of every user.
    macro_precision, macro_recall, macro_f1: the mean over users of each user's own value; macro F1 is the mean
      of per-user F1s, not the F1 of the macro precision and recall. A ratio with a zero denominator is 0.
    true_positives, false_positives, false_negatives: the summed counts (as floats, so the dict is uniform).
  """
  if len(labels) != len(predictions):
    raise ValueError(f'labels has {len(labels)} users but predictions has {len(predictions)}')
  if not labels:
    raise ValueError('f1_scores needs at least one user')
  totals = np.zeros(3, np.int64)
  per_user = []
  for user, (truth, predicted) in enumerate(zip(labels, predictions)):
    truth, predicted = np.asarray(truth, bool), np.asarray(predicted, bool)
    if truth.shape != predicted.shape or truth.ndim != 1:
      raise ValueError(
        f'user {user}: labels has shape {truth.shape} but predictions has {predicted.shape}; '
        f'give one prediction per labelled item'
      )
    counts = np.array([np.sum(truth & predicted), np.sum(~truth & predicted), np.sum(truth & ~predicted)])
    totals += counts
    precision, recall = _ratio(counts[0], counts[0] + counts[1]), _ratio(counts[0], counts[0] + counts[2])
    per_user.append((precision, recall, _f1(precision, recall)))
  true_positives, false_positives, false_negatives = (int(c) for c in totals)
  precision = _ratio(true_positives, true_positives + false_positives)
  recall = _ratio(true_positives, true_positives + false_negatives)
  macro = np.mean(np.asarray(per_user, np.float64), axis=0)
  return {
    'micro_precision': precision,
    'micro_recall': recall,
    'micro_f1': _f1(precision, recall),
    'macro_precision': float(macro[0]),
    'macro_recall': float(macro[1]),
    'macro_f1': float(macro[2]),
    'true_positives': float(true_positives),
    'false_positives': float(false_positives),
    'false_negatives': float(false_negatives),
  }
