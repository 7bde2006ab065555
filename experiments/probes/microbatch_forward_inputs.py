r"""What keeping a saved microbatch forward's inputs costs FDG with microbatches (issue 36 item 4).

A compact checkpoint stores what determines each saved forward instead of its residuals: the
stage input, the BatchNorm statistics before the forward, the dropout key and the parameters
(`stage_functions.saved_forward`). The microbatch forward returns the first three every time and
the parameters only for the first microbatch of a batch (`with_params`), whose copy the batch's
microbatches share. This probe times the forward of one stage of the character GPT
(configs/shakespeare_char_cpu.py, split as the trainer splits it) on one microbatch, jitted as
`methods.Microbatched` jits it, three ways: keeping nothing ('residuals'), the inputs without the
parameters ('inputs'), and with them ('inputs_and_params': what a copy per microbatch would
cost). Wall-clock milliseconds per call, the median of `--repeats` windows of `--iterations`
calls, the three interleaved, compilation excluded.

    python -m experiments.probes.microbatch_forward_inputs   # batch 12, M = 4, K = 2, stage 0

The last stdout line is one JSON object.
"""

import statistics
import time

from absl import app
from absl import flags
import jax
import numpy as np

from experiments.bench import common
from fdg_jax.engine import stage_functions

flags.DEFINE_integer('batch_size', 12, 'Sequences per batch.')
flags.DEFINE_integer('microbatches', 4, 'M: the forward takes batch_size / M sequences.')
flags.DEFINE_integer('num_stages', 2, 'K: how the GPT is split.')
flags.DEFINE_integer('stage', 0, 'The stage timed (not the last: it saves no forward).')
flags.DEFINE_integer('iterations', 100, 'Calls per timed window.')
flags.DEFINE_integer('repeats', 7, 'Timed windows per variant.')
FLAGS = flags.FLAGS

VARIANTS = {'residuals': (False, False), 'inputs': (True, False),
            'inputs_and_params': (True, True)}   # (keeps_inputs, with_params)


def main(argv):
  del argv
  config = common.make_gpt_config('fdg', FLAGS.num_stages, FLAGS.batch_size, n_layer=4,
                                  n_embd=128, n_head=4, block_size=64)
  config.microbatches = FLAGS.microbatches
  config.stage_devices = (0,) * FLAGS.num_stages
  pipe, state = common.build_pipeline(config)
  k, size = FLAGS.stage, FLAGS.batch_size // FLAGS.microbatches
  inputs, _ = common.random_host_batch(config, np.random.default_rng(0))
  x = jax.device_put(inputs[:size], pipe.shardings[0])
  for j in range(k):   # stage k's input: the stages before it, forwarded
    x = pipe._predict[j](state.stages[j].params, state.stages[j].batch_stats, x)  # pylint: disable=protected-access
  stage = jax.tree_util.tree_map(lambda a: a.copy(), state.stages[k])
  calls = {}
  for name, (keeps_inputs, with_params) in VARIANTS.items():
    forward = jax.jit(stage_functions.microbatch_forward(pipe.specs[k], keeps_inputs),
                      donate_argnums=0, static_argnames='with_params')
    calls[name] = lambda s, forward=forward, with_params=with_params: forward(
        s, x, with_params=with_params)
    for _ in range(3):   # compile and warm up
      stage = calls[name](stage)[0]
  windows = {name: [] for name in VARIANTS}
  for _ in range(FLAGS.repeats):
    for name, call in calls.items():
      jax.block_until_ready(stage)
      start = time.perf_counter()
      for _ in range(FLAGS.iterations):
        stage = call(stage)[0]
      jax.block_until_ready(stage)
      windows[name].append(1e3 * (time.perf_counter() - start) / FLAGS.iterations)
  ms = {name: round(statistics.median(w), 3) for name, w in windows.items()}
  params_bytes = sum(a.nbytes for a in jax.tree_util.tree_leaves(stage.params))
  for name, value in ms.items():
    print(f'{name}: {value:.3f} ms per forward ({value / ms["residuals"] - 1:+.1%})')
  common.print_json({'batch_size': FLAGS.batch_size, 'microbatches': FLAGS.microbatches,
                     'num_stages': FLAGS.num_stages, 'stage': k, 'ms_per_forward': ms,
                     'windows_ms': {n: [round(v, 3) for v in w] for n, w in windows.items()},
                     'stage_params_bytes': params_bytes, 'machine': common.machine()})


if __name__ == '__main__':
  app.run(main)
