"""The trainer's metrics: one log line per write and TensorBoard event files, without TensorFlow.

Replaces clu's `metric_writers.create_default_writer` and `periodic_actions.ReportProgress`,
which import TensorFlow (about 8 s a process; the GPU machines have none). TensorBoard's own
`EventFileWriter` imports it too where it is installed (for `tf.io.gfile`), so the records are
framed with its `RecordWriter` into a local file. They hold what clu's writer wrote: scalars
and texts under their plain names as `tf.summary.scalar` / `tf.summary.text` write them, and
the hyperparameters as the hparams plugin's session-start record at step 0.

The log lines are metric dumps for the log file: they carry `console=False` (a LogRecord
attribute) so that a console filter can leave them out; the trainer prints its own progress.
"""

import itertools
import os
import socket
import time
from typing import Any, Mapping, Optional

from absl import logging
import numpy as np
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.scalar import summary_v2 as scalar_summary
from tensorboard.plugins.text import summary_v2 as text_summary
from tensorboard.summary.writer.record_writer import RecordWriter

LOG_ONLY = {'console': False}   # `extra=` of the log lines that belong in the log file only
_file_ids = itertools.count()   # two writers of one process in one second get two files


class MetricWriter:
  """Logs every write; with a `logdir`, also writes it to a TensorBoard event file there.

  Writes are synchronous (a record is a few hundred bytes) and flushed at once, so TensorBoard
  sees them live and a killed run keeps what it wrote. Values must be host numbers: converting
  a device array here would wait for the device.
  """

  def __init__(self, logdir: Optional[str] = None):
    self._file = None
    if logdir is not None:
      os.makedirs(logdir, exist_ok=True)
      name = (f'events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.'
              f'{os.getpid()}.{next(_file_ids)}.v2')
      self._file = RecordWriter(open(os.path.join(logdir, name), 'wb'))
      self._add(event_pb2.Event(file_version='brain.Event:2'))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    logging.info('[%d] %s', step, ', '.join(
        f'{k}={v:.6g}' if isinstance(v, (float, np.floating)) else f'{k}={v}'
        for k, v in sorted(scalars.items())), extra=LOG_ONLY)
    for tag, value in scalars.items():
      self._add_summary(step, scalar_summary.scalar_pb(tag, value))

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    logging.info('[%d] Got texts: %s', step, dict(texts), extra=LOG_ONLY)
    for tag, text in texts.items():
      self._add_summary(step, text_summary.text_pb(tag, text))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Nested mappings and sequences become dotted names ('a.b', 'layers.0'), as in clu; None
    becomes '' and a value that is no bool, number or string its str()."""
    flat = {k: v if isinstance(v, (bool, int, float, str, np.generic)) else
            '' if v is None else str(v) for k, v in _flatten(hparams)}
    logging.info('[Hyperparameters] %s', flat, extra=LOG_ONLY)
    self._add_summary(0, hparams_summary.hparams_pb(flat))

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None

  def _add_summary(self, step: int, summary: summary_pb2.Summary) -> None:
    self._add(event_pb2.Event(step=step, summary=summary))

  def _add(self, event: event_pb2.Event) -> None:
    if self._file is not None:
      event.wall_time = time.time()
      self._file.write(event.SerializeToString())
      self._file.flush()


def create_default_writer(logdir: Optional[str], just_logging: bool = False) -> MetricWriter:
  """As clu's: logs on every process; `just_logging` (processes > 0 of a multi-process run)
  writes no event files."""
  return MetricWriter(None if just_logging else logdir)


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> list[tuple[str, Any]]:
  items = []
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping) or hasattr(value, 'items'):   # a ConfigDict is no Mapping
      items += _flatten(value, f'{name}.')
    elif isinstance(value, (list, tuple)):
      items += _flatten(dict(enumerate(value)), f'{name}.')
    else:
      items.append((name, value))
  return items


class ReportProgress:
  """Called after every step; every `every_secs` seconds and at the last step it writes
  `steps_per_sec` and `uptime` (seconds since it was made) and logs one line, as clu's
  `periodic_actions.ReportProgress` does. The first call only starts the clock.

  It times the host's loop and never waits on the device: with asynchronous dispatch the loop
  runs at the device's pace once the dispatch queue is full, so the rate is an estimate.
  """

  def __init__(self, *, num_train_steps: Optional[int] = None,
               writer: Optional[MetricWriter] = None, every_secs: float = 60.0):
    self._num_train_steps = num_train_steps
    self._writer = writer
    self._every_secs = every_secs
    self._start = time.monotonic()
    self._last = None   # (step, time) of the last report, or of the first call

  def __call__(self, step: int, t: Optional[float] = None) -> bool:
    """Returns whether it reported. `t`: the time.monotonic() of the call (tests pass it)."""
    t = time.monotonic() if t is None else t
    if self._last is None:
      self._last = step, t
      return False
    last_step, last_time = self._last
    if step == last_step or (t - last_time <= self._every_secs
                             and step != self._num_train_steps):
      return False
    steps_per_sec = (step - last_step) / max(t - last_time, 1e-9)
    message = f'{steps_per_sec:.1f} steps/s'
    if self._num_train_steps:
      eta = (self._num_train_steps - step) / steps_per_sec
      message += (f', {100 * step / self._num_train_steps:.1f}% ({step}/{self._num_train_steps})'
                  f', ETA: {_format_secs(eta)}')
    logging.info('Progress: %s', message, extra=LOG_ONLY)
    if self._writer is not None:
      self._writer.write_scalars(step, {'steps_per_sec': steps_per_sec,
                                        'uptime': t - self._start})
    self._last = step, t
    return True


def _format_secs(secs: float) -> str:
  """123456.7 -> '1d10h17m', as clu writes an ETA."""
  days, secs = divmod(int(secs), 24 * 3600)
  hours, secs = divmod(secs, 3600)
  return (f'{days}d' if days else '') + (f'{hours}h' if hours else '') + f'{secs // 60}m'
