"""Tests for fdg_jax.data.text_data on small generated texts."""

import numpy as np
import pytest

from fdg_jax.data import image_sources
from fdg_jax.data.image_sources import DataError
from fdg_jax.data import text_data as td

# Every character once in the first 90%, then text using only those characters.
TEXT = ('The quick brown fox jumps over the lazy dog.\nQUEEN: cheers, my heart!\n' * 8
        + 'the dog jumps over the fox.\n' * 3)


@pytest.fixture
def text_file(tmp_path):
  path = tmp_path / 'input.txt'
  path.write_text(TEXT, encoding='utf-8')
  return str(path)


def test_vocabulary_round_trip_and_json(tmp_path):
  char = td.Vocabulary.from_text('hello, wörld\n')
  assert char.symbols == '\n ,dehlorwö' and char.size == 11
  ids = char.encode('hello wörld')
  assert ids.dtype == np.int32 and char.decode(ids) == 'hello wörld'
  assert td.Vocabulary.from_json(char.to_json()) == char
  byte = td.Vocabulary.from_text('anything', kind='byte')
  assert byte.size == 256 and td.Vocabulary.from_json(byte.to_json()) == byte
  assert td.load_vocabulary(str(tmp_path)) is None
  char.save(str(tmp_path))
  assert td.load_vocabulary(str(tmp_path)) == char
  (tmp_path / td.VOCABULARY_FILE).write_text('{"kind": "char"}')
  with pytest.raises(DataError, match='vocabulary.json is not a vocabulary .*KeyError'):
    td.load_vocabulary(str(tmp_path))


def test_char_versus_byte():
  text = 'naïve café'
  char, byte = td.Vocabulary.from_text(text), td.Vocabulary('byte')
  assert len(char.encode(text)) == len(text) == 10
  assert len(byte.encode(text)) == len(text.encode('utf-8')) == 12
  np.testing.assert_array_equal(byte.encode(text), list(text.encode('utf-8')))
  assert byte.decode(byte.encode(text)) == text
  assert byte.decode([0xC3]) == '\ufffd'  # half a character


def test_textfile_split_as_nanogpt(text_file):
  data = td.load_text('textfile', text_file)
  cut = int(len(TEXT) * 0.9)
  assert data.vocabulary == td.Vocabulary.from_text(TEXT[:cut])
  assert data.vocabulary.decode(data.train_tokens) == TEXT[:cut]
  assert data.vocabulary.decode(data.val_tokens) == TEXT[cut:]
  assert data.train_tokens.dtype == data.val_tokens.dtype == np.int32
  quarter = td.load_text('textfile', text_file, val_fraction=0.25)
  assert len(quarter.train_tokens) == int(len(TEXT) * 0.75)
  assert len(quarter.train_tokens) + len(quarter.val_tokens) == len(TEXT)
  byte = td.load_text('textfile', text_file, kind='byte')
  assert len(byte.train_tokens) == cut and byte.vocabulary.size == 256
  assert 'char vocabulary of' in data.description and 'the last 10%' in data.description


def test_folder_of_files_sorted_and_joined(tmp_path):
  folder = tmp_path / 'texts'
  folder.mkdir()
  (folder / 'b.txt').write_text('second file ' * 20)
  (folder / 'a.txt').write_text('first file ' * 20)
  (folder / 'notes.md').write_text('ignored')
  data = td.load_text('textfile', str(folder), val_fraction=0.2)
  text = data.vocabulary.decode(data.train_tokens) + data.vocabulary.decode(data.val_tokens)
  assert text == 'first file ' * 20 + '\n' + 'second file ' * 20


def test_train_windows_in_bounds_and_shifted(text_file):
  data = td.load_text('textfile', text_file)
  block = 16
  inputs, targets = td.train_batch(data, 64, block, seed=3, step=7)
  assert inputs.shape == targets.shape == (64, block) and inputs.dtype == np.int32
  tokens = data.train_tokens
  np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
  starts = np.random.default_rng([3, 7]).integers(0, len(tokens) - block, 64)
  for row, start in enumerate(starts):
    np.testing.assert_array_equal(inputs[row], tokens[start:start + block])
    np.testing.assert_array_equal(targets[row], tokens[start + 1:start + block + 1])
  # Every start, the last one included, is drawable: windows reach the text's end.
  many = np.concatenate([td.train_batch(data, 512, block, 0, s)[1][:, -1] for s in range(4)])
  assert tokens[-1] in many


def test_batches_deterministic_and_resumable(text_file):
  data = td.load_text('textfile', text_file)
  fresh = td.train_batches(data, 4, 8, seed=1)
  first = [next(fresh) for _ in range(6)]
  resumed = td.train_batches(data, 4, 8, seed=1, start_step=4)
  for expected in first[4:]:
    for a, b in zip(next(resumed), expected):
      np.testing.assert_array_equal(a, b)
  assert not np.array_equal(first[0][0], first[1][0])
  other_seed = next(td.train_batches(data, 4, 8, seed=2))
  assert not np.array_equal(other_seed[0], first[0][0])


@pytest.mark.parametrize('num_tokens, block', [(33, 8), (40, 8), (9, 8), (100, 7)])
def test_eval_windows_predict_each_token_once(num_tokens, block):
  starts, mask = td.eval_windows(num_tokens, block)
  counts = np.zeros(num_tokens, int)
  for start, row in zip(starts, mask):
    assert 0 <= start and start + block + 1 <= num_tokens
    counts[start + 1 + np.flatnonzero(row)] += 1
  assert counts[0] == 0 and (counts[1:] == 1).all()


def test_eval_batches_cover_validation_with_mask(tmp_path):
  path = tmp_path / 'input.txt'
  path.write_text(''.join(chr(ord('a') + i % 26) for i in range(1000)))
  data = td.load_text('textfile', str(path))  # 100 validation tokens
  batches = list(td.eval_batches(data, 4, 8))
  # 99 targets: 12 windows of 8 and a last window for the last 3, in 4 batches of 4.
  assert len(batches) == 4
  predicted = []
  for inputs, targets, mask in batches:
    assert inputs.shape == targets.shape == mask.shape == (4, 8) and mask.dtype == bool
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
    predicted.extend(targets[mask].tolist())
  np.testing.assert_array_equal(predicted, data.val_tokens[1:])
  assert not batches[-1][2][1:].any()  # padding rows
  assert len(list(td.eval_batches(data, 4, 8, max_batches=2))) == 2


def test_bad_inputs_give_one_clear_line(tmp_path, text_file):
  with pytest.raises(DataError, match='does not exist'):
    td.load_text('textfile', str(tmp_path / 'missing.txt'))
  empty = tmp_path / 'empty.txt'
  empty.write_text('')
  with pytest.raises(DataError, match='is empty'):
    td.load_text('textfile', str(empty))
  folder = tmp_path / 'no_text'
  folder.mkdir()
  (folder / 'image.png').write_bytes(b'\x89PNG')
  with pytest.raises(DataError, match=r'holds no \*\.txt files'):
    td.load_text('textfile', str(folder))
  binary = tmp_path / 'binary.txt'
  binary.write_bytes(b'text\x00\x01\x02')
  with pytest.raises(DataError, match='NUL bytes .* binary file'):
    td.load_text('textfile', str(binary))
  latin1 = tmp_path / 'latin1.txt'
  latin1.write_bytes('café au lait'.encode('latin-1'))
  with pytest.raises(DataError, match='not UTF-8 text .*byte offset 3'):
    td.load_text('textfile', str(latin1))
  with pytest.raises(DataError, match='validation text has 65 tokens, fewer than one window '
                     r'of block_size \+ 1 = 101. Raise val_fraction'):
    td.load_text('textfile', text_file, block_size=100)
  with pytest.raises(DataError, match='Unknown text dataset'):
    td.load_text('wikitext', text_file)


def test_character_outside_the_training_vocabulary_named_with_position(tmp_path):
  path = tmp_path / 'input.txt'
  text = 'abc\n' * 45 + 'ab\nbZ\n' + 'abc\n' * 4  # validation: 'b\nbZ\nabc...'
  path.write_text(text)
  with pytest.raises(DataError, match=r"validation text has the character 'Z' \(U\+005A\) "
                     r'at its line 2, column 2 \(character 184 of the whole text\).*'
                     r"vocabulary_from='all'.*kind=.byte."):
    td.load_text('textfile', str(path), vocabulary_from='train')
  assert td.load_text('textfile', str(path), kind='byte').val_tokens.size


def test_the_vocabulary_comes_from_the_whole_text_by_default(tmp_path):
  """As nanoGPT's prepare.py: a validation character the training text lacks is in the
  vocabulary, and the text trains as it is."""
  path = tmp_path / 'input.txt'
  text = 'abc\n' * 45 + 'ab\nbZé\n' + 'abc\n' * 4   # 'Z' and 'é' only in the validation text
  path.write_text(text, encoding='utf-8')
  data = td.load_text('textfile', str(path), block_size=4)
  cut = int(len(text) * 0.9)
  assert data.vocabulary == td.Vocabulary.from_text(text) and data.vocabulary.size == 6
  assert data.vocabulary.decode(data.train_tokens) == text[:cut]
  assert data.vocabulary.decode(data.val_tokens) == text[cut:]
  assert '(from the whole text)' in data.description
  # The ids are the sorted characters: where both parts hold the same characters, the two
  # sources give the same vocabulary and tokens.
  same = tmp_path / 'same.txt'
  same.write_text(TEXT, encoding='utf-8')
  whole, train = (td.load_text('textfile', str(same), vocabulary_from=source)
                  for source in td.VOCABULARY_SOURCES)
  assert whole.vocabulary == train.vocabulary
  np.testing.assert_array_equal(whole.train_tokens, train.train_tokens)
  np.testing.assert_array_equal(whole.val_tokens, train.val_tokens)
  assert '(from the training text)' in train.description
  with pytest.raises(DataError, match="Unknown vocabulary source 'val'"):
    td.load_text('textfile', str(same), vocabulary_from='val')


def test_changed_vocabulary_on_resume(tmp_path, text_file):
  stored = td.load_text('textfile', text_file).vocabulary
  stored.save(str(tmp_path))
  same = td.load_text('textfile', text_file, vocabulary=td.load_vocabulary(str(tmp_path)))
  assert same.vocabulary == stored
  changed = tmp_path / 'changed.txt'
  changed.write_text(TEXT.replace('z', 'Z'))
  with pytest.raises(DataError, match=f'stored vocabulary \\(char, {stored.size} symbols.*'
                     f"give now \\(char, {stored.size} symbols\\) \\(new characters 'Z', "
                     "missing characters 'z'\\).*start a new run in a fresh workdir"):
    td.load_text('textfile', str(changed), vocabulary=stored)
  with pytest.raises(DataError, match=f'{stored.size} symbols.*byte, 256 symbols'):
    td.load_text('textfile', text_file, kind='byte', vocabulary=stored)


def _splits_as_dataset(texts):
  def as_dataset(self, split, **kwargs):
    del self, kwargs
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return tf.data.Dataset.from_tensor_slices({'text': [texts[split]]})
  return as_dataset


def test_tiny_shakespeare_through_tfds_mock(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  # As the real builder: one text per split, train the first 90%, then validation and test.
  texts = {'train': 'First Citizen:\n' * 18, 'validation': 'Citizens: interest\n',
           'test': 'First: nits\n'}
  with tfds.testing.mock_data(as_dataset_fn=_splits_as_dataset(texts)):
    data = td.load_text('tiny_shakespeare', str(tmp_path))
  whole = texts['train'] + texts['validation'] + texts['test']
  cut = int(len(whole) * 0.9)
  assert data.name == 'tiny_shakespeare'
  assert data.vocabulary.decode(data.train_tokens) == whole[:cut]
  # tfds's default mock: random texts of lowercase letters and spaces in every split.
  with tfds.testing.mock_data(num_examples=20):
    mocked = td.load_text('tiny_shakespeare', None, kind='byte', block_size=8)
  assert len(mocked.train_tokens) > 8 and len(mocked.val_tokens) > 8


def test_tiny_shakespeare_offline_gives_data_error(tmp_path, monkeypatch):
  pytest.importorskip('tensorflow_datasets')
  monkeypatch.setattr(image_sources, '_can_reach', lambda *args: False)
  with pytest.raises(DataError, match='not available offline.*--config.dataset=textfile'):
    td.load_text('tiny_shakespeare', str(tmp_path / 'tfds'))
