"""Does a cross-process `jax.device_put` make the host wait? (The FDG host loop relies on it not.)

Process 0 computes a few seconds of matrix products and sends the result to process 1's device
at once; both processes time how long the `device_put` call holds their host, and when the array
is ready on each side. Run in two local processes:

    python -m fdg_jax.launch --num_processes=2 --module=experiments.async_transfer

Each line: the call's host time on each side (ms) against the moment the computation ends and the
array arrives. If the calls return in about a millisecond while the array arrives seconds later,
the transfer is asynchronous on both sides, and a process can dispatch its whole loop ahead.
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from fdg_jax import distributed

flags.DEFINE_string('coordinator_address', None, 'Set by fdg_jax.launch.')
flags.DEFINE_integer('num_processes', None, 'Set by fdg_jax.launch.')
flags.DEFINE_integer('process_id', None, 'Set by fdg_jax.launch.')
flags.DEFINE_integer('trials', 3, 'Transfers timed.')
FLAGS = flags.FLAGS
SHAPE = (1024, 1024)


def main(argv):
  del argv
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  source, target = (jax.sharding.SingleDeviceSharding(d) for d in jax.devices()[:2])
  sender = jax.process_index() == 0
  slow = jax.jit(lambda x: jax.lax.fori_loop(0, 60, lambda i, y: jnp.tanh(y @ y.T / 1e3), x))
  x = jax.device_put(np.ones(SHAPE, np.float32), source) if sender else None
  if sender:
    slow(x).block_until_ready()   # compiled before timing
  spec = jax.ShapeDtypeStruct(SHAPE, np.float32)
  for trial in range(FLAGS.trials):
    distributed.all_processes([0])   # both start together
    start = time.time()
    y = slow(x) if sender else None
    moved = jax.device_put(
        y if sender else jax.make_array_from_single_device_arrays(SHAPE, source, [],
                                                                  dtype=spec.dtype), target)
    returned = time.time()
    (y if sender else moved).block_until_ready()
    ready = time.time()
    what = 'computation ends' if sender else 'array arrives'
    print(f'process {jax.process_index()} trial {trial}: device_put returned after '
          f'{1e3 * (returned - start):.1f} ms; {what} at {1e3 * (ready - start):.0f} ms',
          flush=True)
    distributed.all_processes([0])


if __name__ == '__main__':
  app.run(main)
