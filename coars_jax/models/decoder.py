"""`Decoder`: the decoder-only transformer (Llama / SmolLM2, Qwen2 / Qwen2.5, Qwen3) in Flax NNX, with
grouped-query attention, RoPE, optional q/k RMSNorm and q/k/v biases, tied or untied embeddings, an
optional `KVCache` so the same forward pass serves full-sequence scoring, prefill and one-token decode,
and an optional choice of LoRA adapter per batch row (adapters are attached by `coars_jax.models.lora`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coars_jax.models import block_attention
from coars_jax.models.config import DecoderConfig
from coars_jax.models.kv_cache import KVCache
from coars_jax.models.layers import Embedding, Linear, RMSNorm
from coars_jax.models.logical_axes import BATCH, EMBED, HEAD_DIM, HEADS, KV_HEADS, LENGTH, MLP, VOCAB, constrain
from coars_jax.models.rope import apply_rope, inverse_frequencies
from coars_jax.models.shared_prefix_attention import SharedPrefixKV, merge, partial_own, partial_shared

# A one-token decode step reads the cache in blocks of this many slots (or the largest power of two dividing the
# cache length), from the first block any row attends to through the block of the current token. 64 and 128 cost
# the same with 900 live slots at batch 16; 64 reads less past the live ones (BUILD_NOTES Part 14).
DECODE_BLOCK = 64
# Read at trace time: False makes decode steps attend over every slot of the cache (the benchmarks' baseline).
LIVE_SLOT_DECODE = True
# Read at trace time: a pass of at least `BLOCK_SPARSE_PREFILL_LENGTH` tokens through a cache (a whole prompt's
# prefill, cached scoring) reads only the key blocks its causal, per-segment mask needs (`block_attention`) instead
# of the dense [L, S] softmax of every head: 16 prompts of ~850 tokens in the 1,024 bucket prefilled in 39-42 s
# against 52-57 s (BUILD_NOTES Part 13). Shorter passes (prefix reuse's blocks of new tokens) stay dense: their
# [L, S] scores are small, and with them block-sparse too the demo's rollouts and evaluations ran slower, not faster.
BLOCK_SPARSE_PREFILL = True
BLOCK_SPARSE_PREFILL_LENGTH = 512


def _live_slot_attention(
  grouped: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array, write_index: jax.Array
) -> jax.Array:
  """Attention of one query per row over the cache's LIVE slots only: grouped [B, 1, K, G, D] queries, the cache's
  head-major keys and values [B, K, S, D], mask [B, 1, S] -> [B, 1, K, G, D].

  Prompts are left-padded to a bucket and the cache ends with room for the whole completion bucket, so most slots
  of a decode step are padding or not written yet. The slots run in blocks, as an online softmax: blocks before the
  first slot any row attends to and after the current token are never read. Per row and key head each block is two
  small matrix products over contiguous slots. Equal to the full softmax up to float rounding.
  """
  batch, num_kv_heads, slots, head_dim = keys.shape
  block = block_attention.block_size(slots, largest=DECODE_BLOCK)
  first = jnp.argmax(mask[:, 0, :].any(axis=0)) // block
  last = write_index // block
  scale = head_dim**-0.5
  queries = grouped[:, 0]  # [B, K, G, D]

  def read_block(index, carry):
    running_max, running_sum, weighted = carry  # [B, K, G], [B, K, G], [B, K, G, D]
    start = index * block
    block_keys = jax.lax.dynamic_slice_in_dim(keys, start, block, axis=2)
    block_values = jax.lax.dynamic_slice_in_dim(values, start, block, axis=2)
    block_mask = jax.lax.dynamic_slice_in_dim(mask[:, 0], start, block, axis=1)  # [B, block]
    scores = jnp.einsum('bkgd,bksd->bkgs', queries, block_keys, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(block_mask[:, None, None, :], scores, block_attention.MASKED_SCORE)
    new_max = jnp.maximum(running_max, scores.max(axis=-1))
    probs = jnp.exp(scores - new_max[..., None])
    correction = jnp.exp(running_max - new_max)
    running_sum = running_sum * correction + probs.sum(axis=-1)
    weighted = weighted * correction[..., None] + jnp.einsum('bkgs,bksd->bkgd', probs, block_values.astype(jnp.float32))
    return new_max, running_sum, weighted

  shape = queries.shape[:3]
  init = (jnp.full(shape, block_attention.MASKED_SCORE, jnp.float32), jnp.zeros(shape, jnp.float32))
  init += (jnp.zeros(shape + (head_dim,), jnp.float32),)
  _, running_sum, weighted = jax.lax.fori_loop(first, last + 1, read_block, init)
  return (weighted / running_sum[..., None]).astype(grouped.dtype)[:, None]


def _head_major(array: jax.Array) -> jax.Array:
  """[B, L, K, D] <-> [B, K, L, D] (its own inverse)."""
  return jnp.transpose(array, (0, 2, 1, 3))


class Attention(nnx.Module):
  """Grouped-query self-attention: H query heads share K key/value heads in groups of H // K."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    self.config = config
    E, H, K, D = config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim
    dtypes = dict(param_dtype=config.jnp_param_dtype, compute_dtype=config.jnp_compute_dtype, rngs=rngs)
    self.q_proj = Linear((E,), (H, D), in_axes=(EMBED,), out_axes=(HEADS, HEAD_DIM), use_bias=config.qkv_bias, **dtypes)
    self.k_proj = Linear(
      (E,), (K, D), in_axes=(EMBED,), out_axes=(KV_HEADS, HEAD_DIM), use_bias=config.qkv_bias, **dtypes
    )
    self.v_proj = Linear(
      (E,), (K, D), in_axes=(EMBED,), out_axes=(KV_HEADS, HEAD_DIM), use_bias=config.qkv_bias, **dtypes
    )
    self.o_proj = Linear((H, D), (E,), in_axes=(HEADS, HEAD_DIM), out_axes=(EMBED,), use_bias=config.out_bias, **dtypes)
    if config.qk_norm:
      self.q_norm = RMSNorm(D, eps=config.rms_norm_eps, axis_name=HEAD_DIM, param_dtype=config.jnp_param_dtype)
      self.k_norm = RMSNorm(D, eps=config.rms_norm_eps, axis_name=HEAD_DIM, param_dtype=config.jnp_param_dtype)
    else:
      self.q_norm = self.k_norm = None

  def __call__(
    self,
    x: jax.Array,
    positions: jax.Array,
    mask: jax.Array,
    cached_kv: tuple | None,
    write_index: jax.Array | None,
    adapter_ids: jax.Array | None = None,
    block_sparse: bool = False,
    shared_kv: tuple | None = None,
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """x[B, L, E], mask[B, L, S] -> (out[B, L, E], updated (keys, values) or None).

    Without a cache S == L; with one, the new keys/values are written at slot `write_index` and the
    queries attend over all S = max_len slots that `mask` allows. block_sparse: read only the key blocks the mask
    needs (`block_attention.block_sparse_attention`). shared_kv: (keys, values, segment_ids) of this layer's
    group prefixes (`SharedPrefixKV`), which every query also attends to, before its own cache (a short one:
    its whole length is read).
    """
    queries = constrain(self.q_proj(x, adapter_ids), (BATCH, LENGTH, HEADS, HEAD_DIM))
    keys = constrain(self.k_proj(x, adapter_ids), (BATCH, LENGTH, KV_HEADS, HEAD_DIM))
    values = constrain(self.v_proj(x, adapter_ids), (BATCH, LENGTH, KV_HEADS, HEAD_DIM))
    if self.q_norm is not None:
      queries, keys = self.q_norm(queries), self.k_norm(keys)
    inv_freq = inverse_frequencies(self.config)  # numpy, so it is a compile-time constant under jit
    queries = apply_rope(queries, positions, inv_freq)
    keys = apply_rope(keys, positions, inv_freq)

    batch, length, num_heads, head_dim = queries.shape
    num_kv_heads = keys.shape[2]
    grouped = queries.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
    updated = None
    if cached_kv is not None:
      # The cache is head-major ([B, K, S, D], `kv_cache`): the new tokens' keys and values are written in that
      # layout, and the attention below reads it as it is, or (block-sparse passes) transposed back.
      cache_keys, cache_values = cached_kv
      start = (0, 0, write_index, 0)
      cache_keys = jax.lax.dynamic_update_slice(cache_keys, _head_major(keys).astype(cache_keys.dtype), start)
      cache_values = jax.lax.dynamic_update_slice(cache_values, _head_major(values).astype(cache_values.dtype), start)
      updated = (cache_keys, cache_values)
      keys, values = cache_keys.astype(x.dtype), cache_values.astype(x.dtype)
      if shared_kv is not None:
        attended = merge(partial_own(grouped, keys, values, mask), partial_shared(grouped, *shared_kv), x.dtype)
        return self.o_proj(attended.reshape(batch, length, num_heads, head_dim), adapter_ids), updated
      if length == 1 and LIVE_SLOT_DECODE:
        attended = _live_slot_attention(grouped, keys, values, mask, write_index)
        return self.o_proj(attended.reshape(batch, length, num_heads, head_dim), adapter_ids), updated
      if block_sparse or (BLOCK_SPARSE_PREFILL and length >= BLOCK_SPARSE_PREFILL_LENGTH):
        attended = block_attention.block_sparse_attention(grouped, _head_major(keys), _head_major(values), mask)
        return self.o_proj(attended.reshape(batch, length, num_heads, head_dim), adapter_ids), updated
      key_layout = 'bksd'
    else:
      if block_sparse:
        attended = block_attention.block_sparse_attention(grouped, keys, values, mask)
        return self.o_proj(attended.reshape(batch, length, num_heads, head_dim), adapter_ids), updated
      key_layout = 'bskd'
    scores = jnp.einsum(f'blkgd,{key_layout}->bkgls', grouped, keys, preferred_element_type=jnp.float32)
    scores = scores * (head_dim**-0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, block_attention.MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    attended = jnp.einsum(f'bkgls,{key_layout}->blkgd', probs, values).reshape(batch, length, num_heads, head_dim)
    return self.o_proj(attended, adapter_ids), updated


class FeedForward(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    E, F = config.embed_dim, config.mlp_dim
    dtypes = dict(param_dtype=config.jnp_param_dtype, compute_dtype=config.jnp_compute_dtype, rngs=rngs)
    self.gate_proj = Linear((E,), (F,), in_axes=(EMBED,), out_axes=(MLP,), use_bias=config.mlp_bias, **dtypes)
    self.up_proj = Linear((E,), (F,), in_axes=(EMBED,), out_axes=(MLP,), use_bias=config.mlp_bias, **dtypes)
    self.down_proj = Linear((F,), (E,), in_axes=(MLP,), out_axes=(EMBED,), use_bias=config.mlp_bias, **dtypes)

  def __call__(self, x: jax.Array, adapter_ids: jax.Array | None = None) -> jax.Array:
    hidden = jax.nn.silu(self.gate_proj(x, adapter_ids)) * self.up_proj(x, adapter_ids)
    return self.down_proj(constrain(hidden, (BATCH, LENGTH, MLP)), adapter_ids)


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + attention(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    norm = dict(eps=config.rms_norm_eps, axis_name=EMBED, param_dtype=config.jnp_param_dtype)
    self.attention_norm = RMSNorm(config.embed_dim, **norm)
    self.attention = Attention(config, rngs=rngs)
    self.mlp_norm = RMSNorm(config.embed_dim, **norm)
    self.mlp = FeedForward(config, rngs=rngs)

  def __call__(self, x, positions, mask, cached_kv, write_index, adapter_ids=None, block_sparse=False, shared_kv=None):
    attended, updated = self.attention(
      self.attention_norm(x), positions, mask, cached_kv, write_index, adapter_ids, block_sparse, shared_kv
    )
    x = constrain(x + attended, (BATCH, LENGTH, EMBED))
    x = constrain(x + self.mlp(self.mlp_norm(x), adapter_ids), (BATCH, LENGTH, EMBED))
    return x, updated


class Decoder(nnx.Module):
  """tokens -> logits, optionally reading and extending a `KVCache`.

  Call as `logits, new_cache = model(tokens, positions, segment_ids, cache)`:
    tokens[B, L] int32; positions[B, L] int32, the RoPE position of each token (per row, so padded rows
    keep their own numbering: for left padding use cumsum(segment_ids != 0) - 1);
    segment_ids[B, L] int32, 0 for padding and the same positive id for tokens that may attend to each
    other (a 0/1 attention mask is valid; distinct ids pack several sequences in one row); default all 1;
    cache: None for a plain causal forward (new_cache is then None), or a `KVCache` to write into;
    adapter (keyword): which LoRA adapter each row uses once `add_lora` has attached some. None (default)
    runs the base model alone; a name from `adapter_names` uses that adapter for every row; an int32
    array [B] picks per row, index i meaning adapter_names[i] and -1 (`ADAPTERS_OFF`) the base model.
    Under jit pass the array: names become compile-time constants, indices are data, so one compilation
    serves every adapter and the reference (adapters off) alike.
  Logits at padding positions are finite but meaningless.
  """

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtypes = dict(param_dtype=config.jnp_param_dtype, compute_dtype=config.jnp_compute_dtype, rngs=rngs)
    self.token_embedding = Embedding(config.vocab_size, config.embed_dim, **dtypes)
    self.layers = nnx.List([DecoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = RMSNorm(
      config.embed_dim, eps=config.rms_norm_eps, axis_name=EMBED, param_dtype=config.jnp_param_dtype
    )
    if config.tie_word_embeddings:
      self.lm_head = None
    else:
      self.lm_head = Linear(
        (config.embed_dim,), (config.vocab_size,), in_axes=(EMBED,), out_axes=(VOCAB,), use_bias=False, **dtypes
      )
    # Set by coars_jax.models.lora.add_lora; static, so they live in the graph definition, not the state.
    self.lora_config = None
    self.adapter_names: tuple[str, ...] = ()

  def __call__(
    self,
    tokens: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array | None = None,
    cache: KVCache | None = None,
    *,
    adapter: str | jax.Array | None = None,
    remat: bool = False,
  ) -> tuple[jax.Array, KVCache | None]:
    hidden, new_cache = self.hidden_states(tokens, positions, segment_ids, cache, adapter=adapter, remat=remat)
    return self.logits(hidden), new_cache

  def hidden_states(
    self,
    tokens: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array | None = None,
    cache: KVCache | None = None,
    *,
    adapter: str | jax.Array | None = None,
    remat: bool = False,
    attention_mask: jax.Array | None = None,
    block_sparse: bool = False,
    shared: SharedPrefixKV | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """Final-norm hidden states [B, L, E] (before the vocabulary projection) and the updated cache.

    remat: rematerialise each layer under differentiation (`jax.checkpoint`): the backward pass keeps each
      layer's input only and recomputes the rest, trading one more forward pass of the differentiated layers
      for activation memory.
    attention_mask: bool [B, L, S] (S = the cache's slots, or L without a cache) replaces the mask built from
      segment ids and slots, for layouts it cannot express: packed teacher rows that each read a different
      prefix of the student's cache (`sampling.packed`). The cache's segment ids are still written.
    block_sparse: attention reads only the key blocks the mask needs (`models.block_attention`, with its own
      gradient), for passes whose mask is mostly empty (packed rows: the teacher's, and the student's causal ones).
    shared: the keys and values of prompt prefixes that groups of rows share (`SharedPrefixKV`, G groups of
      B // G consecutive rows); every token also attends to its group's prefix, which comes before the cache's
      slots (positions are the caller's, counted from the prefix's start). Needs a cache; not with remat.
    The input of the lowest layer with LoRA adapters is a stop-gradient point when adapters are attached to
    upper layers only (`LoRAConfig.layers`): no trainable parameter lies below it, so no gradient has to.
    """
    if tokens.ndim != 2 or positions.shape != tokens.shape:
      raise ValueError(f'Decoder: tokens and positions must both be [B, L]; found {tokens.shape} and {positions.shape}')
    if segment_ids is None:
      segment_ids = jnp.ones(tokens.shape, jnp.int32)
    elif segment_ids.shape != tokens.shape:
      raise ValueError(f'Decoder: segment_ids must match tokens {tokens.shape}; found {segment_ids.shape}')
    segment_ids = segment_ids.astype(jnp.int32)
    length = tokens.shape[1]
    adapter_ids = self.adapter_ids(adapter, tokens.shape[0])

    if cache is None:
      slots = jnp.arange(length)
      mask = _attention_mask(segment_ids, segment_ids, slots, slots)
      write_index, cache_segments = None, None
    else:
      _check_cache(cache, tokens.shape, self.config)
      write_index = cache.end_index
      cache_segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (0, write_index))
      mask = _attention_mask(segment_ids, cache_segments, write_index + jnp.arange(length), jnp.arange(cache.max_len))
    if attention_mask is not None:
      if attention_mask.shape != mask.shape:
        raise ValueError(f'Decoder: attention_mask must be {mask.shape}; found {attention_mask.shape}')
      mask = attention_mask.astype(bool)

    if shared is not None and (cache is None or remat or block_sparse):
      raise ValueError('Decoder: a shared prefix needs a cache, and runs without remat and block_sparse')
    x = constrain(self.token_embedding(tokens), (BATCH, LENGTH, EMBED))
    lowest_adapted = self.lowest_adapted_layer
    # With remat, the adapted layers (all of the same structure) run as a `lax.scan` of a checkpointed body:
    # the backward pass is then a loop that recomputes one layer per iteration, so only each layer's input is
    # kept, whatever the backend's scheduler does (an unrolled stack of checkpointed layers is not enough on
    # XLA:CPU, which hoists the recomputations and keeps every layer's attention probabilities).
    scanned = range(lowest_adapted, len(self.layers)) if remat else range(0)
    new_keys, new_values = [], []
    for index, layer in enumerate(self.layers):
      if index == lowest_adapted and index > 0:
        x = jax.lax.stop_gradient(x)
      if index in scanned:
        break
      cached_kv = None if cache is None else (cache.keys[index], cache.values[index])
      shared_kv = None if shared is None else (shared.keys[index], shared.values[index], shared.segment_ids)
      x, updated = layer(x, positions, mask, cached_kv, write_index, adapter_ids, block_sparse, shared_kv)
      if updated is not None:
        new_keys.append(updated[0])
        new_values.append(updated[1])
    if scanned:
      x, updated = _scanned_layers(
        [self.layers[i] for i in scanned],
        x,
        positions,
        mask,
        None if cache is None else (cache.keys[scanned.start :], cache.values[scanned.start :]),
        write_index,
        adapter_ids,
        block_sparse,
      )
      if updated is not None:
        new_keys.extend(updated[0])
        new_values.extend(updated[1])
    hidden = self.final_norm(x)
    if cache is None:
      return hidden, None
    return hidden, KVCache(
      keys=tuple(new_keys), values=tuple(new_values), segment_ids=cache_segments, end_index=write_index + length
    )

  @property
  def lowest_adapted_layer(self) -> int:
    """The lowest layer index with LoRA adapters (0 when all layers, or none, have them)."""
    if self.lora_config is None:
      return 0
    return self.lora_config.layer_indices(self.config.num_layers)[0]

  def adapter_ids(self, adapter: str | jax.Array | None, batch: int) -> jax.Array | None:
    """The int32 [batch] adapter index per row for `adapter` (see the class docstring); None stays None."""
    if adapter is None:
      return None
    if not self.adapter_names:
      raise ValueError(
        f'Decoder: adapter={adapter!r} was requested but the model has no LoRA adapters; '
        'attach them with coars_jax.models.lora.add_lora'
      )
    if isinstance(adapter, str):
      if adapter not in self.adapter_names:
        raise ValueError(f'Decoder: adapter must be one of {self.adapter_names}, found {adapter!r}')
      return jnp.full((batch,), self.adapter_names.index(adapter), jnp.int32)
    adapter_ids = jnp.asarray(adapter)
    if adapter_ids.shape != (batch,) or not jnp.issubdtype(adapter_ids.dtype, jnp.integer):
      raise ValueError(
        f'Decoder: an adapter index array must be integer [{batch}] (one per row); found '
        f'{adapter_ids.dtype}{list(adapter_ids.shape)}'
      )
    # An index outside [-1, num_adapters) would silently act as "off"; catch it when the values are known
    # (numpy, so that a constant inside a jitted function is checked without being traced).
    if not isinstance(adapter, jax.core.Tracer) and batch > 0:
      values = np.asarray(adapter)
      low, high = int(values.min()), int(values.max())
      if low < -1 or high >= len(self.adapter_names):
        raise ValueError(
          f'Decoder: adapter indices must lie in [-1, {len(self.adapter_names)}) for '
          f'adapters {self.adapter_names}; found values in [{low}, {high}]'
        )
    return adapter_ids.astype(jnp.int32)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Projects hidden states [..., E] onto the vocabulary [..., V]."""
    if self.lm_head is None:
      logits = self.token_embedding.attend(hidden)
    else:
      logits = self.lm_head(hidden)
    return constrain(logits, (BATCH, LENGTH, VOCAB)) if logits.ndim == 3 else logits


def _scanned_layers(
  layers: list,
  x: jax.Array,
  positions: jax.Array,
  mask: jax.Array,
  cached_kv: tuple | None,
  write_index: jax.Array | None,
  adapter_ids: jax.Array | None,
  block_sparse: bool = False,
):
  """`layers` (identical in structure) applied in order as a `lax.scan` over their stacked states, each step under
  `jax.checkpoint`: (x, (new keys per layer, new values per layer) or None)."""
  lora = getattr(layers[0].attention.q_proj, 'lora', None)
  if lora is not None and lora.dropout is not None:
    raise ValueError('Decoder: remat=True does not support LoRA dropout; set LoRAConfig.dropout = 0')
  graphdef, first = nnx.split(layers[0])
  states = [first] + [nnx.split(layer)[1] for layer in layers[1:]]
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
  stacked_kv = None if cached_kv is None else (jnp.stack(cached_kv[0]), jnp.stack(cached_kv[1]))

  @jax.checkpoint
  def body(x, inputs):
    state, kv = inputs
    return nnx.merge(graphdef, state)(x, positions, mask, kv, write_index, adapter_ids, block_sparse)

  x, updated = jax.lax.scan(body, x, (stacked, stacked_kv))
  if updated is None:
    return x, None
  keys, values = updated
  return x, (tuple(keys[i] for i in range(len(layers))), tuple(values[i] for i in range(len(layers))))


def _attention_mask(
  query_segments: jax.Array, key_segments: jax.Array, query_slots: jax.Array, key_slots: jax.Array
) -> jax.Array:
  """[B, Lq, Lk] bool: key is at or before the query, holds a real token, and shares the query's segment."""
  causal = key_slots[None, None, :] <= query_slots[None, :, None]
  same_segment = query_segments[:, :, None] == key_segments[:, None, :]
  return causal & same_segment & (key_segments[:, None, :] != 0)


def _check_cache(cache: KVCache, tokens_shape: tuple[int, ...], config: DecoderConfig) -> None:
  batch, length = tokens_shape
  if len(cache.keys) != config.num_layers:
    raise ValueError(f'Decoder: cache has {len(cache.keys)} layers, the model has {config.num_layers}')
  if cache.batch_size != batch:
    raise ValueError(f'Decoder: cache batch is {cache.batch_size}, tokens batch is {batch}')
  if length > cache.max_len:
    raise ValueError(f'Decoder: {length} tokens do not fit a cache of max_len {cache.max_len}')
  # Past the end, dynamic_update_slice would silently clamp and overwrite earlier slots; catch it when the
  # index is known (outside jit). Inside jit the caller sizes max_len for prompt + new tokens.
  if not isinstance(cache.end_index, jax.core.Tracer) and int(cache.end_index) + length > cache.max_len:
    raise ValueError(
      f'Decoder: cache end_index {int(cache.end_index)} + {length} new tokens exceeds '
      f'max_len {cache.max_len}; allocate a longer cache with init_cache'
    )
