"""Builds the `tiny` preset's tokenizer and prints its folder and statistics: `python -m experiments.build_tokenizer`.

Without --output_dir the tokenizer goes to the per-user cache, where `tiny_tokenizer()` finds it.
"""

import json

from absl import flags

from coars_jax import data
from coars_jax.models import tokenizer
from experiments import cli

_DATA_ROOT = flags.DEFINE_string('data_root', None, 'Data root; default $COARS_DATA_DIR, then the user cache.')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Build into this folder instead of the per-user cache.')
_VOCAB_SIZE = flags.DEFINE_integer('vocab_size', tokenizer.DEFAULT_VOCAB_SIZE, 'SentencePiece vocabulary size.')


def main(argv):
  del argv
  titles = data.dataset_titles(_DATA_ROOT.value)
  folder = tokenizer.tiny_tokenizer_folder(titles, vocab_size=_VOCAB_SIZE.value, output_dir=_OUTPUT_DIR.value)
  stats = tokenizer.tokenizer_stats(tokenizer.load_tokenizer(folder), titles)
  print(f'Tokenizer folder: {folder}')
  print(json.dumps(stats, indent=2))


if __name__ == '__main__':
  cli.run(main)
