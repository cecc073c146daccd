"""SASRec training: full-softmax cross-entropy at each window's last item, early stopping on val.

The step is a pure jitted function of (params, optimizer state, batch, key) that donates its state. Every
batch has the same shape (the last one is padded with zero-weight rows), so an epoch compiles one program.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import resource
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx

from coars_jax.data.candidates import candidate_stack
from coars_jax.data.schema import Dataset, WindowSplit
from coars_jax.eval import metrics
from coars_jax.recsys import peer as peer_lib
from coars_jax.recsys.sasrec import SASRec, SASRecConfig

EARLY_STOPPING_METRICS = ('hit@1', 'hit@5', 'ndcg@5')


@dataclasses.dataclass(frozen=True, kw_only=True)
class SASRecTrainConfig:
  """Optimisation settings.

  Attributes:
    learning_rate: Adam step size.
    weight_decay: decoupled weight decay (AdamW); 0 gives Adam.
    batch_size: windows per step.
    max_epochs: upper bound on passes over the training windows.
    patience: epochs without a val improvement before stopping.
    early_stopping_metric: the val metric, averaged over `val_candidate_seeds`, that picks the best epoch.
    val_candidate_seeds: candidate-list seeds of the val windows used for early stopping.
  """

  learning_rate: float = 2e-3
  weight_decay: float = 0.0
  batch_size: int = 512
  max_epochs: int = 100
  patience: int = 10
  early_stopping_metric: str = 'ndcg@5'
  val_candidate_seeds: tuple[int, ...] = tuple(range(10))

  def __post_init__(self):
    if self.learning_rate <= 0:
      raise ValueError(f'SASRecTrainConfig.learning_rate must be > 0, found {self.learning_rate}')
    for name in ('batch_size', 'max_epochs', 'patience'):
      if getattr(self, name) < 1:
        raise ValueError(f'SASRecTrainConfig.{name} must be >= 1, found {getattr(self, name)}')
    if self.early_stopping_metric not in EARLY_STOPPING_METRICS:
      raise ValueError(
        f'SASRecTrainConfig.early_stopping_metric must be one of {EARLY_STOPPING_METRICS}, '
        f'found {self.early_stopping_metric!r}'
      )
    if not self.val_candidate_seeds:
      raise ValueError('SASRecTrainConfig.val_candidate_seeds must name at least one seed')


@dataclasses.dataclass
class TrainResult:
  model: SASRec
  best_epoch: int
  best_val: dict[str, float]
  epochs_run: int
  seconds: float
  peak_rss_mib: float
  history: list[dict] = dataclasses.field(default_factory=list)


def peak_rss_mib() -> float:
  """The process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_optimizer(config: SASRecTrainConfig) -> optax.GradientTransformation:
  if config.weight_decay:
    return optax.adamw(config.learning_rate, weight_decay=config.weight_decay)
  return optax.adam(config.learning_rate)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation):
  """Returns step(params, opt_state, history, lengths, targets, weights, key) -> (params, opt_state, loss)."""

  def loss_fn(params, history, lengths, targets, weights, key):
    logits = nnx.merge(graphdef, params)(history, lengths, key)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, history, lengths, targets, weights, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, history, lengths, targets, weights, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def evaluate_per_seed(
  model: SASRec, windows: WindowSplit, candidates: np.ndarray, target_index: np.ndarray
) -> list[dict[str, float]]:
  """Ranking metrics of `model` on each candidate seed's lists."""
  scores = peer_lib.candidate_scores(model, windows.history, windows.lengths, candidates)
  return [metrics.ranking_metrics(scores[s], target_index[s]) for s in range(candidates.shape[0])]


def mean_metrics(per_seed: Sequence[dict[str, float]]) -> dict[str, float]:
  return {k: float(np.mean([m[k] for m in per_seed])) for k in per_seed[0]}


def train_sasrec(
  dataset: Dataset, model_config: SASRecConfig, train_config: SASRecTrainConfig, *, seed: int, progress: bool = True
) -> TrainResult:
  """Trains SASRec on the train windows with at least one history item, keeping the best val epoch."""
  start = time.perf_counter()
  train = dataset.split('train')
  train = train.select(train.lengths >= 1)
  val = dataset.split('val')
  val_candidates, val_targets = candidate_stack(dataset, 'val', train_config.val_candidate_seeds)

  model = SASRec(model_config, rngs=nnx.Rngs(params=seed))
  graphdef, params = nnx.split(model)
  tx = make_optimizer(train_config)
  opt_state = tx.init(params)
  step = make_train_step(graphdef, tx)
  key = jax.random.key(seed)
  batch = train_config.batch_size
  num_batches = -(-len(train) // batch)

  best = (-np.inf, 0, None, None)
  history, stale = [], 0
  bar = tqdm.trange(
    train_config.max_epochs, desc=f'SASRec {dataset.name} seed {seed}', disable=not progress, leave=False
  )
  for epoch in bar:
    order = np.random.default_rng([seed, epoch]).permutation(len(train))
    order = np.concatenate([order, np.zeros(num_batches * batch - len(order), dtype=order.dtype)])
    weights = np.concatenate([np.ones(len(train), np.float32), np.zeros(num_batches * batch - len(train), np.float32)])
    losses = []
    for b in range(num_batches):
      rows = order[b * batch : (b + 1) * batch]
      key, step_key = jax.random.split(key)
      params, opt_state, loss = step(
        params,
        opt_state,
        train.history[rows],
        train.lengths[rows],
        train.targets[rows],
        weights[b * batch : (b + 1) * batch],
        step_key,
      )
      losses.append(loss)
    nnx.update(model, params)
    val_metrics = mean_metrics(evaluate_per_seed(model, val, val_candidates, val_targets))
    record = {'epoch': epoch, 'train_loss': float(np.mean(jax.device_get(losses))), **val_metrics}
    history.append(record)
    score = val_metrics[train_config.early_stopping_metric]
    if score > best[0]:
      best = (score, epoch, jax.tree.map(np.array, params), val_metrics)
      stale = 0
    else:
      stale += 1
    bar.set_postfix(loss=f'{record["train_loss"]:.3f}', val=f'{score:.3f}', best=f'{best[0]:.3f}@{best[1]}')
    if stale >= train_config.patience:
      break
  nnx.update(model, jax.tree.map(jnp.asarray, best[2]))
  logging.info(
    'SASRec %s seed %d: best val %s %.4f at epoch %d of %d',
    dataset.name,
    seed,
    train_config.early_stopping_metric,
    best[0],
    best[1],
    len(history),
  )
  return TrainResult(
    model=model,
    best_epoch=best[1],
    best_val=best[3],
    epochs_run=len(history),
    seconds=time.perf_counter() - start,
    peak_rss_mib=peak_rss_mib(),
    history=history,
  )
