"""Evaluation: ranking metrics over candidate lists (`metrics`) and the reference table (`reference`)."""

from coars_jax.eval.metrics import hit_at_k, ndcg_at_k, ranking_metrics, target_rank

__all__ = ['hit_at_k', 'ndcg_at_k', 'ranking_metrics', 'target_rank']
