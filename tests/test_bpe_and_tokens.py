"""Byte-level BPE vocabularies and nanoGPT's token files (issue 37, items 4 and 5): the
vocabulary itself, the files as nanoGPT's prepare.py writes them, what is refused and how, and
(slow) runs through the trainer: bits per character, samples, bit-exact resumes, and a run on
token files that equals the run on their text."""

import json
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from experiments.lm import prepare_char_tokens
from fdg_jax import data
from fdg_jax.data import text_data
from fdg_jax.data import token_files
from fdg_jax.tasks import language_model
from fdg_jax.trainer import train
from test_language_model import REPO, TINY, tiny_config, write_text

UNICODE = 'naïve café — 日本語\n\n\tand  spaces  \r\n'


def bpe_data(tmp_path, vocab_size=300, **kwargs):
  return text_data.load_text('textfile', write_text(tmp_path / 'text.txt'), kind='bpe',
                             vocab_size=vocab_size, **kwargs)


def token_folder(tmp_path, name='tokens'):
  """The tests' text and its nanoGPT shakespeare_char token files; (text path, folder)."""
  text = write_text(tmp_path / 'text.txt')
  folder = str(tmp_path / name)
  with open(text, encoding='utf-8') as f:
    prepare_char_tokens.prepare(f.read(), folder)
  return text, folder


def write_meta(folder, meta):
  with open(os.path.join(folder, token_files.META_FILE), 'wb') as f:
    pickle.dump(meta, f)


# ------------------------------------------------------------------ BPE


def test_bpe_decodes_to_the_text_trains_the_same_twice_and_is_stored(tmp_path):
  text = open(write_text(tmp_path / 'text.txt'), encoding='utf-8').read() + UNICODE
  bpe = text_data.Vocabulary.from_text(text, 'bpe', 300)
  assert bpe.kind == 'bpe' and bpe.size == 300
  for sample in (text, UNICODE, 'words it never saw: zebra, yak, Ωmega'):
    ids = bpe.encode(sample)
    assert ids.dtype == np.int32 and ids.max() < bpe.size
    assert bpe.decode(ids) == sample
  assert len(bpe.encode(text)) < len(text) / 2   # merges: fewer tokens than characters
  assert text_data.Vocabulary.from_text(text, 'bpe', 300) == bpe   # deterministic
  assert text_data.Vocabulary.from_text(text, 'bpe', 280) != bpe
  assert text_data.Vocabulary.from_json(bpe.to_json()) == bpe
  assert json.loads(bpe.to_json())['tokenizer']['model']['type'] == 'BPE'   # readable JSON
  bpe.save(str(tmp_path))
  stored = text_data.load_vocabulary(str(tmp_path))
  assert stored == bpe and stored.encode(text).tolist() == bpe.encode(text).tolist()
  assert bpe.count_characters(bpe.encode(UNICODE)) == len(UNICODE)
  with pytest.raises(data.DataError, match='smaller than its 256 bytes'):
    text_data.Vocabulary.from_text(text, 'bpe', 255)
  with pytest.raises(data.DataError, match='A byte vocabulary has no tokenizer'):
    text_data.Vocabulary('byte', tokenizer=bpe.tokenizer)


def test_bpe_splits_the_characters_and_counts_characters_per_token(tmp_path):
  loaded = bpe_data(tmp_path)
  text = (tmp_path / 'text.txt').read_text(encoding='utf-8')
  cut = int(len(text) * 0.9)
  # Trained on the training text only, each part encoded by itself.
  assert loaded.vocabulary == text_data.Vocabulary.from_text(text[:cut], 'bpe', 300)
  assert loaded.vocabulary.decode(loaded.train_tokens) == text[:cut]
  assert loaded.vocabulary.decode(loaded.val_tokens) == text[cut:]
  assert loaded.val_characters == len(text) - cut
  assert loaded.chars_per_token == pytest.approx((len(text) - cut) / len(loaded.val_tokens))
  assert loaded.chars_per_token > 1.5
  assert 'byte-level BPE of 300 tokens' in loaded.description
  assert f'{loaded.chars_per_token:.3f} characters per token' in loaded.description
  # Char and byte vocabularies: one character per token, and characters per byte.
  assert text_data.load_text('textfile', str(tmp_path / 'text.txt')).chars_per_token == 1
  # Bytes 135 to 149 of 150: a continuation byte, then 7 two-byte characters.
  (tmp_path / 'accents.txt').write_text('e' * 50 + 'é' * 50, encoding='utf-8')
  byte = text_data.load_text('textfile', str(tmp_path / 'accents.txt'), kind='byte')
  assert byte.val_characters == 7 and len(byte.val_tokens) == 15
  # A resume encodes with the stored BPE as it is; another kind stored is a changed vocabulary.
  other = text_data.Vocabulary.from_text('another text entirely, another text', 'bpe', 260)
  resumed = bpe_data(tmp_path, vocabulary=other)
  assert resumed.vocabulary is other
  assert resumed.train_tokens.tolist() == other.encode(text[:cut]).tolist()
  char = text_data.Vocabulary.from_text(text)
  with pytest.raises(data.DataError, match=r'stored vocabulary \(char, .*\(bpe, 300 symbols'):
    bpe_data(tmp_path, vocabulary=char)


# ------------------------------------------------------------------ token files


def test_token_files_of_nanogpt_prepare_give_the_text_batches(tmp_path):
  """The files of nanoGPT's shakespeare_char/prepare.py logic: uint16 ids of the sorted
  characters, split 90/10, meta.pkl's itos; read by memory map, they give the text's batches."""
  text_path, folder = token_folder(tmp_path)
  text = (tmp_path / 'text.txt').read_text(encoding='utf-8')
  char = text_data.load_text('textfile', text_path)
  cut = int(len(text) * 0.9)
  with open(os.path.join(folder, 'train.bin'), 'rb') as f:   # the bytes nanoGPT writes
    assert f.read() == char.vocabulary.encode(text[:cut]).astype('<u2').tobytes()
  tokens = token_files.load_token_files(folder, block_size=16)
  assert isinstance(tokens.train_tokens, np.memmap) and tokens.train_tokens.dtype == np.uint16
  assert tokens.vocabulary.kind == 'ids' and tokens.vocabulary.size == char.vocabulary.size
  assert ''.join(tokens.vocabulary.itos) == char.vocabulary.symbols
  assert tokens.vocabulary.decode(tokens.val_tokens) == text[cut:]
  assert tokens.chars_per_token == 1 and tokens.val_fraction is None
  assert tokens.name == 'tokens:tokens' and '(val.bin)' in tokens.description
  for step in (0, 7):
    for a, b in zip(text_data.train_batch(tokens, 4, 16, 3, step),
                    text_data.train_batch(char, 4, 16, 3, step)):
      assert a.dtype == np.int32 and type(a) is np.ndarray
      np.testing.assert_array_equal(a, b)
  for a, b in zip(text_data.eval_batches(tokens, 8, 16), text_data.eval_batches(char, 8, 16)):
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x, y)
  assert tokens.vocabulary.encode('Kings.').tolist() == char.vocabulary.encode('Kings.').tolist()
  # The model may be wider than meta.pkl's ids (nanoGPT pads); the vocabulary is stored.
  padded = token_files.load_token_files(folder, vocab_size=64)
  assert padded.vocabulary.size == 64 and padded.vocabulary.decode([63]) == '\ufffd'
  padded.vocabulary.save(str(tmp_path))
  assert text_data.load_vocabulary(str(tmp_path)) == padded.vocabulary
  with pytest.raises(data.DataError, match=r'stored vocabulary \(ids, 64 symbols.*\(ids, 41'):
    token_files.load_token_files(folder, vocabulary=padded.vocabulary)


def test_meta_pkl_builds_plain_values_only(tmp_path):
  """A pickle that names any class or function is refused before it can run code."""
  _, folder = token_folder(tmp_path)
  marker = tmp_path / 'ran'

  class RunsCode:   # what a malicious pickle does: a callable with arguments
    def __reduce__(self):
      return (open, (str(marker), 'w'))

  write_meta(folder, {'vocab_size': 41, 'itos': {}, 'payload': RunsCode()})
  with pytest.raises(data.DataError, match=r'meta.pkl: refused to unpickle it \(Unpickling'
                     r'Error: it names (io|builtins|_io)\.open\): only plain values'):
    token_files.load_token_files(folder)
  assert not marker.exists()
  write_meta(folder, {'vocab_size': np.int64(41)})   # numpy scalars are classes too
  with pytest.raises(data.DataError, match='it names numpy'):
    token_files.load_token_files(folder)
  write_meta(folder, [41])
  with pytest.raises(data.DataError, match='holds a list, not the dict nanoGPT writes'):
    token_files.load_token_files(folder)
  itos = {i: c for i, c in enumerate(sorted(set((tmp_path / 'text.txt').read_text())))}
  write_meta(folder, {'vocab_size': len(itos), 'itos': itos, 'stoi': {'a': 0}})
  with pytest.raises(data.DataError, match='stoi is not the inverse of its itos'):
    token_files.load_token_files(folder)
  write_meta(folder, {'vocab_size': len(itos), 'itos': {1: 'a'}})
  with pytest.raises(data.DataError, match='itos is not a dict of the ids 0, 1'):
    token_files.load_token_files(folder)
  write_meta(folder, {'vocab_size': 'many'})
  with pytest.raises(data.DataError, match="vocab_size 'many' is not a count of ids"):
    token_files.load_token_files(folder)
  # Plain fields nanoGPT did not write are ignored.
  write_meta(folder, {'vocab_size': len(itos), 'itos': itos, 'note': ('a', 1, 2.0, None)})
  assert token_files.load_token_files(folder).vocabulary.itos == tuple(itos.values())


def test_bad_token_files_give_one_line(tmp_path):
  _, folder = token_folder(tmp_path)
  train_path, val_path = (os.path.join(folder, n) for n in ('train.bin', 'val.bin'))
  good_val = open(val_path, 'rb').read()
  with pytest.raises(data.DataError, match="dataset='tokens' needs --config.data_dir=FOLDER"):
    token_files.load_token_files('')
  with pytest.raises(data.DataError, match='is not a folder'):
    token_files.load_token_files(str(tmp_path / 'text.txt'))
  os.remove(val_path)
  with pytest.raises(data.DataError, match=r'val.bin does not exist. A token folder holds'):
    token_files.load_token_files(folder)
  open(val_path, 'wb').write(good_val + b'\x00')
  with pytest.raises(data.DataError, match=r"val.bin has 2,387 bytes, an odd number: not uint16"):
    token_files.load_token_files(folder)
  open(val_path, 'wb').write(b'')
  with pytest.raises(data.DataError, match='val.bin is empty'):
    token_files.load_token_files(folder)
  open(val_path, 'wb').write(good_val[:20])
  with pytest.raises(data.DataError, match='validation text has 10 tokens, fewer than one window '
                     r'of block_size \+ 1 = 17. Write a longer val.bin'):
    token_files.load_token_files(folder, block_size=16)
  bad = np.frombuffer(good_val, np.uint16).copy()
  bad[100] = 41   # one past meta.pkl's ids
  bad.tofile(val_path)
  with pytest.raises(data.DataError, match=r"val.bin holds the id 41 at position 100, outside "
                     r"the 41 ids meta.pkl's itos names"):
    token_files.load_token_files(folder, vocab_size=64)
  open(val_path, 'wb').write(good_val)
  with pytest.raises(data.DataError, match=r'config.vocab_size=40 is below the 41 ids of .*'
                     r'meta.pkl.*Set --config.vocab_size=41 or more'):
    token_files.load_token_files(folder, vocab_size=40)
  os.remove(os.path.join(folder, 'meta.pkl'))
  with pytest.raises(data.DataError, match=r'meta.pkl gives no vocab_size. Set '
                     r'--config.vocab_size .*50304'):
    token_files.load_token_files(folder)
  # A training file larger than the load-time sample: ids between the sampled runs are caught
  # by the batch that draws them, before the model sees them.
  big = np.zeros(65 * 16384 + 5, np.uint16)
  big[len(big) // 2 + 7] = 50
  big.tofile(train_path)
  loaded = token_files.load_token_files(folder, vocab_size=50)
  start = np.asarray([len(big) // 2])
  with pytest.raises(data.DataError, match=r'tokens:tokens: the training tokens hold the id 50 '
                     r'at position 532,489, outside the vocabulary of 50'):
    text_data.windows_at(loaded, loaded.train_tokens, start, 16, 'training')
  big[:10] = 60   # at the start: a sampled run
  big.tofile(train_path)
  with pytest.raises(data.DataError, match=r'train.bin holds the id 60 at position 0, outside '
                     r'the 50 ids of the model'):
    token_files.load_token_files(folder, vocab_size=50)


def test_token_files_without_meta_have_ids_and_no_characters(tmp_path):
  _, folder = token_folder(tmp_path)
  os.remove(os.path.join(folder, 'meta.pkl'))
  loaded = token_files.load_token_files(folder, vocab_size=50)
  vocabulary = loaded.vocabulary
  assert vocabulary.size == 50 and not vocabulary.has_text and loaded.chars_per_token is None
  assert 'no meta.pkl itos: their text is not known' in loaded.description
  assert vocabulary.decode([3, 14, 0]) == '3 14 0'
  assert vocabulary.encode(' 3 14\n').tolist() == [3, 14]
  assert vocabulary.encode('\n').tolist() == [0]   # the training-time samples' default prompt
  with pytest.raises(data.DataError, match='decimal ids below 50'):
    vocabulary.encode('Kings')
  task = language_model.LanguageModel(tiny_config(folder, dataset='tokens', vocab_size=50))
  assert task.validate() == []
  task.load_data()
  result = {'loss': 2.0, 'accuracy': 0.5}
  assert task.eval_line(result) == (
      'val loss 2.0000  2.885 bits per token (no characters: the ids have no text)  perplexity '
      '7.39  token accuracy 0.500')
  assert task.eval_record(result)['val_bits_per_char'] is None
  summary = task.summary_fields(loaded, result, 1000.0)
  assert summary['val_bits_per_char'] is None and summary['val_chars_per_token'] is None
  assert summary['vocabulary'] == 'ids' and summary['vocabulary_size'] == 50


def test_bits_per_character_in_the_log_and_summary(tmp_path):
  """Bits per character = nats per token / ln 2 / characters per token, for every kind."""
  result = {'loss': 2.0, 'accuracy': 0.5}
  bits = 2.0 / math.log(2)
  task = language_model.LanguageModel(tiny_config(write_text(tmp_path / 'text.txt')))
  loaded = task.load_data()
  assert task.eval_line(result) == (f'val loss 2.0000  {bits:.3f} bits per character  '
                                    'perplexity 7.39  token accuracy 0.500')
  task = language_model.LanguageModel(tiny_config(str(tmp_path / 'text.txt'),
                                                  vocabulary='bpe', vocab_size=300))
  loaded = task.load_data()
  chars = loaded.chars_per_token
  assert task.eval_line(result) == (
      f'val loss 2.0000  {bits / chars:.3f} bits per character ({bits:.3f} bits per token, '
      f'{chars:.3f} characters per token)  perplexity 7.39  token accuracy 0.500')
  summary = task.summary_fields(loaded, result, 1000.0)
  assert summary['val_bits_per_token'] == pytest.approx(bits)
  assert summary['val_chars_per_token'] == chars
  assert summary['val_bits_per_char'] == pytest.approx(bits / chars)
  assert task.eval_record(result)['val_bits_per_char'] == summary['val_bits_per_char']
  (tmp_path / 'accents.txt').write_text('e' * 50 + 'é' * 50, encoding='utf-8')
  task = language_model.LanguageModel(tiny_config(str(tmp_path / 'accents.txt'),
                                                  vocabulary='byte', block_size=4))
  task.load_data()
  assert f'{bits / (7 / 15):.3f} bits per character ({bits:.3f} bits per byte, 0.467 ' \
         'characters per byte)' in task.eval_line(result)


def test_config_checks_of_vocab_size_and_token_folders(tmp_path):
  text = write_text(tmp_path / 'text.txt')
  def problems(**fields):
    return language_model.LanguageModel(tiny_config(text, **fields)).validate()
  assert problems(vocabulary='bpe', vocab_size=512) == []
  assert problems(vocabulary='bpe') == [
      "config.vocab_size: 0 is below a byte-level BPE's 256 bytes. Set "
      '--config.vocab_size=512 (or more).']
  assert problems(vocab_size=100) == [
      'config.vocab_size: a char vocabulary has the size of its text (or 256). Leave it 0 (it '
      "sizes 'bpe' vocabularies and dataset='tokens')."]
  assert problems(dataset='tokens') == [
      f"config.data_dir: dataset='tokens' needs a folder, not {text!r}. Set --config.data_dir "
      "to the folder of train.bin and val.bin (nanoGPT's prepare.py output)."]
  assert problems(dataset='tokens', data_dir=str(tmp_path), vocabulary='bpe',
                  vocab_size=512) == [
      "config.vocabulary: 'bpe' does not apply to dataset='tokens' (the files hold the ids; "
      "meta.pkl, if any, their text). Leave it 'char'."]
  assert problems(dataset='tokens', data_dir=str(tmp_path), vocab_size=-1) == [
      'config.vocab_size: -1 is negative. Use 0 or more.']
  assert 'tokens' in language_model.LanguageModel.DATASETS


def test_old_vocabulary_files_still_load(tmp_path):
  """vocabulary.json as runs before BPE and token files wrote it."""
  (tmp_path / text_data.VOCABULARY_FILE).write_text(
      '{"kind": "char", "size": 3, "symbols": "\\nab"}', encoding='utf-8')
  assert text_data.load_vocabulary(str(tmp_path)) == text_data.Vocabulary('char', '\nab')
  (tmp_path / text_data.VOCABULARY_FILE).write_text(
      '{"kind": "byte", "size": 256, "symbols": ""}', encoding='utf-8')
  assert text_data.load_vocabulary(str(tmp_path)) == text_data.Vocabulary('byte')
  assert text_data.Vocabulary('char', '\nab').to_json() == (
      '{"kind": "char", "size": 3, "symbols": "\\nab"}')


# ------------------------------------------------------------------ through the trainer


@pytest.mark.slow
def test_cli_trains_a_bpe_model_and_samples_it(tmp_path):
  text = write_text(tmp_path / 'text.txt')
  workdir = tmp_path / 'run'
  fields = {**TINY, 'data_dir': text, 'num_train_steps': 12, 'lr_decay_steps': 12,
            'eval_every_steps': 6, 'vocabulary': 'bpe', 'vocab_size': 300}
  result = subprocess.run(
      [sys.executable, '-m', 'fdg_jax.main', '--config=configs/shakespeare_char_cpu.py',
       f'--workdir={workdir}', *[f'--config.{k}={v}' for k, v in fields.items()]],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['vocabulary'] == 'bpe' and summary['vocabulary_size'] == 300
  chars = summary['val_chars_per_token']
  assert chars > 1.5
  assert summary['val_bits_per_char'] == pytest.approx(summary['val_loss'] / math.log(2) / chars)
  assert summary['history'][-1]['val_bits_per_char'] == summary['val_bits_per_char']
  assert summary['val_loss'] < math.log(300)
  stored = text_data.load_vocabulary(str(workdir))
  assert stored.kind == 'bpe' and stored.size == 300
  console = result.stdout + result.stderr
  assert f'bits per character ({summary["val_bits_per_token"]:.3f} bits per token, ' \
         f'{chars:.3f} characters per token)' in console
  assert 'byte-level BPE of 300 tokens' in console
  sampled = subprocess.run(
      [sys.executable, '-m', 'fdg_jax.sample', f'--workdir={workdir}', '--start=The quick ',
       '--num_samples=1', '--max_new_tokens=20'], cwd=REPO, capture_output=True, text=True,
      timeout=600)
  assert sampled.returncode == 0, sampled.stderr[-3000:]
  assert sampled.stdout.startswith('The quick ')
  assert len(sampled.stdout) > len('The quick ') + 20   # tokens of several characters


@pytest.mark.slow
def test_bpe_and_token_file_runs_resume_bit_for_bit(tmp_path):
  text, folder = token_folder(tmp_path)
  for name, path, fields in (('bpe', text, dict(vocabulary='bpe', vocab_size=300)),
                             ('tokens', folder, dict(dataset='tokens'))):
    straight = train.train_and_evaluate(tiny_config(path, steps=12, method='bp', **fields),
                                        str(tmp_path / f'{name}_straight'))
    first = tiny_config(path, steps=6, method='bp', **fields)
    first.lr_decay_steps = 12   # the same schedule as the straight run
    train.train_and_evaluate(first, str(tmp_path / f'{name}_resumed'))
    resumed = train.train_and_evaluate(tiny_config(path, steps=12, method='bp', **fields),
                                       str(tmp_path / f'{name}_resumed'))
    assert resumed['resumed_from_step'] == 6
    assert resumed['params_digest'] == straight['params_digest']
    assert resumed['val_loss'] == straight['val_loss']


@pytest.mark.slow
def test_a_run_on_nanogpt_token_files_equals_the_run_on_their_text(tmp_path):
  """nanoGPT's shakespeare_char files of a text train FDG K = 2 exactly as the text does: the
  same ids, batches and evaluation windows, so the same weights and loss."""
  text, folder = token_folder(tmp_path)
  from_text = train.train_and_evaluate(tiny_config(text, steps=8), str(tmp_path / 'text_run'))
  from_files = train.train_and_evaluate(tiny_config(folder, steps=8, dataset='tokens'),
                                        str(tmp_path / 'files_run'))
  assert from_files['params_digest'] == from_text['params_digest']
  assert from_files['val_loss'] == from_text['val_loss']
  assert from_files['val_bits_per_char'] == from_text['val_bits_per_char']
  assert from_files['vocabulary'] == 'ids' and from_files['dataset'] == 'tokens:tokens'
  assert from_files['sample'] == from_text['sample']   # meta.pkl's itos decodes the samples
