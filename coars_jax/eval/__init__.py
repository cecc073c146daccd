"""Evaluation: ranking metrics over candidate lists (`metrics`), the reference table (`reference`), the agentic
evaluation loop (`agentic`) and the user-agent F1 (`user_f1`).

Only the array metrics are imported here; `agentic` and `user_f1` pull in the agents, the sampler and the
decoder, so import them by module: `from coars_jax.eval import agentic`.
"""

from coars_jax.eval.metrics import hit_at_k, ndcg_at_k, ranking_metrics, target_rank

__all__ = ['hit_at_k', 'ndcg_at_k', 'ranking_metrics', 'target_rank']
