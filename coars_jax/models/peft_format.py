"""The PEFT LoRA folder format that export and import share: the file names (`CONFIG_FILE`, `WEIGHTS_FILE`), the
tensor names PEFT gives the decoder projections of Llama, Qwen2 and Qwen3 (`peft_tensor_name`, and the pattern that
reads them back), the mapping from a `Decoder` linear's path to its (layer, projection) key, the dtype check for
saved tensors, and `PeftAdapterError`, the one-line error every PEFT reader and writer raises.
`models.peft_adapters` re-exports its public names.
"""

from __future__ import annotations

import re

import jax.numpy as jnp

from coars_jax.models.config import DTYPES
from coars_jax.models.lora import ATTENTION_MODULES, MLP_MODULES

CONFIG_FILE = 'adapter_config.json'
WEIGHTS_FILE = 'adapter_model.safetensors'

# transformers' Llama, Qwen2 and Qwen3 share these module paths. PEFT wraps the causal LM as
# PeftModel.base_model (LoraModel) .model (the CausalLM) .model (the decoder stack), and drops the adapter's own
# name ('default') from every key when it saves, so a saved key reads base_model.model.model.layers.i....
_SECTION = {**{name: 'self_attn' for name in ATTENTION_MODULES}, **{name: 'mlp' for name in MLP_MODULES}}
_TENSOR_NAME = re.compile(
  r'base_model\.model\.model\.layers\.(?P<layer>\d+)\.(?P<section>self_attn|mlp)\.'
  r'(?P<module>[a-z_]+)\.lora_(?P<matrix>[AB])\.weight\Z'
)


class PeftAdapterError(ValueError):
  """A PEFT folder that this converter cannot read, or whose adapters do not fit the model; the one-line message
  names the folder, the field or tensor, what was expected and what was found."""


def peft_tensor_name(layer: int, module: str, matrix: str) -> str:
  """PEFT's saved name of LoRA matrix `matrix` ('A' or 'B') of projection `module` in decoder layer `layer`."""
  return f'base_model.model.model.layers.{layer}.{_SECTION[module]}.{module}.lora_{matrix}.weight'


def _layer_and_module(path: str) -> tuple[int, str]:
  """'layers.3.attention.q_proj' -> (3, 'q_proj')."""
  parts = path.split('.')
  return int(parts[1]), parts[-1]


def _dtype(name: str) -> jnp.dtype:
  if name not in DTYPES:
    raise PeftAdapterError(f"'dtype': expected one of {DTYPES}, found {name!r}")
  return jnp.dtype(name)
