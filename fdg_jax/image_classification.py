"""The image-classification task: CIFAR-style images, a model from the zoo, cross-entropy.

A task is what the trainer adds on top of the task-agnostic engine (DESIGN.md section 7): the
model's block list by name, the input spec used for init, the data and its deterministic,
resumable batch streams, the loss, the metrics and the summary fields. `language_model.py` is
the other task; `tasks.py` picks one by `config.task`.
"""

from typing import Any, Callable, Iterator

import jax
import numpy as np

from fdg_jax import input_pipeline
from fdg_jax import models
from fdg_jax import stage_functions

NAME = 'image_classification'
DATASETS = ('cifar10', 'cifar100', 'cifar_python', 'imagefolder')
loss_fn = stage_functions.cross_entropy_loss
metrics = stage_functions.LossAndAccuracy
ITEMS = 'images'   # what the progress line counts per second
EVAL_SPLIT = 'test'


def model_names() -> tuple[str, ...]:
  return models.MODEL_NAMES + models.VIT_NAMES


def num_blocks(config) -> int:
  return len(models.block_names(config.model))


def create_blocks(config, num_classes: int) -> tuple[list, list[str]]:
  """The model's blocks and their names, from the zoo."""
  return (models.create_blocks(config.model, num_classes, dropout_rate=config.dropout_rate),
          models.block_names(config.model))


def input_spec(config, batch_size: int) -> jax.ShapeDtypeStruct:
  """One batch of inputs, as the stages see it: normalised float32 NHWC images."""
  return jax.ShapeDtypeStruct((batch_size, config.image_size, config.image_size, 3), np.float32)


def load_data(config, workdir=None) -> input_pipeline.Dataset:
  """The run's data: its dataset, subsets and image size, as the config names them."""
  del workdir
  return input_pipeline.load_dataset(
      config.dataset, config.data_dir or None, image_size=config.image_size,
      cache_dir=config.cache_dir or None, train_subset=config.train_subset,
      test_subset=config.test_subset)


def num_classes(data: input_pipeline.Dataset) -> int:
  return data.num_classes


def describe(data: input_pipeline.Dataset) -> str:
  return input_pipeline.describe(data)


def num_train_examples(data: input_pipeline.Dataset) -> int:
  return len(data.train_labels)


def steps_per_epoch(config, data: input_pipeline.Dataset) -> int:
  return input_pipeline.steps_per_epoch(data, config.batch_size)


def check_inputs(config, data: input_pipeline.Dataset) -> np.ndarray:
  """A few inputs on which the composed stages must reproduce the unsplit model."""
  del config
  return input_pipeline.normalise(data, data.test_images[:8])


def train_batches(config, data: input_pipeline.Dataset, start_step: int,
                  with_inputs: bool = True) -> Iterator[tuple[Any, np.ndarray]]:
  """(images, labels) of steps start_step, start_step + 1, ...; with_inputs=False gives the
  images' spec only (a process without stage 0)."""
  return input_pipeline.train_batches(data, config.batch_size, config.seed,
                                      start_step=start_step, images=with_inputs)


def stream_inputs(config, data: input_pipeline.Dataset) -> Callable[[int], np.ndarray]:
  """The inputs of the training stream's batch `batch`, by index (a checkpoint stores the
  index, not the images)."""
  def batch_inputs(batch: int) -> np.ndarray:
    return next(train_batches(config, data, batch))[0]
  return batch_inputs


def eval_batches(config, data: input_pipeline.Dataset):
  return input_pipeline.test_batches(data, config.eval_batch_size)


def eval_record(result: dict) -> dict:
  """What the history keeps of an evaluation."""
  return {'test_loss': result['loss'], 'test_error': 1 - result['accuracy']}


def eval_line(result: dict) -> str:
  return f"test loss {result['loss']:.4f}  test error {1 - result['accuracy']:.4f}"


def summary_fields(data: input_pipeline.Dataset, result: dict, items_per_sec: float) -> dict:
  """The task's fields of summary.json."""
  return {
      'train_images': int(len(data.train_labels)),
      'test_images': int(len(data.test_labels)),
      'test_error': 1.0 - result['accuracy'],
      'test_accuracy': result['accuracy'],
      'test_loss': result['loss'],
      'images_per_sec': items_per_sec,
  }


def final_line(summary: dict) -> str:
  return f"Test error {summary['test_error']:.4f}"


def after_evaluation(config, data, pipe, state, step: int, workdir: str, writer) -> dict:
  """Nothing more to show for images."""
  del config, data, pipe, state, step, workdir, writer
  return {}
