"""SASRec: the model, its training and checkpoints, and the peer signals p_t and q_t it gives CoARS."""

from coars_jax.recsys.checkpoint import load_sasrec, save_sasrec
from coars_jax.recsys.crossfit import CrossFittedPeer, FoldSpec, RoutedPeer, held_out_dataset, user_folds
from coars_jax.recsys.peer import peer_opinion, peer_similarity, top_candidate
from coars_jax.recsys.sasrec import SASRec, SASRecConfig
from coars_jax.recsys.training import SASRecTrainConfig, TrainResult, evaluate_per_seed, train_sasrec

__all__ = [
  'CrossFittedPeer',
  'FoldSpec',
  'RoutedPeer',
  'SASRec',
  'SASRecConfig',
  'SASRecTrainConfig',
  'TrainResult',
  'evaluate_per_seed',
  'held_out_dataset',
  'load_sasrec',
  'peer_opinion',
  'peer_similarity',
  'save_sasrec',
  'top_candidate',
  'train_sasrec',
  'user_folds',
]
