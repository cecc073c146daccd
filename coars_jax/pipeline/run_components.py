"""What a run is made of before it learns: the dataset, SASRec and its cross-fitted peers, the backbone
(`load_components`), and the agents it starts from: a warm start (loaded, or trained and saved), PEFT adapters or
the bare base with fresh adapters (`prepare_agents`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from flax import nnx

from coars_jax import configlib
from coars_jax.announce import about, announce
from coars_jax.models import backbone
from coars_jax.agents.episodes import AGENTS
from coars_jax.data import Dataset, load_dataset
from coars_jax.data.user_sim import UserSimSet
from coars_jax.models import peft_adapters
from coars_jax.models.decoder import Decoder
from coars_jax.models.lora import add_lora
from coars_jax.recsys.sasrec import SASRec
from coars_jax.training import warm_start as warm_start_lib

from coars_jax.pipeline.warm_start_run import train_or_load_peer
from coars_jax.pipeline.run_config import TRAINED_METHODS, WARM_START_DIR, lora_config, warm_start_config


# --- the pieces of a run -----------------------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True, eq=False)
class Components:
  """What `run` would otherwise load by name: for tests and notebooks that bring their own.

  Attributes:
    dataset: the windows and titles.
    sasrec: the SASRec trained on every training window: the peer of val and test windows.
    model: the base decoder (adapters are attached, or a warm start run, as the config says).
    tokenizer: its tokenizer.
    user_sim: the F1 set (None: built from the dataset when the config asks for the F1).
    model_label: the rows' model name.
    save_base: whether exported folders carry the base weights (True when the base cannot be rebuilt by name).
  """

  dataset: Dataset
  sasrec: SASRec
  model: Decoder
  tokenizer: Any
  user_sim: UserSimSet | None = None
  model_label: str = 'custom'
  save_base: bool = True
  train_peer: Any = None  # the peer of training windows (`recsys.CrossFittedPeer`); None = `sasrec`

  @property
  def peer(self):
    """The peer of every split: cross-fitted on training windows when `train_peer` is, else `sasrec`."""
    return self.sasrec if self.train_peer is None else self.train_peer


def load_components(config) -> Components:
  """The dataset, SASRec and its cross-fitted fold models (`recsys.experiment.train_or_load_peer`) and the
  backbone named by the config."""
  dataset = load_dataset(config.dataset, config.data_root or None, allow_download=config.allow_download)
  sasrec, peer = train_or_load_peer(config, dataset, progress=config.progress)
  spec = backbone.BackboneSpec.from_config(config)
  model, tokenizer = backbone.load_backbone(spec)
  return Components(
    dataset=dataset,
    sasrec=sasrec,
    model=model,
    tokenizer=tokenizer,
    model_label=spec.label,
    save_base=spec.canonical == backbone.TINY,
    train_peer=peer,
  )


# SmolLM2's SFT cost per row on the 2-core CPU (the table's 48-step warm start of batch 1: 9.5 min, BUILD_NOTES Part 9).
SFT_SECONDS_PER_ROW = 12.0


def warm_start_key(settings: warm_start_lib.WarmStartConfig) -> dict[str, Any]:
  """Everything that shapes a warm start's result (its whole config but the progress bar), as JSON values: a
  saved warm start is reused only under the same key."""
  fields = json.loads(json.dumps(dataclasses.asdict(settings), default=str))
  fields.pop('progress', None)
  return fields


def prepare_agents(config, parts: Components, workdir: pathlib.Path) -> tuple[Decoder, dict[str, Any]]:
  """The model the run starts from, and what it is: the warm start (loaded from `warm_start.folder`, default
  `<workdir>/warm_start`, when that folder holds a complete one, else trained and saved there; every method's
  config can point at the same folder so all of them start from one warm start), or the base with fresh adapters
  (B = 0: the agents start as the base model). Zero-shot and Reflexion without a warm start keep the bare base."""
  model = parts.model
  if config.peft_adapters:
    folders = peft_adapters.peft_export_folders(config.peft_adapters, AGENTS)
    if folders is None:
      raise configlib.ConfigError(
        f"Config field 'peft_adapters': {config.peft_adapters} holds no PEFT folder per agent {list(AGENTS)}"
      )
    peft_adapters.load_peft_adapters(model, folders, lora_config=lora_config(config), rngs=nnx.Rngs(config.lora.seed))
    return model, {'stage': 'peft', 'folder': str(pathlib.Path(config.peft_adapters).absolute())}
  if config.warm_start.enabled:
    folder = pathlib.Path(config.warm_start.folder or workdir / WARM_START_DIR).absolute()
    settings = warm_start_config(config)
    key = warm_start_key(settings)
    meta_path = folder / warm_start_lib.META_FILE
    if meta_path.is_file():
      stored = json.loads(meta_path.read_text()).get('settings')
      if stored is not None and stored != key:
        changed = sorted(name for name in set(stored) | set(key) if stored.get(name) != key.get(name))
        raise configlib.ConfigError(
          f"Config field 'warm_start.folder': {folder} holds a warm start trained with other settings (they "
          f'differ in {", ".join(changed)}); point warm_start.folder elsewhere or delete that folder to retrain'
        )
      model, meta = warm_start_lib.load_warm_start(folder, model)
      announce(
        f'Reusing the warm start in {folder}'
        + (' (trained with the same settings)' if stored else ' (saved before settings were recorded; not checked)')
      )
      return model, {'stage': 'warm_start', 'folder': str(folder), 'base_saved': bool(meta['base_saved'])}
    announce(
      f'Training the warm start into {folder}: none there yet; {settings.steps} SFT steps of batch '
      f'{settings.batch_size} on {settings.num_dialogues + settings.shuffled_dialogues} scripted dialogues, '
      f'{about(settings.steps * SFT_SECONDS_PER_ROW * settings.batch_size)} for SmolLM2 on 2 CPU cores'
    )
    result = warm_start_lib.warm_start_agents(model, parts.tokenizer, parts.dataset, parts.peer, settings)
    history = result.train.history
    summary = {
      'steps': len(history),
      'first_loss': history[0]['loss'],
      'final_loss': history[-1]['loss'],
      'train_seconds': round(result.train.seconds, 1),
      'dialogue_metrics': result.dialogue_metrics,
    }
    warm_start_lib.save_warm_start(
      model,
      folder,
      save_base=settings.train_base,
      metadata={'config': config.warm_start.to_dict(), 'settings': key, 'summary': summary},
    )
    return model, {'stage': 'warm_start', 'folder': str(folder), 'base_saved': settings.train_base, 'summary': summary}
  if config.method in TRAINED_METHODS and not model.adapter_names:
    add_lora(model, lora_config(config), list(AGENTS), rngs=nnx.Rngs(config.lora.seed))
  return model, {'stage': 'zero_shot', 'base_saved': False}
