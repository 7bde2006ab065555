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

import pytest

from experiments.grids import cells as cells_lib
from experiments.grids import grid
from experiments.grids import reports
from experiments.grids import runner as runner_lib
from experiments.paper import compensation_grid
from experiments.paper import fig4a_beta
from experiments.paper import published
from experiments.paper import table2
from experiments.paper import table4
from experiments.probes import transfers
from fdg_jax import checkpoint as checkpoint_lib
from fdg_jax import workdir as workdir_lib
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
  assert len(cells) == len(opts.seeds) * (1 + 5 + 5)   # BP once, five FDG methods per K
  # BP and plain FDG are fig4a_beta.py's cells: a finished run of that grid is read as is.
  fig4a = {c.name: c for c in fig4a_beta.build_cells(opts, betas=(0.25,))}
  for cell in cells[:2]:
    assert grid.cell_record(cell) == grid.cell_record(fig4a[cell.name])
  wp = cells[3].override_dict()
  assert wp['compensation'] == 'weight_prediction' and cells[3].label.endswith(' wp')
  assert cells[2].override_dict()['stash'] == 'recompute'
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
