"""The trainer resumes bit-exactly, survives preemption, stops on divergence, guards its workdir."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from fdg_jax.engine import checkpoint
from fdg_jax.trainer import configuration
from fdg_jax.trainer import train
from fdg_jax.trainer import workdir as workdir_lib
from test_train import REPO, TEST_MODEL, small_config, write_image_folder

pytestmark = pytest.mark.slow   # every test runs the trainer


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  return write_image_folder(tmp_path_factory.mktemp('data'))


def config_for(data, tmp_path, **overrides):
  settings = dict(dataset='imagefolder', data_dir=data, cache_dir=str(tmp_path / 'cache'),
                  checkpoint_every_steps=5)
  return small_config(**{**settings, **overrides})


def cli(data, workdir, steps, extra=(), wait=True):
  command = [sys.executable, '-m', 'fdg_jax.main', '--config=configs/cifar10_resnet20.py',
             f'--workdir={workdir}', f'--config.model={TEST_MODEL}',
             '--config.dataset=imagefolder', f'--config.data_dir={data}', '--config.num_stages=2',
             '--config.beta=0.5',
             f'--config.num_train_steps={steps}', '--config.batch_size=8',
             '--config.image_size=16', '--config.log_every_steps=1',
             '--config.eval_batch_size=16', '--config.eval_every_epochs=0',
             '--config.checkpoint_every_steps=5', *extra]
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             FDG_JAX_CACHE=os.path.join(os.path.dirname(str(workdir)), 'cache'))
  if not wait:
    return subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def straight_run(data, tmp_path_factory):
  """36 steps without interruption, in a fresh process."""
  return cli(data, tmp_path_factory.mktemp('straight') / 'work', 36)


def test_a_finished_run_continued_and_preempted_resumes_to_the_straight_run(data, straight_run,
                                                                           tmp_path):
  """One workdir: a run of 12 steps; the same command for 36, stopped by SIGTERM (a preemption)
  after step 14, which saves a checkpoint; the command again, which ends bit for bit where 36
  steps without interruption end. Also: two runs with the same seed (in processes with the same
  device set-up: XLA's CPU code, and so the last bits, depend on the number of devices) give the
  same digest."""
  workdir = tmp_path / 'work'
  first = cli(data, workdir, 12)
  process = cli(data, workdir, 36, wait=False)
  # Reading blocks until a line comes: a run that hangs silently is killed after 300 s, which
  # ends the reads (the assertions below then fail with its output).
  watchdog = threading.Timer(300, process.kill)
  watchdog.start()
  try:
    for line in process.stderr:   # wait for training to run past the resumed step, then preempt
      if 'step 14/36' in line:
        process.send_signal(signal.SIGTERM)
        break
    stderr = process.stderr.read()
    assert process.wait(timeout=300) != 0
  finally:
    watchdog.cancel()
    process.kill()   # a no-op once it has exited
    process.wait(timeout=10)
  assert 'Stopped by SIGTERM' in stderr and 'Resume by running the same command' in stderr
  assert 'Traceback' not in stderr
  assert os.path.exists(workdir / 'summary-step12.json')   # the shorter run's summary is kept
  assert not os.path.exists(workdir / 'summary.json')
  stopped_at = checkpoint.Checkpointer(str(workdir)).latest_step()
  assert 14 <= stopped_at < 36
  resumed = cli(data, workdir, 36)
  assert resumed['resumed_from_step'] == stopped_at
  assert first['params_digest'] != resumed['params_digest']
  assert resumed['params_digest'] == straight_run['params_digest']


def test_divergence_stops_with_step_and_stage_and_keeps_the_checkpoint(data, tmp_path):
  config = config_for(data, tmp_path, num_train_steps=40, learning_rate=1e6, warmup_lr=1e6,
                      log_every_steps=1, checkpoint_every_steps=1)
  with pytest.raises(workdir_lib.DivergenceError, match=r'diverged at step \d+: non-finite') as error:
    train.train_and_evaluate(config, str(tmp_path / 'work'))
  assert 'stage' in str(error.value)
  latest = checkpoint.Checkpointer(str(tmp_path / 'work')).latest_step()
  # Checkpoints are checked before they are written, so the latest one predates the divergence.
  if latest is not None:
    assert f'last good checkpoint (step {latest})' in str(error.value)
    assert latest < int(str(error.value).split('step ')[1].split(':')[0])
  assert not os.path.exists(tmp_path / 'work' / 'summary.json')


def test_resuming_with_a_different_computation_or_model_is_refused(data, tmp_path):
  config = config_for(data, tmp_path, num_train_steps=4)
  train.train_and_evaluate(config, str(tmp_path / 'work'))
  changed = config_for(data, tmp_path, num_train_steps=8, beta=0.9, learning_rate=0.05)
  with pytest.raises(configuration.ConfigError, match="beta: 0.5 there, 0.9 here.*learning_rate"):
    train.train_and_evaluate(changed, str(tmp_path / 'work'))
  # A run saved before a field existed resumes as if it held the field's old-behaviour value.
  saved_config = tmp_path / 'work' / 'config.json'
  old = {k: v for k, v in json.loads(saved_config.read_text()).items()
         if k not in workdir_lib.ADDED_FIELDS}
  saved_config.write_text(json.dumps(old))
  with pytest.raises(configuration.ConfigError, match="residual_policy: '' there, 'dots_saveable' here"):
    train.train_and_evaluate(config_for(data, tmp_path, num_train_steps=6,
                                        residual_policy='dots_saveable'), str(tmp_path / 'work'))
  # Another model's checkpoint is refused by name, before training.
  os.makedirs(tmp_path / 'other')
  shutil.copytree(tmp_path / 'work' / 'checkpoints', tmp_path / 'other' / 'checkpoints')
  with pytest.raises(checkpoint.CheckpointError, match='does not match the model'):
    train.train_and_evaluate(config_for(data, tmp_path, num_train_steps=8, model='resnet20'),
                             str(tmp_path / 'other'))
  longer = config_for(data, tmp_path, num_train_steps=6, log_every_steps=3)
  assert train.train_and_evaluate(longer, str(tmp_path / 'work'))['resumed_from_step'] == 4


