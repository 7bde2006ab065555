"""The trainer end to end (tfds mock data, a generated image folder, the CLI) and its checks."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import cifar10_resnet20
from configs import cpu_quick
from configs import default as default_config
from fdg_jax import data
from fdg_jax.data import image_sources
from fdg_jax.engine import methods
from fdg_jax.engine import optimizers
from fdg_jax.engine import timeline
from fdg_jax import tasks
from fdg_jax.trainer import configuration
from fdg_jax.trainer import optimizers as optimizer_config
from fdg_jax.trainer import train
from fdg_jax.trainer import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY_KEYS = {
    'model', 'dataset', 'method', 'num_stages', 'beta', 'stash', 'residual_policy',
    'compensation', 'peak_host_memory_mib', 'steps',
    'epochs', 'test_error', 'test_accuracy', 'train_time_s', 'images_per_sec', 'trainable_params',
    'extra_params', 'stage_split', 'devices', 'jax_version', 'params_digest'}


# The tests' model: ResNet-8 compiles in a fraction of ResNet-20's time, which dominated the
# trainer tests; every code path the trainer takes is the same for both.
TEST_MODEL = 'resnet8'


def write_image_folder(root, num_classes=3, train_per_class=12, test_per_class=4, size=16):
  rng = np.random.default_rng(0)
  for split, count in (('train', train_per_class), ('test', test_per_class)):
    for c in range(num_classes):
      folder = root / split / f'class{c}'
      folder.mkdir(parents=True)
      for i in range(count):
        image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        image[..., c] = 255   # a learnable colour cue per class
        Image.fromarray(image).save(folder / f'{i}.png')
  return str(root)


def small_config(**overrides):
  config = default_config.get_config()
  config.update(model=TEST_MODEL, num_stages=2, beta=0.5, batch_size=8, num_train_steps=6,
                log_every_steps=2, eval_every_epochs=0, eval_batch_size=16, image_size=16,
                lr_boundaries_epochs=(1,))
  config.update(**overrides)
  return config


def check_summary(summary, workdir, **expected):
  with open(os.path.join(workdir, 'summary.json')) as f:
    on_disk = json.load(f)
  assert on_disk == summary
  assert SUMMARY_KEYS <= set(summary)
  for key, value in expected.items():
    assert summary[key] == value, key
  assert 0.0 <= summary['test_error'] <= 1.0
  assert summary['test_error'] == pytest.approx(1 - summary['test_accuracy'])
  assert summary['trainable_params'] > 0
  assert len(summary['params_digest']) == 64
  assert len(summary['devices']) == summary['num_stages']
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(workdir))


@pytest.mark.slow
def test_train_and_evaluate_on_tfds_mock_data(tmp_path):
  config = small_config(dataset='cifar10', image_size=32, num_stages=2,
                        compensation='delay_compensation')
  with tfds.testing.mock_data(num_examples=48):
    summary = train.train_and_evaluate(config, str(tmp_path))
  check_summary(summary, str(tmp_path), method='fdg', num_stages=2, steps=6, model=TEST_MODEL,
                extra_params=0, compensation='delay_compensation')
  assert summary['devices'] == [str(d) for d in jax.devices()[:2]]
  assert summary['stage_split'] and len(summary['stage_split']) == 1


@pytest.mark.slow
@pytest.mark.parametrize('method, microbatches', [('gpipe', 2), ('1f1b', 4), ('bp', 2)])
def test_trainer_runs_the_synchronous_schedules(method, microbatches, tmp_path):
  """GPipe, 1F1B (K = 2) and BP over microbatches through the trainer: one update per batch,
  every stage at the same step, nothing in flight; grad_clip reaches the engine as the whole
  model's clipping, and the optimizer itself does not clip."""
  data = write_image_folder(tmp_path / 'data')
  config = small_config(dataset='imagefolder', data_dir=data, method=method,
                        microbatches=microbatches, grad_clip=1.0,
                        cache_dir=str(tmp_path / 'cache'), checkpoint_every_steps=3)
  summary = train.train_and_evaluate(config, str(tmp_path / 'work'))
  num_stages = 1 if method == 'bp' else 2
  check_summary(summary, str(tmp_path / 'work'), method=method, num_stages=num_stages,
                microbatches=microbatches, steps=6)
  task = configuration.create_task(config)
  run = train.initial_run(config, task, 3, 10)
  assert run.pipe.method.microbatches == microbatches and run.pipe.method.grad_clip == 1.0
  assert run.recipe.grad_clip == 1.0   # the run's recipe says it; the stages' optimizers don't
  assert all(len(s.opt_state) == 2 for s in run.state.stages)   # decay, sgd: no clipping


@pytest.mark.slow
@pytest.mark.parametrize('compensation', ['none', 'delay_compensation'])
def test_trainer_runs_fdg_with_microbatches_and_resumes_it(compensation, tmp_path):
  """FDG K = 2 over 2 microbatches through the trainer, checkpointed with microbatches in
  flight (with delay compensation, each batch's forward parameters too) and resumed: the same
  parameters as the uninterrupted run, bit for bit."""
  data = write_image_folder(tmp_path / 'data')
  config = small_config(dataset='imagefolder', data_dir=data, method='fdg', microbatches=2,
                        cache_dir=str(tmp_path / 'cache'), grad_clip=1.0,
                        compensation=compensation)
  straight = train.train_and_evaluate(config, str(tmp_path / 'straight'))
  check_summary(straight, str(tmp_path / 'straight'), method='fdg', num_stages=2,
                microbatches=2, steps=6)
  first = train.train_and_evaluate(small_config(**{**config.to_dict(), 'num_train_steps': 3}),
                                   str(tmp_path / 'resumed'))
  assert first['steps'] == 3
  resumed = train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert resumed['resumed_from_step'] == 3
  assert resumed['params_digest'] == straight['params_digest']


@pytest.mark.slow
@pytest.mark.parametrize('method, num_stages', [('ddg', 3), ('dgl', 3)])   # BP: quick config
def test_train_and_evaluate_other_methods_on_image_folder(method, num_stages, tmp_path):
  data = write_image_folder(tmp_path / 'data')
  config = small_config(dataset='imagefolder', data_dir=data, method=method, num_stages=3,
                        aux_head='conv', cache_dir=str(tmp_path / 'cache'),
                        timeline_start_step=2, timeline_num_steps=3,
                        compensation='weight_prediction' if method == 'ddg' else 'none')
  summary = train.train_and_evaluate(config, str(tmp_path / 'work'))
  check_summary(summary, str(tmp_path / 'work'), method=method, num_stages=num_stages,
                extra_params=summary['extra_params'])
  # The timeline works for every method (FDG's is drawn in test_cli_fdg_two_simulated_devices).
  assert (tmp_path / 'work' / 'timeline.png').stat().st_size > 1000
  assert len(summary['stage_split']) == num_stages - 1
  # Only DGL adds parameters (its auxiliary heads); the network is the same for all methods.
  assert (summary['extra_params'] > 0) == (method == 'dgl')
  assert summary['trainable_params'] == 78_042 - 7 * 65   # resnet8, 3 classes instead of 10


# `python -m fdg_jax.main` in a Python where importing TensorFlow or tfds fails (as on a machine
# without them): an image-folder or text-file job must not need them.
WITHOUT_TENSORFLOW = ("import runpy, sys; sys.modules['tensorflow'] = None; "
                      "sys.modules['tensorflow_datasets'] = None; "
                      "runpy.run_module('fdg_jax.main', run_name='__main__', alter_sys=True)")


@pytest.mark.slow
def test_cli_fdg_two_simulated_devices(tmp_path):
  """The issue's acceptance command, at test scale, in a fresh process where TensorFlow cannot
  be imported."""
  data = write_image_folder(tmp_path / 'data')
  workdir = tmp_path / 'work'
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             FDG_JAX_CACHE=str(tmp_path / 'cache'))
  result = subprocess.run(
      [sys.executable, '-c', WITHOUT_TENSORFLOW, '--config=configs/cifar10_resnet20.py',
       f'--workdir={workdir}', '--config.dataset=imagefolder', f'--config.data_dir={data}',
       f'--config.model={TEST_MODEL}', '--config.method=fdg', '--config.num_stages=2',
       '--config.beta=0.5', '--config.num_train_steps=8', '--config.batch_size=8',
       '--config.image_size=16', '--config.log_every_steps=4', '--config.eval_batch_size=16',
       '--config.timeline_start_step=4', '--config.timeline_num_steps=3'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'FLOPs share' in result.stdout   # the stage table
  with open(workdir / 'summary.json') as f:
    summary = json.load(f)
  assert SUMMARY_KEYS <= set(summary)
  assert summary['num_stages'] == 2 and summary['steps'] == 8 and summary['beta'] == 0.5
  assert len(set(summary['devices'])) == 2   # one stage per simulated device
  assert (workdir / 'timeline.png').stat().st_size > 1000
  # The console holds what is trained, progress, evaluation, checkpoint and the end; the
  # libraries' INFO lines (orbax, TensorFlow's banners) only the log file.
  console = (result.stdout + result.stderr).strip().splitlines()
  assert len(console) <= 25, '\n'.join(console)
  for noise in ('CheckpointManager', 'oneDNN', 'libtpu', '[Hyperparameters]', 'Progress:'):
    assert noise not in result.stdout + result.stderr, noise
  assert sum('step 8/8' in line for line in console) == 1   # one progress line per log step
  assert sum('checkpoint saved' in line for line in console) == 1
  log = (workdir / workdir_lib.LOG_FILE).read_text()
  assert 'CheckpointManager' in log and 'step 8/8' in log


def logged_train_losses(workdir) -> list[float]:
  """The training losses of a run's progress lines (log.txt), in step order."""
  with open(os.path.join(workdir, 'log.txt')) as f:
    return [float(m) for m in re.findall(r'step \d+/\d+ .*? loss (\S+)', f.read())]


@pytest.mark.slow
def test_stages_on_two_devices_each_compute_what_one_device_computes(tmp_path, capsys):
  """K = 2 x D = 2 (config.data_parallel) trains as K = 2 on one device each: the same training
  losses; the stage table and the summary list the four devices. (The engine tests check the
  exactness at rel 1e-5; here the wiring. The test loss is not compared: after a few steps on
  this tiny problem the evaluation's running statistics amplify rounding, which depends on the
  processor and the device count, by orders of magnitude.)"""
  data = write_image_folder(tmp_path / 'data')
  config = cifar10_resnet20.get_config()
  config.update(model=TEST_MODEL, dataset='imagefolder', data_dir=data, num_stages=2,
                num_train_steps=6, batch_size=8, image_size=16, log_every_steps=2,
                eval_batch_size=16, learning_rate=0.01, cache_dir=str(tmp_path / 'cache'))
  single = train.train_and_evaluate(config, str(tmp_path / 'single'))
  config.data_parallel = 2
  capsys.readouterr()
  spread = train.train_and_evaluate(config, str(tmp_path / 'spread'))
  table = capsys.readouterr().out
  assert 'cpu:0, cpu:1' in table and 'cpu:2, cpu:3' in table   # each stage's two devices
  assert spread['data_parallel'] == 2 and single['data_parallel'] == 1
  assert len(set(spread['devices'])) == 4 and len(set(single['devices'])) == 2
  losses = logged_train_losses(tmp_path / 'spread')
  assert len(losses) == 3   # steps 2, 4, 6 (printed to 4 decimals)
  np.testing.assert_allclose(losses, logged_train_losses(tmp_path / 'single'), atol=2e-4)


@pytest.mark.slow
def test_cli_bad_config_is_one_clear_line(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'fdg_jax.main', '--config=configs/cpu_quick.py',
       f'--workdir={tmp_path}', '--config.beta=1.5'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert 'config.beta' in result.stderr and '(0, 1]' in result.stderr
  assert 'Traceback' not in result.stderr
  assert not os.listdir(tmp_path)   # failed before writing anything


@pytest.mark.parametrize('overrides, field', [
    (dict(beta=0.0), 'config.beta'),
    (dict(beta=1.01), 'config.beta'),
    (dict(num_stages=9), 'config.num_stages'),           # more stages than the 8 devices
    (dict(num_stages=12, stage_devices=(0,) * 12), 'config.num_stages'),  # > 11 blocks
    (dict(model='resnet21'), 'config.model'),
    (dict(method='pipedream'), 'config.method'),
    (dict(method='dgl', aux_head='big'), 'config.aux_head'),
    (dict(dataset='mnist'), 'config.dataset'),
    (dict(dataset='imagefolder', data_dir=''), 'config.data_dir'),
    (dict(dataset='imagefolder', data_dir='/no/such/folder'), 'config.data_dir'),
    (dict(stash='disk'), 'config.stash'),
    (dict(residual_policy='save_all'), 'config.residual_policy'),
    (dict(stash='recompute', residual_policy='dots_saveable'), 'config.residual_policy'),
    (dict(method='dgl', residual_policy='dots_saveable'), 'config.residual_policy'),
    (dict(split=(3, 6)), 'config.split'),
    (dict(split=(11,)), 'config.split'),
    (dict(stage_devices=(0, 8)), 'config.stage_devices'),
    (dict(num_train_steps=0), 'config.num_train_steps'),
    (dict(split_by='memory'), 'config.split_by'),
    (dict(data_parallel=0), 'config.data_parallel'),
    (dict(data_parallel=3), 'config.batch_size'),                  # 8 does not split over 3
    (dict(data_parallel=2, eval_batch_size=15), 'config.eval_batch_size'),
    (dict(data_parallel=8), 'config.data_parallel'),               # 2 x 8 > 8 devices
    (dict(data_parallel=4, stage_devices=(0, 6)), 'config.stage_devices'),   # 6..9
    (dict(compensation='momentum'), 'config.compensation'),
    (dict(method='bp', compensation='lr_reschedule'), 'config.compensation'),
    (dict(method='dgl', compensation='weight_prediction'), 'config.compensation'),
    (dict(stash='recompute', compensation='delay_compensation'), 'config.compensation'),
    (dict(compensation='delay_compensation', dc_decay=1.0), 'config.dc_decay'),
    (dict(compensation='lr_reschedule', lr_reschedule_fraction=0.0),
     'config.lr_reschedule_fraction'),
    (dict(warmup_shape='cosine'), 'config.warmup_shape'),
    (dict(task='language_model'), 'config.task'),   # its fields come with tasks.configure
    (dict(microbatches=0), 'config.microbatches'),
    (dict(method='ddg', microbatches=2), 'config.microbatches'),
    (dict(method='dgl', microbatches=2, aux_head='conv'), 'config.microbatches'),
    (dict(method='bp', microbatches=2, compensation='nesterov'), 'config.compensation'),
    (dict(method='gpipe', microbatches=3), 'config.batch_size'),
    (dict(method='1f1b', microbatches=2, stash='recompute'), 'config.stash'),
    (dict(method='1f1b', compensation='nesterov'), 'config.compensation'),
    (dict(task='no_such_task'), 'config.task'),
])
def test_bad_config_fails_before_any_compute(overrides, field, tmp_path, monkeypatch):
  def must_not_load(*args, **kwargs):
    raise AssertionError('data was loaded before the config was checked')
  monkeypatch.setattr(image_sources, 'load_dataset', must_not_load)
  with pytest.raises(configuration.ConfigError, match=field.replace('.', r'\.')) as error:
    train.train_and_evaluate(small_config(**overrides), str(tmp_path / 'work'))
  assert '. ' in str(error.value)   # problem, then the fix
  assert not (tmp_path / 'work').exists()


def test_missing_tfds_data_offline_says_how_to_provide_data(tmp_path):
  config = small_config(dataset='cifar100', data_dir=str(tmp_path / 'empty_tfds'))
  with pytest.raises(data.DataError, match='imagefolder'):
    train.train_and_evaluate(config, str(tmp_path / 'work'))


def test_learning_rate_schedule_follows_the_paper():
  config = default_config.get_config()
  schedule = optimizer_config.learning_rate_schedule(config, steps_per_epoch=10)
  assert float(schedule(0)) == pytest.approx(0.1)
  assert float(schedule(1499)) == pytest.approx(0.1)
  assert float(schedule(1500)) == pytest.approx(0.01)
  assert float(schedule(2250)) == pytest.approx(0.001)
  assert float(schedule(2750)) == pytest.approx(0.0001)
  config.warmup_epochs = 3
  schedule = optimizer_config.learning_rate_schedule(config, steps_per_epoch=10)
  assert float(schedule(29)) == pytest.approx(0.01)
  assert float(schedule(30)) == pytest.approx(0.1)
  assert float(schedule(1500)) == pytest.approx(0.01)   # boundaries stay at their epochs
  config.warmup_shape = 'linear'
  schedule = optimizer_config.learning_rate_schedule(config, steps_per_epoch=10)
  # From warmup_lr at step 0 to learning_rate at step 30, in equal steps of 0.09 / 30.
  assert [float(schedule(s)) for s in (0, 10, 29, 30, 31)] == pytest.approx(
      [0.01, 0.04, 0.097, 0.1, 0.1])
  assert float(schedule(1500)) == pytest.approx(0.01)


def test_optimizer_is_pytorch_sgd_with_coupled_weight_decay():
  config = default_config.get_config()
  optimizer = optimizers.build(optimizer_config.recipe(config, steps_per_epoch=10))
  params = {'w': np.array([1.0, -2.0], np.float32)}
  grads = [{'w': np.array([0.5, 0.25], np.float32)}, {'w': np.array([-1.0, 2.0], np.float32)}]
  state = optimizer.init(params)
  # PyTorch SGD: d = g + wd * p; buf = momentum * buf + d; p -= lr * buf.
  p, buf = params['w'].copy(), np.zeros(2, np.float32)
  for g in grads:
    updates, state = optimizer.update(g, state, params)
    params = {'w': params['w'] + np.asarray(updates['w'])}
    buf = 0.9 * buf + (g['w'] + 5e-4 * p)
    p = p - 0.1 * buf
  np.testing.assert_allclose(params['w'], p, rtol=1e-6)


def test_params_digest_is_order_independent_and_sensitive():
  a = {'params': {'x': np.ones(3, np.float32), 'y': np.zeros(2, np.float32)}}
  b = {'params': {'y': np.zeros(2, np.float32), 'x': np.ones(3, np.float32)}}
  assert train.params_digest(a) == train.params_digest(b)
  c = {'params': {'x': np.array([1, 1, 1.0000001], np.float32), 'y': np.zeros(2, np.float32)}}
  assert train.params_digest(a) != train.params_digest(c)


@pytest.mark.slow
def test_timeline_that_cannot_be_drawn_is_a_warning(tmp_path, monkeypatch, caplog):
  def broken(*args, **kwargs):
    raise RuntimeError('no such trace')
  monkeypatch.setattr(timeline, 'events_from_trace', broken)
  data = write_image_folder(tmp_path / 'data')
  config = small_config(dataset='imagefolder', data_dir=data, method='bp', num_train_steps=4,
                        cache_dir=str(tmp_path / 'cache'), timeline_start_step=2,
                        timeline_num_steps=2)
  summary = train.train_and_evaluate(config, str(tmp_path / 'work'))
  assert summary['steps'] == 4 and not (tmp_path / 'work' / 'timeline.png').exists()
  assert any('No timeline drawn' in r.getMessage() and 'no such trace' in r.getMessage()
             for r in caplog.records if r.levelname == 'WARNING')


@pytest.mark.parametrize('method, num_stages', [
    ('bp', 1), ('fdg', 2), ('fdg', 3), ('ddg', 3), ('dgl', 2)])
def test_quick_config_runs_every_method_and_k_on_one_device(method, num_stages):
  config = cpu_quick.get_config()
  config.update(method=method, num_stages=num_stages)
  configuration.validate_config(config)
  stages = 1 if method == 'bp' else num_stages
  assert configuration.stage_device_indices(config) == ((0,),) * stages


@pytest.mark.parametrize('compounds, betas', [(True, (0.5, 0.5, 0.5)), (False, (1.0, 0.5, 1.0))])
def test_trainer_gives_the_engine_each_stages_beta(compounds, betas):
  """config.beta_compounds reaches the engine as one factor per stage (pipeline.stage_betas;
  the engine test checks what those factors compute)."""
  config = small_config(num_stages=3, beta_compounds=compounds)
  configuration.validate_config(config)
  task = configuration.create_task(config)
  stages, _, _, placements = train.build_stages(config, task, 10, jax.random.key(0))
  pipe = train.create_pipeline(config, task, stages, optimizer_config.recipe(config, 10),
                               placements, 10, 10)
  assert pipe.betas == betas


@pytest.mark.slow
def test_quick_config_trains_with_bp(tmp_path):
  """configs/cpu_quick.py as it is, with --config.method=bp, at test scale."""
  config = cpu_quick.get_config()
  config.update(method='bp', dataset='imagefolder', data_dir=write_image_folder(tmp_path / 'd'),
                cache_dir=str(tmp_path / 'cache'), train_subset=-1, test_subset=-1,
                image_size=16, batch_size=8, num_train_steps=3, eval_batch_size=12,
                timeline_start_step=2, timeline_num_steps=2)
  summary = train.train_and_evaluate(config, str(tmp_path / 'work'))
  check_summary(summary, str(tmp_path / 'work'), method='bp', num_stages=1, extra_params=0)
  assert summary['devices'] == [str(jax.devices()[0])]
  assert (tmp_path / 'work' / 'timeline.png').stat().st_size > 1000   # BP's timeline too
  # Nothing a user has is overwritten: a second run into the same workdir is refused.
  with pytest.raises(configuration.ConfigError, match='already holds a finished run'):
    train.train_and_evaluate(config, str(tmp_path / 'work'))


def test_every_config_field_is_documented():
  """The trainer's fields in configs/default.py, each task's in its config_fields."""
  docs = configuration.field_docs()
  task_fields = set(tasks.get('image_classification').config_fields())
  fields = set(default_config.get_config().keys()) - task_fields
  assert fields <= set(docs), fields - set(docs)
  assert all(len(docs[f]) > 10 for f in fields)
  for name in tasks.BUILTIN:
    task = tasks.get(name)
    task_docs = configuration.task_field_docs(task)
    assert set(task.config_fields()) == set(task_docs), name
    assert all(len(doc) > 10 for doc in task_docs.values()), name


@pytest.mark.slow
def test_cli_help_dry_run_and_misspelt_field(tmp_path):
  def cli(*args):
    return subprocess.run([sys.executable, '-m', 'fdg_jax.main', *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  help_text = cli('--help').stdout
  for field, doc in configuration.field_docs().items():
    assert f'--config.{field}  (default ' in help_text, field
  methods_section = help_text.split('Methods (config.method):')[1]
  for name, info in methods.REGISTRY.items():   # the registry's methods, with what they are
    assert f'  {name}: {info.description}' in methods_section, name
  for name in tasks.BUILTIN:   # each task's own fields, under it
    section = help_text.split(f"Fields of task '{name}'")[1]
    for field in tasks.get(name).config_fields():
      assert f'--config.{field}  (default ' in section, (name, field)
  assert 'Gradient-shrinking factor' in help_text and '--dry_run' in help_text

  misspelt = cli('--config=configs/cpu_quick.py', f'--workdir={tmp_path / "w"}',
                 '--config.bata=0.5')
  assert misspelt.returncode != 0
  assert misspelt.stderr.strip().splitlines() == [
      'error: --config.bata: no such config field; did you mean --config.beta? '
      '(python -m fdg_jax.main --help lists the fields)']

  dry = cli('--config=configs/cpu_quick.py', '--dry_run', '--config.num_stages=3',
            f'--config.model={TEST_MODEL}', '--config.image_size=16')
  assert dry.returncode == 0, dry.stderr[-2000:]
  assert 'beta: 0.5' in dry.stdout and f'Stages of {TEST_MODEL} (fdg, K=3)' in dry.stdout
  assert not (tmp_path / 'w').exists()   # nothing trained, nothing written


def test_split_by_measured_time_balances_block_times_and_shows_both_shares():
  from fdg_jax import models
  from fdg_jax.models import partition  # pylint: disable=g-import-not-at-top
  blocks = models.create_blocks('resnet20', 10)
  times = partition.block_times(blocks, (8, 16, 16, 3), repeats=2)
  assert len(times) == len(blocks) and all(t > 0 for t in times)
  split = partition.balanced_split(times, 2)
  table = partition.stage_table(split, models.block_names('resnet20'), [1, 1],
                                partition.block_flops(blocks, (8, 16, 16, 3)), ['d0', 'd1'],
                                times)
  assert 'FLOPs share' in table and 'time share' in table
  shares = [float(line.split('%')[1].split()[-1]) for line in table.splitlines()[2:]]
  assert abs(sum(shares) - 100) < 0.2   # the time shares of the stages add up


def test_a_workdir_from_before_task_fields_resumes_and_a_changed_task_field_is_refused(tmp_path):
  """Configs saved before each task had its own fields hold both tasks' fields: the other
  task's are ignored (no code reads them), the run's own are compared as before."""
  from configs import shakespeare_char_cpu   # pylint: disable=import-outside-toplevel
  config = shakespeare_char_cpu.get_config()
  task = configuration.create_task(config)
  old = {**workdir_lib.jsonable(config), 'image_size': 32, 'train_subset': -1,
         'test_subset': -1, 'cache_dir': ''}   # as every config.json had them then
  (tmp_path / workdir_lib.CONFIG_FILE).write_text(json.dumps(old))
  workdir_lib.check_config_matches(config, str(tmp_path), task)
  config.n_layer = 6
  with pytest.raises(configuration.ConfigError, match="n_layer: 4 there, 6 here"):
    workdir_lib.check_config_matches(config, str(tmp_path), task)
  config.n_layer, config.sample_tokens = 4, 0   # the task's resumable field may change
  workdir_lib.check_config_matches(config, str(tmp_path), task)
