"""The language model's data: a vocabulary, text sources, and deterministic token batches.

Conventions of nanoGPT's `shakespeare_char` (data/shakespeare_char/prepare.py, train.py):
the text is split into the first 90% for training and the last 10% for validation; a training
batch is `batch_size` windows of block_size + 1 tokens at uniformly drawn start positions, the
inputs being a window's first block_size tokens and the targets its last block_size.

A character vocabulary is the sorted set of characters of the whole text, as nanoGPT's
prepare.py builds it (`vocabulary_from='all'`), so a corpus whose validation part holds a
character the training part lacks (a rare accent, a symbol) trains as it is. `vocabulary_from=
'train'` takes the training text's characters only (what runs before that option did): the
validation text then stays wholly unseen, and a validation character outside the vocabulary is
refused at load time, naming the character and its position (`kind='byte'` has no such case).
Both give the same ids when the two parts hold the same characters (tiny Shakespeare at the
default split does): the ids are the sorted characters.

Differences from nanoGPT, and why:
* Batches are drawn from `np.random.default_rng([seed, step])`, so step s's batch depends only
  on (seed, s) and a resumed run draws the same batches as an uninterrupted one.
* Evaluation covers the whole validation text once with fixed windows (`eval_batches`),
  rather than nanoGPT's `eval_iters` random windows.

A byte-level BPE vocabulary (`kind='bpe'`, GPT-2's pre-tokenisation and byte alphabet) is
trained by Hugging Face `tokenizers` on the training text only (`vocabulary_from` is for char
vocabularies), so the validation text stays unseen; it decodes back to the text exactly.

The vocabulary is stored with the run (`Vocabulary.save(workdir)`, `load_vocabulary(workdir)`),
so a resumed run or a later evaluation encodes with the same ids; `load_text(...,
vocabulary=stored)` refuses a text whose vocabulary has changed since. A stored BPE is used as
it is, not trained again (training is deterministic, but a later `tokenizers` could merge
differently).

Runs with different vocabularies compare by bits per character: nats per token / ln 2 divided
by the validation text's characters per token (`TextData.chars_per_token`; 1 for a char
vocabulary, characters per byte for a byte one, about 1.9 for a 512-token BPE of tiny
Shakespeare).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Iterator

import numpy as np

from fdg_jax.data import DataError
from fdg_jax.data import image_sources

DATASETS = ('textfile', 'tiny_shakespeare')
TFDS_DATASETS = ('tiny_shakespeare',)   # read through tfds
# The vocabularies a text can be read with.
KINDS = ('char', 'byte', 'bpe')
# ... and the ids of prepared token files (`token_files`), whose text is meta.pkl's if any.
VOCABULARY_KINDS = KINDS + ('ids',)
# Where a char vocabulary's characters come from: the whole text, or its training part only.
VOCABULARY_SOURCES = ('all', 'train')
VOCABULARY_FILE = 'vocabulary.json'
_BYTE_VOCABULARY_SIZE = 256
UNKNOWN_ID_TEXT = '\ufffd'   # what an id decodes to where the vocabulary has no text for it
# Where TFDS downloads tiny_shakespeare from (karpathy/char-rnn's input.txt); probed before
# downloading because the TFDS downloader retries for minutes when there is no network.
_TFDS_DOWNLOAD_HOST = ('raw.githubusercontent.com', 443)
_NETWORK_PROBE_TIMEOUT_S = 3.0


# ------------------------------------------------------------------ vocabulary


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """Token ids of a text, by kind:

  'char': id i is symbols[i], the sorted distinct characters;
  'byte': the UTF-8 bytes, 256 ids;
  'bpe': a byte-level BPE, `tokenizer` its Hugging Face `tokenizers` JSON;
  'ids': the ids of prepared token files (`token_files`), `num_ids` of them (the model's
    outputs); `itos` the text of each id where the files' meta.pkl gives it (nanoGPT's), else
    () and no text is known: a text is then written as its decimal ids.
  """
  kind: str
  symbols: str = ''
  tokenizer: str = ''
  itos: tuple[str, ...] = ()
  num_ids: int = 0

  def __post_init__(self):
    if self.kind not in VOCABULARY_KINDS:
      raise DataError(f'Unknown vocabulary kind {self.kind!r}. Use one of {KINDS}.')
    extra = [name for name in ('symbols', 'tokenizer', 'itos', 'num_ids')
             if getattr(self, name) and name not in _FIELDS_OF_KIND[self.kind]]
    if extra:
      holds = ' and '.join(_FIELDS_OF_KIND[self.kind]) or 'nothing: its ids are the bytes'
      raise DataError(f'A {self.kind} vocabulary has no {" or ".join(extra)} (it holds '
                      f'{holds}).')
    if self.kind == 'char' and (not self.symbols
                                or list(self.symbols) != sorted(set(self.symbols))):
      raise DataError('A char vocabulary needs its distinct characters, sorted, as symbols.')
    if self.kind == 'bpe':
      if not self.tokenizer:
        raise DataError('A bpe vocabulary needs its tokenizer (the tokenizers JSON).')
      # One spelling of the JSON, so that a trained and a stored tokenizer compare equal.
      object.__setattr__(self, 'tokenizer', _canonical_json(self.tokenizer))
    if self.kind == 'ids':
      if self.num_ids < 1 or len(self.itos) > self.num_ids:
        raise DataError(f'An ids vocabulary needs num_ids >= 1 and at most that many itos '
                        f'entries (num_ids {self.num_ids}, {len(self.itos)} entries).')
      object.__setattr__(self, 'itos', tuple(self.itos))

  @classmethod
  def from_text(cls, text: str, kind: str = 'char', size: int = 0) -> Vocabulary:
    """The vocabulary of `text`: its sorted distinct characters ('char'), the bytes ('byte'),
    or a byte-level BPE of at most `size` tokens trained on it ('bpe')."""
    if kind == 'byte':
      return cls('byte')
    if kind == 'bpe':
      return cls('bpe', tokenizer=_train_bpe(text, size))
    return cls(kind, ''.join(sorted(set(text))))

  @functools.cached_property
  def _bpe(self):
    """The `tokenizers.Tokenizer` of a bpe vocabulary, parsed once."""
    import tokenizers  # pylint: disable=g-import-not-at-top
    return tokenizers.Tokenizer.from_str(self.tokenizer)

  @functools.cached_property
  def _stoi(self) -> dict:
    """An ids vocabulary's id of each text of `itos` (nanoGPT's stoi)."""
    return {text: index for index, text in enumerate(self.itos)}

  @property
  def size(self) -> int:
    if self.kind == 'byte':
      return _BYTE_VOCABULARY_SIZE
    if self.kind == 'bpe':
      return self._bpe.get_vocab_size()
    if self.kind == 'ids':
      return self.num_ids
    return len(self.symbols)

  @property
  def has_text(self) -> bool:
    """Whether ids decode to text (all but token files without meta.pkl's itos)."""
    return self.kind != 'ids' or bool(self.itos)

  def describe(self) -> str:
    """e.g. 'char vocabulary of 65 symbols', 'byte-level BPE of 512 tokens'."""
    if self.kind == 'bpe':
      return f'byte-level BPE of {self.size} tokens (trained on the training text)'
    if self.kind == 'ids':
      text = (f"meta.pkl's itos names {len(self.itos)}" if self.itos else
              'no meta.pkl itos: their text is not known')
      return f'{self.num_ids} token ids ({text})'
    return f'{self.kind} vocabulary of {self.size} symbols'

  def encode(self, text: str, *, where: str = 'the text', offset: int = 0,
             fix: str = "Use a byte vocabulary (kind='byte'), or a char vocabulary of a text "
                        'that holds it') -> np.ndarray:
    """int32 ids of `text`; a character outside a char vocabulary (or an ids vocabulary's
    itos, encoded character by character as nanoGPT's sample.py does) is a DataError naming it
    and its position (counted from `offset`, the start of `text` within `where`), and `fix`.
    Without itos, `text` is decimal ids separated by spaces (none: id 0)."""
    if self.kind == 'byte':
      return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32)
    if self.kind == 'bpe':
      return np.asarray(self._bpe.encode(text).ids, np.int32)
    if self.kind == 'ids' and not self.itos:
      return _decimal_ids(text, self.num_ids, where)
    if self.kind == 'ids':
      ids = np.fromiter((self._stoi.get(char, -1) for char in text), np.int32, len(text))
      unknown = np.flatnonzero(ids < 0)
    else:
      codes = np.frombuffer(text.encode('utf-32-le'), np.uint32)
      table = np.frombuffer(self.symbols.encode('utf-32-le'), np.uint32)
      ids = np.minimum(np.searchsorted(table, codes), len(table) - 1)
      unknown = np.flatnonzero(table[ids] != codes)
    if unknown.size:
      index = int(unknown[0])
      line = text.count('\n', 0, index) + 1
      column = index - (text.rfind('\n', 0, index) + 1) + 1
      char = text[index]
      raise DataError(
          f'{where} has the character {char!r} (U+{ord(char):04X}) at its line {line}, column '
          f'{column} (character {offset + index} of the whole text), which is not in the '
          f'{self.kind} vocabulary of {self.size} symbols. {fix}.')
    return ids.astype(np.int32)

  def decode(self, ids) -> str:
    """The text of `ids` (undecodable byte sequences, and ids without text, become U+FFFD;
    without itos, the ids in decimal)."""
    ids = np.asarray(ids).reshape(-1)
    if self.kind == 'byte':
      return ids.astype(np.uint8).tobytes().decode('utf-8', errors='replace')
    if self.kind == 'bpe':
      return self._bpe.decode(ids.tolist(), skip_special_tokens=False)
    if self.kind == 'ids' and not self.itos:
      return ' '.join(map(str, ids.tolist()))
    table = self.symbols if self.kind == 'char' else self.itos
    return ''.join(table[i] if i < len(table) else UNKNOWN_ID_TEXT for i in ids.tolist())

  def count_characters(self, ids: np.ndarray) -> int | None:
    """The characters of the text `ids` stand for (None where the vocabulary has no text)."""
    if not self.has_text:
      return None
    if self.kind == 'char':
      return len(ids)
    if self.kind == 'byte':   # UTF-8: every byte but a continuation byte starts a character
      return int(np.count_nonzero((np.asarray(ids) & 0xC0) != 0x80))
    if self.kind == 'ids':
      lengths = np.asarray([len(t) for t in self.itos] + [1], np.int64)   # the last: U+FFFD
      return int(lengths[np.minimum(ids, len(self.itos))].sum())
    return len(self.decode(ids))   # a BPE decodes to its text exactly

  def to_json(self) -> str:
    value = {'kind': self.kind, 'size': self.size}
    if self.kind in ('char', 'byte'):   # the format runs before the other kinds wrote
      value['symbols'] = self.symbols
    elif self.kind == 'bpe':
      value['tokenizer'] = json.loads(self.tokenizer)
    else:
      value['itos'] = list(self.itos)
    return json.dumps(value, ensure_ascii=False)

  @classmethod
  def from_json(cls, text: str) -> Vocabulary:
    value = json.loads(text)
    kind = value['kind']
    if kind == 'bpe':
      vocabulary = cls(kind, tokenizer=json.dumps(value['tokenizer']))
    elif kind == 'ids':
      vocabulary = cls(kind, itos=tuple(value['itos']), num_ids=value['size'])
    else:
      vocabulary = cls(kind, value['symbols'])
    if vocabulary.size != value['size']:
      raise DataError(f'A stored vocabulary says size {value["size"]} but holds '
                      f'{vocabulary.size} symbols: the file is damaged.')
    return vocabulary

  def save(self, workdir: str) -> str:
    """Writes workdir/vocabulary.json atomically; returns its path."""
    path = os.path.join(workdir, VOCABULARY_FILE)
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
      f.write(self.to_json())
    os.replace(path + '.tmp', path)
    return path


# The fields each kind of vocabulary holds.
_FIELDS_OF_KIND = {'char': ('symbols',), 'byte': (), 'bpe': ('tokenizer',),
                   'ids': ('itos', 'num_ids')}


def _canonical_json(text: str) -> str:
  return json.dumps(json.loads(text), ensure_ascii=False, separators=(',', ':'))


def _train_bpe(text: str, size: int) -> str:
  """The JSON of a byte-level BPE of at most `size` tokens trained on `text` (GPT-2's: its
  pre-tokenising regular expression and 256-byte alphabet, no prefix space, no special tokens;
  fewer tokens where the text has no more pairs to merge)."""
  if size < _BYTE_VOCABULARY_SIZE:
    raise DataError(f'A byte-level BPE of {size} tokens is smaller than its 256 bytes. Use a '
                    'vocab_size of 256 or more, e.g. 512.')
  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, trainers, Tokenizer
  # pylint: enable=g-import-not-at-top
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=size, show_progress=False, special_tokens=[],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  # One piece: the pre-tokeniser splits it as it will split the text when encoding.
  tokenizer.train_from_iterator([text], trainer=trainer)
  return tokenizer.to_str()


def _decimal_ids(text: str, num_ids: int, where: str) -> np.ndarray:
  """The ids written in `text` as decimal numbers between spaces (none: id 0)."""
  words = text.split()
  if not all(word.isdigit() and int(word) < num_ids for word in words):
    raise DataError(f'{where} is {text[:40]!r}: token ids without text (no meta.pkl itos) are '
                    f'written as decimal ids below {num_ids} between spaces. Give e.g. "0".')
  return np.asarray([int(word) for word in words] or [0], np.int32)


def load_vocabulary(workdir: str) -> Vocabulary | None:
  """The vocabulary stored in workdir/vocabulary.json, or None if the run has none yet."""
  path = os.path.join(workdir, VOCABULARY_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    text = f.read()
  try:
    return Vocabulary.from_json(text)
  except (ValueError, KeyError, TypeError) as e:  # DataError is a ValueError
    raise DataError(f'{path} is not a vocabulary ({type(e).__name__}: {e}). Restore it from the '
                    'run that wrote it, or start a new run in a fresh workdir.') from e


# ------------------------------------------------------------------ sources


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: arrays don't compare.
class TextData:
  """A text, tokenised and split: in host memory, or memory-mapped token files."""
  name: str
  vocabulary: Vocabulary
  train_tokens: np.ndarray  # int32 [N], or token files' uint16 memory map
  val_tokens: np.ndarray  # int32 [M], or token files' uint16 memory map
  val_fraction: float | None   # None: the files' split (token files)
  vocabulary_from: str = 'all'   # a char vocabulary's source: VOCABULARY_SOURCES
  val_characters: int | None = None   # of the validation text; None: not known

  @property
  def chars_per_token(self) -> float | None:
    """Characters per token of the validation text (None where its text is not known)."""
    if self.val_characters is None:
      return None
    return self.val_characters / len(self.val_tokens)

  @property
  def description(self) -> str:
    """One line for the log, e.g. 'tiny_shakespeare, char vocabulary of 65 symbols (from the
    whole text): train 1,003,854 tokens, validation 111,540 tokens (the last 10%)'."""
    source = ''
    if self.vocabulary.kind == 'char':
      source = (' (from the whole text)' if self.vocabulary_from == 'all'
                else ' (from the training text)')
    split = (f'the last {self.val_fraction:.0%}' if self.val_fraction is not None
             else 'val.bin')
    if self.chars_per_token not in (None, 1.0):
      split += f'; {self.chars_per_token:.3f} characters per token'
    return (f'{self.name}, {self.vocabulary.describe()}{source}: train '
            f'{len(self.train_tokens):,} tokens, validation {len(self.val_tokens):,} tokens '
            f'({split})')


def load_text(dataset: str, data_dir: str | None, kind: str = 'char',
              val_fraction: float = 0.1, vocabulary: Vocabulary | None = None,
              block_size: int | None = None, vocabulary_from: str = 'all',
              vocab_size: int = 0) -> TextData:
  """Reads, tokenises and splits a text: the first 1 - val_fraction for training, the rest
  for validation (nanoGPT: train = data[:int(n * 0.9)]; char and BPE vocabularies split the
  characters, byte vocabularies the bytes).

  Args:
    dataset: 'textfile' (data_dir is a UTF-8 text file, or a folder whose *.txt files are
      joined in sorted order with a newline between files) or 'tiny_shakespeare' (tfds; its
      train, validation and test splits joined in order are char-rnn's input.txt, so the
      default split is nanoGPT's; data_dir is the TFDS data dir, '' or None for its default).
    data_dir: see `dataset`.
    kind: 'char' (the text's characters), 'byte' (256 ids, UTF-8 bytes) or 'bpe' (a byte-level
      BPE of at most `vocab_size` tokens, trained on the training text).
    val_fraction: the share of the text, at its end, held out for validation, in (0, 1).
    vocabulary: the run's stored vocabulary (resume, evaluation); the text must give the same
      (a stored BPE is used as it is).
    block_size: if given, both splits must hold at least one window of block_size + 1 tokens.
    vocabulary_from: a char vocabulary's characters: 'all' (the whole text's, nanoGPT's) or
      'train' (the training text's; a validation character outside them is a DataError).
    vocab_size: a BPE's size (256 or more); unused by the other kinds.
  """
  if kind not in KINDS:
    raise DataError(f'Unknown vocabulary kind {kind!r}. Use one of {KINDS}.')
  if vocabulary_from not in VOCABULARY_SOURCES:
    raise DataError(f'Unknown vocabulary source {vocabulary_from!r}. Use one of '
                    f'{VOCABULARY_SOURCES}.')
  if not 0 < val_fraction < 1:
    raise DataError(f'val_fraction={val_fraction} is outside (0, 1). Use e.g. 0.1 (nanoGPT).')
  if dataset == 'textfile':
    path, text = _read_textfile(data_dir)
    name = f'textfile:{os.path.basename(os.path.normpath(path))}'   # no machine path in records
  elif dataset == 'tiny_shakespeare':
    text, name = _read_tiny_shakespeare(data_dir), dataset
  else:
    raise DataError(f'Unknown text dataset {dataset!r}. Use one of {DATASETS}.')

  length = len(text.encode('utf-8')) if kind == 'byte' else len(text)
  cut = int(length * (1 - val_fraction))
  if not 0 < cut < length:
    raise DataError(f'{name}: {length} tokens split at val_fraction={val_fraction} leave the '
                    'training or the validation text empty. Use a longer text.')
  if kind == 'byte':
    tokens = Vocabulary('byte').encode(text)
    found, train_tokens, val_tokens = Vocabulary('byte'), tokens[:cut], tokens[cut:]
  elif kind == 'bpe':
    found = (vocabulary if vocabulary is not None and vocabulary.kind == 'bpe'
             else Vocabulary.from_text(text[:cut], 'bpe', vocab_size))
    train_tokens, val_tokens = found.encode(text[:cut]), found.encode(text[cut:])
  else:
    found = Vocabulary.from_text(text if vocabulary_from == 'all' else text[:cut])
    train_tokens = found.encode(text[:cut])
    val_tokens = found.encode(
        text[cut:], where=f'{name}: the validation text', offset=cut,
        fix="Build the vocabulary from the whole text (vocabulary_from='all'), use a byte "
            "vocabulary (kind='byte'), or make the training text contain it")
  check_same_vocabulary(vocabulary, found, name)
  data = TextData(name, found, train_tokens, val_tokens, val_fraction, vocabulary_from,
                  found.count_characters(val_tokens))
  if block_size is not None:
    check_lengths(data, block_size)
  return data


def check_lengths(data: TextData, block_size: int) -> None:
  """Each split must hold one window of block_size + 1 tokens (a DataError names the fix)."""
  if block_size < 1:
    raise DataError(f'block_size={block_size} is not positive. Use a positive context length.')
  window = block_size + 1
  if len(data.train_tokens) < window:
    raise DataError(
        f'{data.name}: the training text has {len(data.train_tokens)} tokens, fewer than one '
        f'window of block_size + 1 = {window}. Use a longer text or a smaller block_size.')
  if len(data.val_tokens) < window:
    longer = (f'Raise val_fraction (now {data.val_fraction}), use a longer text'
              if data.val_fraction is not None else 'Write a longer val.bin')
    raise DataError(
        f'{data.name}: the validation text has {len(data.val_tokens)} tokens, fewer than one '
        f'window of block_size + 1 = {window}. {longer}, or a smaller block_size.')


def check_same_vocabulary(stored: Vocabulary | None, found: Vocabulary, name: str) -> None:
  """A DataError if a run's `stored` vocabulary (None: it has none yet) differs from the one
  its data give now (`found`)."""
  if stored is not None and stored != found:
    raise DataError(_changed_vocabulary_message(stored, found, name))


def _changed_vocabulary_message(stored: Vocabulary, found: Vocabulary, name: str) -> str:
  change = ''
  if stored.kind == found.kind == 'char':
    added = ''.join(sorted(set(found.symbols) - set(stored.symbols)))
    removed = ''.join(sorted(set(stored.symbols) - set(found.symbols)))
    change = f' (new characters {added[:20]!r}, missing characters {removed[:20]!r})'
  return (f'{name}: the run\'s stored vocabulary ({stored.kind}, {stored.size} symbols, in '
          f'{VOCABULARY_FILE}) differs from the one the data give now ({found.kind}, '
          f'{found.size} symbols){change}: the text (or the token files\' meta.pkl), the '
          'vocabulary kind, its source or its size changed since the run started. Resume with '
          'the original data, vocabulary, vocabulary_from and vocab_size, or start a new run in '
          'a fresh workdir.')


def _read_textfile(data_dir: str | None) -> tuple[str, str]:
  """(absolute path, text) of a UTF-8 file, or of a folder's *.txt files joined by newlines."""
  if not data_dir:
    raise DataError("dataset='textfile' needs --config.data_dir=FILE_OR_FOLDER: a UTF-8 text "
                    'file, or a folder of *.txt files.')
  path = os.path.abspath(os.path.expanduser(data_dir))
  if not os.path.exists(path):
    raise DataError(f'Text path {path} does not exist. Point --config.data_dir at a UTF-8 '
                    'text file or a folder of *.txt files.')
  if os.path.isdir(path):
    names = sorted(n for n in os.listdir(path)
                   if n.lower().endswith('.txt') and os.path.isfile(os.path.join(path, n)))
    if not names:
      raise DataError(f'Text folder {path} holds no *.txt files. Put the text in .txt files '
                      'there, or point --config.data_dir at a text file.')
    return path, '\n'.join(_read_utf8(os.path.join(path, n)) for n in names)
  return path, _read_utf8(path)


def _read_utf8(path: str) -> str:
  """A file's text, exactly (no newline translation); refuses empty and binary files."""
  try:
    with open(path, 'rb') as f:
      raw = f.read()
  except OSError as e:
    raise DataError(f'Cannot read {path}: {e}. Fix its permissions or remove it.') from e
  if not raw:
    raise DataError(f'{path} is empty. Give a file with text, or remove it from the folder.')
  nul = raw.find(b'\0')
  if nul >= 0:
    raise DataError(f'{path} contains NUL bytes (the first at byte {nul}): a binary file, not '
                    'text. Give a UTF-8 text file.')
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise DataError(f'{path} is not UTF-8 text (byte offset {e.start}: {e.reason}). Convert it '
                    'to UTF-8, e.g. iconv -f LATIN1 -t UTF-8.') from None


def _read_tiny_shakespeare(data_dir: str | None) -> str:
  """tfds tiny_shakespeare's train, validation and test texts joined: char-rnn's input.txt."""
  # TFDS imports TensorFlow: keep it out of runs on local text files.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if data_dir:
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
  try:
    builder = tfds.builder('tiny_shakespeare', data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'Cannot create the TFDS builder for tiny_shakespeare with data_dir '
                    f'{data_dir}: {e}') from e

  def read():
    return ''.join(example['text'].decode('utf-8')
                   for split in ('train', 'validation', 'test')
                   for example in tfds.as_numpy(builder.as_dataset(split=split)))

  if builder.is_prepared():
    return read()
  try:
    # A real unprepared builder fails here at once; tfds.testing.mock_data serves examples.
    return read()
  except Exception:  # pylint: disable=broad-except
    # datasets' probe, so that tests can make both sources offline at once.
    can_reach = image_sources._can_reach  # pylint: disable=protected-access
    if not can_reach(_TFDS_DOWNLOAD_HOST, _NETWORK_PROBE_TIMEOUT_S):
      raise DataError(_offline_message(data_dir, f'cannot reach {_TFDS_DOWNLOAD_HOST[0]}')
                      ) from None
    try:
      builder.download_and_prepare()
      return read()
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(_offline_message(
          data_dir, f'download failed: {type(e).__name__}: {e}')) from e


def _offline_message(data_dir: str | None, reason: str) -> str:
  return (f'Dataset tiny_shakespeare is not prepared in TFDS data dir '
          f'{data_dir or "(TFDS default, ~/tensorflow_datasets)"} and is not available offline '
          f'({reason}). Either prepare it with '
          "`tfds.builder('tiny_shakespeare').download_and_prepare()` on a machine with internet "
          'and point --config.data_dir at that TFDS data dir, or use '
          '--config.dataset=textfile --config.data_dir=FILE with a local copy of the text '
          '(karpathy/char-rnn, data/tinyshakespeare/input.txt).')


# ------------------------------------------------------------------ batches


def train_batch(data: TextData, batch_size: int, block_size: int, seed: int,
                step: int) -> tuple[np.ndarray, np.ndarray]:
  """Step `step`'s batch: (inputs, targets), int32 [batch_size, block_size].

  Window starts are drawn uniformly from [0, len - block_size - 1] (nanoGPT's
  `torch.randint(len(data) - block_size, ...)`) by `np.random.default_rng([seed, step])`;
  targets are the inputs shifted by one token.
  """
  if seed < 0 or step < 0:
    raise ValueError('seed and step must be non-negative.')
  tokens = data.train_tokens
  if len(tokens) < block_size + 1:
    check_lengths(data, block_size)
  starts = np.random.default_rng([seed, step]).integers(
      0, len(tokens) - block_size, size=batch_size)
  windows = windows_at(data, tokens, starts, block_size, 'training')
  return windows[:, :-1], windows[:, 1:]


def windows_at(data: TextData, tokens: np.ndarray, starts: np.ndarray, block_size: int,
               split: str) -> np.ndarray:
  """int32 [len(starts), block_size + 1]: the windows of `tokens` at `starts`. An id outside
  the vocabulary (token files hold any uint16; their loader checks only samples of a large
  training file) is a DataError here, before it reaches the model."""
  windows = np.asarray(tokens[starts[:, None] + np.arange(block_size + 1)], np.int32)
  if windows.size and windows.max() >= data.vocabulary.size:
    row, column = np.argwhere(windows >= data.vocabulary.size)[0]
    raise DataError(
        f'{data.name}: the {split} tokens hold the id {windows[row, column]} at position '
        f'{starts[row] + column:,}, outside the vocabulary of {data.vocabulary.size}. Set '
        '--config.vocab_size above the files\' largest id, or check that they hold uint16 ids '
        "of one tokenizer (nanoGPT's prepare.py).")
  return windows


def train_batches(data: TextData, batch_size: int, block_size: int, seed: int,
                  start_step: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Infinite iterator of `train_batch(..., step)` for step = start_step, start_step + 1, ...;
  a run resumed at step s draws the batches an uninterrupted run draws from step s."""
  check_lengths(data, block_size)
  step = start_step
  while True:
    yield train_batch(data, batch_size, block_size, seed, step)
    step += 1


def eval_windows(num_tokens: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(starts [W], mask [W, block_size]) of the windows that predict each of `num_tokens`
  tokens after the first exactly once.

  Windows of block_size + 1 tokens at stride block_size; if the text does not end on a
  window, one last window ends at the text's end and counts only the targets no earlier
  window predicted (they keep a full window of context).
  """
  if num_tokens < block_size + 1:
    raise ValueError(f'{num_tokens} tokens hold no window of {block_size + 1}.')
  full = (num_tokens - 1) // block_size
  starts = list(range(0, full * block_size, block_size))
  mask = np.ones((full, block_size), bool)
  left = num_tokens - 1 - full * block_size  # targets not predicted yet
  if left:
    starts.append(num_tokens - block_size - 1)
    last = np.zeros((1, block_size), bool)
    last[0, block_size - left:] = True
    mask = np.concatenate([mask, last])
  return np.asarray(starts), mask


def eval_batches(data: TextData, batch_size: int, block_size: int,
                 max_batches: int | None = None
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """The validation text in order: (inputs, targets, mask) batches, int32 [B, T] and bool
  [B, T] (B = batch_size, T = block_size), from `eval_windows`.

  As the image task's `test_batches`, the last batch is zero-padded to batch_size so
  evaluation compiles once; the mask is per target token (False on padding and on the last
  window's already predicted targets): mean nats per token = sum(nll * mask) / sum(mask).
  `max_batches` stops early, covering only the start of the validation text.
  """
  check_lengths(data, block_size)
  starts, mask = eval_windows(len(data.val_tokens), block_size)
  for number, first in enumerate(range(0, len(starts), batch_size)):
    if max_batches is not None and number >= max_batches:
      return
    batch_starts = starts[first:first + batch_size]
    batch_mask = mask[first:first + batch_size]
    windows = windows_at(data, data.val_tokens, batch_starts, block_size, 'validation')
    real = len(batch_starts)
    if real < batch_size:
      windows = np.concatenate([windows, np.zeros((batch_size - real, block_size + 1), np.int32)])
      batch_mask = np.concatenate([batch_mask, np.zeros((batch_size - real, block_size), bool)])
    yield windows[:, :-1], windows[:, 1:], batch_mask
