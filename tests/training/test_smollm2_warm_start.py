"""A few SFT steps teach the pretrained research model the protocol (issue 13): SmolLM2-135M-Instruct's greedy
recommender names a candidate on held-out training windows far more often after 24 batch-1 steps on a handful of
scripted dialogues than before them. The thresholds were fixed before the first run: the base is expected near 0
(it echoes its prompt), and after the steps the share must be at least 0.5 and at least 0.4 above the base's. A
first version with 12 steps failed them (0.0 -> 0.33); 24 steps, the count of the probe that reached 0.95, pass.

On the append-only prompts of issue 21 the result at weight 1 depends on the training seed (0.33, 0.83, 1.00 for
seeds 0, 1, 2: one run of three misses the bar), so the probe weighs the Item line's title and end 4x in the loss,
with which each of the three seeds reached 0.83 (BUILD_NOTES Part 11). The research warm start keeps weight 1, which
val windows preferred there. The bar is unchanged."""

import numpy as np
from flax import nnx

from coars_jax.agents import backbone
from coars_jax.agents.episodes import RECOMMENDER
from coars_jax.data import lastfm, load_dataset
from coars_jax.recsys import SASRec, SASRecConfig
from coars_jax.sampling import LengthBuckets
import coars_jax.training.warm_start as ws
from tests.conftest import require_files

BUCKETS = LengthBuckets(prompt=(512, 1024), completion=(64,))
HELD_OUT = 6  # training windows that no scripted dialogue uses


def test_a_few_sft_steps_teach_smollm2_to_name_candidates():
  root = require_files(lastfm.ITEM_FILE, *lastfm.SPLIT_FILES.values(), lastfm.STATS_FILE)
  dataset = load_dataset('lastfm', root, allow_download=False)
  model, tokenizer = backbone.load_backbone(backbone.BackboneSpec(name='smollm2-135m', allow_download=False))
  # An untrained peer: the hint names some candidate, and the scripted recommender follows the hint, so what the
  # steps must teach is the format and copying a candidate's title (the ranking's quality does not matter here).
  peer = SASRec(
    SASRecConfig(num_items=dataset.num_items, hidden=16, num_heads=2, num_blocks=1, dropout=0.0), rngs=nnx.Rngs(0)
  )
  settings = ws.WarmStartConfig(
    num_dialogues=6,
    shuffled_dialogues=2,
    max_turns=2,
    show_hint=True,
    steps=24,
    batch_size=1,
    learning_rate=5e-4,
    warmup_steps=2,
    item_loss_weight=4.0,
    buckets=BUCKETS,
    progress=False,
  )
  used = set(ws.draw_windows(dataset, 6, seed=0).tolist()) | set(ws.draw_windows(dataset, 2, seed=1).tolist())
  held_out = [i for i in range(0, len(dataset.split('train')), 997) if i not in used][:HELD_OUT]
  rollout = ws.RolloutConfig(max_turns=1, show_hint=True)

  def recommender_valid_ratio():
    metrics, episodes = ws.evaluate_dialogues(
      model,
      tokenizer,
      dataset,
      peer,
      held_out,
      split='train',
      rollout=rollout,
      recommender_max_new_tokens=48,
      user_max_new_tokens=32,
      buckets=BUCKETS,
    )
    assert len(episodes) == HELD_OUT
    return metrics['valid_ratio']

  ws.prepare_model(model, settings)  # fresh adapters (B = 0): the agents are still the base model
  before = recommender_valid_ratio()
  result = ws.warm_start_agents(model, tokenizer, dataset, peer, settings)
  assert len(result.train.history) == settings.steps and np.isfinite(result.train.history[-1]['loss'])
  assert result.examples.max_completion_tokens(RECOMMENDER) > 0
  after = recommender_valid_ratio()
  assert after >= 0.5 and after >= before + 0.4, (before, after)
