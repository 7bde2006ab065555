"""The metric writer's event files read back with TensorBoard's own reader, its log lines, the
progress reporter, and that the trainer's writing needs no TensorFlow."""

import glob
import logging
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.util import tensor_util

from fdg_jax.trainer import metric_writer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_events(logdir) -> event_accumulator.EventAccumulator:
  events = event_accumulator.EventAccumulator(str(logdir), size_guidance={'tensors': 0})
  events.Reload()
  return events


def tensor_values(events, tag) -> list[tuple[int, object]]:
  return [(e.step, tensor_util.make_ndarray(e.tensor_proto).item())
          for e in events.Tensors(tag)]


def test_scalars_texts_and_hparams_read_back_as_tensorboard_reads_them(tmp_path, caplog):
  writer = metric_writer.create_default_writer(str(tmp_path))
  config = ml_collections.ConfigDict({'model': 'resnet20', 'beta': 0.5, 'num_stages': 4,
                                      'nesterov': True, 'optim': {'lr': 0.1},
                                      'split': (3, 5), 'data_dir': None})
  with caplog.at_level(logging.INFO):
    writer.write_hparams(config)
    writer.write_scalars(4, {'train_loss': 2.25, 'train_accuracy': np.float32(0.125)})
    writer.write_scalars(8, {'train_loss': 1.5, 'images_per_sec': 7})
    writer.write_texts(8, {'sample': 'the quick fox'})
  writer.close()
  assert len(glob.glob(str(tmp_path / 'events.out.tfevents.*'))) == 1

  events = read_events(tmp_path)
  tags = events.Tags()['tensors']
  assert set(tags) == {'train_loss', 'train_accuracy', 'images_per_sec', 'sample',
                       hparams_metadata.SESSION_START_INFO_TAG}
  assert tensor_values(events, 'train_loss') == [(4, 2.25), (8, 1.5)]
  assert tensor_values(events, 'train_accuracy') == [(4, 0.125)]
  assert tensor_values(events, 'images_per_sec') == [(8, 7.0)]
  assert tensor_values(events, 'sample') == [(8, b'the quick fox')]
  # The plugins TensorBoard shows them in, from each tag's metadata.
  plugins = {tag: events.SummaryMetadata(tag).plugin_data.plugin_name for tag in tags}
  assert plugins == {'train_loss': 'scalars', 'train_accuracy': 'scalars',
                     'images_per_sec': 'scalars', 'sample': 'text',
                     hparams_metadata.SESSION_START_INFO_TAG: 'hparams'}
  start = hparams_metadata.parse_session_start_info_plugin_data(
      events.SummaryMetadata(hparams_metadata.SESSION_START_INFO_TAG).plugin_data.content)
  hparams = {k: v.WhichOneof('kind') and getattr(v, v.WhichOneof('kind'))
             for k, v in start.hparams.items()}
  assert hparams == {'model': 'resnet20', 'beta': 0.5, 'num_stages': 4, 'nesterov': True,
                     'optim.lr': 0.1, 'split.0': 3, 'split.1': 5, 'data_dir': ''}

  lines = [r.getMessage() for r in caplog.records]
  assert '[4] train_accuracy=0.125, train_loss=2.25' in lines
  assert '[8] images_per_sec=7, train_loss=1.5' in lines
  assert "[8] Got texts: {'sample': 'the quick fox'}" in lines
  assert any(line.startswith('[Hyperparameters] ') and "'optim.lr': 0.1" in line
             for line in lines)
  assert all(r.console is False for r in caplog.records)   # the log file's, not the console's


def test_writes_are_on_disk_before_flush_and_just_logging_writes_no_files(tmp_path, caplog):
  writer = metric_writer.create_default_writer(str(tmp_path / 'speaker'))
  writer.write_scalars(1, {'loss': 3.0})
  assert tensor_values(read_events(tmp_path / 'speaker'), 'loss') == [(1, 3.0)]   # not closed
  writer.close()

  quiet = metric_writer.create_default_writer(str(tmp_path / 'other'), just_logging=True)
  with caplog.at_level(logging.INFO):
    quiet.write_scalars(1, {'loss': 3.0})
  quiet.flush()
  quiet.close()
  assert not (tmp_path / 'other').exists()
  assert '[1] loss=3' in [r.getMessage() for r in caplog.records]


def test_two_writers_in_one_process_write_two_files(tmp_path):
  for _ in range(2):
    metric_writer.create_default_writer(str(tmp_path)).close()
  assert len(os.listdir(tmp_path)) == 2


def test_report_progress_writes_rate_and_uptime_at_its_interval_and_the_last_step(
    tmp_path, caplog):
  writer = metric_writer.create_default_writer(str(tmp_path))
  report = metric_writer.ReportProgress(num_train_steps=100, writer=writer, every_secs=60)
  t0 = report._start   # pylint: disable=protected-access
  with caplog.at_level(logging.INFO):
    reported = [report(1, t0 + 10),     # the first call starts the clock
                report(2, t0 + 30),     # within the interval
                report(41, t0 + 90),    # 40 steps in 80 s
                report(42, t0 + 100),
                report(100, t0 + 110)]  # the last step always reports
  writer.close()
  assert reported == [False, False, True, False, True]
  events = read_events(tmp_path)
  assert tensor_values(events, 'steps_per_sec') == [(41, 0.5), (100, pytest.approx(59 / 20))]
  assert tensor_values(events, 'uptime') == [(41, 90.0), (100, 110.0)]
  progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith('Progress')]
  assert progress == ['Progress: 0.5 steps/s, 41.0% (41/100), ETA: 1m',
                      'Progress: 3.0 steps/s, 100.0% (100/100), ETA: 0m']


def test_report_progress_without_a_writer_or_a_step_count_only_logs(caplog):
  report = metric_writer.ReportProgress(every_secs=1)
  with caplog.at_level(logging.INFO):
    assert not report(5, 0.0)
    assert report(9, 2.0)
  assert [r.getMessage() for r in caplog.records] == ['Progress: 2.0 steps/s']


def test_format_secs_as_clu():
  assert metric_writer._format_secs(123456.7) == '1d10h17m'   # pylint: disable=protected-access
  assert metric_writer._format_secs(59) == '0m'   # pylint: disable=protected-access


def imports_without_tensorflow(module: str, then: str = '') -> subprocess.CompletedProcess:
  """Imports `module` (and runs `then`) in a fresh Python where `import tensorflow` fails."""
  code = f"import sys; sys.modules['tensorflow'] = None; import {module}\n{then}"
  return subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                        text=True, timeout=300)


@pytest.mark.slow   # fresh Python processes
def test_the_writer_needs_no_tensorflow(tmp_path):
  # Blocked, and where it is installed: writing must not load it (8 s a process).
  write = (f"w = fdg_jax.trainer.metric_writer.create_default_writer({str(tmp_path)!r})\n"
           "w.write_hparams({'a': 1}); w.write_scalars(1, {'x': 1.0}); w.write_texts(1, {'t': 's'})\n"
           "w.close()\n")
  result = imports_without_tensorflow('fdg_jax.trainer.metric_writer', write)
  assert result.returncode == 0, result.stderr[-3000:]
  code = f"import fdg_jax.trainer.metric_writer\n{write}assert 'tensorflow' not in sys.modules\n"
  result = subprocess.run([sys.executable, '-c', 'import sys\n' + code], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert len(os.listdir(tmp_path)) == 2


@pytest.mark.slow   # a fresh Python process
def test_the_trainer_imports_without_tensorflow():
  result = imports_without_tensorflow('fdg_jax.trainer.train')
  assert result.returncode == 0, result.stderr[-3000:]
