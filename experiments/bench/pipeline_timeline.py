r"""A profiler timeline of FDG: ResNet-20 split in K stages, stage k on simulated CPU device k.

Compiles and fills the pipeline, then records `--iters` steady iterations with
`fdg_jax.engine.timeline.record_timeline` and draws them (one row per stage, colour = batch) to
experiments/results/timeline_cpu.png. It prints how much of the time two or more stages were
computing at once.

On CPU the simulated devices are not separate hardware: all of them run their programs on one
shared thread pool over the machine's cores, so overlapping bars share those cores and the
timeline shows whether dispatch lets the stages run concurrently, not a speed-up.

    python -m experiments.bench.pipeline_timeline   # K = 4, batch 128, 8 iterations
"""

import os
import tempfile

from absl import app
from absl import flags

import experiments

flags.DEFINE_string('model', 'resnet20', 'Model of the zoo (fdg_jax.models.MODEL_NAMES).')
flags.DEFINE_integer('num_stages', 4, 'K; stage k runs on device k.')
flags.DEFINE_integer('batch_size', 128, 'Images per batch.')
flags.DEFINE_integer('image_size', 32, 'Side of the square input images.')
flags.DEFINE_enum('stash', 'vjp', ['vjp', 'recompute'], 'What the delayed backward uses.')
flags.DEFINE_integer('iters', 8, 'Steady iterations recorded.')
flags.DEFINE_string('png', os.path.join(experiments.RESULTS_DIR, 'timeline_cpu.png'),
                    'Where the chart goes.')
flags.DEFINE_string('trace_dir', '', 'Where the profiler trace goes (default: a new temp dir).')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  # Simulated devices must exist before JAX starts: set the flag unless the caller did.
  if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_'
                               f'device_count={FLAGS.num_stages}').strip()
  import jax  # pylint: disable=import-outside-toplevel
  from experiments.bench import common  # pylint: disable=import-outside-toplevel
  from fdg_jax.engine import timeline  # pylint: disable=import-outside-toplevel

  K = FLAGS.num_stages
  if jax.device_count() < K:
    raise app.UsageError(f'{K} stages need {K} devices; JAX sees {jax.device_count()} '
                         '(XLA_FLAGS was set before this script ran?).')
  config = common.make_config(FLAGS.model, 'fdg', K, FLAGS.batch_size, FLAGS.image_size,
                              FLAGS.stash, stage_devices=tuple(range(K)))
  pipe, state = common.build_pipeline(config)
  batches = common.random_batches(pipe, FLAGS.batch_size, FLAGS.image_size, 4)
  print(f'Compiling and filling ({2 * (K - 1) + 2} iterations) ...', flush=True)
  fed = 0
  for _ in range(2 * (K - 1) + 2):   # past the fill, and the steady functions compiled
    state, _ = pipe.step(state, *batches[fed % len(batches)])
    fed += 1
  jax.block_until_ready(state)

  trace_dir = FLAGS.trace_dir or tempfile.mkdtemp(prefix='fdg_timeline_')
  recorded = [batches[(fed + i) % len(batches)] for i in range(FLAGS.iters)]
  state, events = timeline.record_timeline(pipe, state, recorded, trace_dir)
  title = (f'{FLAGS.model} FDG K={K}, batch {FLAGS.batch_size}, stage k on simulated CPU '
           f'device k ({os.cpu_count()} cores shared); colour/label = batch forwarded')
  timeline.draw_timeline(events, FLAGS.png, title=title)

  summary = timeline.summarize(events)
  print(f'\nTrace: {trace_dir}\nChart: {FLAGS.png}\n')
  print('| stage | device | calls | mean ms / call | busy ms |')
  print('|---|---|---|---|---|')
  per_stage = {}
  for k in range(K):
    spans = [e.end_ms - e.start_ms for e in events if e.stage == k]
    per_stage[k] = sum(spans)
    devices = ','.join(str(d.id) for d in pipe.shardings[k].device_set)
    print(f'| {k} | {devices} | '
          f'{len(spans)} | {sum(spans) / len(spans):.1f} | {sum(spans):.0f} |')
  dispatch = [e.dispatch_end_ms - e.dispatch_start_ms for e in events
              if e.dispatch_start_ms is not None]
  print(f'\nspan {summary["span_ms"]:.0f} ms for {FLAGS.iters} iterations; stages busy '
        f'{summary["busy_ms"]:.0f} ms in all (busy / span = {summary["parallelism"]:.2f}); two or '
        f'more stages computing at once for {summary["overlap_ms"]:.0f} ms '
        f'({summary["overlap_fraction"]:.0%} of the span). Host dispatch of one stage call: '
        f'{sorted(dispatch)[len(dispatch) // 2]:.2f} ms median.')
  overlap = summary['overlap_fraction'] > 0.05
  print('The stages overlap: calls of different stages run at the same time.' if overlap else
        'The stages barely overlap: their calls run one after another.')
  common.print_json({
      'benchmark': 'timeline', 'model': FLAGS.model, 'num_stages': K,
      'batch_size': FLAGS.batch_size, 'iters': FLAGS.iters, 'events': len(events),
      'busy_ms_per_stage': per_stage, 'overlap': overlap, **summary,
      'png': os.path.relpath(FLAGS.png), 'trace_dir': trace_dir,
      'machine': common.machine(),
      'command': experiments.command_line()})


if __name__ == '__main__':
  app.run(main)
