"""Building the `tiny` preset's own tokenizer from text lines: its vocabulary layout (the reserved special and chat
tokens, then 256 byte-fallback pieces, then learned pieces) and chat template, the SentencePiece BPE settings,
training (`train_sentencepiece`), the exact conversion of the SentencePiece model into a `tokenizers`-backed HF
tokenizer (`tokenizer_from_sentencepiece`), writing the HF folder with its build record (`build_tokenizer`), and the
per-user cache of built folders keyed by corpus, settings and library versions (`cached_tokenizer_folder`).
`models.tokenizer` re-exports its public names.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Sequence

import platformdirs
import sentencepiece
import tokenizers
import transformers
from tokenizers import AddedToken, decoders, normalizers
from tokenizers.models import BPE

PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = '<pad>', '<unk>', '<s>', '</s>'
SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_OF_TURN_TOKEN = '<|system|>', '<|user|>', '<|assistant|>', '<|end|>'
CHAT_TOKENS = (SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_OF_TURN_TOKEN)
# Ids 0..7 of the tiny tokenizer, then 256 byte-fallback pieces, then the learned pieces.
RESERVED_TOKENS = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN) + CHAT_TOKENS
NUM_BYTE_PIECES = 256

# A message is "<|role|>\n" + content + "<|end|>". No newline after <|end|>: the sampler stops on <|end|>, so the
# next turn's marker follows it directly and an incrementally built dialogue equals its full re-rendering.
CHAT_TEMPLATE = (
  '{{- bos_token -}}'
  '{%- for message in messages -%}'
  "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
  "{{- raise_exception('unknown chat role ' ~ message['role'] ~ '; expected system, user or assistant') -}}"
  '{%- endif -%}'
  "{{- '<|' ~ message['role'] ~ '|>\\n' ~ message['content'] ~ '<|end|>' -}}"
  '{%- endfor -%}'
  "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

# SentencePiece settings of the tiny tokenizer. BPE rather than unigram: it reaches the configured vocab size on
# this small corpus (unigram's trainer allows at most 7912 pieces on the three datasets' titles), its merges
# convert exactly to a `tokenizers` BPE model, and it is what the Llama-style tiny preset's family uses.
# Identity normalization, kept whitespace and no dummy prefix make encoding a pure function of the characters, so
# decode(encode(text)) == text for any text and the same text encodes the same way whether or not special tokens
# surround it. Byte fallback covers characters the vocabulary lacks (rare CJK in LastFM). Digits are split so that
# every score "0.85" and rank has the same shape. One thread and unsampled, unshuffled input make training
# deterministic.
SENTENCEPIECE_OPTIONS = dict(
  model_type='bpe',
  normalization_rule_name='identity',
  remove_extra_whitespaces=False,
  add_dummy_prefix=False,
  byte_fallback=True,
  character_coverage=0.9995,
  split_digits=True,
  num_threads=1,
  input_sentence_size=0,
  shuffle_input_sentence=False,
  max_sentence_length=1 << 14,
  pad_id=0,
  unk_id=1,
  bos_id=2,
  eos_id=3,
  pad_piece=PAD_TOKEN,
  unk_piece=UNK_TOKEN,
  bos_piece=BOS_TOKEN,
  eos_piece=EOS_TOKEN,
  user_defined_symbols=list(CHAT_TOKENS),
)
TRAINING_SEED = 0
DEFAULT_VOCAB_SIZE = 8192
SENTENCEPIECE_FILE = 'sentencepiece.model'
BUILD_INFO_FILE = 'tokenizer_build.json'
# Bump when the folder layout or the corpus recipe changes, so that caches built by older code are not reused.
BUILD_FORMAT = 1


def train_sentencepiece(lines: Sequence[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> bytes:
  """The serialized SentencePiece BPE model trained on `lines` (`SENTENCEPIECE_OPTIONS`); deterministic."""
  minimum = len(RESERVED_TOKENS) + NUM_BYTE_PIECES + 1
  if vocab_size < minimum:
    raise ValueError(
      f'vocab_size must be at least {minimum} (8 special tokens, 256 byte pieces and one learned '
      f'piece); found {vocab_size}'
    )
  for index, line in enumerate(lines):
    if '\n' in line or '\r' in line:
      raise ValueError(f'corpus line {index} contains a line break; SentencePiece trains on single lines: {line!r}')
  sentencepiece.set_random_generator_seed(TRAINING_SEED)
  model = io.BytesIO()
  try:
    sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, minloglevel=2, **SENTENCEPIECE_OPTIONS
    )
  except RuntimeError as error:
    raise ValueError(
      f'SentencePiece could not train a {vocab_size}-piece BPE model on {len(lines)} lines '
      f'({sum(map(len, lines))} characters): {error}'
    ) from error
  return model.getvalue()


def tokenizer_from_sentencepiece(model_proto: bytes) -> transformers.PreTrainedTokenizerFast:
  """A `tokenizers`-backed HF tokenizer that encodes exactly like the SentencePiece BPE model `model_proto`.

  SentencePiece BPE merges the adjacent pair whose concatenation has the highest score; a `tokenizers` BPE model
  applies merges by rank, so each piece's splits into two normal pieces become merges ranked by that piece's
  score. The reserved tokens are added tokens, matched on the raw text before the model runs.
  """
  processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
  size = processor.get_piece_size()
  pieces = [processor.id_to_piece(index) for index in range(size)]
  if tuple(pieces[: len(RESERVED_TOKENS)]) != RESERVED_TOKENS:
    raise ValueError(
      f'SentencePiece model must start with {list(RESERVED_TOKENS)}; found {pieces[: len(RESERVED_TOKENS)]}'
    )
  normal = {
    piece: index
    for index, piece in enumerate(pieces)
    if index >= len(RESERVED_TOKENS) and not processor.is_byte(index) and not processor.is_unused(index)
  }
  ranked = []
  for piece, index in normal.items():
    for split in range(1, len(piece)):
      left, right = piece[:split], piece[split:]
      if left in normal and right in normal:
        ranked.append((-processor.get_score(index), index, left, right))
  merges = [(left, right) for _, _, left, right in sorted(ranked)]
  backend = tokenizers.Tokenizer(
    BPE(
      vocab={piece: index for index, piece in enumerate(pieces)},
      merges=merges,
      unk_token=UNK_TOKEN,
      fuse_unk=True,
      byte_fallback=True,
    )
  )
  backend.normalizer = normalizers.Replace(' ', '▁')
  backend.decoder = decoders.Sequence([decoders.Replace('▁', ' '), decoders.ByteFallback(), decoders.Fuse()])
  backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in RESERVED_TOKENS])
  return transformers.PreTrainedTokenizerFast(
    tokenizer_object=backend,
    bos_token=BOS_TOKEN,
    eos_token=EOS_TOKEN,
    unk_token=UNK_TOKEN,
    pad_token=PAD_TOKEN,
    extra_special_tokens=list(CHAT_TOKENS),
    chat_template=CHAT_TEMPLATE,
    clean_up_tokenization_spaces=False,
  )


def build_tokenizer(
  lines: Sequence[str], output_dir: str | os.PathLike, *, vocab_size: int = DEFAULT_VOCAB_SIZE
) -> pathlib.Path:
  """Trains on `lines` and writes an HF tokenizer folder to `output_dir`; returns it.

  The folder holds what `AutoTokenizer.from_pretrained` reads (tokenizer.json, tokenizer_config.json,
  chat_template.jinja), the SentencePiece model it came from, and `tokenizer_build.json` with the settings and a
  hash of the corpus.
  """
  folder = pathlib.Path(output_dir)
  folder.mkdir(parents=True, exist_ok=True)
  model_proto = train_sentencepiece(lines, vocab_size)
  tokenizer_from_sentencepiece(model_proto).save_pretrained(os.fspath(folder))
  (folder / SENTENCEPIECE_FILE).write_bytes(model_proto)
  info = dict(_build_settings(vocab_size), corpus_lines=len(lines), corpus_sha256=_corpus_hash(lines))
  (folder / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + '\n')
  return folder


def cached_tokenizer_folder(
  lines: Sequence[str],
  cache_dir: str | os.PathLike | None = None,
  *,
  vocab_size: int = DEFAULT_VOCAB_SIZE,
  prefix: str = 'tokenizer',
) -> pathlib.Path:
  """The folder of the tokenizer for `lines` and `vocab_size` under `cache_dir`, built on first use.

  The folder name carries a hash of the corpus, the settings and the library versions, so changed inputs build a
  new folder instead of reusing a stale one. The build happens in a temporary folder renamed into place, so a
  concurrent process (pytest-xdist) sees either nothing or a complete tokenizer.
  """
  root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
  key = hashlib.sha256(
    json.dumps(_build_settings(vocab_size), sort_keys=True).encode() + _corpus_hash(lines).encode()
  ).hexdigest()[:16]
  folder = root / f'{prefix}-{vocab_size}-{key}'
  if folder.is_dir():
    return folder
  root.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f'.{folder.name}.', dir=root))
  try:
    build_tokenizer(lines, staging, vocab_size=vocab_size)
    staging.rename(folder)
  except OSError:
    if not folder.is_dir():
      raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return folder


def default_cache_dir() -> pathlib.Path:
  """Where built tokenizers are kept: the per-user cache (platformdirs), beside the dataset cache."""
  return pathlib.Path(platformdirs.user_cache_dir('coars_jax')) / 'tokenizers'


def _build_settings(vocab_size: int) -> dict:
  return dict(
    format=BUILD_FORMAT,
    vocab_size=vocab_size,
    seed=TRAINING_SEED,
    sentencepiece=SENTENCEPIECE_OPTIONS,
    chat_template=CHAT_TEMPLATE,
    versions=dict(
      sentencepiece=sentencepiece.__version__, tokenizers=tokenizers.__version__, transformers=transformers.__version__
    ),
  )


def _corpus_hash(lines: Sequence[str]) -> str:
  digest = hashlib.sha256()
  for line in lines:
    digest.update(line.encode('utf-8') + b'\n')
  return digest.hexdigest()
