"""Peer signals from SASRec for the user agent: the opinion p_t and the similarity q_t (METHOD.md section 2)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from coars_jax.recsys.sasrec import SASRec


@nnx.jit
def top_candidate(model: SASRec, history: jax.Array, lengths: jax.Array, candidates: jax.Array) -> jax.Array:
  """int32[B]: SASRec's highest-scored item of each candidate list (the item the peer opinion names)."""
  chex.assert_rank(candidates, 2)
  scores = jnp.take_along_axis(model(history, lengths), candidates, axis=1)
  return jnp.take_along_axis(candidates, jnp.argmax(scores, axis=1)[:, None], axis=1)[:, 0]


@nnx.jit
def peer_similarity(model: SASRec, history: jax.Array, lengths: jax.Array, items: jax.Array) -> jax.Array:
  """float32[B]: q_t in [-1, 1], the cosine between each user's sequence representation and item i_t."""
  chex.assert_rank(items, 1)
  user = model.encode(history, lengths)
  item = model.item_embeddings()[items]
  chex.assert_equal_shape([user, item])
  norms = jnp.linalg.norm(user, axis=-1) * jnp.linalg.norm(item, axis=-1)
  return jnp.clip(jnp.sum(user * item, axis=-1) / jnp.maximum(norms, 1e-12), -1.0, 1.0)


def peer_opinion(title: str) -> str:
  """The sentence p_t shown to the user agent."""
  return f'People with a history like yours chose "{title}".'
