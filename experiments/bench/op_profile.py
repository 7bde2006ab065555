r"""Where an iteration's device time goes, per XLA op category: BP against FDG on one device.

Records `--steps` steady iterations of each method under `jax.profiler.trace` and sums the
durations of the trace's op events of the stage functions (module `jit_update_then_forward`)
by category (convolution, copy/transpose, other fusions, ...). Use it when
experiments/bench/overhead.py reports a ratio that needs explaining. Pin the process to one core
(`taskset -c 0`) so that op durations are not stretched by ops running concurrently.

    taskset -c 0 python -m experiments.bench.op_profile   # ResNet-20, batch 128, BP and FDG K=2

The last stdout line is one JSON object.
"""

import collections

from absl import app
from absl import flags
import jax

import experiments
from experiments.bench import common

flags.DEFINE_string('model', 'resnet20', 'Model of the zoo (fdg_jax.models.MODEL_NAMES).')
flags.DEFINE_integer('batch_size', 128, 'Images per batch.')
flags.DEFINE_string('num_stages', '1,2', 'Comma-separated K values; 1 is BP.')
flags.DEFINE_integer('steps', 3, 'Steady iterations recorded per method.')
FLAGS = flags.FLAGS


def profile(num_stages: int) -> tuple[collections.Counter, collections.Counter]:
  """(ms per iteration by category, ms per iteration by op) of `num_stages` on device 0."""
  config = common.make_config(FLAGS.model, 'bp' if num_stages == 1 else 'fdg', num_stages,
                              FLAGS.batch_size, 32, stage_devices=(0,) * num_stages)
  pipe, state = common.build_pipeline(config)
  batches = common.random_batches(pipe, FLAGS.batch_size, 32, 2)
  for t in range(2 * (num_stages - 1) + 2):   # compile and fill, outside the trace
    state, _ = pipe.step(state, *batches[t % 2])
  jax.block_until_ready(state)

  def run():
    nonlocal state
    for t in range(FLAGS.steps):
      state, _ = pipe.step(state, *batches[t % 2])
    jax.block_until_ready(state)
  by_op = common.traced_op_ms(run, 'jit_update_then_forward', FLAGS.steps)
  return common.ops_by_kind(by_op), by_op


def main(argv):
  del argv
  ks = [int(k) for k in FLAGS.num_stages.split(',')]
  results = {k: profile(k) for k in ks}
  name = lambda k: 'BP' if k == 1 else f'FDG K={k}'
  categories = sorted({c for by_category, _ in results.values() for c in by_category})
  print(f'\n{FLAGS.model}, batch {FLAGS.batch_size}: op time per iteration (ms), summed over '
        'op events\n')
  print('| op category | ' + ' | '.join(name(k) for k in ks) + ' |')
  print('|---|' + '---|' * len(ks))
  for c in categories:
    print(f'| {c} | ' + ' | '.join(f'{results[k][0][c]:.1f}' for k in ks) + ' |')
  print('| total | ' + ' | '.join(f'{sum(results[k][0].values()):.1f}' for k in ks) + ' |')
  for k in ks:
    print(f'\nLongest ops, {name(k)}: ' + ', '.join(
        f'{op} {ms:.1f} ms' for op, ms in results[k][1].most_common(5)))
  common.print_json({
      'benchmark': 'op_profile', 'model': FLAGS.model, 'batch_size': FLAGS.batch_size,
      'steps': FLAGS.steps,
      'ms_per_iteration_by_category': {name(k): dict(results[k][0]) for k in ks},
      'longest_ops': {name(k): results[k][1].most_common(5) for k in ks},
      'machine': common.machine(),
      'command': experiments.command_line()})


if __name__ == '__main__':
  app.run(main)
