"""Tests for fdg_jax.data.image_batches on tiny generated data."""

import dataclasses
import os
import pickle
import tarfile
import threading
import time

import jax
import numpy as np
from PIL import Image
import pytest

from fdg_jax import data
from fdg_jax.data import image_batches as ip
from fdg_jax.data import image_sources
from fdg_jax.trainer import prefetch

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
  return image_sources.load_dataset('imagefolder', tree, cache_dir=cache_dir)


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
  ds = image_sources.load_dataset('imagefolder', tree, image_size=16, cache_dir=cache_dir)
  assert ds.train_images.shape[1:] == ds.test_images.shape[1:] == (16, 16, 3)


# ------------------------------------------------------------------ subsets

# Unequal class sizes, so that proportions and remainders matter.
ORDERED_CLASSES = ('a', 'b', 'c', 'd')
ORDERED_TRAIN = (60, 50, 40, 50)  # 200
ORDERED_TEST = (9, 7, 5, 7)  # 28


def _make_class_ordered_tree(root):
  """8x8 PNGs written class by class; pixel (0, 0) holds (label, index, 0)."""
  for split, counts in (('train', ORDERED_TRAIN), ('test', ORDERED_TEST)):
    for label, (name, count) in enumerate(zip(ORDERED_CLASSES, counts)):
      folder = os.path.join(root, split, name)
      os.makedirs(folder)
      for i in range(count):
        pixels = np.full((8, 8, 3), 128, np.uint8)
        pixels[0, 0] = (label, i, 0)
        Image.fromarray(pixels).save(os.path.join(folder, f'{i:03d}.png'))
  return str(root)


@pytest.fixture
def ordered_tree(tmp_path):
  return _make_class_ordered_tree(tmp_path / 'ordered')


def _ordered(path, cache_dir, **subsets):
  return image_sources.load_dataset('imagefolder', path, image_size=8, cache_dir=cache_dir,
                         **subsets)


def _ids(images):
  """(label, index) of each image, from its pixel (0, 0)."""
  return [tuple(int(v) for v in im[0, 0, :2]) for im in images]


def test_class_ordered_folder_loads_class_by_class(ordered_tree, cache_dir):
  full = _ordered(ordered_tree, cache_dir)
  # The premise of the subset tests: without a subset the splits are sorted by class.
  np.testing.assert_array_equal(full.test_labels, np.repeat(np.arange(4), ORDERED_TEST))
  np.testing.assert_array_equal(full.train_labels, np.repeat(np.arange(4), ORDERED_TRAIN))


def test_test_subset_holds_every_class_in_proportion(ordered_tree, cache_dir):
  full = _ordered(ordered_tree, cache_dir)
  ds = _ordered(ordered_tree, cache_dir, test_subset=10)
  assert len(ds.test_images) == len(ds.test_labels) == 10
  counts = np.bincount(ds.test_labels, minlength=4)
  # Shares 10 * (9, 7, 5, 7) / 28 = (3.21, 2.5, 1.79, 2.5): floors (3, 2, 1, 2), the two
  # left over to the largest remainders: 'c' (0.79), then 'b' (0.5, tied with 'd': lower label).
  np.testing.assert_array_equal(counts, [3, 3, 2, 2])
  shares = 10 * np.asarray(ORDERED_TEST) / sum(ORDERED_TEST)
  assert np.all(np.abs(counts - shares) < 1)
  # Distinct images of the split, each with its own label, in the split's order.
  ids = _ids(ds.test_images)
  assert len(set(ids)) == 10 and set(ids) <= set(_ids(full.test_images))
  assert [label for label, _ in ids] == ds.test_labels.tolist()
  assert ids == sorted(ids)
  # Not simply the first of each class: a seeded pick within the class.
  assert [i for label, i in ids if label == 0] != [0, 1, 2]
  # Train is untouched by test_subset.
  np.testing.assert_array_equal(ds.train_images, full.train_images)


def test_test_subset_at_least_the_split_keeps_it_whole(ordered_tree, cache_dir):
  full = _ordered(ordered_tree, cache_dir)
  for size in (sum(ORDERED_TEST), 1000):
    ds = _ordered(ordered_tree, cache_dir, test_subset=size)
    np.testing.assert_array_equal(ds.test_images, full.test_images)
    np.testing.assert_array_equal(ds.test_labels, full.test_labels)


def test_train_subset_holds_every_class_and_is_the_recorded_selection(ordered_tree, cache_dir):
  full = _ordered(ordered_tree, cache_dir)
  ds = _ordered(ordered_tree, cache_dir, train_subset=100)
  assert len(ds.train_images) == len(ds.train_labels) == 100
  counts = np.bincount(ds.train_labels, minlength=4)
  shares = 100 * np.asarray(ORDERED_TRAIN) / sum(ORDERED_TRAIN)  # (30, 25, 20, 25)
  assert np.all(counts > 0)
  assert np.all(np.abs(counts - shares) <= 6), counts
  # Exactly the selection and order recorded runs were trained on: the first of the seed-0
  # permutation (see image_sources._train_subset_indices).
  keep = np.random.default_rng(0).permutation(200)[:100]
  np.testing.assert_array_equal(ds.train_images, full.train_images[keep])
  np.testing.assert_array_equal(ds.train_labels, full.train_labels[keep])
  # mean/std are those of the subset.
  flat = ds.train_images.reshape(-1, 3) / 255.0
  np.testing.assert_allclose(ds.mean, flat.mean(0), atol=1e-6)
  np.testing.assert_allclose(ds.std, flat.std(0), atol=1e-6)
  # The test split is untouched by train_subset.
  np.testing.assert_array_equal(ds.test_images, full.test_images)


def test_subsets_are_deterministic(ordered_tree, tmp_path):
  # Two loads, the second decoding again into another cache.
  first = _ordered(ordered_tree, str(tmp_path / 'cache1'), train_subset=37, test_subset=11)
  second = _ordered(ordered_tree, str(tmp_path / 'cache2'), train_subset=37, test_subset=11)
  for field in ('train_images', 'train_labels', 'test_images', 'test_labels'):
    np.testing.assert_array_equal(getattr(first, field), getattr(second, field))
  assert first.mean == second.mean and first.std == second.std


def test_stratified_indices_on_a_cifar_like_test_split():
  # CIFAR-10's test split stored class by class: the first 1000 were all one class.
  labels = np.repeat(np.arange(10), 1000)
  keep = image_sources._stratified_indices(labels, 1000, seed=0)
  np.testing.assert_array_equal(np.bincount(labels[keep], minlength=10), [100] * 10)
  assert len(np.unique(keep)) == 1000 and np.all(np.diff(keep) > 0)
  np.testing.assert_array_equal(keep, image_sources._stratified_indices(labels, 1000, seed=0))
  assert not np.array_equal(keep, image_sources._stratified_indices(labels, 1000, seed=1))
  # 15 of 10 classes: one each, the 5 left over (all remainders tied) to labels 0-4.
  keep = image_sources._stratified_indices(labels, 15, seed=0)
  np.testing.assert_array_equal(np.bincount(labels[keep]), [2] * 5 + [1] * 5)
  # Shuffled labels: the same counts from a split that is not class-ordered.
  shuffled = np.random.default_rng(5).permutation(labels)
  keep = image_sources._stratified_indices(shuffled, 250, seed=0)
  np.testing.assert_array_equal(np.bincount(shuffled[keep]), [25] * 10)


# ------------------------------------------------------------------ describe


def test_describe_reports_sizes_and_class_balance(ordered_tree, cache_dir):
  ds = _ordered(ordered_tree, cache_dir, test_subset=10)
  assert image_sources.describe(ds) == (
      f'{ds.name}, 8x8 images: '
      'train 200 images, 4 classes, 50 per class (min 40, max 60); '
      'test 10 images, 4 classes, 2.5 per class (min 2, max 3)')
  balanced = dataclasses.replace(
      ds, test_images=ds.test_images[:8], test_labels=np.repeat(np.arange(4), 2))
  assert image_sources.describe(balanced).endswith('; test 8 images, 4 classes, 2 per class')
  missing = dataclasses.replace(ds, test_images=ds.test_images[:3],
                                test_labels=np.asarray([0, 0, 2], np.int32))
  assert image_sources.describe(missing).endswith(
      '; test 3 images, 2 of 4 classes, 0.8 per class (min 0, max 2)')


def test_archives_match_directory(tree, tmp_path, cache_dir):
  from_dir = image_sources.load_dataset('imagefolder', tree, cache_dir=cache_dir)
  # One archive with a top-level folder, one with train/ and test/ at the top.
  tgz = str(tmp_path / 'data.tar.gz')
  with tarfile.open(tgz, 'w:gz') as tar:
    tar.add(tree, arcname='cifar_like')
  plain = str(tmp_path / 'data.tar')
  with tarfile.open(plain, 'w') as tar:
    for split in ('train', 'test'):
      tar.add(os.path.join(tree, split), arcname=split)
  for archive in (tgz, plain):
    ds = image_sources.load_dataset('imagefolder', archive, cache_dir=cache_dir)
    assert ds.class_names == from_dir.class_names
    for field in ('train_images', 'train_labels', 'test_images',
                  'test_labels'):
      np.testing.assert_array_equal(getattr(ds, field),
                                    getattr(from_dir, field))


def test_cache_is_used_second_time(tree, cache_dir, monkeypatch):
  first = image_sources.load_dataset('imagefolder', tree, cache_dir=cache_dir)
  assert [f for f in os.listdir(cache_dir) if f.endswith('.npz')]

  def no_decoding(*args):
    raise AssertionError('decoded despite the cache')

  monkeypatch.setattr(image_sources, '_decode_image', no_decoding)
  second = image_sources.load_dataset('imagefolder', tree, cache_dir=cache_dir)
  np.testing.assert_array_equal(first.train_images, second.train_images)
  assert second.class_names == first.class_names
  assert second.mean == first.mean
  # A changed file invalidates the cache.
  path = os.path.join(tree, 'train', 'ant', '00.png')
  os.utime(path, ns=(0, 0))
  with pytest.raises(AssertionError, match='despite the cache'):
    image_sources.load_dataset('imagefolder', tree, cache_dir=cache_dir)


def test_default_cache_dir_from_env(tree, tmp_path):
  image_sources.load_dataset('imagefolder', tree)
  assert os.listdir(tmp_path / 'default_cache')


def test_tfds_with_mock_data(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=12):
    ds = image_sources.load_dataset('cifar10', str(tmp_path), train_subset=8)
    ds100 = image_sources.load_dataset('cifar100', None, image_size=16)
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
  monkeypatch.setattr(image_sources, '_can_reach', lambda *args: False)
  start = time.perf_counter()
  with pytest.raises(data.DataError) as error:
    image_sources.load_dataset('cifar10', str(tmp_path / 'tfds'))
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


def _old_normaliser(ds):
  """The batch normalisation as it was before `normalise` was public, verbatim."""
  std = np.asarray(ds.std, np.float32)
  scale = 1.0 / (255.0 * std)
  shift = -np.asarray(ds.mean, np.float32) / std

  def normalise(images):
    n, h, w, c = images.shape
    out = images.astype(np.float32).reshape(n * h, w * c)
    out *= np.tile(scale, w)
    out += np.tile(shift, w)
    return out.reshape(n, h, w, c)

  return normalise


def test_normalise_is_the_batch_normalisation(ds):
  images = ds.train_images[:5]
  before = images.copy()
  out = ip.normalise(ds, images)
  assert out.dtype == np.float32 and out.shape == images.shape
  np.testing.assert_array_equal(images, before)  # The input is not changed.
  np.testing.assert_array_equal(out, _old_normaliser(ds)(images))  # Bit for bit.
  expected = (images / 255.0 - np.asarray(ds.mean)) / np.asarray(ds.std)
  np.testing.assert_allclose(out, expected, atol=1e-5)
  # One image [H, W, 3] and an empty batch work too.
  np.testing.assert_array_equal(ip.normalise(ds, images[2]), out[2])
  assert ip.normalise(ds, images[:0]).shape == (0, 32, 32, 3)
  # The batch iterators normalise with it.
  batch, labels = next(ip.train_batches(ds, 6, seed=2, augment=False))
  idx = np.random.default_rng([2, 0]).permutation(len(ds.train_images))[:6]
  np.testing.assert_array_equal(batch, ip.normalise(ds, ds.train_images[idx]))
  np.testing.assert_array_equal(labels, ds.train_labels[idx])
  images, _, mask = next(ip.test_batches(ds, batch_size=len(ds.test_images) + 2))
  np.testing.assert_array_equal(images[mask], ip.normalise(ds, ds.test_images))


# ------------------------------------------------------------------- errors


def _expect_error(path, match, cache_dir, **kwargs):
  with pytest.raises(data.DataError, match=match) as error:
    image_sources.load_dataset('imagefolder', path, cache_dir=cache_dir, **kwargs)
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
  out = list(prefetch.prefetch_to_device(iter(source), 2, sharding))
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
    for batch in prefetch.prefetch_to_device(failing(), 1, sharding):
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

  prefetched = prefetch.prefetch_to_device(endless(), 2, sharding)
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
  ds = image_sources.load_dataset('cifar_python', str(root))
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
  with pytest.raises(data.DataError, match=r'data_batch_3.*refusing to load'):
    image_sources.load_dataset('cifar_python', str(root))
  assert not marker.exists()


def test_cifar_python_missing_or_truncated_files_are_named(tmp_path):
  root = _write_cifar10_python(tmp_path / 'cifar-10-batches-py')
  (root / 'test_batch').unlink()
  with pytest.raises(data.DataError, match='test_batch is missing'):
    image_sources.load_dataset('cifar_python', str(root))
  root2 = _write_cifar10_python(tmp_path / 'other')
  contents = (root2 / 'data_batch_2').read_bytes()
  (root2 / 'data_batch_2').write_bytes(contents[:len(contents) // 2])
  with pytest.raises(data.DataError, match='data_batch_2'):
    image_sources.load_dataset('cifar_python', str(root2))
  with pytest.raises(data.DataError, match='cifar-10-batches-py'):
    image_sources.load_dataset('cifar_python', str(tmp_path / 'nothing'))
