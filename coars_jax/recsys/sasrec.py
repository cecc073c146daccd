"""SASRec in Flax NNX: a causal self-attention encoder over a user's last items.

CoARS uses it three ways: as a reference recommender, for the peer opinion p_t (its top-scored candidate),
and for the peer similarity q_t (the cosine between the user's sequence representation and an item's
embedding). Histories arrive in the shared schema (left-aligned, padded with the catalog's pad id); the
encoder right-aligns them so that the representation is always read at the last position.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True, kw_only=True)
class SASRecConfig:
  """Model shape.

  Attributes:
    num_items: catalog size; id num_items is the pad id.
    max_len: history positions (the schema's MAX_HISTORY).
    hidden: embedding and model width.
    num_blocks: transformer blocks.
    num_heads: attention heads; must divide hidden.
    dropout: dropout rate on embeddings, attention output and feed-forward output.
  """

  num_items: int
  max_len: int = 10
  hidden: int = 64
  num_blocks: int = 2
  num_heads: int = 1
  dropout: float = 0.5

  def __post_init__(self):
    for name in ('num_items', 'max_len', 'hidden', 'num_blocks', 'num_heads'):
      if getattr(self, name) < 1:
        raise ValueError(f'SASRecConfig.{name} must be >= 1, found {getattr(self, name)}')
    if self.hidden % self.num_heads:
      raise ValueError(f'SASRecConfig.num_heads ({self.num_heads}) must divide hidden ({self.hidden})')
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'SASRecConfig.dropout must be in [0, 1), found {self.dropout}')


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


def right_align(history: jax.Array, lengths: jax.Array, pad_id: int) -> tuple[jax.Array, jax.Array]:
  """Moves each row's real items to the end. Returns (tokens [B, L], valid [B, L])."""
  max_len = history.shape[1]
  source = jnp.arange(max_len)[None, :] - (max_len - lengths[:, None])
  valid = source >= 0
  tokens = jnp.take_along_axis(history, jnp.clip(source, 0, max_len - 1), axis=1)
  return jnp.where(valid, tokens, pad_id), valid


class _Block(nnx.Module):
  def __init__(self, config: SASRecConfig, *, rngs: nnx.Rngs):
    h = config.hidden
    self.config = config
    self.attn_norm = nnx.LayerNorm(h, rngs=rngs)
    self.qkv = nnx.Linear(h, 3 * h, rngs=rngs)
    self.out = nnx.Linear(h, h, rngs=rngs)
    self.ffn_norm = nnx.LayerNorm(h, rngs=rngs)
    self.ffn_in = nnx.Linear(h, h, rngs=rngs)
    self.ffn_out = nnx.Linear(h, h, rngs=rngs)

  def __call__(self, x, mask, keys):
    batch, length, hidden = x.shape
    heads = self.config.num_heads
    q, k, v = jnp.split(self.qkv(self.attn_norm(x)), 3, axis=-1)
    split = lambda t: t.reshape(batch, length, heads, hidden // heads)
    logits = jnp.einsum('bqhd,bkhd->bhqk', split(q), split(k)) / jnp.sqrt(hidden / heads)
    logits = jnp.where(mask[:, None], logits, jnp.finfo(logits.dtype).min)
    attended = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits, axis=-1), split(v))
    x = x + _dropout(self.out(attended.reshape(batch, length, hidden)), self.config.dropout, keys[0])
    y = self.ffn_out(_dropout(jax.nn.gelu(self.ffn_in(self.ffn_norm(x))), self.config.dropout, keys[1]))
    return x + _dropout(y, self.config.dropout, keys[2])


class SASRec(nnx.Module):
  """Scores every catalog item for a batch of histories."""

  def __init__(self, config: SASRecConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.item_embed = nnx.Embed(config.num_items + 1, config.hidden, rngs=rngs)
    self.pos_embed = nnx.Embed(config.max_len, config.hidden, rngs=rngs)
    self.blocks = nnx.List([_Block(config, rngs=rngs) for _ in range(config.num_blocks)])
    self.final_norm = nnx.LayerNorm(config.hidden, rngs=rngs)

  def encode(self, history: jax.Array, lengths: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    """The user's sequence representation, float32[B, hidden], read at the most recent item.

    Args:
      history: int32[B, max_len], left-aligned item ids padded with num_items.
      lengths: int32[B], real items per row; rows of length 0 give a representation of padding only.
      dropout_key: a PRNG key in training, None at evaluation.
    """
    chex.assert_rank([history, lengths], [2, 1])
    chex.assert_equal_shape_prefix([history, lengths], 1)
    config = self.config
    tokens, valid = right_align(history, lengths, config.num_items)
    keys = (
      [None] * (1 + 3 * config.num_blocks)
      if dropout_key is None
      else list(jax.random.split(dropout_key, 1 + 3 * config.num_blocks))
    )
    x = self.item_embed(tokens) * jnp.sqrt(config.hidden) + self.pos_embed(jnp.arange(config.max_len))[None]
    x = _dropout(x, config.dropout, keys[0]) * valid[..., None]
    causal = jnp.tril(jnp.ones((config.max_len, config.max_len), bool))
    # Every position may attend to itself, so that all-padding rows stay finite.
    mask = (causal[None] & valid[:, None, :]) | jnp.eye(config.max_len, dtype=bool)[None]
    for i, block in enumerate(self.blocks):
      x = block(x, mask, keys[1 + 3 * i : 4 + 3 * i]) * valid[..., None]
    return self.final_norm(x[:, -1])

  def item_embeddings(self) -> jax.Array:
    """float32[num_items, hidden]: the (shared input/output) embedding of every real item."""
    return self.item_embed.embedding[...][: self.config.num_items]

  def __call__(self, history: jax.Array, lengths: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    """Logits over the catalog, float32[B, num_items]."""
    return self.encode(history, lengths, dropout_key) @ self.item_embeddings().T
