"""Peer signals from SASRec for the user agent: the opinion p_t and the similarity q_t (METHOD.md section 2)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coars_jax.recsys.sasrec import SASRec


@nnx.jit
def candidate_scores(model: SASRec, history: jax.Array, lengths: jax.Array, candidates: jax.Array) -> jax.Array:
  """float32[B, C]: SASRec's score of each candidate of each list; with candidates [S, B, C] (S lists per window,
  e.g. one per candidate seed), float32[S, B, C] from one pass over the histories. The one candidate scorer: the
  peer's hint, p_t, ranks and SASRec's evaluation all read it."""
  logits = model(history, lengths)
  if candidates.ndim == 3:
    return jax.vmap(lambda lists: jnp.take_along_axis(logits, lists, axis=1))(candidates)
  chex.assert_rank(candidates, 2)
  return jnp.take_along_axis(logits, candidates, axis=1)


@nnx.jit
def top_candidate(model: SASRec, history: jax.Array, lengths: jax.Array, candidates: jax.Array) -> jax.Array:
  """int32[B]: SASRec's highest-scored item of each candidate list (the item the peer opinion names)."""
  chex.assert_rank(candidates, 2)
  scores = candidate_scores(model, history, lengths, candidates)
  return jnp.take_along_axis(candidates, jnp.argmax(scores, axis=1)[:, None], axis=1)[:, 0]


def candidate_ranking(model: SASRec, history, lengths, candidates) -> np.ndarray:
  """int[B, C]: each candidate list reordered by SASRec's score, best first; ties keep list order, as
  `top_candidate`'s argmax does, so column 0 is `top_candidate`."""
  candidates = np.asarray(candidates, np.int32)
  scores = np.asarray(
    candidate_scores(model, jnp.asarray(history, jnp.int32), jnp.asarray(lengths, jnp.int32), jnp.asarray(candidates))
  )
  return np.take_along_axis(candidates, np.argsort(-scores, axis=1, kind='stable'), axis=1)


@nnx.jit
def peer_similarity(model: SASRec, history: jax.Array, lengths: jax.Array, items: jax.Array) -> jax.Array:
  """float32[B]: q_t in [-1, 1], the cosine between each user's sequence representation and item i_t."""
  chex.assert_rank(items, 1)
  user = model.encode(history, lengths)
  item = model.item_embeddings()[items]
  chex.assert_equal_shape([user, item])
  norms = jnp.linalg.norm(user, axis=-1) * jnp.linalg.norm(item, axis=-1)
  return jnp.clip(jnp.sum(user * item, axis=-1) / jnp.maximum(norms, 1e-12), -1.0, 1.0)


def candidate_similarities(model: SASRec, history, lengths, candidates) -> np.ndarray:
  """float32[B, C]: q in [-1, 1] between each user and each of their candidates (`peer_similarity` per pair).

  q_t depends only on the user and the item, and i_t must be a candidate, so one call over every (user, candidate)
  pair before the first turn serves all turns; a call per turn would also recompile whenever the number of live
  episodes changes."""
  candidates = np.asarray(candidates, np.int32)
  batch, width = candidates.shape
  similarities = peer_similarity(
    model,
    np.repeat(np.asarray(history, np.int32), width, axis=0),
    np.repeat(np.asarray(lengths, np.int32), width),
    candidates.reshape(-1),
  )
  return np.asarray(similarities).reshape(batch, width)


def peer_opinion(title: str) -> str:
  """The sentence p_t shown to the user agent."""
  return f'People with a history like yours chose "{title}".'
