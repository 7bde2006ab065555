"""Dataset sources: CIFAR-10/100 (TFDS or the official python pickles) or an image folder.

Holds the in-memory `Dataset` record and `load_dataset`, which reads a whole dataset into
host memory as uint8 numpy arrays, resizes it, takes the optional train/test subsets and
computes the per-channel mean/std; also `describe`, a one-line summary of a loaded dataset.
Batching (normalisation, augmentation, batch iterators) is in `image_batches`; the trainer's
`prefetch` puts batches on devices.

Image-folder layout (a directory or a .tar/.tar.gz/.tgz archive, optionally
with one top-level folder around it)::

    train/<class>/*.{jpg,jpeg,png,bmp,gif,webp}
    test/<class>/*.{jpg,jpeg,png,bmp,gif,webp}

Decoded image folders are cached as .npz files (see `default_cache_dir`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import socket
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from absl import logging
import numpy as np
from PIL import Image

from fdg_jax.data import DataError


IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')
ARCHIVE_EXTENSIONS = ('.tar', '.tar.gz', '.tgz', '.tar.bz2', '.tar.xz')
TFDS_DATASETS = ('cifar10', 'cifar100')

# Bump when the cached arrays change meaning, so old caches are not reused.
_CACHE_FORMAT = 1
_SPLITS = ('train', 'test')
# Where TFDS downloads CIFAR from; probed before downloading because the TFDS
# downloader retries for minutes when there is no network.
_TFDS_DOWNLOAD_HOST = ('www.cs.toronto.edu', 443)
_NETWORK_PROBE_TIMEOUT_S = 3.0
_TFDS_READ_BATCH = 10_000
# Seed of the fixed selections that pick `train_subset` and `test_subset` examples.
_SUBSET_SEED = 0


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: arrays don't compare.
class Dataset:
  """A whole dataset in host memory."""
  train_images: np.ndarray  # uint8 [N, H, W, 3]
  train_labels: np.ndarray  # int32 [N]
  test_images: np.ndarray  # uint8 [M, H, W, 3]
  test_labels: np.ndarray  # int32 [M]
  num_classes: int
  class_names: tuple[str, ...]
  mean: tuple[float, float, float]  # Per channel, train images in [0, 1].
  std: tuple[float, float, float]
  name: str


def default_cache_dir() -> str:
  """`$FDG_JAX_CACHE` if set, else `~/.cache/fdg_jax`."""
  return os.environ.get('FDG_JAX_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'fdg_jax')


# ------------------------------------------------------------------ loading


def load_dataset(dataset: str, data_dir: str | None, *, image_size: int = 32,
                 cache_dir: str | None = None, train_subset: int = -1,
                 test_subset: int = -1) -> Dataset:
  """Loads `dataset` ('cifar10', 'cifar100', 'cifar_python' or 'imagefolder') into memory.

  Args:
    dataset: 'cifar10' / 'cifar100' (TFDS), 'cifar_python' (the official
      python pickles) or 'imagefolder'.
    data_dir: TFDS data dir (None: TFDS default), for 'cifar_python' the
      extracted cifar-10-batches-py or cifar-100-python folder, or for
      'imagefolder' the directory or archive holding train/ and test/.
    image_size: images are resized (bilinear) to image_size x image_size.
    cache_dir: where decoded image folders are cached (default:
      `default_cache_dir()`).
    train_subset: if > 0, keep that many train examples: the first of a fixed
      seeded permutation, in that order (see `_train_subset_indices`).
    test_subset: if > 0, keep that many test examples: a fixed seeded selection
      in which each class gets its share, in the split's order (see
      `_stratified_indices`).

  Returns:
    The dataset, with mean/std computed on the (subset) train images.
  """
  if dataset in TFDS_DATASETS:
    arrays, class_names = _load_tfds(dataset, data_dir, image_size)
    name = dataset
  elif dataset == 'cifar_python':
    arrays, class_names = _load_cifar_python(data_dir, image_size)
    name = f'cifar_python:{os.path.abspath(data_dir)}'
  elif dataset == 'imagefolder':
    path = _check_imagefolder_path(data_dir)
    arrays, class_names = _load_imagefolder(
        path, image_size, cache_dir or default_cache_dir())
    name = f'imagefolder:{path}'
  else:
    raise DataError(
        f'Unknown dataset {dataset!r}. Use --config.dataset=cifar10, cifar100, '
        'cifar_python or imagefolder.')

  train_images, train_labels, test_images, test_labels = arrays
  if train_subset > 0:
    keep = _train_subset_indices(len(train_images), train_subset)
    train_images, train_labels = train_images[keep], train_labels[keep]
  if test_subset > 0:
    keep = _stratified_indices(test_labels, test_subset, _SUBSET_SEED)
    test_images, test_labels = test_images[keep], test_labels[keep]
  if len(train_images) == 0 or len(test_images) == 0:
    raise DataError(f'{name}: the train or test split is empty.')

  mean, std = _channel_mean_std(train_images)
  return Dataset(
      train_images=np.ascontiguousarray(train_images, np.uint8),
      train_labels=np.asarray(train_labels, np.int32),
      test_images=np.ascontiguousarray(test_images, np.uint8),
      test_labels=np.asarray(test_labels, np.int32),
      num_classes=len(class_names),
      class_names=tuple(class_names),
      mean=mean,
      std=std,
      name=name,
  )


def describe(ds: Dataset) -> str:
  """One line for the log: the name, image size, and each split's size and class balance.

  E.g. 'cifar10, 32x32 images: train 5000 images, 10 classes, 500 per class (min 472,
  max 531); test 10000 images, 10 classes, 1000 per class'.
  """
  splits = []
  for split, images, labels in (('train', ds.train_images, ds.train_labels),
                                ('test', ds.test_images, ds.test_labels)):
    counts = np.bincount(labels, minlength=ds.num_classes)
    present = int(np.count_nonzero(counts))
    classes = (f'{present} classes' if present == ds.num_classes else
               f'{present} of {ds.num_classes} classes')
    low, high = int(counts.min()), int(counts.max())
    mean = len(labels) / ds.num_classes
    balance = f'{mean:.0f} per class' if mean == round(mean) else f'{mean:.1f} per class'
    if low != high:
      balance += f' (min {low}, max {high})'
    splits.append(f'{split} {len(images)} images, {classes}, {balance}')
  height, width = ds.train_images.shape[1:3]
  return f'{ds.name}, {height}x{width} images: ' + '; '.join(splits)


# ------------------------------------------------------------------ subsets


def _train_subset_indices(num_examples: int, size: int) -> np.ndarray:
  """The first `size` of a fixed seeded permutation of the train split, in that order.

  Not stratified, unlike `_stratified_indices`, on purpose: the recorded experiment runs
  (experiments/, which set train_subset) were trained on exactly this selection in exactly
  this order, and a run is reproduced only if both stay the same (the batches of
  `image_batches.train_batches` index this order). A uniform random sample of thousands of
  examples already holds every class in about its proportion; `describe` logs the balance.
  """
  return np.random.default_rng(_SUBSET_SEED).permutation(num_examples)[:size]


def _stratified_indices(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
  """Indices of a seeded, class-stratified selection of `size` examples, in ascending order.

  Class c, with n_c of the N examples, gets floor(size * n_c / N) examples; the examples left
  over go one each to the classes with the largest remainders of size * n_c / N (exact
  integer arithmetic; ties to the lower label). Within class c the examples are the first of
  the permutation `np.random.default_rng([seed, c])` of its indices, so a class's selection
  does not depend on the other classes. The result is sorted, keeping the split's order;
  with size >= N it is every index, so the whole split is unchanged.
  """
  labels = np.asarray(labels)
  total = len(labels)
  size = min(size, total)
  classes, counts = np.unique(labels, return_counts=True)
  quotas = size * counts // total
  remainders = size * counts % total
  # Stable sort on the negated remainders: the largest first, ties in label order.
  for i in np.argsort(-remainders, kind='stable')[:size - int(quotas.sum())]:
    quotas[i] += 1
  keep = []
  for c, quota in zip(classes.tolist(), quotas.tolist()):
    members = np.flatnonzero(labels == c)
    keep.append(members[np.random.default_rng([seed, c]).permutation(len(members))[:quota]])
  return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def _channel_mean_std(images: np.ndarray):
  """Exact per-channel mean/std in [0, 1] from 256-bin histograms.

  Histograms avoid a float copy of the whole train set (600 MB for CIFAR).
  """
  values = np.arange(256, dtype=np.float64) / 255.0
  mean, std = [], []
  for c in range(3):
    counts = np.bincount(images[..., c].ravel(), minlength=256)
    p = counts / counts.sum()
    m = float(p @ values)
    mean.append(m)
    std.append(float(np.sqrt(max(p @ (values - m) ** 2, 0.0))))
  # A constant channel would divide by zero when normalising.
  std = [s if s > 1e-6 else 1.0 for s in std]
  return tuple(mean), tuple(std)


def _resize_images(images: np.ndarray, image_size: int) -> np.ndarray:
  """Bilinear resize of a uint8 [N, H, W, 3] batch (no-op if already sized)."""
  if images.shape[1:3] == (image_size, image_size):
    return images
  size = (image_size, image_size)
  return np.stack([
      np.asarray(Image.fromarray(im).resize(size, Image.Resampling.BILINEAR))
      for im in images
  ]) if len(images) else np.zeros((0, *size, 3), np.uint8)


# --------------------------------------------------------------------- TFDS


def _offline_message(name: str, data_dir: str | None, reason: str) -> str:
  return (
      f'Dataset {name!r} is not prepared in TFDS data dir '
      f'{data_dir or "(TFDS default, ~/tensorflow_datasets)"} and is not '
      f'available offline ({reason}). Either prepare it with '
      f'`tfds.builder({name!r}).download_and_prepare()` on a machine with '
      'internet and point --config.data_dir at that TFDS data dir, or use '
      '--config.dataset=imagefolder --config.data_dir=DIR_OR_ARCHIVE with '
      'train/<class>/* and test/<class>/* images.')


def _can_reach(host_port: tuple[str, int], timeout: float) -> bool:
  try:
    with socket.create_connection(host_port, timeout=timeout):
      return True
  except OSError:
    return False


def _read_tfds(builder) -> tuple[np.ndarray, ...]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  out = []
  for split in _SPLITS:
    # Not batch_size=-1: without split sizes (as under tfds.testing.mock_data)
    # TFDS batches by sys.maxsize, which aborts the process inside TF.
    ds = builder.as_dataset(split=split, batch_size=_TFDS_READ_BATCH,
                            shuffle_files=False)
    chunks = list(tfds.as_numpy(ds))
    out += [np.concatenate([c['image'] for c in chunks]).astype(np.uint8),
            np.concatenate([c['label'] for c in chunks]).astype(np.int32)]
  return tuple(out)


def _load_tfds(name: str, data_dir: str | None, image_size: int):
  """Whole CIFAR splits as numpy; downloads only when it can work."""
  # TFDS imports TensorFlow lazily; keep it out of imagefolder-only runs.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if data_dir:
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'Cannot create TFDS builder for {name!r} with data_dir '
                    f'{data_dir}: {e}') from e

  if builder.is_prepared():
    arrays = _read_tfds(builder)
  else:
    try:
      # A real unprepared builder fails here at once, while
      # tfds.testing.mock_data serves fake examples without preparing.
      arrays = _read_tfds(builder)
    except Exception:  # pylint: disable=broad-except
      # TFDS's downloader retries for minutes without network: probe first.
      if not _can_reach(_TFDS_DOWNLOAD_HOST, _NETWORK_PROBE_TIMEOUT_S):
        raise DataError(_offline_message(
            name, data_dir, f'cannot reach {_TFDS_DOWNLOAD_HOST[0]}')) from None
      try:
        builder.download_and_prepare()
        arrays = _read_tfds(builder)
      except Exception as e:  # pylint: disable=broad-except
        raise DataError(_offline_message(
            name, data_dir, f'download failed: {type(e).__name__}: {e}')) from e

  train_images, train_labels, test_images, test_labels = arrays
  train_images = _resize_images(train_images, image_size)
  test_images = _resize_images(test_images, image_size)
  label = builder.info.features['label']
  class_names = tuple(str(n) for n in label.names)
  return (train_images, train_labels, test_images, test_labels), class_names


# ------------------------------------------------------------- cifar_python


class _PlainDataUnpickler(pickle.Unpickler):
  """Unpickles plain containers, strings, numbers and numpy arrays, and nothing else.

  A pickle can name any importable callable and have it called while loading; this one
  admits only what numpy needs to rebuild an array, so a file that would run code is refused
  before anything runs.
  """

  ALLOWED = {
      ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
      ('numpy', 'ndarray'), ('numpy', 'dtype'),
      ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
      ('_codecs', 'encode'),   # how Python 3 writes bytes at pickle protocol 2; pure
  }

  def find_class(self, module, name):
    if (module, name) in self.ALLOWED:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f'refusing to load {module}.{name}')


def _read_python_pickle(path: str):
  try:
    with open(path, 'rb') as f:
      return _PlainDataUnpickler(f, encoding='bytes').load()
  except pickle.UnpicklingError as e:
    raise DataError(
        f'{path}: {e}. This file is not a plain CIFAR batch and could run code if loaded; it '
        'was not loaded. Use the official cifar-10-batches-py / cifar-100-python files.') from e
  except (OSError, EOFError, ValueError) as e:
    raise DataError(f'{path}: cannot read it ({e}). Download the official CIFAR python '
                    'archive again.') from e


def _load_cifar_python(data_dir: str | None, image_size: int):
  """The official python pickles: cifar-10-batches-py or cifar-100-python, extracted."""
  if not data_dir or not os.path.isdir(data_dir):
    raise DataError(
        f'dataset=cifar_python needs data_dir to be an extracted cifar-10-batches-py or '
        f'cifar-100-python folder; got {data_dir!r}.')

  def text(value):
    return value.decode() if isinstance(value, bytes) else str(value)

  def batch(path, label_key):
    content = _read_python_pickle(path)
    try:
      data = np.asarray(content[b'data'], np.uint8).reshape(-1, 3, 32, 32)
      labels = np.asarray(content[label_key], np.int32)
    except (KeyError, TypeError, ValueError) as e:
      raise DataError(f'{path}: not a CIFAR batch ({e}).') from e
    return data.transpose(0, 2, 3, 1), labels

  if os.path.exists(os.path.join(data_dir, 'data_batch_1')):
    train_files = [os.path.join(data_dir, f'data_batch_{i}') for i in range(1, 6)]
    test_files, label_key = [os.path.join(data_dir, 'test_batch')], b'labels'
    names = _read_python_pickle(os.path.join(data_dir, 'batches.meta'))[b'label_names']
  elif os.path.exists(os.path.join(data_dir, 'train')):
    train_files, test_files = [os.path.join(data_dir, 'train')], [os.path.join(data_dir, 'test')]
    label_key = b'fine_labels'
    names = _read_python_pickle(os.path.join(data_dir, 'meta'))[b'fine_label_names']
  else:
    raise DataError(f'{data_dir}: neither data_batch_1 (CIFAR-10) nor train (CIFAR-100) is '
                    'there. Point data_dir at the extracted cifar-10-batches-py or '
                    'cifar-100-python folder.')
  for path in train_files + test_files:
    if not os.path.exists(path):
      raise DataError(f'{path} is missing. Extract the whole CIFAR python archive.')
  splits = []
  for files in (train_files, test_files):
    images, labels = zip(*(batch(path, label_key) for path in files))
    splits += [_resize_images(np.concatenate(images), image_size), np.concatenate(labels)]
  return tuple(splits), [text(n) for n in names]


# -------------------------------------------------------------- imagefolder

# One file or folder of the tree: path parts relative to the root, whether it
# is a folder, and a callable returning its bytes (valid only while iterating,
# since archives are streamed).
_Entry = tuple[tuple[str, ...], bool, Callable[[], bytes] | None]


def _check_imagefolder_path(data_dir: str | None) -> str:
  if not data_dir:
    raise DataError(
        'dataset=imagefolder needs --config.data_dir=DIR_OR_ARCHIVE: a '
        'directory or .tar/.tar.gz/.tgz archive with train/<class>/* and '
        'test/<class>/* images.')
  path = os.path.abspath(os.path.expanduser(data_dir))
  if not os.path.exists(path):
    raise DataError(f'Image folder {path} does not exist. Point '
                    '--config.data_dir at a directory or .tar/.tar.gz/.tgz '
                    'archive with train/<class>/* and test/<class>/* images.')
  if os.path.isfile(path) and not path.lower().endswith(ARCHIVE_EXTENSIONS):
    raise DataError(f'{path} is a file but not a '
                    f'{"/".join(ARCHIVE_EXTENSIONS)} archive. Point '
                    '--config.data_dir at a directory or such an archive.')
  return path


def _is_ignored(parts: tuple[str, ...]) -> bool:
  # Hidden files and macOS archive metadata (._x.jpg, __MACOSX/) are no data.
  return any(p.startswith('.') for p in parts) or parts[:1] == ('__MACOSX',)


def _is_image(parts: tuple[str, ...]) -> bool:
  return parts[-1].lower().endswith(IMAGE_EXTENSIONS)


def _may_hold_split(parts: tuple[str, ...]) -> bool:
  """Whether a file can be under [<top>/]train|test/; others are not decoded."""
  return parts[0] in _SPLITS or (len(parts) > 1 and parts[1] in _SPLITS)


def _scan_directory(root: str) -> list[tuple[tuple[str, ...], bool, int, int]]:
  """Sorted (parts, is_dir, size, mtime_ns) for everything under root."""
  listing = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    rel = os.path.relpath(dirpath, root)
    prefix = () if rel == '.' else tuple(rel.split(os.sep))
    for name in dirnames:
      listing.append((prefix + (name,), True, 0, 0))
    for name in filenames:
      st = os.stat(os.path.join(dirpath, name))
      listing.append((prefix + (name,), False, st.st_size, st.st_mtime_ns))
  listing.sort()
  return listing


def _directory_entries(root: str, listing) -> Iterator[_Entry]:
  for parts, is_dir, _, _ in listing:
    path = os.path.join(root, *parts)

    def read(path=path) -> bytes:
      try:
        with open(path, 'rb') as f:
          return f.read()
      except OSError as e:
        raise DataError(f'Cannot read {path}: {e}. Fix its permissions or '
                        'remove it.') from e

    yield parts, is_dir, (None if is_dir else read)


def _archive_entries(path: str) -> Iterator[_Entry]:
  """Streams an archive's members (no extraction, no seeking)."""
  with tarfile.open(path, mode='r|*') as tar:
    for member in tar:
      parts = tuple(p for p in member.name.split('/') if p not in ('', '.'))
      if not parts:
        continue
      if member.isdir():
        yield parts, True, None
      elif member.isfile():
        yield parts, False, lambda m=member: tar.extractfile(m).read()


def _decode_image(data: bytes, name: str, image_size: int) -> np.ndarray:
  """Decodes one image file to uint8 [image_size, image_size, 3] RGB."""
  try:
    with Image.open(io.BytesIO(data)) as img:
      img = img.convert('RGB')
      if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
      return np.asarray(img, dtype=np.uint8)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'Cannot decode image {name}: {e}. Remove or replace the '
                    'file.') from e


def _decode_tree(entries: Iterable[_Entry], source: str, image_size: int):
  """Decodes candidate images; returns ({parts: image}, {folder parts})."""
  images, folders = {}, set()
  for parts, is_dir, read in entries:
    if _is_ignored(parts):
      continue
    # Archives need not list folders; infer them from the file paths.
    folders.update(parts[:i] for i in range(1, len(parts)))
    if is_dir:
      folders.add(parts)
    elif _is_image(parts) and _may_hold_split(parts):
      name = os.path.join(source, *parts)
      images[parts] = _decode_image(read(), name, image_size)
  return images, folders


def _find_root(folders: set[tuple[str, ...]], source: str) -> tuple[str, ...]:
  """() if train/ or test/ is at the top, else the single folder holding them."""
  if any((s,) in folders for s in _SPLITS):
    root = ()
  else:
    tops = sorted({f[:1] for f in folders
                   if len(f) == 2 and f[1] in _SPLITS})
    if len(tops) > 1:
      raise DataError(
          f'{source} has several top-level folders with train/ or test/ '
          f'({", ".join(t[0] for t in tops)}); keep exactly one, or point '
          '--config.data_dir at one of them.')
    root = tops[0] if tops else ()
  for split in _SPLITS:
    if root + (split,) not in folders:
      where = os.path.join(source, *root)
      raise DataError(
          f'No {split}/ folder in {where}. An image folder needs '
          f'train/<class>/* and test/<class>/* images.')
  return root


def _assemble(images: dict, folders: set, source: str):
  """Sorts the decoded images into (train, test) arrays with labels."""
  root = _find_root(folders, source)
  classes_by_split = {}
  for split in _SPLITS:
    prefix = root + (split,)
    classes_by_split[split] = sorted(
        f[-1] for f in folders
        if len(f) == len(prefix) + 1 and f[:len(prefix)] == prefix)
    if not classes_by_split[split]:
      raise DataError(f'{os.path.join(source, *prefix)} has no class folders; '
                      f'put images in {split}/<class>/.')

  train_classes, test_classes = classes_by_split['train'], classes_by_split[
      'test']
  if train_classes != test_classes:
    missing = sorted(set(train_classes) - set(test_classes))
    extra = sorted(set(test_classes) - set(train_classes))
    raise DataError(
        f'The test/ classes in {os.path.join(source, *root)} differ from the '
        f'train/ classes: missing in test/: {missing or "none"}; only in '
        f'test/: {extra or "none"}. Both splits need the same class folders.')

  by_class: dict[tuple[str, str], list] = {}
  for parts in sorted(images):  # Sorted: the same arrays from dir or archive.
    if len(parts) >= len(root) + 3 and parts[:len(root)] == root:
      split, cls = parts[len(root)], parts[len(root) + 1]
      by_class.setdefault((split, cls), []).append(images[parts])

  arrays = []
  for split in _SPLITS:
    split_images, split_labels = [], []
    for label, cls in enumerate(train_classes):
      found = by_class.get((split, cls), [])
      if not found:
        raise DataError(
            f'Class folder {os.path.join(source, *root, split, cls)} has no '
            f'images ({", ".join(IMAGE_EXTENSIONS)}); add images or remove '
            'the folder.')
      split_images += found
      split_labels += [label] * len(found)
    arrays += [np.stack(split_images), np.asarray(split_labels, np.int32)]
  return tuple(arrays), tuple(train_classes)


def _cache_path(path: str, fingerprint: Any, image_size: int,
                cache_dir: str) -> str:
  key = json.dumps([_CACHE_FORMAT, path, fingerprint, image_size])
  digest = hashlib.sha256(key.encode()).hexdigest()[:20]
  return os.path.join(cache_dir, f'imagefolder-{digest}.npz')


def _read_cache(cache_file: str):
  if not os.path.exists(cache_file):
    return None
  try:
    with np.load(cache_file, allow_pickle=False) as z:
      arrays = tuple(z[k] for k in ('train_images', 'train_labels',
                                    'test_images', 'test_labels'))
      class_names = tuple(str(n) for n in z['class_names'])
    return arrays, class_names
  except Exception as e:  # pylint: disable=broad-except
    # A damaged cache is rebuilt, never fatal.
    logging.warning('Ignoring unreadable cache %s: %s', cache_file, e)
    return None


def _write_cache(cache_file: str, arrays, class_names) -> None:
  """Writes atomically, so a killed run never leaves a half-written cache."""
  cache_dir = os.path.dirname(cache_file)
  tmp = None
  try:
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix='.npz.tmp')
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, train_images=arrays[0], train_labels=arrays[1],
               test_images=arrays[2], test_labels=arrays[3],
               class_names=np.asarray(class_names, dtype=str))
    os.replace(tmp, cache_file)
    tmp = None
  except OSError as e:
    # An unwritable cache only costs decoding again next time.
    logging.warning('Could not write cache %s: %s', cache_file, e)
  finally:
    if tmp is not None and os.path.exists(tmp):
      os.unlink(tmp)


def _load_imagefolder(path: str, image_size: int, cache_dir: str):
  """Decoded (cached) image folder arrays and class names."""
  if os.path.isdir(path):
    listing = _scan_directory(path)
    fingerprint = hashlib.sha256(
        json.dumps(listing).encode()).hexdigest()
  else:
    st = os.stat(path)
    listing, fingerprint = None, [st.st_size, st.st_mtime_ns]

  cache_file = _cache_path(path, fingerprint, image_size, cache_dir)
  cached = _read_cache(cache_file)
  if cached is not None:
    logging.info('Loaded %s from cache %s', path, cache_file)
    return cached

  start = time.perf_counter()
  if listing is not None:
    images, folders = _decode_tree(
        _directory_entries(path, listing), path, image_size)
  else:
    try:
      images, folders = _decode_tree(_archive_entries(path), path, image_size)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
      raise DataError(
          f'Archive {path} is corrupt or truncated ({type(e).__name__}: {e}). '
          'Re-download or re-create it (e.g. tar czf data.tar.gz train test).'
      ) from e
  arrays, class_names = _assemble(images, folders, path)
  logging.info('Decoded %d images from %s in %.1f s', len(images), path,
               time.perf_counter() - start)
  _write_cache(cache_file, arrays, class_names)
  return arrays, class_names
