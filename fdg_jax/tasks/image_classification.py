"""The image-classification task: CIFAR-style images, a model from the zoo, cross-entropy.

A task is what the trainer adds on top of the task-agnostic engine; `base.Task` documents each
member. `language_model.py` is the other built-in task.
"""

import os
from typing import Any, Iterator, Optional

import jax
import ml_collections
import numpy as np

from fdg_jax.data import image_batches
from fdg_jax.data import image_sources
from fdg_jax import models
from fdg_jax.models import aux_heads
from fdg_jax.tasks import base

# config.dataset -> classes, where the name alone says it (a dry run then reads no data).
_TFDS_CLASSES = {'cifar10': 10, 'cifar100': 100}
_LOCAL_DATASETS = ('imagefolder', 'cifar_python')


class ImageClassification(base.Task):
  """Images (N, H, W, 3) in, class logits out; test error and loss reported."""

  NAME = 'image_classification'
  DATASETS = tuple(_TFDS_CLASSES) + _LOCAL_DATASETS
  TFDS_DATASETS = image_sources.TFDS_DATASETS
  ITEMS = 'images'
  EVAL_SPLIT = 'test'
  AUX_HEADS = ('mlp-sr', 'conv', 'vit')
  RESUMABLE_FIELDS = frozenset({'cache_dir'})

  @staticmethod
  def config_fields() -> ml_collections.ConfigDict:
    fields = ml_collections.ConfigDict()
    # Side of the square images the model sees (image folders are resized to it).
    fields.image_size = 32
    # Use only this many training / test examples (-1 = all): reduced-scale runs.
    fields.train_subset = -1
    fields.test_subset = -1
    # Where decoded image folders are cached ('' = $FDG_JAX_CACHE or ~/.cache/fdg_jax).
    fields.cache_dir = ''
    # DGL's auxiliary classifier: 'mlp-sr' (DGL's MLP-SR-aux head) or 'conv' (a small conv
    # head) for the CNNs; 'vit' (LayerNorm, mean over tokens, Dense) for the ViT.
    fields.aux_head = 'mlp-sr'
    return fields

  @staticmethod
  def model_names() -> tuple[str, ...]:
    return models.MODEL_NAMES + models.VIT_NAMES

  def validate(self) -> list[str]:
    config, problems = self.config, []
    if config.image_size <= 0:
      problems.append(base.problem('image_size', f'{config.image_size} is not positive',
                                   'Use a positive integer.'))
    if config.aux_head not in self.AUX_HEADS:
      problems.append(base.problem('aux_head', f'unknown auxiliary head {config.aux_head!r}',
                                   f'Choose one of {self.AUX_HEADS}.'))
    if config.dataset in _LOCAL_DATASETS:
      if not config.data_dir:
        problems.append(base.problem(
            'data_dir', f'dataset={config.dataset!r} needs data_dir',
            'Set --config.data_dir to a folder or .tar/.tar.gz archive with train/<class>/* '
            'and test/<class>/* images (imagefolder), or to an extracted cifar-10-batches-py '
            'or cifar-100-python folder (cifar_python).'))
      elif not os.path.exists(config.data_dir):
        problems.append(base.problem('data_dir', f'{config.data_dir!r} does not exist',
                                     'Check the path.'))
    return problems

  def num_blocks(self) -> int:
    return len(models.block_names(self.config.model))

  def create_blocks(self, num_outputs: int) -> tuple[list, list[str]]:
    """The model's blocks and their names, from the zoo."""
    config = self.config
    return (models.create_blocks(config.model, num_outputs, dropout_rate=config.dropout_rate),
            models.block_names(config.model))

  def input_spec(self, batch_size: int) -> jax.ShapeDtypeStruct:
    """One batch of inputs, as the stages see it: normalised float32 NHWC images."""
    size = self.config.image_size
    return jax.ShapeDtypeStruct((batch_size, size, size, 3), np.float32)

  def known_num_outputs(self) -> Optional[int]:
    return _TFDS_CLASSES.get(self.config.dataset)

  def aux_head(self):
    return aux_heads.get(self.config.aux_head)

  def load_data(self, workdir=None) -> image_sources.Dataset:
    """The run's data: its dataset, subsets and image size, as the config names them."""
    del workdir
    config = self.config
    return image_sources.load_dataset(
        config.dataset, config.data_dir or None, image_size=config.image_size,
        cache_dir=config.cache_dir or None, train_subset=config.train_subset,
        test_subset=config.test_subset)

  def num_outputs(self, data: image_sources.Dataset) -> int:
    return data.num_classes

  def describe(self, data: image_sources.Dataset) -> str:
    return image_sources.describe(data)

  def num_train_examples(self, data: image_sources.Dataset) -> int:
    return len(data.train_labels)

  def steps_per_epoch(self, data: image_sources.Dataset) -> int:
    return image_batches.steps_per_epoch(data, self.config.batch_size)

  def check_inputs(self, data: image_sources.Dataset) -> np.ndarray:
    return image_batches.normalise(data, data.test_images[:8])

  def train_batches(self, data: image_sources.Dataset, start_step: int,
                    with_inputs: bool = True) -> Iterator[tuple[Any, np.ndarray]]:
    """(images, labels) of steps start_step, start_step + 1, ...; with_inputs=False gives the
    images' spec only (a process without stage 0)."""
    return image_batches.train_batches(data, self.config.batch_size, self.config.seed,
                                       start_step=start_step, images=with_inputs)

  def eval_batches(self, data: image_sources.Dataset):
    return image_batches.test_batches(data, self.config.eval_batch_size)

  def eval_record(self, result: dict) -> dict:
    return {'test_loss': result['loss'], 'test_error': 1 - result['accuracy']}

  def eval_line(self, result: dict) -> str:
    return f"test loss {result['loss']:.4f}  test error {1 - result['accuracy']:.4f}"

  def summary_fields(self, data: image_sources.Dataset, result: dict,
                     items_per_sec: float) -> dict:
    return {
        'train_images': int(len(data.train_labels)),
        'test_images': int(len(data.test_labels)),
        'test_error': 1.0 - result['accuracy'],
        'test_accuracy': result['accuracy'],
        'test_loss': result['loss'],
        'images_per_sec': items_per_sec,
    }

  def final_line(self, summary: dict) -> str:
    return f"Test error {summary['test_error']:.4f}"


TASK = ImageClassification
