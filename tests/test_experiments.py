"""The experiment grid (experiments/grids/: grid, cells, runner, reports) and the scripts'
reports, without training.

A fake runner stands in for `python -m fdg_jax.main`: it writes a summary.json with a history, as
the trainer does, and records which cells it was asked to run.
"""

import csv
import json
import math
import os
import subprocess
import sys
from unittest import mock

from absl import app
import pytest

from experiments.grids import cells as cells_lib
from experiments.grids import grid
from experiments.grids import metrics
from experiments.grids import relocate
from experiments.grids import reports
from experiments.grids import runner as runner_lib
from experiments.lm import depth_grid
from experiments.lm import shakespeare_grid
from experiments.paper import compensation_grid
from experiments.paper import fig4a_beta
from experiments.paper import published
from experiments.paper import table2
from experiments.paper import table4
from experiments.bench import action_timeline
from experiments.bench import schedule_cost
from experiments.probes import transfers
from fdg_jax.engine import checkpoint as checkpoint_lib
from fdg_jax.engine import schedule as schedule_lib
from fdg_jax.trainer import configuration
from fdg_jax.trainer import workdir as workdir_lib
from conftest import OTHER_XLA_FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def options(tmp_path, **kwargs):
  kwargs.setdefault('seeds', (0, 1))
  return cells_lib.Options(name='test', out_dir=str(tmp_path / 'out'), argv=('test',), **kwargs)


def fake_summary(cell, error=None):
  """What the trainer writes, with a test error that depends on the cell."""
  error = error if error is not None else 0.30 + 0.1 * (1 - cell.beta) + 0.01 * cell.seed
  history = [{'step': 10 * e, 'epoch': float(e), 'test_loss': 1.0, 'test_error': error + 0.1 / e}
             for e in (1, 2, 3)]
  history[-1]['test_error'] = error
  return {'model': cell.model, 'dataset': 'cifar10', 'method': cell.method,
          'num_stages': cell.num_stages, 'beta': cell.beta, 'stash': 'vjp', 'steps': 30,
          'epochs': 3.0, 'batch_size': 128, 'train_images': 1280, 'test_images': 1000,
          'test_error': error, 'test_accuracy': 1 - error, 'test_loss': 1.0,
          'train_time_s': 100.0 / cell.num_stages, 'images_per_sec': 38.4 * cell.num_stages,
          'resumed_from_step': 0, 'trainable_params': 1000,
          'extra_params': 50 if cell.method == 'dgl' else 0, 'stage_split': [5],
          'devices': ['TFRT_CPU_0'], 'jax_version': 'test', 'params_digest': 'ab',
          'history': history}


class FakeRunner:

  def __init__(self, fail=()):
    self.ran = []
    self.fail = set(fail)

  def __call__(self, cell, workdir):
    self.ran.append(cell.name)
    if cell.name in self.fail:
      raise runner_lib.RunFailed('exit status 1')
    os.makedirs(os.path.join(workdir, checkpoint_lib.CHECKPOINT_DIR, '30'))
    with open(os.path.join(workdir, workdir_lib.SUMMARY_FILE), 'w') as f:
      json.dump(fake_summary(cell), f)


def test_cell_names_and_labels(tmp_path):
  opts = options(tmp_path)
  f = 'configs/cifar10_resnet20.py'
  bp = cells_lib.make_cell(opts, f, method='bp', seed=1, num_stages=4, beta=0.5)
  fdg = cells_lib.make_cell(opts, f, method='fdg', num_stages=2, beta=0.5, seed=0)
  ddg = cells_lib.make_cell(opts, f, method='ddg', num_stages=3, beta=0.5, seed=2)
  assert bp.name == 'resnet20_bp_seed1' and (bp.num_stages, bp.beta) == (1, 1.0)
  assert fdg.name == 'resnet20_fdg_k2_beta0.5_seed0' and fdg.label == 'FDG K=2 β=0.5'
  assert ddg.name == 'resnet20_ddg_k3_seed2' and ddg.beta == 1.0   # DDG: no shrinking
  # beta=None: the config file's (the paper's best beta for ResNet-20, 0.2).
  assert cells_lib.make_cell(opts, f, method='fdg', seed=0).name == 'resnet20_fdg_k2_beta0.2_seed0'
  assert fdg.group == cells_lib.make_cell(opts, f, method='fdg', num_stages=2, beta=0.5,
                                          seed=3).group


def test_cpu_scale_compresses_the_schedule(tmp_path):
  cell = cells_lib.make_cell(options(tmp_path), 'configs/cifar10_resnet56_k3.py', method='fdg',
                             seed=0)
  o = cell.override_dict()
  assert o['lr_boundaries_epochs'] == (6, 9, 11)       # 150/225/275 of 300 -> of 12
  assert o['warmup_epochs'] == 1 and o['num_epochs'] == 12 and o['train_subset'] == 10_000
  paper = cells_lib.make_cell(options(tmp_path, scale='paper'), 'configs/cifar10_resnet56.py',
                              method='fdg', seed=0)
  assert 'lr_boundaries_epochs' not in paper.override_dict()
  explicit = cells_lib.make_cell(options(tmp_path, sets=('lr_boundaries_epochs=(3,)',)),
                                 'configs/cifar10_resnet20.py', method='bp', seed=0)
  assert explicit.override_dict()['lr_boundaries_epochs'] == (3,)


def test_a_relative_data_dir_means_the_caller_s_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)   # not the repository, where the trainer runs
  cell = cells_lib.make_cell(options(tmp_path, dataset='imagefolder', data_dir='data/images'),
                             'configs/cifar10_resnet20.py', method='bp', seed=0)
  assert cell.override_dict()['data_dir'] == str(tmp_path / 'data' / 'images')
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  home = cells_lib.make_cell(options(tmp_path, data_dir='~/images'),
                             'configs/cifar10_resnet20.py', method='bp', seed=0)
  assert home.override_dict()['data_dir'] == str(tmp_path / 'home' / 'images')
  remote = cells_lib.make_cell(options(tmp_path, data_dir='gs://bucket/tfds'),
                               'configs/cifar10_resnet20.py', method='bp', seed=0)
  assert remote.override_dict()['data_dir'] == 'gs://bucket/tfds'


@pytest.mark.parametrize('sets, message', [
    (('nonsense=1',), 'does not exist'), (('num_epochs=1.5',), 'num_epochs'),
    (('beta=1',), 'set by the grid'), (('train_subset',), 'FIELD=VALUE')])
def test_bad_overrides_fail_before_running(tmp_path, sets, message):
  with pytest.raises(cells_lib.GridError, match=message):
    cells_lib.make_cell(options(tmp_path, sets=sets), 'configs/cifar10_resnet20.py',
                        method='bp', seed=0)


def test_grids_run_in_the_repository_and_write_under_its_results():
  """Each run's command.sh changes to cells_lib.REPO; a grid's default output is in
  experiments/results/, where the recorded grids are."""
  assert cells_lib.REPO == REPO
  assert cells_lib.Options(name='x').output_dir == os.path.join(REPO, 'experiments', 'results',
                                                                'x_cpu')


def test_subprocess_command_and_simulated_devices(tmp_path):
  opts = options(tmp_path, dataset='imagefolder', data_dir=str(tmp_path),
                 sets=('cache_dir=/tmp/c',))
  fdg = cells_lib.make_cell(opts, 'configs/cifar10_resnet20.py', method='fdg', num_stages=2,
                            beta=0.25, seed=0)
  bp = cells_lib.make_cell(opts, 'configs/cifar10_resnet20.py', method='bp', seed=0)
  runner = runner_lib.SubprocessRunner(python='PY', platform_info=('cpu', 1), log=lambda _: None)
  argv, env = runner.command(fdg, 'W')
  assert argv[:5] == ['PY', '-m', 'fdg_jax.main', '--config=configs/cifar10_resnet20.py',
                      '--workdir=W']
  for arg in ('--config.beta=0.25', '--config.dataset=imagefolder', '--config.num_stages=2',
              '--config.lr_boundaries_epochs=(6,9,11)', '--config.cache_dir=/tmp/c'):
    assert arg in argv
  # The other XLA flags are kept; only the device count is the run's own.
  assert env['XLA_FLAGS'] == f'{OTHER_XLA_FLAGS} --xla_force_host_platform_device_count=2'
  assert runner.command(bp, 'W')[1]['XLA_FLAGS'] == OTHER_XLA_FLAGS
  assert runner_lib.xla_flags('--a --xla_force_host_platform_device_count=8', 'cpu', 3) == (
      '--a --xla_force_host_platform_device_count=3')
  gpu = runner_lib.SubprocessRunner(python='PY', platform_info=('gpu', 1), log=lambda _: None)
  argv, env = gpu.command(fdg, 'W')
  assert '--config.stage_devices=(0,0)' in argv and env['XLA_FLAGS'] == OTHER_XLA_FLAGS
  assert runner_lib.format_value((3,)) == '(3,)' and runner_lib.format_value(True) == 'True'


def test_processes_launch_one_process_per_stage_and_a_cell_resumes_in_its_layout(tmp_path):
  opts = options(tmp_path)
  fdg = cells_lib.make_cell(opts, 'configs/cifar10_resnet20.py', method='fdg', num_stages=2,
                            beta=0.25, seed=0)
  bp = cells_lib.make_cell(opts, 'configs/cifar10_resnet20.py', method='bp', seed=0)
  logged = []
  runner = runner_lib.SubprocessRunner(python='PY', platform_info=('cpu', 1), log=logged.append,
                                       processes=True)
  fresh, started_in_processes, started_in_one = (str(tmp_path / n) for n in 'abc')
  argv, env = runner.command(fdg, fresh)
  assert argv[:7] == ['PY', '-m', 'fdg_jax.launch', '--num_processes=2',
                      f'--grace_s={runner_lib.STOP_GRACE_S}', '--',
                      '--config=configs/cifar10_resnet20.py']
  assert '--config.num_stages=2' in argv and env['XLA_FLAGS'] == OTHER_XLA_FLAGS
  assert runner.command(bp, fresh)[0][:3] == ['PY', '-m', 'fdg_jax.main']
  # The layout that wrote a cell's checkpoint decides where it resumes.
  os.makedirs(os.path.join(started_in_processes, 'checkpoints', 'process_0'))
  assert checkpoint_lib.written_by(started_in_processes) is None   # nothing saved yet
  open(os.path.join(started_in_processes, 'checkpoints', 'process_0', '250.msgpack'), 'w').close()
  assert checkpoint_lib.written_by(started_in_processes) == checkpoint_lib.PROCESSES
  assert grid.has_checkpoint(started_in_processes)
  assert runner.command(fdg, started_in_processes)[0][2] == 'fdg_jax.launch'
  os.makedirs(os.path.join(started_in_one, 'checkpoints', '250'))
  assert checkpoint_lib.written_by(started_in_one) == checkpoint_lib.ONE_PROCESS
  argv, env = runner.command(fdg, started_in_one)
  assert argv[2] == 'fdg_jax.main' and env['XLA_FLAGS'].endswith('device_count=2')
  assert logged == [f'{fdg.name}: resumes in one process, where its checkpoint was written.']
  gpu = runner_lib.SubprocessRunner(python='PY', platform_info=('gpu', 2), processes=True)
  with pytest.raises(cells_lib.GridError, match='Leave --processes out'):
    gpu.command(fdg, fresh)


def test_grid_runs_missing_cells_reads_finished_ones_and_resumes(tmp_path):
  opts = options(tmp_path)
  cells = fig4a_beta.build_cells(opts, betas=(0.5, 1.0))
  assert [c.name for c in cells[:3]] == [
      'resnet20_bp_seed0', 'resnet20_fdg_k2_beta0.5_seed0', 'resnet20_fdg_k2_beta1_seed0']
  out = opts.output_dir
  # A finished cell made earlier: its summary is read, the cell is not rerun.
  done = cells[1]
  workdir = os.path.join(out, 'runs', done.name)
  grid.write_cell_record(done, workdir)
  with open(os.path.join(workdir, workdir_lib.SUMMARY_FILE), 'w') as f:
    json.dump(fake_summary(done, error=0.123), f)
  runner = FakeRunner(fail={cells[2].name})
  results = grid.run_grid(cells, out, runner=runner, log=lambda _: None)
  assert runner.ran == [c.name for c in cells if c is not done]
  by_name = {r.cell.name: r for r in results}
  assert by_name[done.name].status == 'read'
  assert by_name[done.name].summary['test_error'] == 0.123
  assert by_name[cells[2].name].status == 'failed'
  assert by_name[cells[0].name].status == 'trained'
  # Finished runs lose their checkpoints unless asked to keep them.
  assert not os.path.exists(os.path.join(by_name[cells[0].name].workdir,
                                         checkpoint_lib.CHECKPOINT_DIR))
  # Again: only the failed cell runs.
  runner = FakeRunner()
  results = grid.run_grid(cells, out, runner=runner, log=lambda _: None)
  assert runner.ran == [cells[2].name]
  assert all(r.status in ('read', 'trained') for r in results)
  # Report-only runs nothing.
  runner = FakeRunner()
  grid.run_grid(cells, out, runner=runner, report_only=True, log=lambda _: None)
  assert runner.ran == []


def test_grid_refuses_a_workdir_of_other_settings(tmp_path):
  cells = fig4a_beta.build_cells(options(tmp_path, seeds=(0,)), betas=(0.5,))
  out = str(tmp_path / 'out')
  grid.run_grid(cells, out, runner=FakeRunner(), log=lambda _: None)
  longer = fig4a_beta.build_cells(options(tmp_path, seeds=(0,), sets=('num_epochs=20',)),
                                  betas=(0.5,))
  runner = FakeRunner()
  with pytest.raises(cells_lib.GridError, match='num_epochs: 12 there, 20 here'):
    grid.run_grid(longer, out, runner=runner, log=lambda _: None)
  assert runner.ran == []
  # Fields that only move files or logs do not make another cell.
  moved = fig4a_beta.build_cells(options(tmp_path, seeds=(0,), sets=('cache_dir=/x',)),
                                 betas=(0.5,))
  assert [r.status for r in grid.run_grid(moved, out, runner=runner, log=lambda _: None)] == [
      'read', 'read']
  # A data_dir written relative to the repository root (as committed records hold it) is the
  # absolute path it names; another folder is another cell.
  data = os.path.join(os.path.dirname(cells_lib.REPO), 'shared', 'data', 'd.tar.gz')
  with_data = fig4a_beta.build_cells(options(tmp_path, seeds=(0,), data_dir=data), betas=(0.5,))
  out = str(tmp_path / 'with_data')
  grid.run_grid(with_data, out, runner=FakeRunner(), log=lambda _: None)
  for name in os.listdir(out):
    record = os.path.join(out, name, grid.CELL_FILE)
    if os.path.exists(record):
      with open(record) as f:
        text = f.read()
      with open(record, 'w') as f:
        f.write(text.replace(data, '../shared/data/d.tar.gz'))
  assert [r.status for r in grid.run_grid(with_data, out, runner=runner, log=lambda _: None)] == [
      'read', 'read']
  elsewhere = fig4a_beta.build_cells(options(tmp_path, seeds=(0,), data_dir='/elsewhere/d.tar.gz'),
                                     betas=(0.5,))
  with pytest.raises(cells_lib.GridError, match='data_dir'):
    grid.run_grid(elsewhere, out, runner=runner, log=lambda _: None)


def test_aggregate_mean_and_sample_std():
  assert reports.mean_std([0.1, 0.2, 0.3]) == pytest.approx((0.2, 0.1))
  mean, std = reports.mean_std([0.4])
  assert mean == 0.4 and math.isnan(std)
  cell = cells_lib.Cell('fdg', 'resnet20', 2, 0.5, 0, 'configs/cifar10_resnet20.py')
  results = [grid.Result(cell, 'w', 'read', fake_summary(cell, error=e))
             for e in (0.1, 0.2, 0.3)]
  results.append(grid.Result(cell, 'w', 'failed'))
  (group,) = reports.aggregate(results)
  assert group.n == 3 and group.stat('test_error') == pytest.approx((0.2, 0.1))
  epochs, mean, std = group.curve()
  assert epochs == [1.0, 2.0, 3.0] and mean[-1] == pytest.approx(0.2)
  assert reports.fmt_pct(0.2, 0.1) == '20.00 ± 10.00' and reports.fmt_pct(0.2, math.nan) == '20.00'


@pytest.mark.parametrize('script', ['fig4a_beta', 'table2', 'table4'])
def test_reports_are_written_from_summaries(tmp_path, script):
  opts = options(tmp_path)
  module = {'fig4a_beta': fig4a_beta, 'table2': table2, 'table4': table4}[script]
  cells = (fig4a_beta.build_cells(opts, betas=(0.5, 1.0)) if script == 'fig4a_beta'
           else module.build_cells(opts))
  results = grid.run_grid(cells, opts.output_dir, runner=FakeRunner(fail={cells[-1].name}),
                          log=lambda _: None)
  module.report(results, opts)
  out = opts.output_dir
  pngs = {'fig4a_beta': ['beta.png', 'curves.png']}.get(script, ['curves.png'])
  for name in pngs:
    with open(os.path.join(out, name), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with open(os.path.join(out, 'results.csv')) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(cells)
  assert [r['status'] for r in rows].count('failed') == 1
  with open(os.path.join(out, 'results.md')) as f:
    md = f.read()
  assert '±' in md and published.SOURCE in md and f'{len(cells) - 1} of {len(cells)} finished' in md
  if script == 'table4':
    assert '2.00x' in md   # fake times: 100 s / K, BP 100 s
    # The paper's columns: BP 6.19%, FDG K = 3 at its tuned beta 0.2, speed-up 1 / 0.4432.
    assert '| 6.19 | 1.00x |' in md and '| 6.08 | 1.92x |' in md and '| 2.26x |' in md
  if script == 'table2':
    assert 'DGL K=2' in md and 'FDG K=2 β=1' in md and 'FDG K=2 β=0.2' in md
    assert '| 7.92 |' in md and '| 7.23 |' in md and '| 7.78 |' in md   # ResNet-20 row
  if script == 'fig4a_beta':   # β = 0.5 is not in the paper's row: its reported betas instead
    assert '| β=0.2: 7.23, β=1: 7.92 |' in md and '| 7.78 |' in md


def test_compensation_grid_shares_fig4a_cells_and_reports(tmp_path):
  opts = options(tmp_path)
  cells = compensation_grid.build_cells(opts, num_stages=(2, 4), betas=(0.25, 0.5))
  names = [c.name for c in cells]
  assert names[:6] == [
      'resnet20_bp_seed0', 'resnet20_fdg_k2_beta0.25_seed0',
      'resnet20_fdg_k2_beta0.25_recompute_seed0', 'resnet20_fdg_k2_beta0.25_wp_seed0',
      'resnet20_fdg_k2_beta0.25_dc_seed0', 'resnet20_fdg_k2_beta0.25_lr_seed0']
  # BP once, 14 FDG methods per K but beta once at K = 2 (plain FDG's computation there).
  assert len(cells) == len(opts.seeds) * (1 + 13 + 14)
  # BP and plain FDG are fig4a_beta.py's cells: a finished run of that grid is read as is.
  fig4a = {c.name: c for c in fig4a_beta.build_cells(opts, betas=(0.25,))}
  for cell in cells[:2]:
    assert grid.cell_record(cell) == grid.cell_record(fig4a[cell.name])
  wp = cells[3].override_dict()
  assert wp['compensation'] == 'weight_prediction' and cells[3].label.endswith(' wp')
  assert cells[2].override_dict()['stash'] == 'recompute'
  by_name = {c.name: c for c in cells}
  nag = by_name['resnet20_fdg_k2_beta0.25_nag0.9_seed0'].override_dict()
  assert (nag['compensation'], nag['nesterov_momentum']) == ('nesterov', 0.9)
  assert by_name['resnet20_fdg_k4_beta0.5_once_seed1'].override_dict()['beta_compounds'] is False
  assert 'resnet20_fdg_k2_beta0.25_once_seed0' not in by_name
  # 2BW's microbatches: the name and the setting say M=8 once, the variant what comes with it.
  m8_ef = by_name['resnet20_fdg_k4_beta0.5_m8_ef_seed0']
  assert m8_ef.override_dict()['microbatches'] == 8 and m8_ef.group[-1] == 'M=8 ef'
  assert m8_ef.override_dict()['compensation'] == 'error_feedback'
  m8_nag = by_name['resnet20_fdg_k4_beta0.5_m8_nag0.9_seed0'].override_dict()
  assert (m8_nag['microbatches'], m8_nag['nesterov_momentum']) == (8, 0.9)
  assert by_name['resnet20_fdg_k4_beta0.5_m8_seed0'].group[-1] == 'M=8'
  with pytest.raises(cells_lib.GridError, match='one beta per K'):
    compensation_grid.build_cells(opts, num_stages=(2, 4), betas=(0.25,))
  with pytest.raises(cells_lib.GridError, match='unknown'):
    compensation_grid.build_cells(opts, methods=('bp', 'momentum'))
  results = grid.run_grid(cells, opts.output_dir, runner=FakeRunner(), log=lambda _: None)
  compensation_grid.report(results, opts)
  for name in ('bars.png', 'curves.png'):
    with open(os.path.join(opts.output_dir, name), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with open(os.path.join(opts.output_dir, 'results.md')) as f:
    md = f.read()
  assert 'FDG K=4 β=0.5 dc' in md and 'vs plain FDG of its K' in md


def test_relocate_writes_records_without_machine_paths(tmp_path):
  """A cell's records as a clone writes them become what a reader runs from the repository
  root, and the grid still takes the relocated cell for the same cell."""
  repo, clone = cells_lib.REPO, '/tmp/grid_repo'
  data = os.path.join(os.path.dirname(repo), 'shared', 'data', 'c.tar.gz')
  # A path outside the repository's parent stays as it is (not under /tmp: a checkout may be).
  elsewhere = '/nonexistent-elsewhere/fdg_cache'
  text = (f'# c, from {clone}\ncd {clone} && {repo}/.venv/bin/python -m fdg_jax.main '
          f'--workdir={repo}/experiments/results/g/runs/c --config.data_dir={data} '
          f'--config.cache_dir={elsewhere}\n')
  assert relocate.relocate_text(text, [repo, clone]) == (
      '# c, from .\ncd . && python -m fdg_jax.main --workdir=experiments/results/g/runs/c '
      f'--config.data_dir=../shared/data/c.tar.gz --config.cache_dir={elsewhere}\n')
  sibling = f'{repo}2/x'   # not inside the repository: relative to it through '..'
  assert relocate.relocate_text(sibling, [repo]) == os.path.relpath(sibling, repo)
  opts = options(tmp_path, data_dir=data)
  cell = compensation_grid.build_cells(opts, methods=('bp',), num_stages=(2,), betas=(0.25,))[0]
  workdir = tmp_path / 'runs' / cell.name
  grid.write_cell_record(cell, str(workdir))
  (workdir / 'command.sh').write_text(text)
  (workdir / 'events.out.tfevents.1').write_bytes(repo.encode())
  assert relocate.main([str(tmp_path / 'runs'), f'--clone={clone}']) == 0
  assert 'data_dir": "../shared/data/c.tar.gz' in (workdir / grid.CELL_FILE).read_text()
  assert clone not in (workdir / 'command.sh').read_text()
  assert (workdir / 'events.out.tfevents.1').read_bytes() == repo.encode()   # binary: as is
  grid.check_cell_record(cell, str(workdir))   # the same cell


def test_grid_lock_is_one_grid_per_out_dir(tmp_path):
  """A second grid on the same out_dir is refused, even one that looked for the lock just
  before the first took it (two grids started at the same instant both ran on 2026-12-06, when
  the lock was looked for, then written); a lock whose grid has ended is taken over."""
  out = str(tmp_path / 'out')
  path = runner_lib.acquire_lock(out)
  with pytest.raises(cells_lib.GridError, match=f'another grid \\(pid {os.getpid()}\\)'):
    runner_lib.acquire_lock(out)
  with mock.patch.object(os.path, 'exists', return_value=False):   # "no lock yet", as it saw
    with pytest.raises(cells_lib.GridError, match='another grid'):
      runner_lib.acquire_lock(out)
  ended = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                         capture_output=True, text=True, check=True).stdout.strip()
  with open(path, 'w') as f:
    f.write(ended)
  assert runner_lib.acquire_lock(out) == path
  with open(path) as f:
    assert f.read() == str(os.getpid())


def test_paper_lookup():
  assert published.test_error('Table 2', 'resnet56', 'ddg') == 6.89
  assert published.test_error('Table 2', 'resnet56', 'ddg', num_stages=3) is None
  assert published.test_error('Table 2', 'resnet110', 'dgl') == 6.50
  assert published.test_error('Table 3', 'resnet18', 'fdg', 2, 0.5) == 22.18
  assert published.test_error('Table 4', 'resnet56', 'fdg', 4, 0.3) == 6.14
  assert published.test_error('Table 4', 'resnet56', 'bp', 1) == 6.19
  assert published.test_error('Table 2', 'resnet20', 'fdg', 2, 0.5) is None
  assert published.describe('Table 2', 'wrn28_10', 'bp', 1, 1.0) == '4.00 (cited, no rerun)'
  assert published.describe('Table 2', 'resnet20', 'ddg', 2, 1.0) == '–'
  assert published.describe('Table 4', 'resnet56', 'fdg', 5, 0.5) == '–'


@pytest.mark.parametrize('config_file,table', [
    *[(f'configs/cifar10_{m}.py', 'Table 2') for m in published.TEST_ERRORS['Table 2']],
    *[(f'configs/cifar100_{m}.py', 'Table 3') for m in published.TEST_ERRORS['Table 3']],
    ('configs/cifar10_resnet56_k3.py', 'Table 4'), ('configs/cifar10_resnet56_k4.py', 'Table 4')])
def test_row_configs_use_the_papers_tuned_beta(config_file, table):
  config = cells_lib.load_config(config_file)
  assert config.beta == published.tuned_beta(table, config.model, config.num_stages)


def test_differences_pair_runs_by_seed():
  def group(method, errors, seeds):
    return reports.Group(('resnet20', method, 2, 1.0), method,
                         [{'test_error': e} for e in errors], list(seeds))
  bp = group('bp', (0.30, 0.40, 0.35), (0, 1, 2))
  # Same gap on every seed, listed in another order: +2 points, no spread.
  mean, se, n = reports.paired_difference(group('fdg', (0.42, 0.32, 0.37), (1, 0, 2)), bp)
  assert n == 3 and mean == pytest.approx(0.02) and se == pytest.approx(0.0, abs=1e-12)
  # Per-seed differences 1 and 3 points: +2 ± 1 (std sqrt(2) / sqrt(2)).
  assert reports.fmt_difference(group('fdg', (0.31, 0.43), (0, 1)), bp) == '+2.00 ± 1.00'
  # Only the seeds both have count; one pair has no standard error.
  assert reports.fmt_difference(group('fdg', (0.50, 0.20), (0, 7)), bp) == '+20.00'
  assert reports.fmt_difference(group('fdg', (0.5,), (9,)), bp) == '–'
  assert reports.fmt_difference(bp, bp) == '–' and reports.fmt_difference(bp, None) == '–'


def test_bench_memory_sizes_a_residual_policy(tmp_path):
  out = tmp_path / 'bench.json'
  # Run as documented, from the repository root; --isolate (the default) starts the module again
  # for the configuration, as `python -m` too.
  subprocess.run([sys.executable, '-m', 'experiments.bench.memory', '--model=resnet8',
                  '--batch_size=2', '--image_size=8', '--num_stages=2',
                  '--stash=vjp+nothing_saveable', f'--output={out}'],
                 check=True, capture_output=True, cwd=REPO)
  with open(out) as f:
    result = json.load(f)
  assert result['isolated_processes']
  # The recorded command runs again as it stands: the module, not the file's absolute path.
  assert result['command'].startswith('python -m experiments.bench.memory --model=resnet8 ')
  [config] = result['configs']
  stage = config['stages'][0]
  assert config['stash'] == 'vjp+nothing_saveable' and result['entries_equal_delay']
  # Nothing saveable: an entry is only what the backward recomputes from, input and old weights.
  assert stage['entries'] == 2 and stage['entry_bytes'] == (stage['input_bytes'] +
                                                            stage['params_bytes'])


def test_bench_memory_watches_the_schedules_saved_forwards(tmp_path):
  """--schedules wraps the executor's `_act` to watch the residuals each stage holds: GPipe and
  1F1B at K = 3, M = 4 reach their bounds (GPipe M at every non-last stage, 1F1B K - k)."""
  out = tmp_path / 'bench.json'
  subprocess.run([sys.executable, '-m', 'experiments.bench.memory', '--model=resnet8',
                  '--batch_size=4', '--image_size=8', '--num_stages=3', '--schedules=gpipe,1f1b',
                  '--microbatches=4', f'--output={out}'], check=True, capture_output=True,
                 cwd=REPO)
  with open(out) as f:
    result = json.load(f)
  assert result['peaks_equal_bounds']
  peaks = {c['schedule']: [s['peak_entries'] for s in c['stages']] for c in result['configs']}
  assert peaks == {'gpipe': [4, 4, 0], '1f1b': [3, 2, 0]}


def test_in_loop_times_reads_each_stage_s_compute_wait_and_transfers():
  """A two-stage loop written by hand: stage 0 computes 500 ms per call and never waits; stage 1
  computes 300 ms, then waits for the next activation (20 ms after stage 0's output is ready);
  cotangents take 10 ms. `in_loop_times` must read exactly that back."""
  ready = []
  for i in range(6):
    act_ready = 0.5 * (i + 1)                     # stage 0's call of iteration i ends
    cot_ready = 0.5 * i + 0.02 + 0.3              # stage 1's call starts at act i - 1's arrival
    ready += [('activation', i, 'sent', act_ready), ('activation', i, 'arrived', act_ready + 0.02),
              ('cotangent', i, 'sent', cot_ready), ('cotangent', i, 'arrived', cot_ready + 0.01)]
  got = transfers.in_loop_times(ready[::-1])   # the order of the events does not matter
  assert got['period_ms'] == pytest.approx(500)
  assert got['busy_ms'] == pytest.approx([500, 300])
  assert got['idle_ms'] == pytest.approx([0, 200])
  assert got['latency_ms'] == pytest.approx([20, 10])
  # An event the thread had not seen (a missing arrival) drops that iteration, not the run.
  partial = [r for r in ready if r[:3] != ('cotangent', 2, 'arrived')]
  assert len(transfers.in_loop_times(partial)['per_iteration']['busy_ms'][0]) == 4


def speedup(tmp_path, *args):
  return subprocess.run([sys.executable, '-m', 'experiments.bench.speedup', *args,
                         f'--output={tmp_path / "speedup.json"}'],
                        capture_output=True, text=True, cwd=REPO, timeout=1800)


@pytest.mark.parametrize('args, message', [
    (['--task=language_model', '--model=resnet20'], '--model is for image_classification'),
    (['--task=language_model', '--n_embd=30', '--n_head=4'], 'not a multiple of --n_head'),
    (['--variant_env=LD_PRELOAD=/nonexistent/libtcmalloc.so'], 'does not exist'),
    (['--configs=bp_1core,pipedream_m2'], "unknown ['pipedream_m2']"),
    (['--configs=1f1b_m0'], "unknown ['1f1b_m0']"),
    (['--microbatches=3'], 'does not split into that many microbatches'),   # batch 128
    (['--microbatches=two'], 'give numbers >= 2'),
    (['--microbatches=1'], 'give numbers >= 2'),
    (['--configs=fdg_m1'], "unknown ['fdg_m1']"),
])
def test_bench_speedup_refuses_bad_flags_before_running(tmp_path, args, message):
  done = speedup(tmp_path, *args)
  assert done.returncode != 0 and message in done.stderr
  assert not (tmp_path / 'speedup.json').exists()


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason='the benchmark pins two cores')
def test_bench_speedup_runs_a_gpt_with_an_allocator_variant(tmp_path):
  """The smallest GPT, FDG K = 2 in two processes, plain and under a variant environment."""
  done = speedup(tmp_path, '--task=language_model', '--n_layer=2', '--n_embd=16', '--n_head=2',
                 '--block_size=8', '--batch_size=2', '--configs=fdg', '--iters=2', '--warmup=3',
                 '--timeline_iters=2', '--repeats=1', '--variant_env=MALLOC_ARENA_MAX=3')
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  with open(tmp_path / 'speedup.json') as f:
    result = json.load(f)
  assert result['task'] == 'language_model' and result['model'] == 'gpt2x16_h2_t8'
  assert result['gpt']['vocab_size'] == 65
  assert set(result['ms_per_iter']) == {'fdg', 'fdg+env'}
  assert all(ms > 0 for ms in result['ms_per_iter'].values())
  # The variant's processes, and only they, ran with its environment.
  assert result['env']['fdg+env']['MALLOC_ARENA_MAX'] == '3'
  assert result['env']['fdg'].get('MALLOC_ARENA_MAX') != '3'
  for name in ('fdg', 'fdg+env'):
    [[kernel]] = result['kernel'][name]
    assert len(kernel['minor_faults']) == 2   # both processes
    assert len(result['stage_compute_ms'][name]) == 2 and result['exchange_ms'][name] > 0
  # The plain run's timeline lies beside the result.
  assert (tmp_path / 'speedup_flops_timeline.png').exists()


# The speed-up benchmark's names, commands and configs over microbatches, read in a process of
# their own: the benchmark's flags (--model, ...) would clash with the grids' in this one.
SPEEDUP_COMMANDS = """
import json
from experiments.bench import speedup
from fdg_jax.trainer import configuration
FLAGS = speedup.FLAGS
FLAGS(['speedup', '--task=language_model', '--batch_size=16', '--timeline_iters=3',
       '--configs=bp_1core,fdg,fdg_m8', '--microbatches=2,4'])
names = speedup.config_names()
commands = {name: speedup.commands(name, [0, 1], events=True) for name in names}
config = speedup.make_config('1f1b', 2, 4)
configuration.validate_config(config)
worker = commands['1f1b_m4'][0]
FLAGS.unparse_flags()
FLAGS(['speedup', *worker[worker.index('--') + 1:]])
print(json.dumps({
    'names': names, 'commands': commands,
    'parsed': {n: speedup.microbatched(n) for n in ('1f1b_m4', 'gpipe_m2', 'fdg_m16', 'fdg',
                                                    'fdg_time', 'gpipe_m0', 'bp_m2', 'fdg_mx',
                                                    '1f1b_m1', 'fdg_m1')},
    'config': {k: config[k] for k in ('task', 'method', 'num_stages', 'microbatches',
                                      'batch_size')},
    'worker': [FLAGS.method, speedup.worker_microbatches(), FLAGS.split_by]}))
"""


def test_bench_speedup_names_and_commands_over_microbatches():
  """--microbatches=2,4 adds GPipe, 1F1B and FDG at each M after --configs; each runs as fdg
  does (two pinned processes through fdg_jax.launch, the FLOP split), its worker reading its M
  back; the config the worker builds is the trainer's, which accepts it."""
  done = subprocess.run([sys.executable, '-c', SPEEDUP_COMMANDS], capture_output=True, text=True,
                        cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  got = json.loads(done.stdout.splitlines()[-1])
  assert got['names'] == ['bp_1core', 'fdg', 'fdg_m8', 'gpipe_m2', '1f1b_m2', 'fdg_m2',
                          'gpipe_m4', '1f1b_m4', 'fdg_m4']
  assert got['parsed'] == {'1f1b_m4': ['1f1b', 4], 'gpipe_m2': ['gpipe', 2], 'fdg_m16': ['fdg', 16],
                           'fdg': None, 'fdg_time': None, 'gpipe_m0': None, 'bp_m2': None,
                           'fdg_mx': None, '1f1b_m1': ['1f1b', 1], 'fdg_m1': None}
  [command] = got['commands']['1f1b_m4']
  launch = command[:command.index('--') + 1]
  assert launch[1:] == ['-m', 'fdg_jax.launch', '--num_processes=2', '--module',
                        'experiments.bench.speedup', '--']
  assert got['commands']['fdg'][0][:len(launch)] == launch   # as FDG runs
  worker = command[len(launch):]
  for flag in ('--method=1f1b', '--microbatches=4', '--split_by=flops', '--timeline_events=True',
               '--timeline_iters=3', '--task=language_model', '--batch_size=16'):
    assert flag in worker
  assert '--microbatches=2' in got['commands']['fdg_m2'][0]
  assert not any(a.startswith('--microbatches') for a in got['commands']['fdg'][0])
  assert len(got['commands']['bp_1core']) == 1
  assert got['config'] == {'task': 'language_model', 'method': '1f1b', 'num_stages': 2,
                           'microbatches': 4, 'batch_size': 16}
  assert got['worker'] == ['1f1b', 4, 'flops']


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason='the benchmark pins two cores')
def test_bench_speedup_runs_1f1b_and_fdg_over_microbatches(tmp_path):
  """The smallest GPT, 1F1B and FDG with M = 2, K = 2 in two processes: time per batch, each
  stage's busy share and bubble from the action timeline, the ratio, the side-by-side drawing."""
  done = speedup(tmp_path, '--task=language_model', '--n_layer=2', '--n_embd=16', '--n_head=2',
                 '--block_size=8', '--batch_size=4', '--configs=1f1b_m2,fdg_m2', '--iters=2',
                 '--warmup=3', '--timeline_iters=2', '--repeats=1')
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  with open(tmp_path / 'speedup.json') as f:
    result = json.load(f)
  assert set(result['ms_per_iter']) == {'1f1b_m2', 'fdg_m2'}
  one_f_one_b, fdg = result['microbatched']['1f1b_m2'], result['microbatched']['fdg_m2']
  assert (one_f_one_b['method'], one_f_one_b['microbatches']) == ('1f1b', 2)
  assert one_f_one_b['bubble_theory'] == pytest.approx(1 / 3) and 'bubble_theory' not in fdg
  for entry in (one_f_one_b, fdg):
    assert len(entry['stage_compute_ms']) == 2 and all(ms > 0 for ms in entry['stage_compute_ms'])
    assert entry['bubble'] == pytest.approx([1 - s for s in entry['busy_share']])
    assert entry['exchange_ms'] > 0 and entry['timeline_ms_per_iter'] > 0
    assert 'over_bp_1core' not in entry   # BP was not run
  assert result['fdg_over_1f1b']['2'] == pytest.approx(
      result['ms_per_iter']['1f1b_m2'] / result['ms_per_iter']['fdg_m2'])
  assert 'capacity' not in result and 'fdg_over_bp_1core' not in result
  assert (tmp_path / 'speedup_m2_timelines.png').exists()


def _named(name):
  """A stand-in for a jitted function: the trace names its module jit_NAME."""
  def function():
    pass
  function.__name__ = name
  return function


def test_action_timeline_ties_executions_to_actions():
  """A trace written by hand for stage 0 of 1F1B (K = 2, M = 2, one batch): F0 F1 B0 B1 U0.
  The backward compiled twice (B0 without a gradient sum yet), so its executions are two runs of
  run_ids; each run is one compiled function's calls in order. Busy time counts overlaps once."""
  Action = schedule_lib.Action
  method = mock.Mock(microbatches=2, grad_clip=0.0, keeps_inputs=lambda k: False, functions=(
      {'forward': _named('forward'), 'backward': _named('backward'), 'norm': _named('norm'),
       'update': _named('update')},
      {'loss': _named('forward_backward'), 'norm': _named('norm'), 'update': _named('update')}))
  actions = [(0, Action('F', 0)), (0, Action('F', 1)), (0, Action('B', 0)), (0, Action('B', 1)),
             (0, Action('U', 0))]

  def ops(module, run_id, start, end):   # two op events of one execution
    middle = (start + end) / 2
    return [{'ph': 'X', 'ts': t0, 'dur': t1 - t0, 'name': 'fusion',
             'args': {'hlo_module': f'jit_{module}', 'run_id': str(run_id),
                      'device_ordinal': '0'}} for t0, t1 in ((start, middle), (middle, end))]
  trace = {'traceEvents': [
      *ops('forward', 40, 0, 1000), *ops('forward', 41, 1000, 2000),
      *ops('backward', -7, 3000, 5000),         # printed signed: the first variant's run
      *ops('backward', 900, 4500, 6000),        # overlaps the last by 0.5 ms
      *ops('update', 12, 6000, 6500),
      {'ph': 'X', 'ts': 0, 'dur': 9000, 'name': 'other', 'args': {'hlo_module': 'jit_other',
                                                                   'run_id': '1'}}]}
  events = action_timeline.events_from_trace(trace, actions, method, 2, {0: (0,)})
  assert [(e.label, e.batch, e.start_ms, e.end_ms) for e in events] == [
      ('F0', 0, 0.0, 1.0), ('F1', 0, 1.0, 2.0), ('B0', 0, 3.0, 5.0), ('B1', 0, 4.5, 6.0),
      ('U0', 0, 6.0, 6.5)]
  assert action_timeline.busy_ms(events, 0) == pytest.approx(5.5)
  assert action_timeline.span_ms(events) == pytest.approx(6.5)
  # Executions the actions do not explain keep their kind, without an index.
  unexplained = action_timeline.events_from_trace(trace, actions[:4], method, 2, {0: (0,)})
  assert [e.label for e in unexplained] == ['F0', 'F1', 'B0', 'B1', 'U']


@pytest.mark.parametrize('num_stages', [2, 3, 4, 8])
@pytest.mark.parametrize('microbatches', [1, 2, 4, 8])
def test_schedule_cost_of_equal_unit_stages(num_stages, microbatches):
  """Equal stages, F = B = 1, no latency: GPipe and 1F1B take (M + K - 1)(F + B) a batch (their
  bubble (K - 1)/(M + K - 1)), an update U more after the flush; FDG's steady state is one
  stage's work, M (F + B) + U, whatever K."""
  K, M = num_stages, microbatches
  for name in ('gpipe', '1f1b'):
    predicted = schedule_cost.predict(name, K, M, 1.0, 1.0)
    assert predicted['ms_per_batch'] == pytest.approx((M + K - 1) * 2)
    assert predicted['bubble'] == pytest.approx(schedule_cost.bubble_theory(K, M))
    assert predicted['speedup'] == pytest.approx(K * M / (M + K - 1))
    assert schedule_cost.time_per_batch(name, K, M, 1.0, 1.0, 0.5) == pytest.approx(
        (M + K - 1) * 2 + 0.5)
  fdg = schedule_cost.predict('fdg', K, M, 1.0, 1.0, 0.5)
  assert fdg['ms_per_batch'] == pytest.approx(2 * M + 0.5) and fdg['bubble'] == pytest.approx(0)
  # DGL (M = 1): no cotangent to wait for, so one stage's F (its forward, head and backward) and
  # U a batch, whatever K and the latency.
  dgl = schedule_cost.predict('dgl', K, 1, 2.0, 0.0, 0.5, latency=3.0)
  assert dgl['ms_per_batch'] == pytest.approx(2.5) and dgl['bubble'] == pytest.approx(0)
  # Unequal stages: the slowest stage's work sets FDG's pace.
  slow = [1.0] * (K - 1) + [3.0]
  assert schedule_cost.time_per_batch('fdg', K, M, slow, 1.0, 0.5) == pytest.approx(4 * M + 0.5)


@pytest.mark.slow
def test_schedule_cost_measures_a_gpt_with_the_optimizer_it_is_given(tmp_path):
  """--measure in its pinned process, with --optimizer: the times keyed by model, optimizer and
  batch, every microbatch size's stage times and both stages' update (rotated Adam's, its
  refreshes at their rate) positive."""
  times = tmp_path / 'times.json'
  done = subprocess.run(
      [sys.executable, '-m', 'experiments.bench.schedule_cost', '--measure=gpt:4', '--n_layer=2',
       '--n_embd=16', '--n_head=2', '--block_size=8', '--microbatches=2', '--repeats=1',
       '--warmup=1', '--optimizer=rotated_adamw', f'--times={times}'],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  (key, entry), = json.loads(times.read_text())['models'].items()
  assert key == 'gpt2x16_h2_t8_rotated_adamw_b4' and entry['optimizer'] == 'rotated_adamw'
  assert sorted(entry['micro']) == ['1', '2'] and len(entry['update_ms']) == 2
  assert min(entry['update_ms']) > 0 and entry['micro']['2']['microbatch_size'] == 2
  assert entry['aux_head_ms'] > 0   # DGL's auxiliary head


def fake_stage_times():
  """Stage times as --measure writes them: stage 0's forward 10 and backward 20 ms, the last
  stage's fused forward, loss and backward 30 ms, updates of 5 ms."""
  micro = {'forward_ms': 10.0, 'backward_ms': 20.0, 'loss_ms': 30.0, 'microbatch_size': 4}
  return {'model': 'gpt1x8_h1_t4', 'batch_size': 16, 'update_ms': [5.0, 5.0],
          'micro': {'1': micro, '4': micro}, 'aux_head_ms': 3.0}


def test_schedule_cost_stage_times_and_validation_by_hand():
  """K = 2 is the two measured stages (the last stage's backward is in its fused forward); K = 4
  splits the model's forward and backward (the fused loss in stage 0's ratio 1:2) into equal
  stages. Validation against a speedup result, by hand, latency 0: FDG (M = 4) runs each stage's
  work, M (10 + 20) + 5 = 125 ms; 1F1B's critical path is stage 0's F0, the last stage's four
  fused calls, stage 0's last backward and its update, 10 + 4 x 30 + 20 + 5 = 155 ms; plain FDG
  (M = 1) 35 ms. A measured 250 ms is a -50% error."""
  entry = fake_stage_times()
  assert schedule_cost.stage_times(entry, 4, 2) == ([10.0, 30.0], [20.0, 0.0], [5.0, 5.0])
  assert schedule_cost.stage_times(entry, 4, 4) == ([5.0, 5.0, 5.0, 15.0], [10.0, 10.0, 10.0, 0.0],
                                                    [2.5] * 4)
  # DGL: forward and backward at M = 1 in one F, every stage but the last with its 3 ms head.
  assert schedule_cost.dgl_stage_times(entry, 2) == ([33.0, 30.0], [0.0, 0.0], [5.0, 5.0])
  assert schedule_cost.dgl_stage_times(entry, 4) == ([18.0, 18.0, 18.0, 15.0], [0.0] * 4,
                                                     [2.5] * 4)
  rows = schedule_cost.table(entry, [4], [1, 4], lambda M: 0.0, 24)
  assert [(r['microbatches'], r['schedule']) for r in rows] == [
      (1, 'gpipe'), (1, '1f1b'), (1, 'fdg'), (1, 'dgl'), (4, 'gpipe'), (4, '1f1b'), (4, 'fdg')]
  assert rows[3]['ms_per_batch'] == pytest.approx(20.5)   # the slowest stage: 18 + 2.5
  del entry['aux_head_ms']   # times measured before the head was: no DGL row
  assert 'dgl' not in {r['schedule'] for r in schedule_cost.table(entry, [4], [1], lambda M: 0, 24)}
  entry = fake_stage_times()
  result = {'model': 'gpt1x8_h1_t4', 'batch_size': 16,
            'ms_per_iter': {'fdg': 35.0, 'fdg_m4': 250.0, '1f1b_m4': 155.0, 'fdg_m4+env': 1.0},
            'exchange_ms': {'fdg': 0.0, 'fdg_m4': 0.0, '1f1b_m4': 0.0},
            'microbatched': {'1f1b_m4': {'method': '1f1b', 'microbatches': 4},
                             'fdg_m4': {'method': 'fdg', 'microbatches': 4},
                             'fdg_m4+env': {'method': 'fdg', 'microbatches': 4}}}
  rows = {r['config']: r for r in schedule_cost.validation(result, entry, 24)}
  assert set(rows) == {'fdg', '1f1b_m4', 'fdg_m4'}   # variants left out
  assert rows['fdg']['predicted_ms'] == pytest.approx(35.0) and rows['fdg']['error'] == 0
  assert rows['1f1b_m4']['predicted_ms'] == pytest.approx(155.0)
  assert rows['fdg_m4']['predicted_ms'] == pytest.approx(125.0)
  assert rows['fdg_m4']['error'] == pytest.approx(-0.5)
  # The latency is half the measured round trip, and it lengthens the prediction.
  result['exchange_ms']['1f1b_m4'] = 4.0
  [late] = [r for r in schedule_cost.validation(result, entry, 24) if r['config'] == '1f1b_m4']
  assert late['latency_ms'] == 2.0 and late['predicted_ms'] > 155.0


def test_schedule_cost_command_validates_and_tabulates(tmp_path):
  """The command reads stage times and a speedup result: the validation's table and JSON, then
  the K = 2, 4, 8 table; it refuses a result of a model it has no times for."""
  times, result = tmp_path / 'times.json', tmp_path / 'speedup.json'
  times.write_text(json.dumps({'models': {'gpt1x8_h1_t4_b16': fake_stage_times()}}))
  result.write_text(json.dumps({
      'model': 'gpt1x8_h1_t4', 'batch_size': 16, 'ms_per_iter': {'fdg_m4': 250.0},
      'exchange_ms': {'fdg_m4': 0.0},
      'microbatched': {'fdg_m4': {'method': 'fdg', 'microbatches': 4}}}))
  run = lambda *args: subprocess.run(
      [sys.executable, '-m', 'experiments.bench.schedule_cost', f'--times={times}', *args],
      capture_output=True, text=True, cwd=REPO, timeout=300)
  done = run(f'--validate={result}')
  assert done.returncode == 0, done.stderr[-3000:]
  assert '| fdg_m4 | 0.0 | 250 | 125 | -50.0% |' in done.stdout
  assert json.loads(done.stdout.splitlines()[-1])['max_abs_error'] == pytest.approx(0.5)
  done = run('--microbatches=4', f'--output={tmp_path / "table.json"}')
  assert done.returncode == 0, done.stderr[-3000:]
  rows = json.loads((tmp_path / 'table.json').read_text())['tables']['gpt1x8_h1_t4_b16']
  assert [(r['num_stages'], r['schedule']) for r in rows] == [
      (K, name) for K in (2, 4, 8) for name in ('gpipe', '1f1b', 'fdg')]
  # Each stage works M (F + B) + U = 125 ms a batch: 250 ms in all on one device.
  assert '| 2 | 4 | 0.0 | 215 (1.16) | 155 (1.61) | 125 (2.00) |' in done.stdout
  result.write_text(json.dumps({'model': 'resnet20', 'batch_size': 128}))
  done = run(f'--validate={result}')
  assert done.returncode != 0 and 'has no stage times of resnet20_b128' in done.stderr


# ------------------------------------------------------------------ the language-model grid


def lm_options(tmp_path, **kwargs):
  return options(tmp_path, scales=shakespeare_grid.SCALES, **kwargs)


def fake_lm_summary(cell, val_loss=None):
  """What the language-model trainer writes, with a validation loss that depends on the cell."""
  val_loss = val_loss if val_loss is not None else (
      1.9 + 0.05 * (cell.num_stages - 1) + 0.1 * (1 - cell.beta) + 0.01 * cell.seed)
  history = [{'step': step, 'epoch': step / 1307, 'val_loss': val_loss + 1.0 / step,
              'val_bits_per_token': 0.0, 'val_token_accuracy': 0.4} for step in (10, 20)]
  history[-1]['val_loss'] = val_loss
  return {'task': 'language_model', 'model': cell.model, 'dataset': 'textfile:t.txt',
          'method': cell.method, 'num_stages': cell.num_stages, 'beta': cell.beta,
          'compensation': dict(cell.overrides).get('compensation', 'none'), 'steps': 20,
          'epochs': 20 / 1307, 'batch_size': 12, 'vocabulary': 'char', 'vocabulary_size': 65,
          'train_tokens': 1003854, 'val_tokens': 111540, 'val_loss': val_loss,
          'val_bits_per_char': val_loss / math.log(2), 'val_perplexity': math.exp(val_loss),
          'val_token_accuracy': 0.4, 'tokens_per_sec': 500.0, 'train_time_s': 30.0,
          'sample': f'sample of {cell.name}', 'resumed_from_step': 0, 'trainable_params': 812416,
          'extra_params': 0, 'stage_split': [3], 'devices': ['cpu:0'], 'jax_version': 'test',
          'params_digest': 'ab', 'history': history}


class FakeLMRunner(FakeRunner):

  def __call__(self, cell, workdir):
    self.ran.append(cell.name)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, workdir_lib.SUMMARY_FILE), 'w') as f:
      json.dump(fake_lm_summary(cell), f)


def test_shakespeare_grid_cells_and_commands(tmp_path, capsys):
  opts = lm_options(tmp_path, dataset='textfile', data_dir=str(tmp_path / 't.txt'),
                    sets=('num_train_steps=20',))
  cells = shakespeare_grid.build_cells(opts)
  assert [c.name for c in cells[:8]] == [
      'gpt_bp_seed0', 'gpt_fdg_k2_beta1_seed0', 'gpt_fdg_k2_beta0.5_seed0',
      'gpt_fdg_k4_beta1_seed0', 'gpt_ddg_k2_seed0', 'gpt_dgl_k2_seed0',
      'gpt_fdg_k2_beta1_wp_seed0', 'gpt_fdg_k4_beta1_wp_seed0']
  per_seed = len(shakespeare_grid.METHODS)
  assert [c.name for c in cells[8:per_seed]] == [
      'gpt_fdg_k2_beta1_nag_seed0', 'gpt_fdg_k4_beta1_nag_seed0', 'gpt_fdg_k2_beta1_dm_seed0',
      'gpt_fdg_k4_beta1_dm_seed0', 'gpt_fdg_k2_beta1_nagdm_seed0', 'gpt_fdg_k4_beta1_nagdm_seed0',
      'gpt_fdg_k4_beta1_lr_seed0', 'gpt_fdg_k4_beta1_lr1_seed0']
  assert len(cells) == per_seed * len(opts.seeds) and cells[per_seed].name == 'gpt_bp_seed1'
  assert {c.config_file for c in cells} == {'configs/shakespeare_char_cpu.py'}
  by_name = {c.name: c.override_dict() for c in cells}
  for o in by_name.values():   # the config file as it is: no image subset, no epochs
    assert o['stage_devices'] == () and o['num_train_steps'] == 20
    assert o['dataset'] == 'textfile' and o['data_dir'] == str(tmp_path / 't.txt')
    assert 'train_subset' not in o and 'num_epochs' not in o
  lr_whole = by_name['gpt_fdg_k4_beta1_lr1_seed0']
  assert (lr_whole['compensation'], lr_whole['lr_reschedule_fraction']) == ('lr_reschedule', 1.0)
  assert by_name['gpt_dgl_k2_seed0']['aux_head'] == 'lm'
  assert by_name['gpt_fdg_k4_beta1_wp_seed0']['compensation'] == 'weight_prediction'
  assert 'compensation' not in by_name['gpt_fdg_k4_beta1_seed0']
  assert by_name['gpt_fdg_k2_beta1_nag_seed0']['compensation'] == 'nesterov'
  assert by_name['gpt_fdg_k4_beta1_dm_seed0']['compensation'] == 'delay_momentum'
  assert by_name['gpt_fdg_k4_beta1_nagdm_seed0']['compensation'] == 'nesterov+delay_momentum'
  assert [c.name for c in shakespeare_grid.build_cells(opts, methods=('bp', 'fdg_k2'))] == [
      'gpt_bp_seed0', 'gpt_fdg_k2_beta1_seed0', 'gpt_bp_seed1', 'gpt_fdg_k2_beta1_seed1']
  with pytest.raises(cells_lib.GridError, match='unknown'):
    shakespeare_grid.build_cells(opts, methods=('bp', 'fdg_k3'))
  with pytest.raises(cells_lib.GridError, match="choose one of \\('cpu',\\)"):
    shakespeare_grid.build_cells(lm_options(tmp_path, scale='paper'))
  # The commands: every stage on its own device; K stages in K processes with --processes.
  runner = runner_lib.SubprocessRunner(python='PY', platform_info=('cpu', 1), log=lambda _: None,
                                       processes=True)
  bp, k4 = cells[0], cells[3]
  argv, _ = runner.command(bp, 'W')
  assert argv[:5] == ['PY', '-m', 'fdg_jax.main', '--config=configs/shakespeare_char_cpu.py',
                      '--workdir=W']
  assert '--config.stage_devices=()' in argv and '--config.method=bp' in argv
  argv, _ = runner.command(k4, 'W')
  assert argv[2:4] == ['fdg_jax.launch', '--num_processes=4']
  assert '--config.num_stages=4' in argv and '--config.beta=1.0' in argv
  grid.print_grid(cells[:8], opts.output_dir, processes=True)
  printed = capsys.readouterr().out
  assert '8 cells in' in printed and 'gpt_dgl_k2_seed0: to run' in printed
  assert '--config.aux_head=lm' in printed


def test_shakespeare_grid_report_from_summaries(tmp_path):
  opts = lm_options(tmp_path, seeds=(0, 1, 2))
  cells = shakespeare_grid.build_cells(opts)
  logged = []
  results = grid.run_grid(cells, opts.output_dir, runner=FakeLMRunner(), log=logged.append,
                          metric=metrics.VAL_LOSS)
  assert f'[1/{len(cells)}] gpt_bp_seed0: validation loss 1.9000 in 30 s' in logged
  # A seed whose loss moves against the others: FDG K=2 beta 1 - BP is then 0.05, 0.05, 0.08.
  seed2 = next(r for r in results if r.cell.name == 'gpt_fdg_k2_beta1_seed2')
  seed2.summary = fake_lm_summary(seed2.cell, val_loss=1.9 + 0.02 + 0.08)
  shakespeare_grid.report(results, opts)
  out = opts.output_dir
  with open(os.path.join(out, 'curves.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with open(os.path.join(out, 'results.csv')) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(cells) and rows[0]['val_loss'] == '1.9'
  assert rows[-1]['compensation'] == 'lr_reschedule'
  with open(os.path.join(out, 'results.md')) as f:
    md = f.read()
  # BP: 1.90, 1.91, 1.92 -> 1.9100 ± 0.0100 nats, / ln 2 bits; FDG K=2: +0.06 ± 0.01 (s.e.).
  bits = 1.91 / math.log(2)
  assert f'| BP | 1.9100 ± 0.0100 | {bits:.3f} ± {0.01 / math.log(2):.3f} | – |' in md
  assert '| FDG K=2 β=1 | 1.9700 ± 0.0265 |' in md and '| +0.0600 ± 0.0100 |' in md
  assert '| FDG K=2 β=0.5 |' in md and '| +0.1000 ± 0.0000 |' in md
  assert '| DGL K=2 |' in md and '| FDG K=4 β=1 wp |' in md and '| FDG K=4 β=1 nagdm |' in md
  assert 'vocabulary of 65 symbols' in md and "nanoGPT's CPU recipe" in md
  assert 'Validation loss of the composed network' in md and f'{len(cells)} of {len(cells)} finished' in md
  assert 'sample of gpt_fdg_k4_beta1_wp_seed0' in md and 'sample of gpt_bp_seed1' not in md
  # The curves: val_loss against step, mean over the seeds.
  (bp,) = [g for g in reports.aggregate(results) if g.key[1] == 'bp']
  steps, mean, _ = bp.curve('val_loss', 'step')
  assert steps == [10, 20] and mean == pytest.approx([2.01, 1.91])


def test_depth_grid_cells_pass_the_trainers_checks_and_the_dry_run_lists_them(tmp_path, capsys):
  """The deep recipe's grid: each method with AdamW and with Muon (cells tagged muon; the
  Nesterov look-ahead and basis rotation with AdamW only), each compensation alone and with
  microbatches of at least 2(K - 1) that divide the batch, K = 4 before K = 8 and the references
  last; every cell's config passes the trainer's checks before anything runs, and `--dry_run`
  lists every cell with its command."""
  text = tmp_path / 't.txt'
  text.write_text('To be, or not to be.\n' * 50)
  opts = options(tmp_path, scales=depth_grid.SCALES, dataset='textfile', data_dir=str(text))
  cells = depth_grid.build_cells(opts)
  per_seed = len(depth_grid.METHODS)
  # Per optimizer: BP, then at K = 4 and 8 plain FDG, its 4 compensations, M alone and with each
  # (10 each), then DDG, DGL and 1F1B at both K (6); Muon without the 2 x 2 x 2 AdamW-only ones;
  # rotated Adam on every stage: BP and FDG with microbatches at both K (3).
  assert per_seed == 2 * (1 + 2 * 10 + 6) - 8 + 3 and len(cells) == 2 * per_seed
  names = [c.name for c in cells[:per_seed]]
  assert names[:8] == [
      'gpt_bp_seed0', 'gpt_fdg_k4_beta1_seed0', 'gpt_fdg_k4_beta1_nag_seed0',
      'gpt_fdg_k4_beta1_wp_seed0', 'gpt_fdg_k4_beta1_ef_seed0', 'gpt_fdg_k4_beta1_rot_seed0',
      'gpt_fdg_k4_beta1_m8_seed0', 'gpt_fdg_k4_beta1_m8_nag_seed0']
  for name in ('gpt_fdg_k8_beta1_m16_seed0', 'gpt_1f1b_k8_m16_seed0', 'gpt_bp_muon_seed0',
               'gpt_fdg_k8_beta1_muon-wp_seed0', 'gpt_fdg_k8_beta1_m16_muon_seed0',
               'gpt_fdg_k8_beta1_m16_muon-ef_seed0', 'gpt_dgl_k8_muon_seed0',
               'gpt_bp_rotadam_seed0', 'gpt_fdg_k8_beta1_m16_rotadam_seed0'):
    assert name in names, name
  assert not [n for n in names if 'muon-nag' in n or 'muon-rot' in n]
  by_name = {c.name: c for c in cells}
  muon_m16 = by_name['gpt_fdg_k8_beta1_m16_muon_seed0']
  assert muon_m16.label == 'FDG K=8 β=1 M=16 muon'
  assert (muon_m16.override_dict()['optimizer'], muon_m16.microbatches) == ('muon', 16)
  assert 'optimizer' not in by_name['gpt_fdg_k8_beta1_m16_seed0'].override_dict()
  for cell in cells[:per_seed]:   # the trainer's own checks, as the run will make them
    config = cells_lib.load_config(cell.config_file)
    config.update(cell.override_dict())
    assert config.batch_size % cell.microbatches == 0
    assert cell.microbatches == 1 or cell.microbatches >= 2 * (cell.num_stages - 1)
    configuration.validate_config(config)
  grid.print_grid(cells[:per_seed], opts.output_dir)
  printed = capsys.readouterr().out
  assert f'{per_seed} cells in' in printed
  for name in names:
    assert f'- {name}: to run' in printed
  assert '--config.method=fdg --config.microbatches=16' in printed
  assert '--config.optimizer=muon' in printed


def test_depth_grid_report_compares_each_optimizer_with_its_bp(tmp_path):
  opts = options(tmp_path, scales=depth_grid.SCALES, seeds=(0, 1))
  methods = ('bp', 'fdg_k4', 'bp_muon', 'fdg_k4_muon', 'fdg_k8_m16_muon', 'bp_rotadam',
             'fdg_k4_m8_rot', 'fdg_k4_m8_rotadam')
  cells = depth_grid.build_cells(opts, methods)
  results = grid.run_grid(cells, opts.output_dir, runner=FakeLMRunner(), log=lambda _: None,
                          metric=metrics.VAL_LOSS)
  for r in results:   # BP with Muon 0.1 below BP with AdamW, rotated 0.2; FDG 0.15 above its BP
    overrides = r.cell.override_dict()
    muon = overrides.get('optimizer') == 'muon'
    rotated = (overrides.get('optimizer') == 'rotated_adamw'
               or overrides.get('compensation') == 'basis_rotation')
    loss = (1.9 - 0.1 * muon - 0.2 * rotated + 0.15 * (r.cell.method != 'bp')
            + 0.01 * r.cell.seed)
    r.summary = fake_lm_summary(r.cell, val_loss=loss)
  depth_grid.report(results, opts)
  with open(os.path.join(opts.output_dir, 'results.md')) as f:
    md = f.read()
  assert 'Deep character GPT' in md and 'BP with Muon' in md
  assert '| BP | 1.9050 ± 0.0071 |' in md and '| BP muon | 1.8050 ± 0.0071 |' in md
  assert '| BP rotadam | 1.7050 ± 0.0071 |' in md
  for label in ('FDG K=4 β=1', 'FDG K=4 β=1 muon', 'FDG K=8 β=1 M=16 muon',
                'FDG K=4 β=1 M=8 rot', 'FDG K=4 β=1 M=8 rotadam'):
    (row,) = [line for line in md.splitlines() if line.startswith(f'| {label} |')]
    assert '| +0.1500 ± 0.0000 |' in row, row   # against its own optimizer's BP


def test_a_grid_of_methods_over_microbatches_dry_run_lists_their_commands(tmp_path):
  """A grid's cells of 1F1B and FDG with microbatches (the script's `microbatches` override, or
  `--set microbatches=M` for every cell): M is in their names and labels (the registry's
  labels), another M is another cell, and `--dry_run` prints each command with
  `--config.method=1f1b --config.microbatches=4`. A method without microbatches refuses them
  before anything runs."""
  f = 'configs/cifar10_resnet20.py'
  opts = options(tmp_path)
  one_f_one_b = cells_lib.make_cell(opts, f, method='1f1b', num_stages=4, seed=0,
                                    script_overrides={'microbatches': 4})
  fdg = cells_lib.make_cell(options(tmp_path, sets=('microbatches=2',)), f, method='fdg',
                            num_stages=2, beta=0.5, seed=1)
  gpipe = cells_lib.make_cell(opts, f, method='gpipe', num_stages=2, seed=0)
  assert (one_f_one_b.name, one_f_one_b.label) == ('resnet20_1f1b_k4_m4_seed0', '1F1B K=4 M=4')
  assert (fdg.name, fdg.label) == ('resnet20_fdg_k2_beta0.5_m2_seed1', 'FDG K=2 β=0.5 M=2')
  assert (gpipe.name, gpipe.label, gpipe.microbatches) == ('resnet20_gpipe_k2_seed0',
                                                           'GPipe K=2', 1)
  assert one_f_one_b.group != cells_lib.make_cell(
      opts, f, method='1f1b', num_stages=4, seed=0, script_overrides={'microbatches': 8}).group
  for method in ('ddg', 'dgl'):
    with pytest.raises(cells_lib.GridError, match=f"method '{method}' does not take microbatches"):
      cells_lib.make_cell(options(tmp_path, sets=('microbatches=4',)), f, method=method,
                          num_stages=2, seed=0)

  script = tmp_path / 'microbatch_grid.py'   # a grid script, as experiments/paper's are
  script.write_text(
      'from absl import app\n'
      'from experiments.grids import cells, grid\n'
      'def build_cells(options):\n'
      "  return [cells.make_cell(options, 'configs/cifar10_resnet20.py', method=method,\n"
      '                          num_stages=4, seed=seed, script_overrides=overrides)\n'
      '          for seed in options.seeds\n'
      "          for method, overrides in (('bp', {}), ('1f1b', {'microbatches': 4}))]\n"
      "if __name__ == '__main__':\n"
      "  cells.define_flags('microbatch_grid')\n"
      "  app.run(lambda _: grid.main('microbatch_grid', build_cells, lambda *_: None))\n")
  result = subprocess.run(
      [sys.executable, str(script), '--dry_run', '--seeds=0', f'--out_dir={tmp_path / "out"}'],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
      timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert '2 cells in' in result.stdout, result.stdout
  (line,) = [line for line in result.stdout.splitlines() if '--config.method=1f1b' in line]
  assert f'--workdir={tmp_path / "out" / "runs" / "resnet20_1f1b_k4_m4_seed0"}' in line
  assert '--config.method=1f1b --config.microbatches=4' in line
  assert '--config.num_stages=4' in line
  assert '- resnet20_1f1b_k4_m4_seed0: to run' in result.stdout


def test_action_recorder_records_a_running_pipeline(tmp_path):
  """The recorder wraps the executor's `_act` on a real pipeline (FDG, K = 2, M = 2): one
  labelled event per local action, and the executor's own method back afterwards."""
  import jax   # pylint: disable=import-outside-toplevel  (this file's other tests need none)
  from fdg_jax.engine import methods   # pylint: disable=import-outside-toplevel
  from fdg_jax.engine import pipeline  # pylint: disable=import-outside-toplevel
  from tiny import initial_variables, make_optimizer, tiny_batches  # pylint: disable=import-outside-toplevel
  batches = tiny_batches(3, batch_size=8)
  modules, variables = initial_variables(2)
  pipe = pipeline.Pipeline(modules, make_optimizer(), placements=jax.devices()[:2],
                           method=methods.Microbatched('fdg', 2))
  state = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
  state, _ = pipe.step(state, *batches[0])   # compiles
  recorder = action_timeline.ActionRecorder(pipe, str(tmp_path))
  recorder.start(state)
  for inputs, labels in batches[1:]:
    state, _ = pipe.step(state, inputs, labels)
  events = recorder.stop(state)
  assert '_act' not in pipe.__dict__
  # Every action is a jitted call but the last stage's B (it sends what its fused loss made).
  calls = [(k, a) for k, a in recorder.actions if not (k == 1 and a.kind == 'B')]
  assert len(events) == len(calls) > 0
  assert all(e.index is not None for e in events), [e.label for e in events]


def test_time_to_loss_from_learning_curves_and_the_cost_model(tmp_path):
  """Steps to BP's final loss (linear between evaluations) times each schedule's predicted
  seconds per batch; 1F1B on BP's curve; a measured run on its own clock (train_s)."""
  from experiments.lm import time_to_loss   # pylint: disable=import-outside-toplevel

  def run(folder, method, num_stages, microbatches, losses, train_s=None, optimizer='adamw',
          compensation='none'):
    workdir = tmp_path / folder
    workdir.mkdir(parents=True)
    history = [{'step': 100 * (i + 1), 'val_loss': loss,
                **({'train_s': train_s[i]} if train_s else {})} for i, loss in enumerate(losses)]
    (workdir / 'summary.json').write_text(json.dumps(
        {'method': method, 'num_stages': num_stages, 'microbatches': microbatches,
         'compensation': compensation, 'optimizer': optimizer, 'history': history}))
    (workdir / 'config.json').write_text('{}')

  run('grid/runs/bp_seed0', 'bp', 1, 1, [3.0, 2.0, 1.5])
  run('grid/runs/bp_seed1', 'bp', 1, 1, [3.0, 2.2, 1.7])              # BP's mean final: 1.6
  run('grid/runs/fdg_k4_seed0', 'fdg', 4, 1, [3.0, 2.5, 1.9])         # never reaches 1.6
  run('grid/runs/fdg_k4_m8_seed0', 'fdg', 4, 8, [3.0, 1.6, 1.4])      # at step 200
  run('grid/runs/dgl_k4_seed0', 'dgl', 4, 1, [3.0, 2.0, 1.6])         # at step 300, as BP
  run('measured/fdg', 'fdg', 2, 1, [3.0, 1.5], train_s=[10.0, 30.0])  # 1.6 at 28.7 s
  # Basis rotation is measured against BP with rotated Adam (final 1.2), not against AdamW's.
  run('grid/runs/bp_rotadam_seed0', 'bp', 1, 1, [3.0, 1.8, 1.2], optimizer='rotated_adamw')
  run('grid/runs/fdg_k4_m8_rot_seed0', 'fdg', 4, 8, [3.0, 1.5, 1.3],
      compensation='basis_rotation')
  rows = [  # the cost model's rows for K = 4: ms per batch, speed-up over one device
      {'num_stages': 4, 'microbatches': 1, 'schedule': 'fdg', 'ms_per_batch': 250.0,
       'speedup': 4.0},
      {'num_stages': 4, 'microbatches': 8, 'schedule': 'fdg', 'ms_per_batch': 300.0,
       'speedup': 3.3},
      {'num_stages': 4, 'microbatches': 8, 'schedule': '1f1b', 'ms_per_batch': 400.0,
       'speedup': 2.5},
      {'num_stages': 4, 'microbatches': 1, 'schedule': 'dgl', 'ms_per_batch': 260.0,
       'speedup': 4.0}]
  # Rotated Adam's updates make every schedule 1.5x slower (its own table).
  rotated = [dict(r, ms_per_batch=1.5 * r['ms_per_batch']) for r in rows]
  with pytest.raises(app.UsageError, match=r"no \['gpt_rotated_adamw_b16'\].*--optimizer="):
    time_to_loss.report(str(tmp_path / 'grid'), {'tables': {'gpt_b16': rows}}, 'gpt_b16', [4],
                        0.5, {}, str(tmp_path / 'out'))
  text = time_to_loss.report(
      str(tmp_path / 'grid'), {'tables': {'gpt_b16': rows, 'gpt_rotated_adamw_b16': rotated}},
      'gpt_b16', [4], 0.5, {'fdg K=2': str(tmp_path / 'measured' / 'fdg')}, str(tmp_path / 'out'))
  table = {line.split(' | ')[0].lstrip('| '): line.split(' | ')[1:]
           for line in text.splitlines() if line.startswith('| ') and '---' not in line}
  # BP: one device, 1 s a batch; its mean curve 3.0, 2.1, 1.6 reaches 1.6 at step 300, 2.1 at 200.
  assert table['bp'][:4] == ['1.000', '300', '300', '200']
  assert table['1f1b K=4 M=8'][:4] == ['0.400', '300', '120', '200']   # BP's curve, faster
  assert table['fdg K=4 M=8'][:4] == ['0.300', '200', '60', '164']   # 2.1: 100 + 100 * 0.9 / 1.4
  # The fastest synchronous schedule over the row, to BP (1F1B's 120 s over 60 s) and to BP +
  # 0.5 (1F1B's 80 s over 49.3 s).
  assert [c.rstrip(' |') for c in table['fdg K=4 M=8'][-2:]] == ['2.00', '1.62']
  assert table['fdg K=4'][1:3] == ['never', 'never']
  assert table['dgl K=4'][:4] == ['0.260', '300', '78', '190']   # DGL at its own price
  # Never at BP's loss, but at BP + 0.5 (step 266.7, 0.25 s a batch) sooner than 1F1B.
  assert [c.rstrip(' |') for c in table['fdg K=4'][-2:]] == ['never', '1.20']
  assert table['fdg K=2 (measured)'][2] == '29'
  assert 'rotated_adamw: BP 1.2000' in text
  assert table['fdg K=4 M=8 basis_rotation'][1:3] == ['never', 'never']   # 1.3 > 1.2
  assert table['1f1b K=4 M=8 rotated_adamw'][:4] == ['0.600', '300', '180', '217']
  # One loss for every optimizer: rotated Adam's 1F1B (its BP's curve 3.0, 1.8, 1.2: 1.6 at step
  # 233, 0.6 s a batch) against AdamW's 1F1B (step 300, 0.4 s), both against the faster one.
  text = time_to_loss.report(
      str(tmp_path / 'grid'), {'tables': {'gpt_b16': rows, 'gpt_rotated_adamw_b16': rotated}},
      'gpt_b16', [4], 0.5, {}, str(tmp_path / 'out'), common_target=1.6)
  common = text.split('### K = 4: to 1.6 with any optimizer')[1]
  table = {line.split(' | ')[0].lstrip('| '): [c.rstrip(' |') for c in line.split(' | ')[1:]]
           for line in common.splitlines() if line.startswith('| ') and '---' not in line}
  assert table['1f1b K=4 M=8'] == ['0.400', '300', '120', '1.00']
  assert table['1f1b K=4 M=8 rotated_adamw'] == ['0.600', '233', '140', '0.86']
  assert table['fdg K=4 M=8'] == ['0.300', '200', '60', '2.00']
  assert (tmp_path / 'out' / 'time_to_loss.png').stat().st_size > 1000
  assert time_to_loss.parse_measured(['1f1b K=2 M=8=runs/a', 'bp=runs/b']) == {
      '1f1b K=2 M=8': 'runs/a', 'bp': 'runs/b'}


def test_op_profile_reads_a_jitted_function_s_ops_from_its_trace():
  """bench.common.traced_op_ms: the op events of one jitted module, per iteration, by kind."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from experiments.bench import common  # pylint: disable=g-import-not-at-top

  @jax.jit
  def step(x):
    return jnp.tanh(x @ x).sum()

  @jax.jit
  def other(x):
    return jnp.exp(x).sum()
  x = jnp.ones((96, 96))
  jax.block_until_ready((step(x), other(x)))

  def run():
    for _ in range(2):
      jax.block_until_ready((step(x), other(x)))
  by_op = common.traced_op_ms(run, 'jit_step', 2)
  assert by_op and all(ms >= 0 for ms in by_op.values())
  kinds = common.ops_by_kind(by_op)
  assert set(kinds) & {'dot', 'ynn_fusion'}, by_op   # the product, under either kernel
  assert sum(kinds.values()) == pytest.approx(sum(by_op.values()))
  assert not common.traced_op_ms(run, 'jit_absent', 2)
