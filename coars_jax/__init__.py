"""coars_jax: CoARS (arXiv:2604.10029), co-evolving agentic recommender training, in JAX/Flax.

Subpackages: `data` (datasets, candidates), `recsys` (SASRec, peer signals), `eval` (metrics, reference
tables). Each lists its public names in its `__init__`.
"""

__version__ = '0.1.0'
