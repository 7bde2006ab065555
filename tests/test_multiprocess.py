"""Stages in separate processes (jax.distributed, cross-process device_put) compute what one
process computes: every method, K = 2 and 3, both stashes, stages spread over processes; the
trainer in two processes ends cleanly when a process is killed, saves one step in every process
on SIGINT, and resumes from either bit-exactly."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import chex
import jax
import numpy as np
import pytest

from conftest import OTHER_XLA_FLAGS
from fdg_jax.engine import distributed
from mp_engine_child import run
import mp_trainer_child
from test_train import TEST_MODEL, write_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240
pytestmark = pytest.mark.slow   # every test launches processes


@contextlib.contextmanager
def launched(num_processes, args, module='mp_engine_child', grace_s=5):
  """fdg_jax.launch running `module` in `num_processes` processes (a Popen). The launcher and its
  children get a session of their own, ended on leaving, whatever happens, so that no process
  outlives the test. Without the persistent compilation cache that conftest sets: with it, the
  four-process test of stages spread over processes hung twice; a later probe stalled without
  the cache too, so the cause is not settled (docs/record/suite_time.md, "The suite's time" and
  its part 2)."""
  env = dict(os.environ, PYTHONPATH=os.path.join(REPO, 'tests'), JAX_COMPILATION_CACHE_DIR='')
  launcher = subprocess.Popen(
      [sys.executable, '-m', 'fdg_jax.launch', f'--num_processes={num_processes}',
       f'--module={module}', f'--grace_s={grace_s}', '--', *args],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      start_new_session=True)
  try:
    yield launcher
  finally:
    end_session(launcher.pid)
    launcher.wait(timeout=10)


def end_session(pid):
  """SIGKILL to the launcher `pid` and every process of its session (if any is left)."""
  try:
    os.killpg(pid, signal.SIGKILL)
  except ProcessLookupError:
    pass


def launch(num_processes, args, module='mp_engine_child', timeout_s=TIMEOUT_S):
  """Runs `launched(...)` to the end; its exit code and output."""
  with launched(num_processes, args, module) as launcher:
    output, _ = launcher.communicate(timeout=timeout_s)
  return launcher.returncode, output


def leaves_of(tree):
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_processes_compute_what_one_process_computes(tmp_path):
  """Stage k on process k, in one launch of three processes: FDG (both stashes), DDG and DGL
  at K = 3, whose stages take every role (first, middle, last); FDG at K = 2 on processes 0-1
  (process 2 holds no stage). The final variables of every stage and the composed model's
  logits equal one process's (rel 1e-5). Also K = 2 with both stages on process 0: bit for bit
  the spread layout (the transfers are exact). (DDG and DGL at K = 2, across processes, are in
  the four-process test below.) Also stages that pass pytrees across processes 0-1
  (tests/test_pytree_stages.py): a dict of float arrays, and a (float, bool mask) tuple whose
  cotangent has no mask leaf. Also the look-ahead compensations (FDG: Nesterov with the delay
  momentum; DDG: Nesterov), whose delayed stages run optimizers of their own. Also the methods
  over microbatches (tests/mp_engine_child.py's '.mM'), every microbatch's activation and
  cotangent its own transfer: GPipe, 1F1B clipped by the whole model's norm (each stage's
  squared norm moved to every other process; every batch is clipped) and FDG, each at K = 3
  and K = 2, one with M = 2 and the other M = 4; 1F1B with clipping at K = 2 on process 0
  alone equals it spread bit for bit; FDG with M = 4, and with M = 2 and delay compensation
  (each batch's forward parameters in flight), checkpointed half-way with microbatches in
  flight (each process saving its stages' part) and restored into a new pipeline ends bit for
  bit where the straight run does."""
  runs = {3: ['fdg:vjp', 'fdg:recompute', 'ddg:vjp', 'dgl:vjp',
              'fdg@nesterov+delay_momentum:vjp', 'ddg@nesterov:vjp',
              'gpipe.m2:vjp', '1f1b.m4.clip:vjp', 'fdg.m4:vjp', 'fdg.m4:vjp:on0-1-2:resume',
              'fdg.m2@delay_compensation:vjp:on0-1-2:resume'],
          2: ['fdg:vjp:on0-1', 'fdg+dict:vjp:on0-1', 'fdg+mask:recompute:on0-1',
              'gpipe.m4:vjp:on0-1', '1f1b.m2.clip:vjp:on0-1', 'fdg.m2:vjp:on0-1']}
  together = ['fdg:vjp:on0-0', '1f1b.m2.clip:vjp:on0-0']   # every stage on process 0
  code, stdout = launch(3, ['--num_stages=3', f'--out_dir={tmp_path}',
                            f'--runs={",".join(runs[3] + runs[2] + together)}'],
                        timeout_s=2 * TIMEOUT_S)
  assert code == 0, stdout[-5000:]
  assert all(f'[{i}] process {i} done' in stdout for i in range(3))
  for num_stages, names in runs.items():
    for name in names:
      method, stash = name.split(':')[:2]
      expected, logits = run(method, num_stages, stash, jax.devices()[:num_stages])
      out = tmp_path / name.replace(':', '-')
      with np.load(f'{out}.npz') as got:
        got = {k: got[k] for k in got.files}
      assert set(got) == set(leaves_of(expected)), name
      chex.assert_trees_all_close(got, leaves_of(expected), rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(np.load(f'{out}-logits.npy'), np.asarray(logits),
                                 rtol=1e-5, atol=1e-6)
  for first, second in [('fdg-vjp-on0-1', 'fdg-vjp-on0-0'),   # spread, on process 0
                        ('1f1b.m2.clip-vjp-on0-1', '1f1b.m2.clip-vjp-on0-0'),
                        ('fdg.m4-vjp', 'fdg.m4-vjp-on0-1-2-resume')]:   # straight, resumed
    with np.load(tmp_path / f'{first}.npz') as one, np.load(tmp_path / f'{second}.npz') as two:
      chex.assert_trees_all_equal(dict(one), dict(two))


def test_stages_spread_over_processes_compute_what_one_process_computes(tmp_path):
  """Stages whose devices belong to several processes (a stage's batch split over them, its
  gradients and BatchNorm statistics reduced across them), in four processes: data-parallel BP
  on processes 0-1, a stage on processes 0-1 beside one on process 2 (FDG, and DDG the other way
  round), K = 2 x D = 2 (FDG, DGL); the processes without a stage only take part in the
  transfers. The same variables as one process with one device per stage (rel 1e-5); a run
  checkpointed half-way (each process saving its shards) and restored into a new pipeline ends
  bit for bit where the straight run does. Also K = 2 x D = 2 over microbatches: 1F1B clipped
  by the whole model's norm (a stage's squared norm, replicated on its two processes' devices,
  moved to the other stage's two) and FDG with M = 2."""
  runs = ['bp:vjp:on01', 'bp:vjp:on01:resume', 'fdg:vjp:on01-2', 'ddg:vjp:on2-01',
          'fdg:vjp:on01-23', 'fdg:vjp:on01-23:resume', 'dgl:vjp:on01-23',
          '1f1b.m2.clip:vjp:on01-23', 'fdg.m2:vjp:on01-23']
  # Seven runs in four processes: on two busy cores (the test suite's other worker, a grid)
  # this took over 240 s once. (Nine, with the microbatches: 80 s to 150 s on two busy cores.)
  code, stdout = launch(4, ['--num_stages=0', f'--out_dir={tmp_path}', f'--runs={",".join(runs)}'],
                        timeout_s=2 * TIMEOUT_S)
  assert code == 0, stdout[-5000:]

  def variables_of(name):
    with np.load(tmp_path / f'{name.replace(":", "-")}.npz') as got:
      return {k: got[k] for k in got.files}
  for name in runs:
    method, stash, layout, *resume = name.split(':')
    if resume:
      chex.assert_trees_all_equal(variables_of(name), variables_of(name.rsplit(':', 1)[0]))
      continue
    num_stages = len(layout[2:].split('-'))
    expected, _ = run(method, num_stages, stash, jax.devices()[:num_stages])
    chex.assert_trees_all_close(variables_of(name), leaves_of(expected), rtol=1e-5, atol=1e-6)


def test_host_values_do_not_hold_up_pending_transfers():
  """Process 0 sends 20 arrays and at once exchanges host values with process 1, which takes
  0.3 s over each array first: the exchange waits for process 1 without slowing the transfers
  (in a gloo collective it slowed them to ~1.8 s each and gave up after 30 s)."""
  code, output = launch(2, ['--arrays=20', '--seconds_per_array=0.3'], module='mp_exchange_child')
  assert code == 0, output[-5000:]
  total = float(sum(2 * 500 * i for i in range(20)))
  rows = f'[[0, {int(total)}], [1, {int(total)}]]'
  for process in (0, 1):
    assert f'process {process} done: total {total:g}, rows {rows}' in output, output[-3000:]


# ---------------------------------------------------------------- the trainer in processes


def trainer_args(data, workdir, steps, *extra):
  return ['--config=configs/cifar10_resnet20.py', f'--workdir={workdir}',
          f'--config.model={TEST_MODEL}',
          '--config.dataset=imagefolder', f'--config.data_dir={data}',
          f'--config.cache_dir={os.path.join(os.path.dirname(data), "cache")}',
          f'--config.num_train_steps={steps}', '--config.batch_size=8',
          '--config.image_size=16', '--config.log_every_steps=4', '--config.eval_batch_size=12',
          '--config.checkpoint_every_steps=4', '--config.learning_rate=0.01',
          '--config.eval_every_epochs=1', '--config.num_stages=2', '--config.beta=0.5', *extra]


def summary_of(workdir):
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)


def test_trainer_runs_data_parallel_bp_in_two_processes(tmp_path):
  """The trainer with BP's batch split over two processes (one device each): it trains,
  evaluates, checkpoints each process's shards and writes the summary. (That it computes what
  one process computes, and resumes bit for bit, the engine test above checks.)"""
  data = write_image_folder(tmp_path / 'data')
  code, output = launch(2, trainer_args(data, tmp_path / 'dp', 4, '--config.method=bp',
                                        '--config.data_parallel=2'), module='fdg_jax.main')
  assert code == 0, output[-5000:]
  summary = summary_of(tmp_path / 'dp')
  assert summary['data_parallel'] == 2 and summary['num_processes'] == 2
  assert len(set(summary['devices'])) == 2 and summary['history'][0]['step'] == 4
  assert 'cpu:0, cpu:' in output   # the stage table lists the stage's two devices
  for process in (0, 1):
    assert (tmp_path / 'dp' / 'checkpoints' / f'process_{process}' / '4.msgpack').exists()


def test_trainer_in_two_processes_equals_one_pinned_process_bit_for_bit(tmp_path):
  """The trainer (FDG, DDG, DGL, 1F1B over 2 microbatches with the whole model's clipping, FDG
  over 2 microbatches, FDG with error feedback, the ViT with basis rotation, at K = 2) with
  stage k in process k, each process pinned to its core,
  ends with the same variables, bit for bit, as one process with one CPU device pinned to one
  core and both stages on it: XLA:CPU computes alike with one device and one thread in both
  layouts, so the layouts can be compared exactly (two devices, or cores, in one process round
  differently)."""
  data = write_image_folder(tmp_path / 'data')
  args = [f'--data={data}', '--steps=12']
  timeout_s = TIMEOUT_S * len(mp_trainer_child.METHODS) // 3   # the runs one after the other
  code, output = launch(2, [*args, f'--out_dir={tmp_path / "two"}'], module='mp_trainer_child',
                        timeout_s=timeout_s)
  assert code == 0, output[-5000:]
  # The launched processes inherit conftest's XLA flags (-O2): the process alone compiles with
  # the same, since programs compiled at different levels need not round alike (with JAX 0.12
  # the default level and -O2 differ in the last bits; docs/record/newest_releases.md).
  env = dict(os.environ, PYTHONPATH=os.path.join(REPO, 'tests'), JAX_COMPILATION_CACHE_DIR='',
             XLA_FLAGS=f'{OTHER_XLA_FLAGS} --xla_force_host_platform_device_count=1')
  core = min(os.sched_getaffinity(0))
  alone = subprocess.run(
      [sys.executable, '-m', 'mp_trainer_child', *args,
       f'--out_dir={tmp_path / "one"}'], preexec_fn=lambda: os.sched_setaffinity(0, {core}),
      cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
  assert alone.returncode == 0, alone.stderr[-5000:]
  for method in mp_trainer_child.METHODS:
    one, two = summary_of(tmp_path / 'one' / method), summary_of(tmp_path / 'two' / method)
    assert one['num_processes'] == 1 and two['num_processes'] == 2
    assert len(set(one['devices'])) == 1 and len(set(two['devices'])) == 2
    for key in ('params_digest', 'test_loss', 'test_accuracy'):
      assert one[key] == two[key], (method, key)
    if 'timeline_start_step' in mp_trainer_child.METHODS[method]:   # of both processes' calls
      assert (tmp_path / 'two' / method / 'timeline.png').stat().st_size > 1000, method
  # Two steps of K = 2, M = 2: 1F1B's stage 0 makes F, F, B, B, the norm and U, stage 1 F+B
  # twice, the norm and U (20 calls); FDG's, the same without the norms (16).
  assert 'Timeline of 20 stage calls' in output and 'Timeline of 16 stage calls' in output, (
      output[-5000:])


def child_pid(workdir, process_id):
  """The pid of the trainer process `process_id` of the run in `workdir` (from /proc)."""
  for entry in os.listdir('/proc'):
    if not entry.isdigit():
      continue
    try:
      with open(f'/proc/{entry}/cmdline', 'rb') as f:
        argv = f.read().decode(errors='replace').split('\0')
    except OSError:
      continue
    if f'--workdir={workdir}' in argv and f'--process_id={process_id}' in argv:
      return int(entry)
  return None


def test_trainer_in_two_processes_killed_stopped_and_resumed_ends_where_a_straight_run_does(
    tmp_path):
  """What a run on a cluster lives through, in one chain of launches of the same command:
  1. a process killed (SIGKILL) after the checkpoint at step 40: the launcher names it, ends
     the other process at once and fails;
  2. the command again: it resumes, and SIGINT to the launcher (what a grid does to stop a
     cell) has both processes save the same step and exit (process 1 waits for process 0 to
     have received and saved the cotangent it sent);
  3. the command again: it resumes from that step and ends bit for bit (parameters and final
     evaluation) where one straight run of the same command ends.
  (That two processes compute what one computes, the engine tests above check: the trainer adds
  no arithmetic.)"""
  data = write_image_folder(tmp_path / 'data')
  steps = 200   # the kill and the SIGINT each come with over 100 steps still to run

  def args(workdir, *extra):
    return trainer_args(data, workdir, steps, '--config.checkpoint_every_steps=40',
                        '--config.eval_every_epochs=10', *extra)

  # The straight run also draws the timeline of both processes' stage calls (steps 14-16): it
  # only observes, the numbers stay the same.
  code, output = launch(2, args(tmp_path / 'straight', '--config.timeline_start_step=14',
                                '--config.timeline_num_steps=3'), module='fdg_jax.main')
  assert code == 0, output[-5000:]
  assert 'Timeline of 6 stage calls' in output   # 2 stages x 3 steps, from 2 processes
  assert (tmp_path / 'straight' / 'timeline.png').stat().st_size > 1000
  assert f'Stages of {TEST_MODEL}' in output and '[1] Stages' not in output   # process 0 speaks

  workdir = tmp_path / 'chain'
  with launched(2, args(workdir), module='fdg_jax.main') as launcher:
    deadline = time.time() + TIMEOUT_S
    while not all((workdir / 'checkpoints' / f'process_{i}' / '40.msgpack').exists()
                  for i in (0, 1)):   # a checkpoint is complete when every process wrote it
      assert time.time() < deadline and launcher.poll() is None, 'no checkpoint in time'
      time.sleep(0.2)
    victim = child_pid(workdir, 1)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    output, _ = launcher.communicate(timeout=90)
    assert time.time() - killed_at < 60
  assert launcher.returncode != 0
  assert f'process 1 (pid {victim}) was killed by SIGKILL' in output, output[-3000:]
  assert child_pid(workdir, 0) is None and child_pid(workdir, 1) is None

  # The processes get time to reach the same step, save and exit before the launcher kills them.
  with launched(2, args(workdir), module='fdg_jax.main', grace_s=90) as launcher:
    deadline, lines, resumed = time.time() + TIMEOUT_S, [], False
    # Reading blocks until a line comes: a run that hangs silently is ended at the deadline,
    # which ends the read (the assertions below then fail with its output).
    watchdog = threading.Timer(TIMEOUT_S, end_session, (launcher.pid,))
    watchdog.start()
    try:
      for line in launcher.stdout:   # the first step logged after resuming: all stages compiled
        lines.append(line)
        resumed = resumed or 'Resumed from the checkpoint at step' in line
        if resumed and re.search(rf'step \d+/{steps}', line):
          break
        assert time.time() < deadline, ''.join(lines[-30:])
    finally:
      watchdog.cancel()
    launcher.send_signal(signal.SIGINT)
    output, _ = launcher.communicate(timeout=120)
  output = ''.join(lines) + output
  assert re.search(r'Resumed from the checkpoint at step (40|80) ', output), output[-3000:]
  stops = re.findall(r'Stopped by SIGTERM \(to one of the processes\) at step (\d+)', output)
  assert stops and len(set(stops)) == 1, output[-3000:]
  stop = int(stops[0])
  for process in (0, 1):
    assert (workdir / 'checkpoints' / f'process_{process}' / f'{stop}.msgpack').exists(), (
        output[-3000:])

  code, output = launch(2, args(workdir), module='fdg_jax.main')
  assert code == 0, output[-5000:]
  straight, chain = summary_of(tmp_path / 'straight'), summary_of(workdir)
  assert straight['num_processes'] == 2 and len(set(straight['devices'])) == 2
  assert chain['resumed_from_step'] == stop and straight['steps'] == chain['steps'] == steps
  for key in ('params_digest', 'test_loss', 'test_accuracy'):
    assert chain[key] == straight[key], key


def test_unreachable_coordinator_is_one_clear_line(tmp_path):
  port = distributed.free_port('127.0.0.1')
  started = time.time()
  result = subprocess.run(
      [sys.executable, '-m', 'fdg_jax.main', '--config=configs/cpu_quick.py',
       f'--workdir={tmp_path}', f'--coordinator_address=127.0.0.1:{port}',
       '--num_processes=2', '--process_id=1', '--join_timeout_s=3'],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0 and time.time() - started < 60
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: Process 1 could not join the run at coordinator 127.0.0.1:')
  assert 'Traceback' not in result.stderr
