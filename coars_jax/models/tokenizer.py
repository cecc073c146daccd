"""Tokenizers for the decoder: loading any HF tokenizer folder, rendering chats (the folder's chat template, or a
plain-text fallback), the EOS/pad ids a sampler needs, and the `tiny` preset's own SentencePiece BPE tokenizer,
trained at run time on the three datasets' item titles plus dialogue-protocol text and cached, because the
datasets' terms forbid redistributing anything derived from them in the repository."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pathlib
import random
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence

import platformdirs
import sentencepiece
import tokenizers
import transformers
from tokenizers import AddedToken, decoders, normalizers
from tokenizers.models import BPE

# Files one of which any loadable HF tokenizer folder holds: the fast serialization, a SentencePiece model, or the
# vocab files of BPE/WordPiece tokenizers.
VOCABULARY_FILES = ('tokenizer.json', 'tokenizer.model', 'spiece.model', 'vocab.json', 'vocab.txt')

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


# Lines in the formats the agents exchange. Each template is filled `repeats` times by `protocol_corpus`; add a line
# here when the prompts gain a new phrasing. Fields: {title}, {other_title}, {reason}, {action}, {score}, {rank}.
PROTOCOL_TEMPLATES = (
  # Recommender turn.
  'Reason: {reason}',
  'Item: {title}',
  'Recommend exactly one item from the candidates. Answer with a Reason line and an Item line.',
  'The previous recommendation was {title}. The user chose {action} with score {score}.',
  'The user did not accept {title}. Recommend a different candidate.',
  # Simulated-user turn.
  'Action: {action}',
  'Score: {score}',
  'You are a user with the history below. Decide how you react to the recommended item.',
  'Answer with a Reason line, an Action line (click, star, skip or dislike) and a Score line between 0 and 1.',
  'Recommended item: {title}',
  'Feedback: {action}. {reason}',
  # History and candidate lists.
  "The user's history, oldest first:",
  'The user has interacted with {rank} items:',
  '{rank}. {title}',
  'Candidate items:',
  '- {title}',
  'Candidates: "{title}", "{other_title}"',
  # Peer opinions.
  'People with a history like yours chose "{title}".',
  'Users similar to you rated "{title}" highly.',
  'A recommender trained on past interactions ranks "{title}" first.',
  'Most people who liked "{other_title}" also liked "{title}".',
)

PROTOCOL_REASONS = (
  'It matches the style of the items in the history.',
  'The user played {other_title} many times, and {title} is close to it.',
  'The history leans towards this genre, and this candidate fits it best.',
  'It is popular with people who share this history.',
  'The user skipped similar items before, so a different kind of item is safer.',
  'I already own something like {title}, so I would skip it.',
  'This is exactly what I was looking for after {other_title}.',
  'It is not my taste at all.',
  'I might try it, but it does not excite me.',
  'The recent items point to a new interest, and {title} follows it.',
)

PROTOCOL_ACTIONS = ('click', 'star', 'skip', 'dislike')
# Stand-in titles for `protocol_corpus()` without titles; invented, not from any dataset.
EXAMPLE_TITLES = (
  'Blue Harbour',
  'The Quiet Year',
  'Night Trains',
  'Studio Condenser Microphone',
  'Guitar Strings, Light Gauge',
  'Café Nocturne',
  'Åsa Lind',
  'Return of the Lighthouse',
)


def protocol_corpus(titles: Sequence[str] = (), *, repeats: int = 16, seed: int = TRAINING_SEED) -> Iterator[str]:
  """Lines in the dialogue formats (`PROTOCOL_TEMPLATES`), each template filled `repeats` times.

  titles: the titles to put in {title} and {other_title}; `EXAMPLE_TITLES` when empty. Filling is seeded, so the
  same arguments give the same lines.
  """
  pool = tuple(titles) or EXAMPLE_TITLES
  rng = random.Random(seed)
  for template in PROTOCOL_TEMPLATES:
    for _ in range(repeats):
      title, other_title = rng.choice(pool), rng.choice(pool)
      reason = rng.choice(PROTOCOL_REASONS).format(title=title, other_title=other_title)
      yield template.format(
        title=title,
        other_title=other_title,
        reason=reason,
        action=rng.choice(PROTOCOL_ACTIONS),
        score=f'{rng.random():.2f}',
        rank=rng.randint(1, 20),
      )


def tokenizer_corpus(title_sets: Iterable[Sequence[str]], *, repeats: int = 16) -> list[str]:
  """The training lines: every title, then the protocol corpus filled with those titles.

  Titles get a leading space because in prompts they follow a label or list marker ("Item: X", "1. X"); without
  a dummy prefix, that space is part of the title's first piece.
  """
  titles = [title for title_set in title_sets for title in title_set]
  return [' ' + title for title in titles] + list(protocol_corpus(titles, repeats=repeats))


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
