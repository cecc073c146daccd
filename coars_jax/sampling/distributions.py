"""The next-token distribution a sampler draws from: `SamplingParams` (greedy, temperature, top-k, top-p) and
the pure functions that turn raw logits into that distribution's float32 log-probs and draw from it. The
sampler and the scorer share them, so behaviour log-probs reported at sampling time and log-probs recomputed
later by `score` with the same params describe one and the same distribution."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
  """How logits become a next-token distribution pi(. | context); applied in the order temperature, top-k,
  top-p, as transformers' logits warpers do.

  temperature: 0 means greedy (argmax); otherwise logits are divided by it.
  top_k: keep only the k largest logits (None: keep all). Ties with the k-th value are kept too.
  top_p: nucleus sampling; keep the smallest set of most likely tokens whose probability reaches top_p
    (1.0: keep all). The most likely token is always kept, so a tiny top_p is greedy.

  Reported log-probs are log pi(token), in float32, of the distribution actually sampled from: tokens
  removed by top-k / top-p have log-prob -inf under it. Greedy decoding has no proper distribution (a point
  mass would give log-prob 0), so with temperature 0 the reported log-probs are those of the model itself,
  log_softmax(logits), with no temperature or filtering. These params are static under jit: each distinct
  value compiles its own programs.
  """

  temperature: float = 1.0
  top_k: int | None = None
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f'SamplingParams.temperature: expected >= 0 (0 is greedy), found {self.temperature}')
    if self.top_k is not None and (not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k <= 0):
      raise ValueError(f'SamplingParams.top_k: expected None or a positive int, found {self.top_k!r}')
    if not 0 < self.top_p <= 1:
      raise ValueError(f'SamplingParams.top_p: expected in (0, 1], found {self.top_p}')
    if self.temperature == 0 and (self.top_k is not None or self.top_p < 1):
      raise ValueError(
        'SamplingParams: greedy decoding (temperature=0) ignores top_k and top_p; leave them '
        f'unset, found top_k={self.top_k}, top_p={self.top_p}'
      )

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


GREEDY = SamplingParams(temperature=0.0)


def log_probs(logits: jax.Array, params: SamplingParams) -> jax.Array:
  """float32 log pi(v) over the vocabulary (last axis) of the distribution `params` samples from."""
  return jax.nn.log_softmax(filtered_logits(logits, params), axis=-1)


def filtered_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
  """float32 logits after temperature, top-k and top-p; removed tokens are -inf."""
  logits = logits.astype(jnp.float32)
  if params.greedy:
    return logits
  if params.temperature != 1.0:
    logits = logits / params.temperature
  vocab_size = logits.shape[-1]
  if params.top_k is not None and params.top_k < vocab_size:
    # Only the k largest survive top-k, so nucleus filtering needs to sort just those, not the vocabulary.
    candidates = jax.lax.top_k(logits, params.top_k)[0]
    logits = jnp.where(logits < candidates[..., -1:], -jnp.inf, logits)
  elif params.top_p < 1.0:
    candidates = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
  else:
    return logits
  if params.top_p < 1.0:
    logits = jnp.where(logits < _nucleus_threshold(candidates, params.top_p), -jnp.inf, logits)
  return logits


def sample(key: jax.Array, logits: jax.Array, params: SamplingParams) -> tuple[jax.Array, jax.Array]:
  """Draws one token per row of logits [..., V]: (tokens[...] int32, their float32 log-probs under pi)."""
  if params.greedy:
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scores = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  else:
    scores = log_probs(logits, params)
    tokens = jax.random.categorical(key, scores, axis=-1).astype(jnp.int32)
  return tokens, jnp.take_along_axis(scores, tokens[..., None], axis=-1)[..., 0]


def _nucleus_threshold(descending: jax.Array, top_p: float) -> jax.Array:
  """The smallest logit kept by top-p, given candidate logits [..., K] sorted in descending order."""
  probs = jax.nn.softmax(descending, axis=-1)
  # A token is kept while the mass strictly before it is below top_p, so the first token always is.
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)
  return jnp.take_along_axis(descending, kept - 1, axis=-1)
