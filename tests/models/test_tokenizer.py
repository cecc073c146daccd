"""Tokenizer: a small SentencePiece BPE build on the synthetic titles plus the protocol corpus reloads through
AutoTokenizer identically, matches the SentencePiece model, round-trips text, renders chats, builds
deterministically and caches; the real three-dataset build runs when the data is present."""

import json
import re

import pytest
import sentencepiece

from coars_jax import data
from coars_jax.data import instruments, lastfm, movielens, synthetic
from coars_jax.models import tokenizer, tokenizer_build
from tests.conftest import require_files

SMALL_VOCAB = 512
TEXTS = (
  'Item 7',
  ' Item 12',
  ' Café Del Mar',
  'Björk',
  ' 宇多田ヒカル',
  'emoji 🎸 guitar',
  'two  spaces, trailing ',
  'Reason: the history is all Item 3.\nItem: Item 4',
  'Action: dislike',
  'Score: 0.85',
  '',
  'People with a history like yours chose "Item 9".',
)
MESSAGES = (
  {'role': 'system', 'content': 'You recommend items.'},
  {'role': 'user', 'content': 'Candidates:\n- Item 1\n- Café Del Mar'},
  {'role': 'assistant', 'content': 'Reason: it fits.\nItem: Item 1'},
)
REAL_DATA_FILES = (
  lastfm.ITEM_FILE,
  *lastfm.SPLIT_FILES.values(),
  lastfm.STATS_FILE,
  movielens.RATINGS_FILE,
  movielens.ITEMS_FILE,
  *movielens.SPLIT_FILES.values(),
  instruments.RATINGS_FILE,
  instruments.META_FILE,
)


@pytest.fixture(scope='module')
def synthetic_lines():
  return tokenizer.tokenizer_corpus([synthetic.synthetic_dataset().catalog.titles])


@pytest.fixture(scope='module')
def synthetic_folder(synthetic_lines, tmp_path_factory):
  return tokenizer.build_tokenizer(synthetic_lines, tmp_path_factory.mktemp('tokenizer'), vocab_size=SMALL_VOCAB)


def _ids(tok, texts=TEXTS):
  return [tok.encode(text, add_special_tokens=False) for text in texts]


def test_build_writes_an_hf_folder_with_the_configured_vocab_and_special_ids(synthetic_folder):
  assert {
    'tokenizer.json',
    'tokenizer_config.json',
    'chat_template.jinja',
    tokenizer.SENTENCEPIECE_FILE,
    tokenizer.BUILD_INFO_FILE,
  } <= {path.name for path in synthetic_folder.iterdir()}
  tok = tokenizer.load_tokenizer(synthetic_folder)
  assert len(tok) == tok.vocab_size == SMALL_VOCAB
  assert tok.convert_tokens_to_ids(list(tokenizer.RESERVED_TOKENS)) == list(range(8))
  assert tokenizer.special_token_ids(tok) == tokenizer.SpecialTokenIds(bos_id=2, eos_ids=(3, 7), pad_id=0, unk_id=1)
  info = json.loads((synthetic_folder / tokenizer.BUILD_INFO_FILE).read_text())
  assert info['vocab_size'] == SMALL_VOCAB and info['sentencepiece']['model_type'] == 'bpe'


def test_reload_matches_the_built_tokenizer_and_the_sentencepiece_model(synthetic_folder, synthetic_lines):
  model_proto = (synthetic_folder / tokenizer.SENTENCEPIECE_FILE).read_bytes()
  built = tokenizer.tokenizer_from_sentencepiece(model_proto)
  reloaded = tokenizer.load_tokenizer(synthetic_folder)
  processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
  texts = TEXTS + tuple(synthetic_lines)
  assert _ids(reloaded, texts) == _ids(built, texts) == [processor.encode(text) for text in texts]
  assert tokenizer.special_token_ids(reloaded) == tokenizer.special_token_ids(built)
  assert tokenizer.render_chat(reloaded, MESSAGES) == tokenizer.render_chat(built, MESSAGES)
  assert reloaded.get_vocab() == built.get_vocab()


def test_decode_inverts_encode_including_accents_cjk_and_whitespace(synthetic_folder):
  tok = tokenizer.load_tokenizer(synthetic_folder)
  for text, ids in zip(TEXTS, _ids(tok)):
    assert tok.decode(ids) == text
    assert tokenizer.UNK_TOKEN not in tok.convert_ids_to_tokens(ids)  # byte fallback, never <unk>


def test_digits_are_split_so_every_score_has_the_same_shape(synthetic_folder):
  tok = tokenizer.load_tokenizer(synthetic_folder)
  assert tok.tokenize(' 0.85')[-4:] == ['0', '.', '8', '5']
  assert tok.tokenize(' Item 42')[-2:] == ['4', '2']


def test_chat_template_renders_the_documented_format_and_round_trips(synthetic_folder):
  tok = tokenizer.load_tokenizer(synthetic_folder)
  rendered = tokenizer.render_chat(tok, MESSAGES)
  assert rendered == (
    '<s><|system|>\nYou recommend items.<|end|><|user|>\nCandidates:\n- Item 1\n- Café Del Mar'
    '<|end|><|assistant|>\nReason: it fits.\nItem: Item 1<|end|><|assistant|>\n'
  )
  assert tokenizer.render_chat(tok, MESSAGES[:2], add_generation_prompt=False).endswith('Café Del Mar<|end|>')
  ids = tok.encode(rendered, add_special_tokens=False)
  assert ids[:3] == [2, 4, tok.convert_tokens_to_ids('<0x0A>')]
  assert ids.count(7) == 3 and ids[-2:] == [6, tok.convert_tokens_to_ids('<0x0A>')]
  assert tok.decode(ids) == rendered
  assert tok.decode(ids, skip_special_tokens=True).startswith('\nYou recommend items.\nCandidates:')
  # The template's encoding equals the markers' ids spliced between separately encoded contents.
  content = tok.encode(MESSAGES[0]['content'], add_special_tokens=False)
  assert ids[3 : 3 + len(content) + 1] == content + [7]


def test_chat_template_rejects_an_unknown_role(synthetic_folder):
  tok = tokenizer.load_tokenizer(synthetic_folder)
  with pytest.raises(Exception, match='unknown chat role tool'):
    tokenizer.render_chat(tok, [{'role': 'tool', 'content': 'x'}])


def test_render_chat_plain_fallback_without_a_template(synthetic_folder):
  tok = tokenizer.load_tokenizer(synthetic_folder)
  tok.chat_template = None
  assert tokenizer.render_chat(tok, MESSAGES[:2]) == (
    'System: You recommend items.\n\nUser: Candidates:\n- Item 1\n- Café Del Mar\n\nAssistant:'
  )
  assert tokenizer.render_chat(tok, MESSAGES[:1], add_generation_prompt=False) == 'System: You recommend items.\n\n'
  with pytest.raises(ValueError, match=r'messages\[1\] must be a mapping'):
    tokenizer.render_chat(tok, [MESSAGES[0], {'role': 'user'}])


def test_special_token_ids_fall_back_to_eos_for_pad(synthetic_folder):
  tok = tokenizer.load_tokenizer(synthetic_folder)
  tok.pad_token = None
  assert tokenizer.special_token_ids(tok).pad_id == 3


def test_two_builds_are_byte_identical(synthetic_lines, tmp_path):
  first = tokenizer.build_tokenizer(synthetic_lines, tmp_path / 'first', vocab_size=SMALL_VOCAB)
  # A different training in between: leftover trainer state must not change the next build.
  tokenizer.build_tokenizer(synthetic_lines[::-1], tmp_path / 'other', vocab_size=400)
  second = tokenizer.build_tokenizer(synthetic_lines, tmp_path / 'second', vocab_size=SMALL_VOCAB)
  names = sorted(path.name for path in first.iterdir())
  assert names == sorted(path.name for path in second.iterdir()) and len(names) == 5
  for name in names:
    assert (first / name).read_bytes() == (second / name).read_bytes(), name
  other = (tmp_path / 'other' / tokenizer.SENTENCEPIECE_FILE).read_bytes()
  assert other != (first / tokenizer.SENTENCEPIECE_FILE).read_bytes()


def test_cached_folder_is_built_once_and_keyed_by_corpus_and_vocab(synthetic_lines, tmp_path, monkeypatch):
  folder = tokenizer.cached_tokenizer_folder(synthetic_lines, tmp_path, vocab_size=SMALL_VOCAB)
  assert re.fullmatch(rf'tokenizer-{SMALL_VOCAB}-[0-9a-f]{{16}}', folder.name)
  assert len(tokenizer.load_tokenizer(folder)) == SMALL_VOCAB

  def refuse(*args, **kwargs):
    raise AssertionError('rebuilt a cached tokenizer')

  monkeypatch.setattr(tokenizer_build, 'build_tokenizer', refuse)
  assert tokenizer.cached_tokenizer_folder(synthetic_lines, tmp_path, vocab_size=SMALL_VOCAB) == folder
  with pytest.raises(AssertionError, match='rebuilt'):
    tokenizer.cached_tokenizer_folder(synthetic_lines + ['Item: a new line'], tmp_path, vocab_size=SMALL_VOCAB)
  with pytest.raises(AssertionError, match='rebuilt'):
    tokenizer.cached_tokenizer_folder(synthetic_lines, tmp_path, vocab_size=SMALL_VOCAB + 1)
  assert [path.name for path in tmp_path.iterdir()] == [folder.name]  # no staging folders left behind


def test_protocol_corpus_covers_the_dialogue_formats_deterministically():
  lines = list(tokenizer.protocol_corpus(['Item 1', 'Item 2'], repeats=4))
  assert lines == list(tokenizer.protocol_corpus(['Item 1', 'Item 2'], repeats=4))
  assert len(lines) == 4 * len(tokenizer.PROTOCOL_TEMPLATES)
  patterns = (
    r'Reason: .+',
    r'Item: Item [12]',
    r'Action: (click|star|skip|dislike)',
    r'Score: [01]\.\d\d',
    r'\d+\. Item [12]',
    r'- Item [12]',
    r'People with a history like yours chose "Item [12]"\.',
  )
  for pattern in patterns:
    assert any(re.fullmatch(pattern, line) for line in lines), pattern
  assert not any('{' in line for line in lines)
  assert any(title in line for line in tokenizer.protocol_corpus() for title in tokenizer.EXAMPLE_TITLES)


def test_training_rejects_a_too_small_vocab_and_line_breaks():
  with pytest.raises(ValueError, match='vocab_size must be at least 265.*found 100'):
    tokenizer.train_sentencepiece(['Item 1'], vocab_size=100)
  with pytest.raises(ValueError, match='corpus line 1 contains a line break'):
    tokenizer.train_sentencepiece(['Item 1', 'Item\n2'], vocab_size=SMALL_VOCAB)


def test_load_tokenizer_names_the_missing_folder_or_files(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    tokenizer.load_tokenizer(tmp_path / 'absent')
  (tmp_path / 'config.json').write_text('{}')
  with pytest.raises(FileNotFoundError, match=r"holds none of .*tokenizer\.json.*found \['config\.json'\]"):
    tokenizer.load_tokenizer(tmp_path)
  (tmp_path / 'tokenizer.json').write_text('{not json')
  with pytest.raises(ValueError, match='transformers could not load a tokenizer'):
    tokenizer.load_tokenizer(tmp_path)


def test_tiny_tokenizer_on_the_three_real_datasets(tmp_path):
  data_root = require_files(*REAL_DATA_FILES)
  titles = data.dataset_titles(data_root, allow_download=False)
  folder = tokenizer.tiny_tokenizer_folder(titles, cache_dir=tmp_path)
  tok = tokenizer.tiny_tokenizer(titles, cache_dir=tmp_path)
  assert [path.name for path in tmp_path.iterdir()] == [folder.name]  # the second call reused the cache
  assert len(tok) == tokenizer.DEFAULT_VOCAB_SIZE
  all_titles = [title for item_titles in titles.values() for title in item_titles]
  assert {'Café Del Mar', 'Björk'} <= set(all_titles)
  processor = sentencepiece.SentencePieceProcessor(model_file=str(folder / tokenizer.SENTENCEPIECE_FILE))
  prompts = [' ' + title for title in all_titles] + list(TEXTS)
  ids = _ids(tok, prompts)
  assert ids == [processor.encode(text) for text in prompts]
  assert [tok.decode(row) for row in ids] == prompts
  stats = tokenizer.tokenizer_stats(tok, titles)
  # Titles compress well below one token per character, and no dataset's titles average under one token.
  for name, item_titles in titles.items():
    characters = sum(len(title) + 1 for title in item_titles) / len(item_titles)
    assert 1.0 <= stats['mean_tokens_per_title'][name] < characters / 2, name
  assert tok.tokenize(' Café Del Mar') == ['▁Café', '▁Del', '▁Mar']
  # The protocol corpus gives the dialogue keywords their own tokens.
  vocab = tok.get_vocab()
  for word in ('Reason', 'Item', 'Action', 'Score', '▁click', '▁star', '▁skip', '▁dislike', 'People', '▁chose'):
    assert word in vocab, word
