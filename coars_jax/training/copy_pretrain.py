"""Copy pre-training of a randomly initialised base, before its warm start.

The recommender's `Item:` line must copy a candidate's title out of the prompt. A randomly initialised decoder
trained only on the scripted dialogues learns the protocol's format but not the copy: it settles on naming one
frequent title whatever the prompt says (BUILD_NOTES.md, "Measured (warm start with the moving hint)"), because
natural titles let it lower the loss with token statistics long before an attention circuit that copies forms.

This stage removes that shortcut: every row is a random token sequence followed by the same sequence again, and
the loss is on the repeat. Nothing but copying lowers it, and the 4-layer `tiny` base learns it (an induction
circuit: find the earlier occurrence of the current token, emit what followed it) in a few hundred steps on 2 CPU
cores. The warm start then only has to learn where to copy from. Tokens come from the tokenizer's learned pieces,
so no data, title or window is read here.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx

from coars_jax.models.decoder import Decoder
from coars_jax.sampling import completion_log_probs


@dataclasses.dataclass(frozen=True, kw_only=True)
class CopyPretrainConfig:
  """The copy task and its optimiser.

  Attributes:
    steps: optimizer updates (0 = no copy pre-training).
    batch_size: rows per update.
    length: random tokens per row; the row is these tokens, then the same tokens again.
    first_token_id: the lowest token id drawn (ids below are special and byte-fallback pieces, which never need
      copying in a title and would make rows that are not valid text).
    learning_rate: peak AdamW step size after `warmup_steps`, cosine-decayed to a tenth at `steps`.
    warmup_steps: linear warm-up updates.
    max_grad_norm: global gradient-norm clip.
    seed: the token draw.
    progress: show a tqdm bar.
  """

  steps: int = 300
  batch_size: int = 32
  length: int = 24
  first_token_id: int = 264
  learning_rate: float = 3e-3
  warmup_steps: int = 50
  max_grad_norm: float = 1.0
  seed: int = 0
  progress: bool = True

  def __post_init__(self):
    for name, least in (('steps', 0), ('batch_size', 1), ('length', 2), ('first_token_id', 0), ('warmup_steps', 0),
                        ('seed', 0)):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f'CopyPretrainConfig.{name} must be an int >= {least}, found {value!r}')
    for name in ('learning_rate', 'max_grad_norm'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f'CopyPretrainConfig.{name} must be a positive number, found {value!r}')
    if self.steps and self.warmup_steps >= self.steps:
      raise ValueError(f'CopyPretrainConfig.warmup_steps ({self.warmup_steps}) must be smaller than steps '
                       f'({self.steps})')


def copy_rows(rng: np.random.Generator, batch_size: int, length: int, low: int, high: int) -> np.ndarray:
  """int32[batch_size, length] token ids drawn uniformly from [low, high)."""
  if not 0 <= low < high:
    raise ValueError(f'copy_rows: need 0 <= low < high, found low={low}, high={high}')
  return rng.integers(low, high, size=(batch_size, length)).astype(np.int32)


def copy_loss(model: Decoder, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mean NLL of the repeat given the first copy, share of repeat tokens with probability above 1/2)."""
  mask = jnp.ones_like(tokens)
  log_probs = completion_log_probs(model, tokens, mask, tokens, mask)
  return -log_probs.mean(), (log_probs > -jnp.log(2.0)).mean()


@functools.partial(jax.jit, static_argnames=('graphdef',), donate_argnames=('state',))
def _step(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array):
  model, optimizer = nnx.merge(graphdef, state)
  grad_fn = nnx.value_and_grad(copy_loss, argnums=nnx.DiffState(0, nnx.Param), has_aux=True)
  (loss, accuracy), grads = grad_fn(model, tokens)
  optimizer.update(model, grads)
  return nnx.state((model, optimizer)), {'loss': loss, 'copy_accuracy': accuracy}


def copy_pretrain(model: Decoder, config: CopyPretrainConfig = CopyPretrainConfig()) -> list[dict[str, float]]:
  """Trains every base parameter of `model` on the copy task, in place; returns per-step metrics.

  Run it before adapters are attached: the adapters would be part of `nnx.Param` and start from B = 0 anyway,
  but the warm start's optimizer should see them fresh.
  """
  if model.adapter_names:
    raise ValueError(f'copy_pretrain trains the bare base; the model already has adapters {model.adapter_names}')
  if config.first_token_id >= model.config.vocab_size:
    raise ValueError(f'CopyPretrainConfig.first_token_id ({config.first_token_id}) is not below the vocab size '
                     f'({model.config.vocab_size})')
  if not config.steps:
    return []
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps, decay_steps=config.steps,
      end_value=config.learning_rate * 0.1)
  optimizer = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                                               optax.adamw(schedule)), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  rng = np.random.default_rng([config.seed, 0xC0B7])
  history = []
  start = time.perf_counter()
  bar = tqdm.trange(config.steps, desc='copy pre-training', disable=not config.progress, dynamic_ncols=True)
  for _ in bar:
    tokens = copy_rows(rng, config.batch_size, config.length, config.first_token_id, model.config.vocab_size)
    state, metrics = _step(graphdef, state, jnp.asarray(tokens))
    history.append({name: float(value) for name, value in jax.device_get(metrics).items()})
    bar.set_postfix(loss=f'{history[-1]["loss"]:.3f}', copied=f'{history[-1]["copy_accuracy"]:.2f}')
  trained, _ = nnx.merge(graphdef, state)
  nnx.update(model, nnx.state(trained))
  if history:
    history[-1]['seconds'] = time.perf_counter() - start
  return history
