"""How one cell trains: `python -m fdg_jax.main` in a subprocess of its own, with its XLA_FLAGS
(or, with `processes`, `python -m fdg_jax.launch`: one process per stage).

`SubprocessRunner` is the grid's default `Runner`; `acquire_lock` keeps a second grid process out
of an output directory.
"""

import contextlib
import datetime
import os
import re
import shlex
import signal
import subprocess
import sys
from typing import Callable, Optional

from experiments.grids import cells as cells_lib
from fdg_jax.engine import checkpoint as checkpoint_lib
from fdg_jax.trainer import workdir as workdir_lib

COMMAND_FILE = 'command.sh'
# The run's console output, appended (the trainer's own full log is workdir_lib.LOG_FILE).
OUTPUT_FILE = 'train.log'
LOCK_FILE = '.grid.lock'
# How long the processes of a stopped cell get to save before the launcher kills them: they run
# on to the step JAX's preemption service picks (tens of seconds on a slow shared CPU), then
# save. The launcher's own 30 s lost a checkpoint here.
STOP_GRACE_S = 300

# Trains `cell` in `workdir`, leaving its summary there (workdir_lib.SUMMARY_FILE).
Runner = Callable[[cells_lib.Cell, str], None]


class RunFailed(RuntimeError):
  """One cell's training did not produce a summary."""


def format_value(value) -> str:
  """A config value as `--config.FIELD=` expects it."""
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, (tuple, list)):
    items = ','.join(format_value(v) if not isinstance(v, str) else repr(v) for v in value)
    return f'({items},)' if len(value) == 1 else f'({items})'
  return str(value) if isinstance(value, str) else repr(value)


_DEVICE_COUNT_FLAG = re.compile(r'--xla_force_host_platform_device_count=\S*')


def xla_flags(existing: str, platform_name: str, num_stages: int) -> str:
  """XLA_FLAGS for a run: on CPU, K simulated devices for K > 1 (any older count removed)."""
  flags = _DEVICE_COUNT_FLAG.sub('', existing).split()
  if platform_name == 'cpu' and num_stages > 1:
    flags.append(f'--xla_force_host_platform_device_count={num_stages}')
  return ' '.join(flags)


class SubprocessRunner:
  """Trains a cell with `python -m fdg_jax.main` in a subprocess of its own.

  The platform is probed once (in a subprocess too: this process imports JAX but never starts a
  backend, which on an accelerator would hold its memory). Output goes to WORKDIR/train.log
  (appended); the command to WORKDIR/command.sh. SIGINT/SIGTERM of the grid are passed to the
  run, whose trainer saves a checkpoint and exits; the grid then stops.

  With `processes=True` (CPU only) a cell of K > 1 stages and one device per stage trains in K
  processes started by `fdg_jax.launch`, stage k in process k on its own cores: what one process
  with K simulated devices computes (tests/test_multiprocess.py), with the stages really in
  parallel. A cell whose checkpoint one process wrote resumes in one process, and vice versa:
  the two layouts keep different checkpoint files.
  """

  def __init__(self, python: str = sys.executable, platform_info: Optional[tuple] = None,
               log: Callable[[str], None] = print, processes: bool = False):
    self.python = python
    self._platform = platform_info
    self.log = log
    self.processes = processes

  def platform(self) -> tuple[str, int]:
    if self._platform is None:
      env = dict(os.environ, XLA_FLAGS=xla_flags(os.environ.get('XLA_FLAGS', ''), 'cpu', 1))
      out = subprocess.run(
          [self.python, '-c', 'import jax; d = jax.devices(); print(d[0].platform, len(d))'],
          cwd=cells_lib.REPO, env=env, capture_output=True, text=True, check=False)
      if out.returncode:
        raise cells_lib.GridError(
            f'could not start JAX to find the platform:\n{out.stderr[-2000:]}')
      name, count = out.stdout.split()[-2:]
      self._platform = (name, int(count))
      self.log(f'Platform: {name}, {count} device(s).')
    if self.processes and self._platform[0] != 'cpu':
      raise cells_lib.GridError(
          f'--processes starts one CPU process per stage, but JAX runs on '
          f'{self._platform[0]}. Leave --processes out: stages then go on the accelerators.')
    return self._platform

  def in_processes(self, cell: cells_lib.Cell, workdir: str) -> bool:
    """Whether `cell` trains in one process per stage (see the class docstring)."""
    if not self.processes or cell.num_stages == 1:
      return False
    overrides = cell.override_dict()
    if overrides.get('data_parallel', 1) != 1 or overrides.get('stage_devices'):
      return False
    if checkpoint_lib.written_by(workdir) == checkpoint_lib.ONE_PROCESS:
      self.log(f'{cell.name}: resumes in one process, where its checkpoint was written.')
      return False
    return True

  def command(self, cell: cells_lib.Cell, workdir: str) -> tuple[list[str], dict]:
    """(argv, environment changes) of the run."""
    platform_name, count = self.platform()
    overrides = cell.override_dict()
    if platform_name != 'cpu' and count < cell.num_stages and not overrides.get('stage_devices'):
      overrides['stage_devices'] = tuple(k % count for k in range(cell.num_stages))
      self.log(f'warning: {cell.name}: K={cell.num_stages} stages on {count} {platform_name} '
               f"device(s): stages share them, stage_devices={overrides['stage_devices']}. "
               'Accuracy is unaffected; times are not those of K devices.')
    trainer_args = [f'--config={cell.config_file}', f'--workdir={workdir}']
    trainer_args += [f'--config.{k}={format_value(v)}' for k, v in sorted(overrides.items())]
    if self.in_processes(cell, workdir):   # fdg_jax.launch gives each process one device
      return ([self.python, '-m', 'fdg_jax.launch', f'--num_processes={cell.num_stages}',
               f'--grace_s={STOP_GRACE_S}', '--'] + trainer_args,
              {'XLA_FLAGS': xla_flags(os.environ.get('XLA_FLAGS', ''), platform_name, 1)})
    env = {'XLA_FLAGS': xla_flags(os.environ.get('XLA_FLAGS', ''), platform_name,
                                  cell.num_stages)}
    return [self.python, '-m', 'fdg_jax.main'] + trainer_args, env

  def __call__(self, cell: cells_lib.Cell, workdir: str) -> None:
    argv, env_changes = self.command(cell, workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, COMMAND_FILE), 'w') as f:
      f.write(f'# {cell.name}, from {cells_lib.REPO}\ncd {shlex.quote(cells_lib.REPO)} && '
              + ' '.join(f'{k}={shlex.quote(v)}' for k, v in env_changes.items()) + ' '
              + ' '.join(shlex.quote(a) for a in argv) + '\n')
    log_path = os.path.join(workdir, OUTPUT_FILE)
    env = dict(os.environ, **env_changes)
    env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    with open(log_path, 'a') as log_file:
      log_file.write(f'\n===== {datetime.datetime.now().isoformat(timespec="seconds")} '
                     f'{" ".join(shlex.quote(a) for a in argv)}\n')
      log_file.flush()
      process = subprocess.Popen(argv, cwd=cells_lib.REPO, env=env, stdout=log_file,
                                 stderr=subprocess.STDOUT)
      try:
        code = process.wait()
      except BaseException:   # KeyboardInterrupt, or SIGTERM turned into one by `main`
        if process.poll() is None:
          process.send_signal(signal.SIGINT)   # the trainer saves a checkpoint and exits
        process.wait()
        raise
    if code:
      with open(log_path, errors='replace') as f:
        tail = ''.join(f.readlines()[-15:])
      raise RunFailed(f'exit status {code}; the end of {log_path}:\n{tail}')


def acquire_lock(out_dir: str) -> str:
  """One grid process per out_dir: two would train the same cell at once."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, LOCK_FILE)
  for _ in range(2):   # a stale lock is removed once, then taken
    try:   # created and written at once: two grids started together cannot both take it
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      try:
        with open(path) as f:
          pid = int(f.read().strip() or 0)
        os.kill(pid, 0)
      except (ValueError, ProcessLookupError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
          os.remove(path)   # stale: its grid has ended
        continue
      raise cells_lib.GridError(f'another grid (pid {pid}) is running in {out_dir}. Wait for '
                                'it, or use --report_only to write the results so far.') from None
    with os.fdopen(fd, 'w') as f:
      f.write(str(os.getpid()))
    return path
  raise cells_lib.GridError(f'could not take the lock {path}: remove it if no grid is running.')
