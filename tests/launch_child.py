"""A stand-in for fdg_jax.main that tests/test_launch.py starts through fdg_jax.launch.

It imports no JAX (fast, and no devices to set up), prints one `info {json}` line with what the
launcher gave it, then behaves as --mode says:
  ok:         exits 0.
  fail:       process 1 exits 3; process 0 ignores SIGTERM and sleeps (only SIGKILL ends it).
  killed:     process 1 kills itself with SIGKILL; process 0 sleeps.
  checkpoint: prints 'ready' and sleeps; on SIGTERM prints 'saved' and exits 0.
In 'fail' and 'killed', process 1 ends only once process 0 has printed its line and set up its
signal handling (a file in --ready_dir says so): on a loaded machine, process 0 could otherwise
still be starting when the launcher stops it.
"""

import argparse
import json
import os
import signal
import sys
import time

READY_TIMEOUT_S = 20   # process 1's wait for process 0; the tests' launches time out at 30 s


def on_sigterm(signum, frame):
  del signum, frame
  print('saved', flush=True)
  sys.exit(0)


def end_process_1(mode: str, ready_file: str):
  """Waits (bounded) for process 0's ready file, then fails or is killed as `mode` says."""
  deadline = time.monotonic() + READY_TIMEOUT_S
  while not os.path.exists(ready_file) and time.monotonic() < deadline:
    time.sleep(0.05)
  if mode == 'fail':
    sys.exit(3)
  os.kill(os.getpid(), signal.SIGKILL)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--mode', choices=['ok', 'fail', 'killed', 'checkpoint'], required=True)
  parser.add_argument('--note', default='')
  parser.add_argument('--coordinator_address', required=True)
  parser.add_argument('--num_processes', type=int, required=True)
  parser.add_argument('--process_id', type=int, required=True)
  parser.add_argument('--ready_dir', help="where process 0 says it is ready ('fail', 'killed')")
  args = parser.parse_args()
  if args.mode in ('fail', 'killed') and not args.ready_dir:
    parser.error(f'--mode={args.mode} needs --ready_dir')
  if args.mode == 'checkpoint':
    signal.signal(signal.SIGTERM, on_sigterm)   # before 'info': the test waits for that line
  if args.mode == 'fail' and args.process_id == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
  print('info ' + json.dumps({
      'pid': os.getpid(), 'process_id': args.process_id, 'num_processes': args.num_processes,
      'coordinator_address': args.coordinator_address, 'note': args.note,
      'xla_flags': os.environ.get('XLA_FLAGS'), 'jax_platforms': os.environ.get('JAX_PLATFORMS'),
      'cores': sorted(os.sched_getaffinity(0))}), flush=True)

  if args.mode == 'ok':
    return
  if args.mode in ('fail', 'killed'):
    ready_file = os.path.join(args.ready_dir, 'process_0_ready')
    if args.process_id == 0:
      open(ready_file, 'w').close()
    else:
      end_process_1(args.mode, ready_file)
  if args.mode == 'checkpoint':
    print('ready', flush=True)
  while True:
    time.sleep(1)


if __name__ == '__main__':
  main()
