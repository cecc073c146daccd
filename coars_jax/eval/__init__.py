"""Evaluation: ranking metrics over candidate lists and the reference table."""

from coars_jax.eval.metrics import hit_at_k, ndcg_at_k, ranking_metrics, target_rank
from coars_jax.eval.reference import format_markdown, reference_rows, summarize

__all__ = ['format_markdown', 'hit_at_k', 'ndcg_at_k', 'ranking_metrics', 'reference_rows', 'summarize',
           'target_rank']
