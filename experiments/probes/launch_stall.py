"""How often a two-process launch stalls, and where its processes' start-up time goes.

Each launch is `fdg_jax.launch` running this file's child in two processes (each pinned to its
own core where there are two): import JAX, join with `jax.distributed`, then one compiled sum
over both processes' devices. A launch that has not ended after `--timeout_s` counts as stalled;
its processes print their Python stacks (faulthandler) at `--stacks_after_s`, and the output's
tail is kept. With `--cache_dir`, JAX's persistent compilation cache is on (emptied first with
`--empty_cache`); without it, off. docs/record/suite_time.md ("The suite's time, part 2")
records what it showed.

  python -m experiments.probes.launch_stall --launches=40 --out=/tmp/stall_nocache.json
  python -m experiments.probes.launch_stall --launches=40 --cache_dir=/tmp/probe_cache \
      --empty_cache --out=/tmp/stall_cache.json
"""

import argparse
import faulthandler
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from experiments import REPO

MODULE = 'experiments.probes.launch_stall'


def child(args) -> None:
  """One process of a launch: the time to import JAX, to join, and to compute, on one line."""
  started = time.time()
  faulthandler.dump_traceback_later(args.stacks_after_s, exit=False)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fdg_jax.engine import distributed  # pylint: disable=g-import-not-at-top
  imported = time.time()
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  joined = time.time()
  mesh = jax.make_mesh((jax.device_count(),), ('p',))
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('p'))
  local = np.full((jax.local_device_count(),), jax.process_index() + 1.0, np.float32)
  values = jax.make_array_from_process_local_data(split, local)
  total = jax.jit(jnp.sum, out_shardings=jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))(values)
  total = float(total.addressable_data(0))
  faulthandler.cancel_dump_traceback_later()
  print(f'import {imported - started:.2f} s, join {joined - imported:.2f} s, '
        f'sum {time.time() - joined:.2f} s, total {total:g}', flush=True)


def one_launch(args) -> dict:
  """One launch under the timeout: 'ok', 'failed' or 'stalled', with each process's times."""
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=args.cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  command = [sys.executable, '-m', 'fdg_jax.launch', '--num_processes=2', f'--module={MODULE}',
             '--grace_s=2', '--', '--child', f'--stacks_after_s={args.stacks_after_s}']
  started = time.time()
  # A session of its own, so that a stalled launch's processes all end with it.
  launcher = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
  try:
    output, _ = launcher.communicate(timeout=args.timeout_s)
    outcome = 'ok' if launcher.returncode == 0 else 'failed'
  except subprocess.TimeoutExpired:
    os.killpg(launcher.pid, signal.SIGKILL)
    output, _ = launcher.communicate(timeout=30)
    outcome = 'stalled'
  times = {}
  for process, phases in re.findall(r'^\[(\d)\] import (.*), total', output, re.MULTILINE):
    times[int(process)] = {name: float(seconds) for name, seconds in
                           re.findall(r'(\w+) ([\d.]+) s', 'import ' + phases)}
  record = {'outcome': outcome, 'wall_s': round(time.time() - started, 2), 'processes': times}
  if outcome != 'ok':
    record['output_tail'] = output[-6000:]
  return record


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--launches', type=int, default=20, help='How many launches, one by one.')
  parser.add_argument('--timeout_s', type=float, default=40,
                      help='A launch not ended after this long counts as stalled.')
  parser.add_argument('--stacks_after_s', type=float, default=25,
                      help='When a process still running prints its Python stack.')
  parser.add_argument('--cache_dir', default='',
                      help="JAX's persistent compilation cache; empty: off.")
  parser.add_argument('--empty_cache', action='store_true',
                      help='Delete --cache_dir before the first launch.')
  parser.add_argument('--out', help='JSON file for every launch (default: print only).')
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--coordinator_address', help=argparse.SUPPRESS)
  parser.add_argument('--num_processes', type=int, help=argparse.SUPPRESS)
  parser.add_argument('--process_id', type=int, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args)
    return
  if args.out and os.path.exists(args.out):
    sys.exit(f'error: {args.out} exists; give another --out (nothing is overwritten).')
  if args.empty_cache and args.cache_dir:
    shutil.rmtree(args.cache_dir, ignore_errors=True)
  launches = []
  for i in range(args.launches):
    launches.append(one_launch(args))
    record = launches[-1]
    print(f'launch {i + 1}/{args.launches}: {record["outcome"]} in {record["wall_s"]} s '
          f'{record["processes"]}', flush=True)
  stalled = sum(r['outcome'] == 'stalled' for r in launches)
  failed = sum(r['outcome'] == 'failed' for r in launches)
  print(f'{stalled} of {len(launches)} launches stalled, {failed} failed '
        f'(cache: {args.cache_dir or "off"})')
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'settings': vars(args), 'launches': launches}, f, indent=1)


if __name__ == '__main__':
  main()
