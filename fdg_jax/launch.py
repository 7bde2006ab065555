"""Starts N local processes of the trainer that join with `jax.distributed.initialize`.

  python -m fdg_jax.launch --num_processes=2 -- --config=configs/cifar10_resnet56.py --workdir=DIR

Everything after `--` goes to every process unchanged, followed by
`--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I`. On CPU each process sees
`--devices_per_process` simulated devices; when there are enough cores, each process is pinned
to its own block of them. Output lines carry the process id as a prefix `[I] `. If a process
fails, the others get SIGTERM and, after `--grace_s`, SIGKILL; SIGTERM or SIGINT to the launcher
is forwarded as SIGTERM (the trainer saves a checkpoint and exits).

Exit status: 0 when every process exits 0; otherwise that of the first failed process (128+S
when killed by signal S), or 128+S when the launcher itself got signal S.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time

from absl import app
from absl import flags

from fdg_jax.engine import distributed

FLAGS = flags.FLAGS
flags.DEFINE_integer('num_processes', None, 'How many processes to start.', lower_bound=1)
flags.DEFINE_integer('devices_per_process', 1, 'Simulated CPU devices each process sees.',
                     lower_bound=1)
flags.DEFINE_integer('port', 0, 'Coordinator port on 127.0.0.1; 0 picks a free one.',
                     lower_bound=0, upper_bound=65535)
flags.DEFINE_string('module', 'fdg_jax.main', 'What each process runs with `python -m`.')
flags.DEFINE_float('grace_s', 30, 'Seconds the processes get after SIGTERM before SIGKILL.',
                   lower_bound=0)

HOST = '127.0.0.1'
DISTRIBUTED_FLAGS = ('--coordinator_address', '--num_processes', '--process_id')
POLL_S = 0.2
KILL_WAIT_S = 5   # after SIGKILL a process is gone at once, unless stuck in the kernel
_DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'



def available_cores() -> list[int] | None:
  """The cores this process may run on, or None where the OS cannot tell (or pin)."""
  if not hasattr(os, 'sched_getaffinity'):
    return None
  return sorted(os.sched_getaffinity(0))


def core_blocks(available: list[int], n: int) -> list[list[int]] | None:
  """n disjoint blocks of len(available) // n consecutive cores of `available`; None if there
  are fewer cores than n. Cores left over at the end stay unused."""
  if len(available) < n:
    return None
  size = len(available) // n
  return [list(available[i * size:(i + 1) * size]) for i in range(n)]


def child_env(env: dict[str, str], devices_per_process: int) -> dict[str, str]:
  """`env` with XLA_FLAGS asking for exactly `devices_per_process` CPU devices.

  A device count the caller set (the tests' conftest sets 8) is replaced; the other XLA flags
  and JAX_PLATFORMS are kept as they are.
  """
  xla_flags = re.sub(rf'(^|\s){_DEVICE_COUNT_FLAG}(=\S*)?(?=\s|$)', ' ',
                     env.get('XLA_FLAGS', ''))
  xla_flags = f'{xla_flags.strip()} {_DEVICE_COUNT_FLAG}={devices_per_process}'.strip()
  # Unbuffered, so that each line reaches the launcher when written, not in 8 KiB chunks.
  return dict(env, XLA_FLAGS=xla_flags, PYTHONUNBUFFERED='1')


def _describe(cores: list[int]) -> str:
  """'0-3,8' for [0, 1, 2, 3, 8]."""
  runs = []
  for core in cores:
    if runs and core == runs[-1][1] + 1:
      runs[-1][1] = core
    else:
      runs.append([core, core])
  return ','.join(str(a) if a == b else f'{a}-{b}' for a, b in runs)


def _status(returncode: int) -> str:
  if returncode < 0:
    return f'was killed by {signal.Signals(-returncode).name}'
  return f'exited with code {returncode}'


def _exit_code(returncode: int) -> int:
  return 128 - returncode if returncode < 0 else returncode


class _Output:
  """Writes the launcher's lines and the children's (prefixed `[I] `) whole, one at a time."""

  def __init__(self):
    self._lock = threading.Lock()

  def write(self, line: str, stream=None):
    with self._lock:
      print(line, file=stream or sys.stdout, flush=True)

  def copy(self, process_id: int, pipe):
    for raw in iter(pipe.readline, b''):
      self.write(f'[{process_id}] ' + raw.decode(errors='replace').rstrip('\r\n'))
    pipe.close()


def _terminate(children: list[subprocess.Popen], grace_s: float, output: _Output):
  """SIGTERM to every running child; SIGKILL to those still running after grace_s."""
  for child in children:
    if child.poll() is None:
      child.send_signal(signal.SIGTERM)
  deadline = time.monotonic() + grace_s
  while time.monotonic() < deadline and any(child.poll() is None for child in children):
    time.sleep(POLL_S / 2)
  for process_id, child in enumerate(children):
    if child.poll() is None:
      output.write(f'process {process_id} (pid {child.pid}) still running {grace_s:g} s after '
                   'SIGTERM; sending SIGKILL', sys.stderr)
  _kill(children)


def _kill(children: list[subprocess.Popen]):
  for child in children:
    if child.poll() is None:
      child.kill()
  for child in children:
    try:
      child.wait(timeout=KILL_WAIT_S)
    except subprocess.TimeoutExpired:
      pass


def launch(child_args: list[str], num_processes: int, *, devices_per_process: int = 1,
           port: int = 0, module: str = 'fdg_jax.main', grace_s: float = 30,
           env: dict[str, str] | None = None) -> int:
  """Runs `python -m module *child_args` plus the distributed flags in num_processes local
  processes until all exit; returns the exit status (see the module docstring)."""
  port = port or distributed.free_port(HOST)
  environment = child_env(dict(os.environ if env is None else env), devices_per_process)
  cores = available_cores()
  blocks = core_blocks(cores, num_processes) if cores else None
  output = _Output()
  if blocks:
    placement = 'pinned: ' + ', '.join(f'process {i} on cores {_describe(block)}'
                                       for i, block in enumerate(blocks))
  elif cores:
    placement = f'not pinned to cores (fewer cores than processes: {len(cores)} < {num_processes})'
  else:
    placement = 'not pinned to cores (this OS cannot pin)'
  output.write(f'launch: {num_processes} processes of {module}, coordinator {HOST}:{port}, '
               f'{placement}')

  received = []   # signals to the launcher; acted on in the polling loop, not in the handler
  previous_handlers = {}
  if threading.current_thread() is threading.main_thread():   # only there can Python handle
    for signum in (signal.SIGTERM, signal.SIGINT):
      previous_handlers[signum] = signal.signal(signum, lambda s, _: received.append(s))

  children, readers = [], []
  try:
    for process_id in range(num_processes):
      args = [*child_args, f'--coordinator_address={HOST}:{port}',
              f'--num_processes={num_processes}', f'--process_id={process_id}']
      command = distributed.module_command(module, args,
                                           blocks[process_id] if blocks else None)
      child = subprocess.Popen(command, env=environment, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
      children.append(child)
      # Daemon: a grandchild holding the pipe open must not keep the launcher alive.
      reader = threading.Thread(target=output.copy, args=(process_id, child.stdout),
                                daemon=True)
      reader.start()
      readers.append(reader)

    while True:
      if received:
        name = signal.Signals(received[0]).name
        output.write(f'interrupted by {name}: sending SIGTERM to the {num_processes} processes '
                     f'(SIGKILL after {grace_s:g} s)', sys.stderr)
        _terminate(children, grace_s, output)
        return 128 + received[0]
      codes = [child.poll() for child in children]
      failed = next((i for i, code in enumerate(codes) if code not in (None, 0)), None)
      if failed is not None:
        child = children[failed]
        output.write(f'error: process {failed} (pid {child.pid}) {_status(child.returncode)}; '
                     'stopping the other processes', sys.stderr)
        _terminate(children, grace_s, output)
        return _exit_code(child.returncode)
      if all(code == 0 for code in codes):
        return 0
      time.sleep(POLL_S)
  finally:
    _kill(children)   # whatever happened above, no child outlives the launcher
    for reader in readers:
      reader.join(timeout=KILL_WAIT_S)   # the last lines of output
    for signum, handler in previous_handlers.items():
      signal.signal(signum, handler)


def main(argv):
  child_args = argv[1:]
  for arg in child_args:
    if arg.split('=', 1)[0] in DISTRIBUTED_FLAGS:
      raise app.UsageError(f'{arg}: the launcher adds {", ".join(DISTRIBUTED_FLAGS)} itself; '
                           'pass --num_processes before `--`.')
  sys.exit(launch(child_args, FLAGS.num_processes,
                  devices_per_process=FLAGS.devices_per_process, port=FLAGS.port,
                  module=FLAGS.module, grace_s=FLAGS.grace_s))


if __name__ == '__main__':
  flags.mark_flag_as_required('num_processes')
  app.run(main)
