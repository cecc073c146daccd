"""Tokenizers for the decoder: loading any HF tokenizer folder, rendering chats (the folder's chat template, or a
plain-text fallback), the EOS/pad ids a sampler needs, and the `tiny` preset's own SentencePiece BPE tokenizer,
trained at run time on the three datasets' item titles plus dialogue-protocol text and cached, because the
datasets' terms forbid redistributing anything derived from them in the repository.

Building that tokenizer lives in two modules, re-exported here (import from this one): `tokenizer_corpus` (the
training lines: titles plus the dialogue-protocol corpus) and `tokenizer_build` (the vocabulary layout and chat
template, SentencePiece training, the conversion to an HF tokenizer, and the built-folder cache). This module keeps
loading tokenizers, rendering chats, the special ids, the `tiny` preset's entry points (`tiny_tokenizer_folder`,
`tiny_tokenizer`) and the statistics."""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping, Sequence

import transformers

from coars_jax.models.tokenizer_build import (
  ASSISTANT_TOKEN,
  BOS_TOKEN,
  BUILD_FORMAT,
  BUILD_INFO_FILE,
  CHAT_TEMPLATE,
  CHAT_TOKENS,
  DEFAULT_VOCAB_SIZE,
  END_OF_TURN_TOKEN,
  EOS_TOKEN,
  NUM_BYTE_PIECES,
  PAD_TOKEN,
  RESERVED_TOKENS,
  SENTENCEPIECE_FILE,
  SENTENCEPIECE_OPTIONS,
  SYSTEM_TOKEN,
  TRAINING_SEED,
  UNK_TOKEN,
  USER_TOKEN,
  build_tokenizer,
  cached_tokenizer_folder,
  default_cache_dir,
  tokenizer_from_sentencepiece,
  train_sentencepiece,
)
from coars_jax.models.tokenizer_corpus import (
  EXAMPLE_TITLES,
  PROTOCOL_ACTIONS,
  PROTOCOL_REASONS,
  PROTOCOL_TEMPLATES,
  protocol_corpus,
  tokenizer_corpus,
)

__all__ = [
  'ASSISTANT_TOKEN',
  'BOS_TOKEN',
  'BUILD_FORMAT',
  'BUILD_INFO_FILE',
  'CHAT_TEMPLATE',
  'CHAT_TOKENS',
  'DEFAULT_VOCAB_SIZE',
  'END_OF_TURN_TOKEN',
  'END_OF_TURN_TOKENS',
  'EOS_TOKEN',
  'EXAMPLE_TITLES',
  'NUM_BYTE_PIECES',
  'PAD_TOKEN',
  'PROTOCOL_ACTIONS',
  'PROTOCOL_REASONS',
  'PROTOCOL_TEMPLATES',
  'RESERVED_TOKENS',
  'SENTENCEPIECE_FILE',
  'SENTENCEPIECE_OPTIONS',
  'SYSTEM_TOKEN',
  'SpecialTokenIds',
  'TRAINING_SEED',
  'UNK_TOKEN',
  'USER_TOKEN',
  'VOCABULARY_FILES',
  'build_tokenizer',
  'cached_tokenizer_folder',
  'default_cache_dir',
  'end_of_turn_id',
  'load_gguf_tokenizer',
  'load_tokenizer',
  'mean_tokens_per_title',
  'protocol_corpus',
  'render_chat',
  'special_token_ids',
  'tiny_tokenizer',
  'tiny_tokenizer_folder',
  'tokenizer_corpus',
  'tokenizer_from_sentencepiece',
  'tokenizer_stats',
  'train_sentencepiece',
]

# Files one of which any loadable HF tokenizer folder holds: the fast serialization, a SentencePiece model, or the
# vocab files of BPE/WordPiece tokenizers.
VOCABULARY_FILES = ('tokenizer.json', 'tokenizer.model', 'spiece.model', 'vocab.json', 'vocab.txt')

# Tokens that chat tokenizers use to end a turn in place of (or besides) their eos token: ours, Qwen/SmolLM2,
# Llama 3 and Gemma. A sampler that stopped only on eos would run past the end of the assistant's answer.
END_OF_TURN_TOKENS = (
  END_OF_TURN_TOKEN,
  '<|im_end|>',
  '<|eot_id|>',
  '<|eom_id|>',
  '<|end_of_text|>',
  '<end_of_turn>',
  '<|endoftext|>',
)


@dataclasses.dataclass(frozen=True)
class SpecialTokenIds:
  """What a sampler needs: stop on any of `eos_ids`, fill finished rows with `pad_id`.

  bos_id: the beginning-of-sequence id, or None when the tokenizer has none (Qwen).
  eos_ids: the eos id first, then every end-of-turn token the tokenizer has (`END_OF_TURN_TOKENS`).
  pad_id: the pad id, or the first eos id when the tokenizer has no pad token (Llama 3); padded positions are
    masked, so only its being a valid id matters.
  unk_id: the unknown-token id, or None.
  """

  bos_id: int | None
  eos_ids: tuple[int, ...]
  pad_id: int
  unk_id: int | None


def load_tokenizer(model_folder: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
  """`AutoTokenizer.from_pretrained(model_folder)` from local files only, never running code from the folder.

  Raises FileNotFoundError when the folder is absent or holds none of `VOCABULARY_FILES`, and ValueError when
  transformers cannot build a tokenizer from what is there.
  """
  folder = pathlib.Path(model_folder)
  if not folder.is_dir():
    raise FileNotFoundError(f'tokenizer folder {folder} does not exist or is not a directory')
  present = sorted(path.name for path in folder.iterdir())
  if not any(name in present for name in VOCABULARY_FILES):
    raise FileNotFoundError(f'tokenizer folder {folder} holds none of {list(VOCABULARY_FILES)}; found {present}')
  try:
    return transformers.AutoTokenizer.from_pretrained(os.fspath(folder), local_files_only=True, trust_remote_code=False)
  except (OSError, ValueError, KeyError) as error:
    raise ValueError(f'transformers could not load a tokenizer from {folder} (files: {present}): {error}') from error


def load_gguf_tokenizer(gguf_path: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
  """The tokenizer (and chat template) stored inside a GGUF file, e.g. `gguf_checkpoint.smollm2_gguf_path()`,
  through transformers' GGUF reader (needs the `gguf` package)."""
  path = pathlib.Path(gguf_path)
  if not path.is_file():
    raise FileNotFoundError(f'GGUF file {path} does not exist')
  try:
    return transformers.AutoTokenizer.from_pretrained(
      os.fspath(path.parent), gguf_file=path.name, local_files_only=True, trust_remote_code=False
    )
  except (OSError, ValueError, KeyError, ImportError) as error:
    raise ValueError(f'transformers could not read a tokenizer from {path}: {error}') from error


def render_chat(tokenizer, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
  """The prompt text for `messages` (dicts with "role" and "content").

  With a chat template on the tokenizer, that template renders them (through jinja2). Without one, the plain-text
  fallback writes each message as "<Role>: <content>" followed by a blank line, e.g. "User: Pick one.\\n\\n",
  and the generation prompt is "Assistant:"; it adds no special tokens.
  """
  for index, message in enumerate(messages):
    if not (
      isinstance(message, Mapping) and isinstance(message.get('role'), str) and isinstance(message.get('content'), str)
    ):
      raise ValueError(f"messages[{index}] must be a mapping with string 'role' and 'content'; found {message!r}")
  if getattr(tokenizer, 'chat_template', None):
    return tokenizer.apply_chat_template(
      [dict(message) for message in messages], tokenize=False, add_generation_prompt=add_generation_prompt
    )
  text = ''.join(f'{message["role"].capitalize()}: {message["content"]}\n\n' for message in messages)
  return text + 'Assistant:' if add_generation_prompt else text


def special_token_ids(tokenizer) -> SpecialTokenIds:
  """The bos, eos/end-of-turn, pad and unk ids of `tokenizer` (see `SpecialTokenIds`)."""
  added = tokenizer.get_added_vocab()
  eos_ids = [tokenizer.eos_token_id] + [added[token] for token in END_OF_TURN_TOKENS if token in added]
  eos_ids = tuple(dict.fromkeys(token_id for token_id in eos_ids if token_id is not None))
  if not eos_ids:
    raise ValueError(
      f'tokenizer {tokenizer.name_or_path!r} has no eos token and none of the end-of-turn tokens '
      f'{list(END_OF_TURN_TOKENS)}; a sampler would never stop'
    )
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
  return SpecialTokenIds(bos_id=tokenizer.bos_token_id, eos_ids=eos_ids, pad_id=pad_id, unk_id=tokenizer.unk_token_id)


def tiny_tokenizer_folder(
  titles: Mapping[str, Sequence[str]],
  cache_dir: str | os.PathLike | None = None,
  vocab_size: int = DEFAULT_VOCAB_SIZE,
  *,
  output_dir: str | os.PathLike | None = None,
) -> pathlib.Path:
  """The `tiny` preset's tokenizer folder, trained on every dataset's titles plus the protocol corpus.

  titles: the item titles per dataset (`coars_jax.data.dataset_titles`; this module does not read datasets).
  output_dir: build into this folder (always, overwriting); without it the folder is built into `cache_dir`
    (default `default_cache_dir()`) on first use and reused after.
  """
  lines = tokenizer_corpus(titles.values())
  if output_dir is not None:
    return build_tokenizer(lines, output_dir, vocab_size=vocab_size)
  return cached_tokenizer_folder(lines, cache_dir, vocab_size=vocab_size, prefix='tiny')


def tiny_tokenizer(
  titles: Mapping[str, Sequence[str]], cache_dir: str | os.PathLike | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE
):
  """The `tiny` preset's tokenizer, loaded from `tiny_tokenizer_folder` (built there on first use)."""
  return load_tokenizer(tiny_tokenizer_folder(titles, cache_dir, vocab_size))


def end_of_turn_id(tokenizer) -> int:
  """The token a chat model ends its message with: the first end-of-turn token the tokenizer has (its chat
  template's turn terminator: <|end|>, <|im_end|>, <|eot_id|>, ...), else its eos token."""
  added = tokenizer.get_added_vocab()
  for token in END_OF_TURN_TOKENS:
    if token in added:
      return int(added[token])
  if tokenizer.eos_token_id is None:
    raise ValueError(
      f'tokenizer {tokenizer.name_or_path!r} has neither an eos token nor any end-of-turn token '
      f'{list(END_OF_TURN_TOKENS)}; messages could not be terminated'
    )
  return int(tokenizer.eos_token_id)


def mean_tokens_per_title(tokenizer, titles: Sequence[str]) -> float:
  """Mean token count of " " + title (a title as it follows "Item:" in a prompt)."""
  if not titles:
    raise ValueError('mean_tokens_per_title needs at least one title; found none')
  encoded = tokenizer([' ' + title for title in titles], add_special_tokens=False)['input_ids']
  return sum(map(len, encoded)) / len(titles)


def tokenizer_stats(tokenizer, titles: Mapping[str, Sequence[str]]) -> dict:
  """Vocabulary size, special ids and mean tokens per title of each dataset in `titles`."""
  special = special_token_ids(tokenizer)
  return dict(
    vocab_size=len(tokenizer),
    bos_id=special.bos_id,
    eos_ids=list(special.eos_ids),
    pad_id=special.pad_id,
    unk_id=special.unk_id,
    mean_tokens_per_title={
      name: round(mean_tokens_per_title(tokenizer, item_titles), 3) for name, item_titles in titles.items()
    },
  )
