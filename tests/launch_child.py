"""A stand-in for fdg_jax.main that tests/test_launch.py starts through fdg_jax.launch.

It imports no JAX (fast, and no devices to set up), prints one `info {json}` line with what the
launcher gave it, then behaves as --mode says:
  ok:         exits 0.
  fail:       process 1 exits 3; process 0 ignores SIGTERM and sleeps (only SIGKILL ends it).
  killed:     process 1 kills itself with SIGKILL after 1 s; process 0 sleeps.
  checkpoint: prints 'ready' and sleeps; on SIGTERM prints 'saved' and exits 0.
"""

import argparse
import json
import os
import signal
import sys
import time


def on_sigterm(signum, frame):
  del signum, frame
  print('saved', flush=True)
  sys.exit(0)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--mode', choices=['ok', 'fail', 'killed', 'checkpoint'], required=True)
  parser.add_argument('--note', default='')
  parser.add_argument('--coordinator_address', required=True)
  parser.add_argument('--num_processes', type=int, required=True)
  parser.add_argument('--process_id', type=int, required=True)
  args = parser.parse_args()
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
  if args.mode == 'fail' and args.process_id == 1:
    sys.exit(3)
  if args.mode == 'killed' and args.process_id == 1:
    time.sleep(1)
    os.kill(os.getpid(), signal.SIGKILL)
  if args.mode == 'checkpoint':
    print('ready', flush=True)
  while True:
    time.sleep(1)


if __name__ == '__main__':
  main()
