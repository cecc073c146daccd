"""The SFT warm start (project issue 4 section 3) for models that do not yet speak the dialogue protocol, as one
call: scripted recommender-user dialogues on TRAINING windows (`scripted_dialogues`), played through the real
episode loop so every prompt is exactly what inference will show, then SFT of each agent's own completion tokens
through its own LoRA adapter (`sft`); plus greedy checks of the result, its Orbax save/load, and the ml_collections
experiment (`default_config`, `validate`, `train_and_evaluate`) that `pipeline.warm_start_run` runs once it has
loaded the dataset and the SASRec peer, which this module takes as arguments. The settings are
`warm_start_config.WarmStartConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from coars_jax import configlib
from coars_jax.models import backbone
from coars_jax.agents.episodes import (
  AGENTS,
  RECOMMENDER,
  USER,
  Episode,
  LLMBackend,
  LLMBackendConfig,
  RolloutConfig,
  episode_metrics,
  run_episodes,
)
from coars_jax.agents.trajectory import Trajectory
from coars_jax.data import DATASETS, Dataset
from coars_jax.models import tokenizer as tokenizer_lib
from coars_jax.models.adapter_checkpoint import load_adapters, save_adapters
from coars_jax.models.config import DecoderConfig, RopeScaling
from coars_jax.models.decoder import Decoder
from coars_jax.models.lora import BASE_PARAMS, add_lora
from coars_jax.parallel import distributed
from coars_jax.sampling import GREEDY, LengthBuckets

# The settings, the scripted dialogues and the SFT step live in their own modules; their names stay importable
# from here.
from coars_jax.training.warm_start_config import (  # noqa: F401
  SMOLLM2_BUCKETS,
  SMOLLM2_SASREC,
  SMOLLM2_TRAIN_POOL,
  SMOLLM2_WARM_START,
  WarmStartConfig,
)
from coars_jax.training.scripted_dialogues import (  # noqa: F401
  dialogue_script,
  DialogueScript,
  draw_windows,
  RECOMMENDER_REASONS,
  SCORE_DECIMALS,
  scripted_dialogues,
  scripted_user_reaction,
  ScriptedAgents,
  ScriptPeer,
  USER_REASONS,
)
from coars_jax.training.sft import (  # noqa: F401
  agent_adapters,
  batch_indices,
  batch_shapes,
  item_title_start,
  learning_rate_schedule,
  make_batch,
  make_optimizer,
  sft_loss,
  SFTExamples,
  STEP_TRACE_NAME,
  train_sft,
  trainable_filter,
  TrainResult,
)


# --- the warm start as one call ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class WarmStartResult:
  """What `warm_start_agents` did.

  Attributes:
    episodes: the scripted dialogues trained on.
    examples: their agent messages as SFT rows.
    train: the optimizer run.
    dialogue_metrics: `episode_metrics` of the SASRec-ordered scripted dialogues (their Hit@1 is SASRec's on those
      windows); the shuffled ones are left out.
  """

  episodes: tuple[Episode, ...]
  examples: SFTExamples
  train: TrainResult
  dialogue_metrics: dict[str, float]

  def max_new_tokens(self, agent: str, margin: int = 8) -> int:
    """A token budget for greedy evaluation: the longest scripted message of `agent` plus `margin`; a model that
    imitates the script never needs more."""
    return self.examples.max_completion_tokens(agent) + margin


def prepare_model(model: Decoder, config: WarmStartConfig) -> Decoder:
  """Attaches the recommender and user adapters (`config.lora`, seeded by `config.seed`) unless the model has
  them; returns `model`."""
  if not model.adapter_names:
    add_lora(model, config.lora, list(AGENTS), rngs=nnx.Rngs(config.seed))
  agent_adapters(model)
  return model


def warm_start_agents(
  model: Decoder, tokenizer, dataset: Dataset, peer, config: WarmStartConfig = WarmStartConfig()
) -> WarmStartResult:
  """Scripted dialogues on `config.num_dialogues` training windows, then SFT of `model` on them, in place.

  `model` gets the two agents' adapters if it has none (`prepare_model`).
  """
  prepare_model(model, config)
  if len(tokenizer) > model.config.vocab_size:
    raise ValueError(
      f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
      f"{model.config.vocab_size}; use the model's own tokenizer"
    )
  windows = draw_windows(dataset, config.num_dialogues, seed=config.seed, pool=config.train_pool)
  episodes = scripted_dialogues(dataset, peer, tokenizer, windows, rollout=config.rollout, seed=config.seed)
  if config.shuffled_dialogues:
    shuffled_windows = draw_windows(dataset, config.shuffled_dialogues, seed=config.seed + 1, pool=config.train_pool)
    episodes += scripted_dialogues(
      dataset, peer, tokenizer, shuffled_windows, rollout=config.rollout, seed=config.seed, shuffled=True
    )
  pad_id = tokenizer_lib.special_token_ids(tokenizer).pad_id
  examples = SFTExamples.from_trajectory(Trajectory.from_episodes(episodes, pad_token_id=pad_id))
  if config.item_loss_weight != 1.0:
    examples = examples.with_item_starts(tokenizer)
  logging.info('warm start: %d dialogues, %d agent messages', len(episodes), len(examples))
  train = train_sft(model, examples, config, pad_token_id=pad_id)
  return WarmStartResult(
    episodes=tuple(episodes), examples=examples, train=train, dialogue_metrics=episode_metrics(episodes[: len(windows)])
  )


def evaluate_dialogues(
  model: Decoder,
  tokenizer,
  dataset: Dataset,
  peer,
  window_indices: Sequence[int],
  *,
  split: str = 'val',
  rollout: RolloutConfig = RolloutConfig(),
  recommender_max_new_tokens: int = 64,
  user_max_new_tokens: int = 64,
  buckets: LengthBuckets = LengthBuckets(),
  seed: int = 0,
) -> tuple[dict[str, float], list[Episode]]:
  """Greedy rollouts of both adapted agents on `window_indices` of `split`: (`episode_metrics`, episodes)."""
  backend = LLMBackend(
    model,
    tokenizer,
    adapters={RECOMMENDER: RECOMMENDER, USER: USER},
    config=LLMBackendConfig(
      recommender_max_new_tokens=recommender_max_new_tokens,
      user_max_new_tokens=user_max_new_tokens,
      sampling=GREEDY,
      buckets=buckets,
      merge_adapters=True,  # the adapters stay fixed during this evaluation
    ),
  )
  episodes = run_episodes(dataset, split, list(window_indices), backend, peer=peer, config=rollout, seed=seed)
  return episode_metrics(episodes), episodes


# --- checkpoints -------------------------------------------------------------------------------------------------

BASE_DIR, ADAPTERS_DIR, META_FILE = 'base', 'adapters', 'warm_start.json'


def save_warm_start(
  model: Decoder, directory: str | os.PathLike, *, save_base: bool, metadata: dict[str, Any] | None = None
) -> pathlib.Path:
  """Writes the adapters (`models.save_adapters`) and, if `save_base`, the base weights (Orbax) with the decoder
  config, under `directory`; `META_FILE` is written last, so a folder without it is an interrupted save. In a
  multi-host run every process calls it (the Orbax saves are collective); the primary alone clears the old files
  and writes `META_FILE`."""
  directory = pathlib.Path(directory).absolute()  # Orbax requires absolute paths.
  meta_path = directory / META_FILE
  if distributed.is_primary():
    directory.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)
  distributed.barrier(f'warm-start-cleared-{directory}')
  save_adapters(model, directory / ADAPTERS_DIR, overwrite=True)
  if distributed.is_primary() and (directory / BASE_DIR).exists():
    shutil.rmtree(directory / BASE_DIR)
  distributed.barrier(f'warm-start-base-cleared-{directory}')
  if save_base:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / BASE_DIR, nnx.to_pure_dict(nnx.state(model, BASE_PARAMS)))
    checkpointer.wait_until_finished()
  meta = {'decoder_config': dataclasses.asdict(model.config), 'base_saved': bool(save_base), **(metadata or {})}
  if distributed.is_primary():
    tmp = directory / (META_FILE + '.tmp')
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    os.replace(tmp, meta_path)
  distributed.barrier(f'warm-start-saved-{directory}')
  return directory


def load_warm_start(directory: str | os.PathLike, base: Decoder | None = None) -> tuple[Decoder, dict[str, Any]]:
  """(model with the warm-started adapters, metadata) from `save_warm_start`'s folder.

  A folder with a saved base rebuilds the decoder from its config and weights; otherwise `base` (the frozen base
  the adapters were trained on, e.g. from `load_hf_checkpoint`) receives the adapters, in place.
  """
  directory = pathlib.Path(directory).absolute()
  meta_path = directory / META_FILE
  if not meta_path.is_file():
    raise FileNotFoundError(
      f'{directory} holds no complete warm start ({META_FILE} is missing); run '
      f'experiments/warm_start.py or save_warm_start first'
    )
  meta = json.loads(meta_path.read_text())
  if meta['base_saved']:
    fields = dict(meta['decoder_config'])
    fields['eos_token_ids'] = tuple(fields['eos_token_ids'])
    if fields.get('rope_scaling') is not None:
      fields['rope_scaling'] = RopeScaling(**fields['rope_scaling'])
    model = Decoder(DecoderConfig(**fields), rngs=nnx.Rngs(0))
    state = nnx.state(model, BASE_PARAMS)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(state))
    restored = ocp.StandardCheckpointer().restore(directory / BASE_DIR, abstract)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
  elif base is None:
    raise ValueError(
      f'{directory} holds adapters only (the base was frozen); pass the base model they were trained on as base='
    )
  else:
    model = base
  load_adapters(model, directory / ADAPTERS_DIR)
  return model, meta


# --- the experiment ----------------------------------------------------------------------------------------------


def default_config(dataset: str = 'lastfm') -> ml_collections.ConfigDict:
  """Defaults for `configs/warm_start_*.py`; each field documents what it controls."""
  defaults = WarmStartConfig()
  return ml_collections.ConfigDict(
    {
      'dataset': dataset,  # lastfm | movielens | instruments
      'data_root': '',  # '' -> $COARS_DATA_DIR -> the per-user cache folder
      'allow_download': True,  # fetch missing public originals (checksum-verified) when the network allows
      'workdir': f'runs/warm_start_{dataset}',  # adapters/, base/ (when trained) and warm_start.json
      'model': 'tiny',  # 'tiny' (random init, own tokenizer), 'smollm2-135m', or an HF checkpoint folder
      'tokenizer_vocab_size': tokenizer_lib.DEFAULT_VOCAB_SIZE,  # the tiny tokenizer's size (model='tiny' only)
      'model_seed': 0,  # the tiny model's random initialisation
      'sasrec_workdir': f'runs/sasrec_{dataset}',  # where SASRec's checkpoint is (trained there if absent)
      'sasrec_seed': 0,  # which SASRec training seed ranks the candidates and gives q
      'sasrec_max_epochs': 0,  # cap on SASRec's epochs when it is trained here (0 = its own default, early-stopped)
      'sasrec_folds': 5,  # K user folds: training windows get an out-of-fold SASRec (0 = the full one, an oracle)
      'sasrec_fold_seed': 0,  # the permutation that deals training users into folds
      'warm_start': {f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults) if f.name != 'buckets'},
      'prompt_buckets': defaults.buckets.prompt,
      'completion_buckets': defaults.buckets.completion,
      'eval': {
        'split': 'val',  # the windows greedy rollouts are scored on
        'num_windows': 8,  # the first this many windows of the split (0 skips the evaluation)
        'token_margin': 8,  # greedy budget = longest scripted message of that agent + this
      },
    }
  )


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails on the first bad field, naming it; runs before any data is read."""
  configlib.check_keys(config, default_config(config.get('dataset', 'lastfm')))
  configlib.require(config.dataset in DATASETS, 'dataset', f'one of {DATASETS}', config.dataset)
  for name in ('workdir', 'sasrec_workdir', 'model'):
    configlib.require(isinstance(config[name], str) and config[name], name, 'a non-empty string', config[name])
  configlib.require(
    backbone.is_known(config.model),
    'model',
    f'one of {sorted(backbone.ALIASES)} or an existing HF checkpoint folder',
    config.model,
  )
  configlib.require(config.eval.split in ('val', 'test'), 'eval.split', "'val' or 'test'", config.eval.split)
  for name in ('num_windows', 'token_margin'):
    value = config.eval[name]
    configlib.require(
      isinstance(value, int) and not isinstance(value, bool) and value >= 0, f'eval.{name}', 'an int >= 0', value
    )
  configlib.require_peer_fields(config)
  try:
    warm_start_config(config)
  except (TypeError, ValueError) as error:
    raise configlib.ConfigError(f'Config group warm_start / prompt_buckets / completion_buckets: {error}') from error


def warm_start_config(config: ml_collections.ConfigDict) -> WarmStartConfig:
  return WarmStartConfig(
    **config.warm_start.to_dict(),
    buckets=LengthBuckets(
      prompt=tuple(int(n) for n in config.prompt_buckets), completion=tuple(int(n) for n in config.completion_buckets)
    ),
  )


def load_model_and_tokenizer(config: ml_collections.ConfigDict) -> tuple[Decoder, Any]:
  """The base decoder and its tokenizer (`models.backbone.load_backbone`): the `tiny` preset at random init with
  the tiny tokenizer, SmolLM2-135M-Instruct from its GGUF, or an HF checkpoint folder."""
  return backbone.load_backbone(backbone.BackboneSpec.from_config(config))


def train_and_evaluate(config: ml_collections.ConfigDict, dataset: Dataset, *, peer, eval_peer) -> dict[str, Any]:
  """The experiment once its data and peers are loaded (`pipeline.warm_start_run.run` loads them): model and
  tokenizer; warm start on scripted dialogues whose hints, p_t and q come from `peer` (out of fold on training
  windows); save under `workdir`; greedy rollouts on the first `eval.num_windows` windows of `eval.split` with
  `eval_peer` (the SASRec of every training window). Returns the summary it also saves."""
  validate(config)
  settings = warm_start_config(config)
  model, tokenizer = load_model_and_tokenizer(config)
  result = warm_start_agents(model, tokenizer, dataset, peer, settings)
  history = result.train.history
  tail = history[-min(len(history), 20) :]
  summary: dict[str, Any] = {
    'dataset': dataset.name,
    'model': config.model,
    'train_base': settings.train_base,
    'dialogues': len(result.episodes),
    'agent_messages': len(result.examples),
    'scripted_dialogue_metrics': result.dialogue_metrics,
    'steps': len(history),
    'first_loss': history[0]['loss'],
    'final_loss_mean_last_20': float(np.mean([h['loss'] for h in tail])),
    'train_seconds': round(result.train.seconds, 1),
    'update_step_traces': result.train.traces,
  }
  if config.eval.num_windows:
    count = min(config.eval.num_windows, len(dataset.split(config.eval.split)))
    metrics, _ = evaluate_dialogues(
      model,
      tokenizer,
      dataset,
      eval_peer,
      range(count),
      split=config.eval.split,
      rollout=settings.rollout,
      recommender_max_new_tokens=result.max_new_tokens(RECOMMENDER, config.eval.token_margin),
      user_max_new_tokens=result.max_new_tokens(USER, config.eval.token_margin),
      buckets=settings.buckets,
      seed=settings.seed,
    )
    summary['eval'] = {'split': config.eval.split, 'windows': count, **metrics}
  save_warm_start(
    model, config.workdir, save_base=settings.train_base, metadata={'config': config.to_dict(), 'summary': summary}
  )
  return summary
