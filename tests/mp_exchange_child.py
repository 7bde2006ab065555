"""One process of tests/test_multiprocess.py::test_host_values_do_not_hold_up_pending_transfers.

Process 0 sends process 1 a batch of arrays by cross-process `device_put` and goes straight on
to exchange host values (as the pipeline's evaluation does once its stage is done); process 1
takes its time over each array before using it. With the host values in a gloo collective,
process 0's transfers slowed to about one per 1.8 s while it waited in the collective, and the
collective gave up after 30 s.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from fdg_jax.engine import distributed

SHAPE = (500, 16, 16, 16)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--coordinator_address')
  parser.add_argument('--num_processes', type=int)
  parser.add_argument('--process_id', type=int)
  parser.add_argument('--arrays', type=int, default=20)
  parser.add_argument('--seconds_per_array', type=float, default=0.3)
  args = parser.parse_args()
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  source, target = (jax.sharding.SingleDeviceSharding(d) for d in jax.devices()[:2])
  sender = jax.process_index() == 0
  double = jax.jit(lambda x: 2 * x)
  total, start = 0.0, time.time()
  for i in range(args.arrays):
    value = (double(jax.device_put(np.full(SHAPE, i, np.float32), source)) if sender else
             jax.make_array_from_single_device_arrays(SHAPE, source, [], dtype=np.float32))
    moved = jax.device_put(value, target)
    if not sender:
      time.sleep(args.seconds_per_array)   # the last stage's work on the previous batch
      total += float(jnp.sum(moved[:, 0, 0, 0]))
  received = time.time() - start
  shared = distributed.broadcast_values(None if sender else {'total': total}, ('total',), 1)
  rows = distributed.all_processes([jax.process_index(), int(shared['total'])])
  print(f'process {jax.process_index()} done: total {shared["total"]:g}, rows '
        f'{rows.tolist()}, arrays received in {received:.1f} s', flush=True)


if __name__ == '__main__':
  main()
