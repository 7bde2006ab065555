"""nanoGPT's prepared token files: train.bin and val.bin (uint16 token ids), and meta.pkl.

nanoGPT's prepare.py scripts (data/shakespeare_char, data/shakespeare, data/openwebtext) write
each split's token ids as raw uint16, native byte order (`np.array(ids, np.uint16).tofile(...)`
or a `np.memmap(..., mode='w+')`), and data/shakespeare_char also a pickle, meta.pkl:
`{'vocab_size': int, 'itos': {id: str}, 'stoi': {str: id}}`. Its train.py reads the .bin files
by memory map (`np.memmap(path, dtype=np.uint16, mode='r')`), so a corpus larger than memory
trains; so does `load_token_files`, and the batches (`text_data.train_batch`, `eval_batches`)
copy out only their windows.

meta.pkl is read by an unpickler that builds plain values only (dicts, lists, tuples, strings,
numbers): it refuses any class or function, so a pickle cannot run code here; nanoGPT's meta.pkl
needs none. Its itos gives the ids their text (samples, prompts, characters per token: bits per
character); without meta.pkl the ids have no text and the run reports bits per token only.

The model's output size is `vocab_size` (nanoGPT pads GPT-2's 50,257 ids to 50,304), or
meta.pkl's vocab_size when it is 0. Ids at or above it are refused: the whole validation file
and evenly spaced samples of the training file at load time, and every batch's windows as they
are drawn (`text_data.windows_at`), so a bad id never reaches the model.
"""

from __future__ import annotations

import io
import os
import pickle

import numpy as np

from fdg_jax.data import DataError
from fdg_jax.data import text_data

DATASET = 'tokens'
TRAIN_FILE, VAL_FILE, META_FILE = 'train.bin', 'val.bin', 'meta.pkl'
TOKEN_DTYPE = np.uint16
# A nanoGPT meta.pkl is a few kilobytes; a larger one is not one.
_META_MAX_BYTES = 64 << 20
# The training file's ids checked at load time: this many evenly spaced runs of this many ids.
_SAMPLE_RUNS, _SAMPLE_RUN_LENGTH = 64, 16384


class _PlainUnpickler(pickle.Unpickler):
  """Builds only what pickle's own opcodes make (dict, list, tuple, set, str, bytes, numbers,
  booleans, None): every class or function a pickle names is refused."""

  def find_class(self, module, name):
    raise pickle.UnpicklingError(f'it names {module}.{name}')


def read_meta(path: str) -> dict:
  """The plain fields of nanoGPT's meta.pkl at `path`; a DataError, in one line, if it holds
  anything else or is not a pickle of a dict."""
  size = os.path.getsize(path)
  if size > _META_MAX_BYTES:
    raise DataError(f'{path} has {size:,} bytes, not a nanoGPT meta.pkl (a few kilobytes). '
                    f'Remove it, or give a meta.pkl of vocab_size, itos and stoi.')
  with open(path, 'rb') as f:
    raw = f.read()
  try:
    meta = _PlainUnpickler(io.BytesIO(raw)).load()
  except Exception as e:  # pylint: disable=broad-except  # any malformed pickle
    raise DataError(
        f'{path}: refused to unpickle it ({type(e).__name__}: {e}): only plain values (dicts, '
        'lists, strings, numbers) are read, as nanoGPT writes them. Write it again with plain '
        'fields (vocab_size, itos, stoi), or remove it and set --config.vocab_size.') from None
  if not isinstance(meta, dict):
    raise DataError(f'{path} holds a {type(meta).__name__}, not the dict nanoGPT writes. Write '
                    'it as {vocab_size, itos, stoi}, or remove it and set --config.vocab_size.')
  return meta


def vocabulary_of(meta: dict, vocab_size: int, path: str) -> text_data.Vocabulary:
  """The ids vocabulary of `vocab_size` ids (0: meta.pkl's vocab_size) and meta.pkl's itos."""
  meta_size = meta.get('vocab_size', 0)
  if type(meta_size) is not int or meta_size < 0:   # pylint: disable=unidiomatic-typecheck
    raise DataError(f"{path}: its vocab_size {meta_size!r} is not a count of ids. Fix it, or "
                    'remove meta.pkl and set --config.vocab_size.')
  itos = meta.get('itos', {})
  if (not isinstance(itos, dict) or set(itos) != set(range(len(itos)))
      or not all(isinstance(text, str) for text in itos.values())):
    raise DataError(f'{path}: its itos is not a dict of the ids 0, 1, ... to their strings. '
                    'Fix it, or remove meta.pkl (the ids then have no text).')
  stoi = meta.get('stoi')
  if stoi is not None and stoi != {text: index for index, text in itos.items()}:
    raise DataError(f'{path}: its stoi is not the inverse of its itos. Write meta.pkl again '
                    "with nanoGPT's prepare.py.")
  needed = max(meta_size, len(itos))
  if not vocab_size and not needed:
    raise DataError(f'{path} gives no vocab_size. Set --config.vocab_size to the number of '
                    'ids (e.g. 50304 for GPT-2 ids, as nanoGPT pads 50257).')
  if vocab_size and vocab_size < needed:
    raise DataError(f'config.vocab_size={vocab_size} is below the {needed} ids of {path}: the '
                    f'model needs an output for each. Set --config.vocab_size={needed} or more '
                    "(0 takes meta.pkl's).")
  return text_data.Vocabulary('ids', itos=tuple(itos[i] for i in range(len(itos))),
                              num_ids=vocab_size or needed)


def open_tokens(path: str) -> np.ndarray:
  """A read-only uint16 memory map of a token file; a DataError if it is missing, empty or not
  whole uint16 ids."""
  if not os.path.isfile(path):
    raise DataError(f'{path} does not exist. A token folder holds {TRAIN_FILE} and '
                    f"{VAL_FILE}, as nanoGPT's prepare.py writes them.")
  size = os.path.getsize(path)
  if size == 0:
    raise DataError(f'{path} is empty. Write its token ids again (nanoGPT\'s prepare.py).')
  if size % np.dtype(TOKEN_DTYPE).itemsize:
    raise DataError(f'{path} has {size:,} bytes, an odd number: not uint16 token ids. Write '
                    "them as nanoGPT's prepare.py does (np.array(ids, np.uint16).tofile).")
  return np.memmap(path, dtype=TOKEN_DTYPE, mode='r')


def check_ids(tokens: np.ndarray, num_ids: int, path: str, ids: str, *,
              sampled: bool = False) -> None:
  """A DataError naming the first id of `tokens` at or above `num_ids` (`ids` says what they
  are): all of them, or (`sampled`) evenly spaced runs of them, cheap on a file larger than
  memory."""
  runs = [(0, len(tokens))]
  if sampled and len(tokens) > _SAMPLE_RUNS * _SAMPLE_RUN_LENGTH:
    firsts = np.linspace(0, len(tokens) - _SAMPLE_RUN_LENGTH, _SAMPLE_RUNS).astype(np.int64)
    runs = [(int(first), _SAMPLE_RUN_LENGTH) for first in firsts]
  for first, length in runs:
    run = tokens[first:first + length]
    if run.max() >= num_ids:
      position = first + int(np.argmax(run >= num_ids))
      raise DataError(
          f'{path} holds the id {int(tokens[position])} at position {position:,}, outside '
          f'{ids}. Set --config.vocab_size above its largest id (without meta.pkl), or check '
          "that the files hold uint16 ids of one tokenizer (nanoGPT's prepare.py).")


def load_token_files(data_dir: str | None, vocab_size: int = 0,
                     vocabulary: text_data.Vocabulary | None = None,
                     block_size: int | None = None) -> text_data.TextData:
  """nanoGPT's token files in the folder `data_dir`, memory-mapped, as `TextData` of an 'ids'
  vocabulary (`vocabulary_of`); `vocabulary` is the run's stored one (resume, evaluation),
  which the files must give again; `block_size` as `text_data.load_text`'s."""
  if not data_dir:
    raise DataError(f"dataset='{DATASET}' needs --config.data_dir=FOLDER holding {TRAIN_FILE} "
                    f"and {VAL_FILE} (uint16 token ids, as nanoGPT's prepare.py writes them).")
  folder = os.path.abspath(os.path.expanduser(data_dir))
  if not os.path.isdir(folder):
    raise DataError(f'{folder} is not a folder. Point --config.data_dir at the folder of '
                    f'{TRAIN_FILE} and {VAL_FILE}.')
  meta_path = os.path.join(folder, META_FILE)
  meta = read_meta(meta_path) if os.path.exists(meta_path) else {}
  found = vocabulary_of(meta, vocab_size, meta_path)
  train_path, val_path = (os.path.join(folder, name) for name in (TRAIN_FILE, VAL_FILE))
  train_tokens, val_tokens = open_tokens(train_path), open_tokens(val_path)
  # The ids must have text where meta.pkl gives it, and a place in the model in any case.
  known, ids = ((len(found.itos), f"the {len(found.itos)} ids {META_FILE}'s itos names")
                if found.itos else (found.num_ids, f'the {found.num_ids} ids of the model'))
  check_ids(val_tokens, known, val_path, ids)
  check_ids(train_tokens, known, train_path, ids, sampled=True)
  name = f'{DATASET}:{os.path.basename(folder)}'   # no machine path in records
  text_data.check_same_vocabulary(vocabulary, found, name)
  data = text_data.TextData(name, found, train_tokens, val_tokens, None,
                            val_characters=found.count_characters(val_tokens))
  if block_size is not None:
    text_data.check_lengths(data, block_size)
  return data
