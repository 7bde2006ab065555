"""fdg_jax.launch: flags, devices and cores per process, prefixed output, failure and SIGTERM.

The processes run tests/launch_child.py (no JAX), so each launch takes about a second.
"""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

from fdg_jax import launch as launch_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, 'tests')
OTHER_XLA_FLAG = '--xla_cpu_enable_fast_math=false'
TIMEOUT_S = 30   # for every launch; each should end within a few seconds


@pytest.fixture
def started_pids():
  """The pids the children print; any still alive at the end is killed, the test failing or not."""
  pids = []
  yield pids
  for pid in pids:
    if alive(pid):
      os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def launcher_env(**overrides):
  env = dict(os.environ, PYTHONPATH=TESTS,
             XLA_FLAGS=f'{OTHER_XLA_FLAG} --xla_force_host_platform_device_count=8')
  env.update(overrides)
  return {k: v for k, v in env.items() if v is not None}


def launcher_command(num_processes, mode, *launcher_flags, child_flags=()):
  return [sys.executable, '-m', 'fdg_jax.launch', f'--num_processes={num_processes}',
          '--module=launch_child', *launcher_flags, '--', f'--mode={mode}', *child_flags]


def run_launcher(num_processes, mode, *launcher_flags, child_flags=(), **env):
  return subprocess.run(launcher_command(num_processes, mode, *launcher_flags,
                                         child_flags=child_flags),
                        cwd=REPO, env=launcher_env(**env), capture_output=True, text=True,
                        timeout=TIMEOUT_S)


def child_infos(output: str, pids=None) -> dict[int, dict]:
  """{process id: what it printed in its `info` line}, read from the prefixed output."""
  infos = {}
  for line in output.splitlines():
    if line.startswith('[') and '] info ' in line:
      prefix, payload = line.split('] info ', 1)
      info = json.loads(payload)
      assert int(prefix[1:]) == info['process_id'], line
      infos[info['process_id']] = info
      if pids is not None:
        pids.append(info['pid'])
  return infos


def test_core_blocks():
  assert launch_lib.core_blocks([0, 1], 2) == [[0], [1]]
  assert launch_lib.core_blocks([0, 1, 2, 3, 4, 5, 6], 3) == [[0, 1], [2, 3], [4, 5]]
  assert launch_lib.core_blocks([2, 5, 7, 9], 2) == [[2, 5], [7, 9]]   # the affinity set's own
  assert launch_lib.core_blocks([0, 1], 3) is None


def test_child_env_sets_one_device_count_and_keeps_the_rest():
  env = {'XLA_FLAGS': f'--xla_force_host_platform_device_count=8 {OTHER_XLA_FLAG} '
                      '--xla_force_host_platform_device_count=4', 'HOME': 'h'}
  child = launch_lib.child_env(env, 2)
  assert child['XLA_FLAGS'].split() == [OTHER_XLA_FLAG, '--xla_force_host_platform_device_count=2']
  assert child['HOME'] == 'h' and 'JAX_PLATFORMS' not in child
  assert launch_lib.child_env({}, 3)['XLA_FLAGS'] == '--xla_force_host_platform_device_count=3'
  assert launch_lib.child_env({'JAX_PLATFORMS': 'cpu'}, 1)['JAX_PLATFORMS'] == 'cpu'
  assert env['XLA_FLAGS'].count('device_count') == 2   # the caller's dict is left alone


def test_free_port_can_be_bound():
  import socket  # pylint: disable=g-import-not-at-top
  from fdg_jax.engine import distributed  # pylint: disable=g-import-not-at-top
  port = distributed.free_port(launch_lib.HOST)
  with socket.socket() as s:
    s.bind((launch_lib.HOST, port))


@pytest.mark.slow
def test_every_process_gets_its_flags_devices_and_cores(started_pids):
  result = run_launcher(2, 'ok', '--devices_per_process=3',
                        child_flags=['--note=two words'], JAX_PLATFORMS=None)
  assert result.returncode == 0, result.stdout + result.stderr
  start_line = result.stdout.splitlines()[0]
  assert start_line.startswith('launch: 2 processes of launch_child, coordinator 127.0.0.1:')
  infos = child_infos(result.stdout, started_pids)
  assert sorted(infos) == [0, 1]
  port = start_line.split('coordinator 127.0.0.1:')[1].split(',')[0]
  for info in infos.values():
    assert info['num_processes'] == 2
    assert info['coordinator_address'] == f'127.0.0.1:{port}'
    assert info['note'] == 'two words'   # passed unchanged
    assert info['xla_flags'].split() == [OTHER_XLA_FLAG,
                                         '--xla_force_host_platform_device_count=3']
    assert info['jax_platforms'] is None   # not set when the caller did not set it

  cores = sorted(os.sched_getaffinity(0))
  if len(cores) < 2:
    pytest.skip(f'{len(cores)} core: nothing to pin')
  assert 'pinned: process 0 on cores ' in start_line
  size = len(cores) // 2
  assert len(infos[0]['cores']) == len(infos[1]['cores']) == size
  assert not set(infos[0]['cores']) & set(infos[1]['cores'])
  assert set(infos[0]['cores'] + infos[1]['cores']) <= set(cores)


@pytest.mark.slow
def test_no_pinning_with_fewer_cores_than_processes(monkeypatch, capsys, started_pids):
  """In-process, with the launcher told it has one core; JAX_PLATFORMS passes through."""
  monkeypatch.setattr(launch_lib, 'available_cores', lambda: [0])
  code = launch_lib.launch(['--mode=ok'], 2, module='launch_child',
                           env=launcher_env(JAX_PLATFORMS='cpu'))
  output = capsys.readouterr().out
  assert code == 0, output
  assert 'not pinned to cores (fewer cores than processes: 1 < 2)' in output.splitlines()[0]
  infos = child_infos(output, started_pids)
  assert sorted(infos) == [0, 1]
  for info in infos.values():
    assert info['cores'] == sorted(os.sched_getaffinity(0))   # inherited, not narrowed
    assert info['jax_platforms'] == 'cpu'


@pytest.mark.slow
def test_a_failing_process_stops_the_others(started_pids, tmp_path):
  """Process 0 ignores SIGTERM, so it also takes the SIGKILL after --grace_s."""
  start = time.monotonic()
  result = run_launcher(2, 'fail', '--grace_s=1', child_flags=(f'--ready_dir={tmp_path}',))
  elapsed = time.monotonic() - start
  infos = child_infos(result.stdout, started_pids)
  assert result.returncode == 3, result.stdout + result.stderr
  assert (f'error: process 1 (pid {infos[1]["pid"]}) exited with code 3; stopping the other '
          'processes') in result.stderr
  assert f'process 0 (pid {infos[0]["pid"]}) still running 1 s after SIGTERM' in result.stderr
  assert not alive(infos[0]['pid'])
  assert elapsed < 15


@pytest.mark.slow
def test_a_killed_process_stops_the_others(started_pids, tmp_path):
  result = run_launcher(2, 'killed', '--grace_s=5', child_flags=(f'--ready_dir={tmp_path}',))
  infos = child_infos(result.stdout, started_pids)
  assert result.returncode == 128 + signal.SIGKILL, result.stdout + result.stderr
  assert f'error: process 1 (pid {infos[1]["pid"]}) was killed by SIGKILL' in result.stderr
  assert 'still running' not in result.stderr   # process 0 ended at SIGTERM, within the grace
  assert not alive(infos[0]['pid'])


@pytest.mark.slow
def test_sigterm_to_the_launcher_reaches_every_process(started_pids):
  launcher = subprocess.Popen(launcher_command(2, 'checkpoint'), cwd=REPO, env=launcher_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = queue.Queue()
  reader = threading.Thread(target=lambda: [lines.put(line) for line in launcher.stdout],
                            daemon=True)
  reader.start()
  output = []
  try:
    while sum(line.endswith('] ready\n') for line in output) < 2:
      output.append(lines.get(timeout=TIMEOUT_S))
    launcher.send_signal(signal.SIGTERM)
    code = launcher.wait(timeout=TIMEOUT_S)
  finally:
    if launcher.poll() is None:
      launcher.kill()
      launcher.wait(timeout=TIMEOUT_S)
  reader.join(timeout=TIMEOUT_S)
  while not lines.empty():
    output.append(lines.get())
  text = ''.join(output)
  infos = child_infos(text, started_pids)
  assert code == 128 + signal.SIGTERM, text
  assert '[0] saved' in text and '[1] saved' in text
  assert 'interrupted by SIGTERM' in text
  assert not any(alive(info['pid']) for info in infos.values())
