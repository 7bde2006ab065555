"""The task interface: everything task-specific the trainer asks, member by member.

A task is one module holding one subclass of `Task` named in its `TASK` attribute (the built-in
ones are `image_classification` and `language_model`; any importable module works, by its dotted
name in `config.task`). The trainer builds it once per run, `TASK(config)`, and from then on asks
it, never the config, for what differs between tasks: its own config fields and their checks, its
model's blocks, its data and their batch streams, its loss and metrics, the numbers and lines it
reports, and DGL's auxiliary head. The engine knows nothing of tasks: what travels between
stages is any pytree, and the loss and metrics are the task's.

Members a task must define are abstract below; the others have a default that fits most tasks.
"""

import abc
import inspect
from typing import Any, Callable, Iterable, Iterator, Optional

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from fdg_jax.engine import stage_functions


def problem(field: str, what: str, fix: str) -> str:
  """One line for a bad config field, as every check writes it: 'config.FIELD: what. Fix.'"""
  return f'config.{field}: {what}. {fix}'


class Task(abc.ABC):
  """A task of the trainer, bound to one run's config (`self.config`)."""

  # ------------------------------------------------------------ what the task is, without a run

  NAME: str = ''                     # config.task of the built-in tasks ('' = the module's name)
  DATASETS: tuple[str, ...] = ()     # the values config.dataset may take
  TFDS_DATASETS: tuple[str, ...] = ()   # those read through tfds (the trainer imports TF first)
  ITEMS: str = 'examples'            # what the progress line counts per second
  EVAL_SPLIT: str = 'test'           # the prefix of its evaluation metrics ('test', 'val')
  AUX_HEADS: tuple[str, ...] = ()    # names config.aux_head may take (DGL's heads), if any
  # Its fields that change only the length or logging of a run: a resumed run may change them.
  RESUMABLE_FIELDS: frozenset = frozenset()
  # Its fields added after runs could be checkpointed, with the value that computes what such a
  # run did: a saved config without one of them resumes as if it held that value.
  ADDED_FIELDS: dict = {}
  # Its fields that fix the network's variables beside config.model (their shapes or meaning): a
  # run started from another run's network (config.init_from) must have the same values.
  ARCHITECTURE_FIELDS: tuple[str, ...] = ()
  # `(outputs, targets) -> per-example losses` and the clu metrics of training and evaluation.
  loss_fn: Callable[[Any, Any], jax.Array] = staticmethod(stage_functions.cross_entropy_loss)
  metrics: type = stage_functions.LossAndAccuracy

  @staticmethod
  @abc.abstractmethod
  def config_fields() -> ml_collections.ConfigDict:
    """The task's own config fields with their defaults, each with a comment above it (the
    comments are the fields' documentation in `--help`)."""

  @classmethod
  def config_fields_source(cls) -> str:
    """The source of `config_fields`, from which `--help` reads each field's comment."""
    return inspect.getsource(cls.config_fields)

  @staticmethod
  @abc.abstractmethod
  def model_names() -> tuple[str, ...]:
    """The values config.model may take."""

  # ------------------------------------------------------------ one run

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  def validate(self) -> list[str]:
    """One `problem(...)` line per bad field of the task's own (none by default); called before
    any data is read. The trainer has checked config.model and config.dataset already."""
    return []

  @abc.abstractmethod
  def num_blocks(self) -> int:
    """Blocks of config.model (the most stages a split can make)."""

  @abc.abstractmethod
  def create_blocks(self, num_outputs: int) -> tuple[list[nn.Module], list[str]]:
    """The model as an ordered list of flax blocks and their names; `num_outputs` is
    `num_outputs(data)` (classes, or the vocabulary's size). Each block is called as
    `block(x, train=bool)` (`models.partition.StageModule` chains a run of them into a stage)."""

  @abc.abstractmethod
  def input_spec(self, batch_size: int) -> Any:
    """One batch of inputs as the first stage sees it (a `jax.ShapeDtypeStruct` tree)."""

  def known_num_outputs(self) -> Optional[int]:
    """The model's output size when the config alone says it (a dry run then reads no data);
    None when only the data can tell."""
    return None

  def aux_head(self) -> Optional[Callable[[int, int], nn.Module]]:
    """DGL's auxiliary head factory `(stage, num_outputs) -> module` (None: DGL not offered)."""
    return None

  def start_from(self, source_workdir: str, workdir: str) -> list[str]:
    """config.init_from: one `problem(...)` line per reason the network of the run in
    `source_workdir` cannot start this run, beyond `ARCHITECTURE_FIELDS` (none by default);
    otherwise what the two runs must share becomes this run's, in `workdir` (the language
    model's vocabulary, which the network's embedding and head index). Called on a fresh start
    only, before any data is read."""
    del source_workdir, workdir
    return []

  # ------------------------------------------------------------ data

  @abc.abstractmethod
  def load_data(self, workdir: Optional[str] = None) -> Any:
    """The run's data; `workdir` is where a task may store and later find what must stay the
    same across a resume (a vocabulary). Fails with `fdg_jax.data.DataError`, in one line."""

  @abc.abstractmethod
  def num_outputs(self, data) -> int:
    """The model's output size for these data."""

  @abc.abstractmethod
  def describe(self, data) -> str:
    """One line about the data, for the log."""

  @abc.abstractmethod
  def num_train_examples(self, data) -> int:
    """Examples (or tokens) in the training split."""

  @abc.abstractmethod
  def steps_per_epoch(self, data) -> int:
    """Batches per epoch (0: the batch is larger than the data)."""

  def items_per_step(self) -> int:
    """The items a batch holds, for the progress line's rate (`ITEMS` per second)."""
    return self.config.batch_size

  @abc.abstractmethod
  def check_inputs(self, data) -> np.ndarray:
    """A few inputs on which the composed stages must reproduce the unsplit model."""

  @abc.abstractmethod
  def train_batches(self, data, start_step: int,
                    with_inputs: bool = True) -> Iterator[tuple[Any, Any]]:
    """(inputs, targets) of steps start_step, start_step + 1, ..., a function of (seed, step)
    only, so a resumed run continues the same stream; with_inputs=False may give the inputs'
    spec instead of the inputs (a process without stage 0)."""

  def stream_inputs(self, data) -> Callable[[int], Any]:
    """The inputs of the training stream's batch `batch`, by index (a checkpoint stores the
    index, not the inputs)."""
    def batch_inputs(batch: int):
      return next(self.train_batches(data, batch))[0]
    return batch_inputs

  @abc.abstractmethod
  def eval_batches(self, data) -> Iterable[tuple]:
    """(inputs, targets[, mask]) batches of the evaluation split."""

  # ------------------------------------------------------------ what the run reports

  @abc.abstractmethod
  def eval_record(self, result: dict) -> dict:
    """What the history keeps of an evaluation (`result`: the metrics' values)."""

  @abc.abstractmethod
  def eval_line(self, result: dict) -> str:
    """The log line of an evaluation."""

  @abc.abstractmethod
  def summary_fields(self, data, result: dict, items_per_sec: float) -> dict:
    """The task's fields of summary.json."""

  @abc.abstractmethod
  def final_line(self, summary: dict) -> str:
    """The run's last log line."""

  def after_evaluation(self, data, pipe, state, step: int, workdir: str, writer) -> dict:
    """Anything more to show after an evaluation (the language model samples text); its
    values join the evaluation's result. Every process calls it."""
    del data, pipe, state, step, workdir, writer
    return {}
