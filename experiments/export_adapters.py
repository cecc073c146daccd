"""Both agents' LoRA adapters as Hugging Face PEFT folders: `python -m experiments.export_adapters
--checkpoint=<warm start | RL final/ or best/> --output=<folder> [--base_model=<Hub id or folder>]`.

Writes `<output>/recommender` and `<output>/user`, each with adapter_config.json and adapter_model.safetensors, which
`peft.PeftModel.from_pretrained(<transformers model>, folder)` and LoRA-serving engines load as they are.
"""

import json

from absl import flags

from coars_jax.models import peft_adapters
from experiments import cli

_CHECKPOINT = flags.DEFINE_string(
  'checkpoint', None, "A folder with both agents' adapters (a warm start, or an RL run's final/ or best/)."
)
_OUTPUT = flags.DEFINE_string('output', None, 'Where the PEFT folders go, one per agent.')
_BASE_MODEL = flags.DEFINE_string(
  'base_model', '', "base_model_name_or_path (a Hub id or folder); default: the backbone the run's config names."
)
_DTYPE = flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'], "The saved tensors' dtype (default: as trained).")


def main(argv):
  del argv
  try:
    folders = peft_adapters.export_checkpoint(
      _CHECKPOINT.value, _OUTPUT.value, base_model=_BASE_MODEL.value or None, dtype=_DTYPE.value
    )
  except (FileNotFoundError, ValueError) as error:
    cli.fail(str(error))
  print(json.dumps({name: str(folder) for name, folder in folders.items()}, indent=2))


def entry():
  """The `coars-export-adapters` console script (setup.py)."""
  cli.run(main, required=('checkpoint', 'output'))


if __name__ == '__main__':
  entry()
