"""Tests for fdg_jax.input_pipeline on tiny generated data."""

import os
import pickle
import tarfile
import threading
import time

import jax
import numpy as np
from PIL import Image
import pytest

from fdg_jax import input_pipeline as ip

CLASSES = ('ant', 'bee', 'cat')
NUM_TRAIN_PER_CLASS = 6
NUM_TEST_PER_CLASS = 2


def _write_image(path, label, index, size):
  """A noisy image whose dominant channel is `label` (checks the labels)."""
  rng = np.random.default_rng([label, index, size])
  pixels = rng.integers(0, 60, (size, size, 3))
  pixels[..., label] += 180
  Image.fromarray(pixels.astype(np.uint8)).save(path, quality=95)


def _make_tree(root, classes=CLASSES):
  """train/ and test/ folders of PNG and JPEG images, some 40x40."""
  for split, count in (('train', NUM_TRAIN_PER_CLASS),
                       ('test', NUM_TEST_PER_CLASS)):
    for label, name in enumerate(classes):
      folder = os.path.join(root, split, name)
      os.makedirs(folder)
      for i in range(count):
        ext = ('.png', '.JPG', '.jpeg')[i % 3]  # Extensions in any case.
        size = 40 if i % 2 else 32
        _write_image(os.path.join(folder, f'{i:02d}{ext}'), label, i, size)
  return str(root)


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
  # Nothing may be written to the home directory.
  monkeypatch.setenv('FDG_JAX_CACHE', str(tmp_path / 'default_cache'))


@pytest.fixture
def tree(tmp_path):
  return _make_tree(tmp_path / 'data')


@pytest.fixture
def cache_dir(tmp_path):
  return str(tmp_path / 'cache')


@pytest.fixture
def ds(tree, cache_dir):
  return ip.load_dataset('imagefolder', tree, cache_dir=cache_dir)


def test_imagefolder_shapes_dtypes_labels(ds, tree):
  n, m = NUM_TRAIN_PER_CLASS * 3, NUM_TEST_PER_CLASS * 3
  assert ds.train_images.shape == (n, 32, 32, 3)
  assert ds.test_images.shape == (m, 32, 32, 3)
  assert ds.train_images.dtype == np.uint8
  assert ds.train_labels.dtype == ds.test_labels.dtype == np.int32
  assert ds.num_classes == 3 and ds.class_names == CLASSES
  assert ds.name == f'imagefolder:{os.path.abspath(tree)}'
  for images, labels in ((ds.train_images, ds.train_labels),
                         (ds.test_images, ds.test_labels)):
    np.testing.assert_array_equal(images.mean(axis=(1, 2)).argmax(-1), labels)
  flat = ds.train_images.reshape(-1, 3) / 255.0
  np.testing.assert_allclose(ds.mean, flat.mean(0), atol=1e-6)
  np.testing.assert_allclose(ds.std, flat.std(0), atol=1e-6)


def test_image_size_resizes(tree, cache_dir):
  ds = ip.load_dataset('imagefolder', tree, image_size=16, cache_dir=cache_dir)
  assert ds.train_images.shape[1:] == ds.test_images.shape[1:] == (16, 16, 3)


def test_subsets(tree, cache_dir):
  full = ip.load_dataset('imagefolder', tree, cache_dir=cache_dir)
  ds = ip.load_dataset('imagefolder', tree, cache_dir=cache_dir,
                       train_subset=7, test_subset=4)
  assert len(ds.train_images) == 7 and len(ds.test_images) == 4
  # Train subset is a shuffle, so it mixes classes; test is the first M.
  assert len(set(ds.train_labels.tolist())) > 1
  np.testing.assert_array_equal(ds.test_images, full.test_images[:4])
  flat = ds.train_images.reshape(-1, 3) / 255.0
  np.testing.assert_allclose(ds.mean, flat.mean(0), atol=1e-6)


def test_archives_match_directory(tree, tmp_path, cache_dir):
  from_dir = ip.load_dataset('imagefolder', tree, cache_dir=cache_dir)
  # One archive with a top-level folder, one with train/ and test/ at the top.
  tgz = str(tmp_path / 'data.tar.gz')
  with tarfile.open(tgz, 'w:gz') as tar:
    tar.add(tree, arcname='cifar_like')
  plain = str(tmp_path / 'data.tar')
  with tarfile.open(plain, 'w') as tar:
    for split in ('train', 'test'):
      tar.add(os.path.join(tree, split), arcname=split)
  for archive in (tgz, plain):
    ds = ip.load_dataset('imagefolder', archive, cache_dir=cache_dir)
    assert ds.class_names == from_dir.class_names
    for field in ('train_images', 'train_labels', 'test_images',
                  'test_labels'):
      np.testing.assert_array_equal(getattr(ds, field),
                                    getattr(from_dir, field))


def test_cache_is_used_second_time(tree, cache_dir, monkeypatch):
  first = ip.load_dataset('imagefolder', tree, cache_dir=cache_dir)
  assert [f for f in os.listdir(cache_dir) if f.endswith('.npz')]

  def no_decoding(*args):
    raise AssertionError('decoded despite the cache')

  monkeypatch.setattr(ip, '_decode_image', no_decoding)
  second = ip.load_dataset('imagefolder', tree, cache_dir=cache_dir)
  np.testing.assert_array_equal(first.train_images, second.train_images)
  assert second.class_names == first.class_names
  assert second.mean == first.mean
  # A changed file invalidates the cache.
  path = os.path.join(tree, 'train', 'ant', '00.png')
  os.utime(path, ns=(0, 0))
  with pytest.raises(AssertionError, match='despite the cache'):
    ip.load_dataset('imagefolder', tree, cache_dir=cache_dir)


def test_default_cache_dir_from_env(tree, tmp_path):
  ip.load_dataset('imagefolder', tree)
  assert os.listdir(tmp_path / 'default_cache')


def test_tfds_with_mock_data(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=12):
    ds = ip.load_dataset('cifar10', str(tmp_path), train_subset=8)
    ds100 = ip.load_dataset('cifar100', None, image_size=16)
  assert ds.train_images.shape == (8, 32, 32, 3)
  assert ds.test_images.shape == (12, 32, 32, 3)
  assert ds.train_images.dtype == np.uint8
  assert ds.train_labels.dtype == np.int32
  assert ds.num_classes == len(ds.class_names) == 10
  assert ds.train_labels.max() < 10 and ds.name == 'cifar10'
  assert ds100.num_classes == 100
  assert ds100.train_images.shape == (12, 16, 16, 3)


def test_tfds_offline_gives_data_error(tmp_path, monkeypatch):
  pytest.importorskip('tensorflow_datasets')
  # Never download for real, even on a machine with internet.
  monkeypatch.setattr(ip, '_can_reach', lambda *args: False)
  start = time.perf_counter()
  with pytest.raises(ip.DataError) as error:
    ip.load_dataset('cifar10', str(tmp_path / 'tfds'))
  message = str(error.value)
  assert 'not available offline' in message
  assert str(tmp_path / 'tfds') in message
  assert '--config.dataset=imagefolder' in message
  assert time.perf_counter() - start < 30


def test_train_batches_deterministic_and_resumable(ds):
  batch_size = 4  # 18 examples: 4 steps per epoch, 2 dropped.
  assert ip.steps_per_epoch(ds, batch_size) == 4
  take = lambda it, n: [next(it) for _ in range(n)]
  first = take(ip.train_batches(ds, batch_size, seed=3), 10)
  again = take(ip.train_batches(ds, batch_size, seed=3), 10)
  resumed = take(ip.train_batches(ds, batch_size, seed=3, start_step=6), 4)
  other = take(ip.train_batches(ds, batch_size, seed=4), 10)
  images, labels = first[0]
  assert images.shape == (4, 32, 32, 3) and images.dtype == np.float32
  assert labels.shape == (4,) and labels.dtype == np.int32
  for (a, la), (b, lb) in zip(first, again):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
  for (a, la), (b, lb) in zip(first[6:], resumed):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
  assert any(not np.array_equal(a, b) for (a, _), (b, _) in zip(first, other))


def test_epoch_is_a_permutation_and_normalised(ds):
  batch_size = 6  # Divides 18: one epoch covers every example once.
  batches = ip.train_batches(ds, batch_size, seed=0, augment=False)
  epoch = [next(batches) for _ in range(ip.steps_per_epoch(ds, batch_size))]
  images = np.concatenate([b[0] for b in epoch])
  labels = np.concatenate([b[1] for b in epoch])
  np.testing.assert_array_equal(np.sort(labels), np.sort(ds.train_labels))
  np.testing.assert_allclose(images.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
  np.testing.assert_allclose(images.std(axis=(0, 1, 2)), 1.0, atol=1e-4)


def test_augmentation_is_crop_and_flip(ds):
  plain, _ = next(ip.train_batches(ds, 6, seed=1, augment=False))
  augmented, _ = next(ip.train_batches(ds, 6, seed=1, augment=True))
  assert not np.allclose(plain, augmented)
  # Each augmented image is one of the padded crops (or flips) of its source;
  # padding is zero before normalisation.
  zero = (-np.asarray(ds.mean) / np.asarray(ds.std)).astype(np.float32)
  p = ip.CROP_PADDING
  for src, out in zip(plain, augmented):
    padded = np.broadcast_to(zero, (32 + 2 * p, 32 + 2 * p, 3)).copy()
    padded[p:-p, p:-p] = src
    candidates = [padded[y:y + 32, x:x + 32] for y in range(2 * p + 1)
                  for x in range(2 * p + 1)]
    candidates += [c[:, ::-1] for c in candidates]
    assert any(np.allclose(c, out, atol=1e-5) for c in candidates)


def test_test_batches_cover_everything_once(ds):
  batches = list(ip.test_batches(ds, batch_size=4))  # 6 examples: 4 + 2 pad.
  assert len(batches) == 2
  for images, labels, mask in batches:
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.float32
    assert labels.shape == mask.shape == (4,) and mask.dtype == bool
  np.testing.assert_array_equal(batches[1][2], [True, True, False, False])
  images = np.concatenate([b[0][b[2]] for b in batches])
  labels = np.concatenate([b[1][b[2]] for b in batches])
  np.testing.assert_array_equal(labels, ds.test_labels)
  expected = (ds.test_images / 255.0 - np.asarray(ds.mean)) / np.asarray(
      ds.std)
  np.testing.assert_allclose(images, expected, atol=1e-4)


# ------------------------------------------------------------------- errors


def _expect_error(path, match, cache_dir, **kwargs):
  with pytest.raises(ip.DataError, match=match) as error:
    ip.load_dataset('imagefolder', path, cache_dir=cache_dir, **kwargs)
  return str(error.value)


def test_error_no_data_dir(cache_dir):
  _expect_error(None, 'needs --config.data_dir', cache_dir)


def test_error_missing_path(tmp_path, cache_dir):
  path = str(tmp_path / 'nowhere')
  assert path in _expect_error(path, 'does not exist', cache_dir)


def test_error_no_test_folder(tree, cache_dir):
  os.rename(os.path.join(tree, 'test'), os.path.join(tree, 'val'))
  assert tree in _expect_error(tree, 'No test/ folder', cache_dir)


def test_error_no_train_folder(tmp_path, cache_dir):
  os.makedirs(tmp_path / 'empty' / 'images')
  path = str(tmp_path / 'empty')
  assert path in _expect_error(path, 'No train/ folder', cache_dir)


def test_error_empty_class_folder(tree, cache_dir):
  os.makedirs(os.path.join(tree, 'train', 'dog'))
  os.makedirs(os.path.join(tree, 'test', 'dog'))
  message = _expect_error(tree, 'has no images', cache_dir)
  assert os.path.join(tree, 'train', 'dog') in message


def test_error_class_mismatch(tree, cache_dir):
  os.rename(os.path.join(tree, 'test', 'cat'),
            os.path.join(tree, 'test', 'cow'))
  message = _expect_error(tree, 'differ from the train/ classes', cache_dir)
  assert "'cat'" in message and "'cow'" in message


def test_error_undecodable_image(tree, cache_dir):
  bad = os.path.join(tree, 'train', 'bee', 'broken.png')
  with open(bad, 'wb') as f:
    f.write(b'not an image')
  assert bad in _expect_error(tree, 'Cannot decode image', cache_dir)


def test_error_corrupt_and_truncated_archives(tree, tmp_path, cache_dir):
  garbage = str(tmp_path / 'garbage.tar.gz')
  with open(garbage, 'wb') as f:
    f.write(os.urandom(4096))
  assert garbage in _expect_error(garbage, 'corrupt or truncated', cache_dir)
  good = str(tmp_path / 'good.tgz')
  with tarfile.open(good, 'w:gz') as tar:
    tar.add(tree, arcname='.')
  truncated = str(tmp_path / 'truncated.tgz')
  with open(good, 'rb') as src, open(truncated, 'wb') as dst:
    dst.write(src.read()[:os.path.getsize(good) // 2])
  assert truncated in _expect_error(truncated, 'corrupt or truncated',
                                    cache_dir)


def test_error_not_an_archive(tmp_path, cache_dir):
  path = str(tmp_path / 'data.zip')
  with open(path, 'wb') as f:
    f.write(b'PK')
  assert path in _expect_error(path, 'not a', cache_dir)


# ----------------------------------------------------------------- prefetch


def test_prefetch_to_device_puts_on_sharding():
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[-1])
  source = [{'x': np.full((2, 3), i, np.float32), 'y': np.arange(2) + i}
            for i in range(5)]
  out = list(ip.prefetch_to_device(iter(source), 2, sharding))
  assert len(out) == 5
  for i, batch in enumerate(out):
    for leaf, expected in ((batch['x'], source[i]['x']),
                           (batch['y'], source[i]['y'])):
      assert isinstance(leaf, jax.Array)
      assert leaf.sharding == sharding
      assert leaf.devices() == {jax.devices()[-1]}
      np.testing.assert_array_equal(np.asarray(leaf), expected)


def test_prefetch_to_device_propagates_errors():
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[-1])

  def failing():
    yield np.zeros(2)
    yield np.ones(2)
    raise RuntimeError('producer broke')

  out = []
  with pytest.raises(RuntimeError, match='producer broke'):
    for batch in ip.prefetch_to_device(failing(), 1, sharding):
      out.append(batch)
  assert len(out) == 2


def test_prefetch_to_device_stops_when_consumer_stops():
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[-1])
  closed = threading.Event()

  def endless():
    try:
      i = 0
      while True:
        yield np.full(2, i)
        i += 1
    finally:
      closed.set()

  prefetched = ip.prefetch_to_device(endless(), 2, sharding)
  assert next(prefetched)[0] == 0
  prefetched.close()
  assert closed.wait(timeout=5)
  assert not any(t.name == 'prefetch_to_device' and t.is_alive()
                 for t in threading.enumerate())


# ------------------------------------------------------------ cifar_python (official pickles)

def _write_cifar10_python(root, per_batch=4):
  root.mkdir()
  rng = np.random.default_rng(0)
  for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
    content = {b'data': rng.integers(0, 255, (per_batch, 3072), dtype=np.uint8),
               b'labels': [int(x) for x in rng.integers(0, 10, per_batch)],
               b'batch_label': b'x'}
    with open(root / name, 'wb') as f:
      pickle.dump(content, f, protocol=2)
  with open(root / 'batches.meta', 'wb') as f:
    pickle.dump({b'label_names': [f'c{i}'.encode() for i in range(10)]}, f, protocol=2)
  return root


def test_cifar_python_reads_the_official_pickles(tmp_path):
  root = _write_cifar10_python(tmp_path / 'cifar-10-batches-py')
  ds = ip.load_dataset('cifar_python', str(root))
  assert ds.train_images.shape == (20, 32, 32, 3) and ds.test_images.shape == (4, 32, 32, 3)
  assert ds.class_names == tuple(f'c{i}' for i in range(10)) and ds.num_classes == 10
  with open(root / 'data_batch_1', 'rb') as f:
    first = pickle.load(f, encoding='bytes')
  np.testing.assert_array_equal(ds.train_images[0],
                                first[b'data'][0].reshape(3, 32, 32).transpose(1, 2, 0))


class _RunsCode:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def test_cifar_python_refuses_a_pickle_that_would_run_code(tmp_path):
  root = _write_cifar10_python(tmp_path / 'cifar-10-batches-py')
  marker = tmp_path / 'code_ran'
  with open(root / 'data_batch_3', 'wb') as f:
    pickle.dump({b'data': _RunsCode(marker), b'labels': []}, f, protocol=2)
  with pytest.raises(ip.DataError, match=r'data_batch_3.*refusing to load'):
    ip.load_dataset('cifar_python', str(root))
  assert not marker.exists()


def test_cifar_python_missing_or_truncated_files_are_named(tmp_path):
  root = _write_cifar10_python(tmp_path / 'cifar-10-batches-py')
  (root / 'test_batch').unlink()
  with pytest.raises(ip.DataError, match='test_batch is missing'):
    ip.load_dataset('cifar_python', str(root))
  root2 = _write_cifar10_python(tmp_path / 'other')
  data = (root2 / 'data_batch_2').read_bytes()
  (root2 / 'data_batch_2').write_bytes(data[:len(data) // 2])
  with pytest.raises(ip.DataError, match='data_batch_2'):
    ip.load_dataset('cifar_python', str(root2))
  with pytest.raises(ip.DataError, match='cifar-10-batches-py'):
    ip.load_dataset('cifar_python', str(tmp_path / 'nothing'))
