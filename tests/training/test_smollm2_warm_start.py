"""A few SFT steps teach the pretrained research model the protocol (issue 13): SmolLM2-135M-Instruct's greedy
recommender names a candidate on held-out training windows far more often after 24 batch-1 steps on a handful of
scripted dialogues than before them. The thresholds were fixed before the first run: the base is expected near 0
(it echoes its prompt), and after the steps the share must be at least 0.5 and at least 0.4 above the base's. A
first version with 12 steps failed them (0.0 -> 0.33); 24 steps, the count of the probe that reached 0.95, pass.

On the append-only prompts of issue 21 the result at weight 1 depends on the training seed (0.33, 0.83, 1.00 for
seeds 0, 1, 2: one run of three misses the bar), so the probe weighs the Item line's title and end 4x in the loss,
with which each of the three seeds reached 0.83 (BUILD_NOTES Part 11). The research warm start keeps weight 1, which
val windows preferred there. The bar is unchanged."""

from coars_jax.data import lastfm
from experiments.probe_sft import sft_probe
from tests.conftest import require_files


def test_a_few_sft_steps_teach_smollm2_to_name_candidates():
  root = require_files(lastfm.ITEM_FILE, *lastfm.SPLIT_FILES.values(), lastfm.STATS_FILE)
  probe = sft_probe(root, seed=0, item_loss_weight=4.0, max_turns=2)
  assert probe.after >= 0.5 and probe.after >= probe.before + 0.4, (probe.before, probe.after)
