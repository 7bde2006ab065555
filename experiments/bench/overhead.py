r"""FDG's overhead over back-propagation on one device, and the host's share of an iteration.

All K stages of FDG sit on one device, so nothing runs in parallel that BP could not: the ratio
FDG / BP measures what splitting costs (stage boundaries, saved residuals, the host loop), not
what pipelining gains. BP is the unsplit model as a 1-stage Pipeline on the same device; both
use the trainer's stages, initial weights and optimizer (`train.initial_run`) on the same random
batches, already on the device.

After compilation and the fill (so that every stage runs its steady function), runs alternate
BP, FDG K=2, FDG K=4, BP, ...; each run times `--iters` steady iterations, from the first
dispatch until `jax.block_until_ready` on the whole pipeline state (all stage states and
everything in flight). The per-iteration medians over `--repeats` runs and their ratios are
reported; `fdg_over_bp` is the worst ratio over the K values.

Dispatch share: once per run, one more iteration is timed alone: the time `pipe.step` takes to
return (the host issuing every stage's call, without waiting) over the time until its results
are ready. `dispatch_share_pipelined` is the same share inside the timed runs (host time spent
in `pipe.step` over the run's wall time). The process's CPU time per iteration is reported too:
on a shared machine it is steadier than wall time.

On CPU, "one device" is not an in-order stream: the K stage programs can run at the same time on
the machine's cores, and XLA:CPU compiles the one large BP program differently from K smaller
ones (experiments/bench/op_profile.py shows where the time goes), so there the ratio mixes both
effects with the engine's own cost; on an accelerator it is the engine's cost.

    python -m experiments.bench.overhead   # ResNet-20, batch 128, K = 2 and 4
    python -m experiments.bench.overhead --stash=vjp+nothing_saveable   # cost of a policy

The last stdout line is one JSON object; it is also written to
experiments/results/bench_overhead_<model>_b<batch>_<size>px[_<stash>].json.
"""

import os
import statistics
import time

from absl import app
from absl import flags
import jax

import experiments
from experiments.bench import common

flags.DEFINE_string('model', 'resnet20', 'Model of the zoo (fdg_jax.models.MODEL_NAMES).')
flags.DEFINE_integer('batch_size', 128, 'Images per batch.')
flags.DEFINE_string('num_stages', '2,4', 'Comma-separated K values of FDG to compare with BP.')
flags.DEFINE_string('stash', 'vjp', "What the delayed backward uses: 'vjp', 'recompute' or "
                    "'vjp+POLICY' (POLICY in pipeline.RESIDUAL_POLICIES).")
flags.DEFINE_integer('warmup', 3, 'Steady iterations run (untimed) after compilation and fill.')
flags.DEFINE_integer('iters', 6, 'Steady iterations per timed run.')
flags.DEFINE_integer('repeats', 5, 'Timed runs per method, interleaved.')
flags.DEFINE_integer('image_size', 32, 'Side of the square input images.')
FLAGS = flags.FLAGS


class Runner:
  """One pipeline, its state and batches; steps it and times it."""

  def __init__(self, name: str, config, num_batches: int = 4):
    self.name = name
    self.pipe, self.state = common.build_pipeline(config)
    self.batches = common.random_batches(self.pipe, config.batch_size, config.image_size,
                                         num_batches)
    self.fed = 0

  def step(self):
    images, labels = self.batches[self.fed % len(self.batches)]
    self.state, _ = self.pipe.step(self.state, images, labels)
    self.fed += 1

  def warm_up(self, steady_iterations: int) -> float:
    """Compiles and fills: 2(K-1) iterations reach the steady state, then a few more."""
    start = time.perf_counter()
    for _ in range(2 * (self.pipe.num_stages - 1) + steady_iterations):
      self.step()
      jax.block_until_ready(self.state)
    return time.perf_counter() - start

  def timed_run(self, iterations: int) -> tuple[float, float, float]:
    """(seconds per iteration, share of the run the host spent inside pipe.step,
    process CPU seconds per iteration)."""
    jax.block_until_ready(self.state)
    in_step = 0.0
    cpu_start, start = time.process_time(), time.perf_counter()
    for _ in range(iterations):
      before = time.perf_counter()
      self.step()
      in_step += time.perf_counter() - before
    jax.block_until_ready(self.state)
    total = time.perf_counter() - start
    return total / iterations, in_step / total, (time.process_time() - cpu_start) / iterations

  def dispatch_sample(self) -> tuple[float, float]:
    """(seconds for pipe.step to return, seconds until the iteration's results are ready)."""
    jax.block_until_ready(self.state)
    start = time.perf_counter()
    self.step()
    dispatched = time.perf_counter()
    jax.block_until_ready(self.state)
    return dispatched - start, time.perf_counter() - start


def main(argv):
  del argv
  ks = [int(k) for k in FLAGS.num_stages.split(',')]
  if any(k < 2 for k in ks):
    raise app.UsageError(f'--num_stages={FLAGS.num_stages}: FDG needs K >= 2 (K=1 is BP).')
  device = jax.devices()[0]
  print(f'Device: {device} ({device.device_kind}); every stage on it. '
        f'{FLAGS.model}, batch {FLAGS.batch_size}, stash={FLAGS.stash}.', flush=True)

  def config(method, k):
    return common.make_config(FLAGS.model, method, k, FLAGS.batch_size, FLAGS.image_size,
                              FLAGS.stash, stage_devices=(0,) * k)

  runners = [Runner('bp', config('bp', 1))]
  runners += [Runner(f'fdg_k{k}', config('fdg', k)) for k in ks]
  for runner in runners:
    print(f'{runner.name}: compiling and warming up (K={runner.pipe.num_stages}) ...',
          flush=True)
    print(f'  {runner.warm_up(FLAGS.warmup):.1f} s', flush=True)

  per_iteration = {r.name: [] for r in runners}
  share_pipelined = {r.name: [] for r in runners}
  dispatch = {r.name: [] for r in runners}
  cpu_time = {r.name: [] for r in runners}
  for repeat in range(FLAGS.repeats):
    for runner in runners:   # interleaved: BP, FDG K=2, FDG K=4, BP, ...
      seconds, share, cpu_seconds = runner.timed_run(FLAGS.iters)
      per_iteration[runner.name].append(seconds)
      cpu_time[runner.name].append(cpu_seconds)
      share_pipelined[runner.name].append(share)
      dispatch[runner.name].append(runner.dispatch_sample())
    print(f'repeat {repeat + 1}/{FLAGS.repeats}: ' + '  '.join(
        f'{name} {times[-1] * 1e3:.0f} ms' for name, times in per_iteration.items()), flush=True)

  median = {name: statistics.median(times) for name, times in per_iteration.items()}
  ratios = {str(k): median[f'fdg_k{k}'] / median['bp'] for k in ks}
  # The same ratio from adjacent runs only, less sensitive to the machine's load drifting.
  paired = {str(k): statistics.median(f / b for f, b in zip(per_iteration[f'fdg_k{k}'],
                                                             per_iteration['bp']))
            for k in ks}
  key = lambda name: 'bp' if name == 'bp' else name[len('fdg_k'):]
  dispatch_share = {key(n): statistics.median(d / t for d, t in samples)
                    for n, samples in dispatch.items()}
  dispatch_ms = {key(n): statistics.median(d for d, _ in samples) * 1e3
                 for n, samples in dispatch.items()}
  # The least time is the host's own cost; the median also holds waits for a core (the
  # stages dispatched first are already computing on the same cores as the host thread).
  dispatch_ms_min = {key(n): min(d for d, _ in samples) * 1e3 for n, samples in dispatch.items()}
  cpu_median = {name: statistics.median(times) for name, times in cpu_time.items()}

  print(f'\n| method | ms / iteration (median of {FLAGS.repeats}) | / BP | CPU ms / iteration '
        '| / BP | dispatch ms (median, min) | dispatch share | share in timed runs |')
  print('|---|---|---|---|---|---|---|---|')
  for runner in runners:
    name, k = runner.name, key(runner.name)
    ratio = 1.0 if name == 'bp' else ratios[k]
    print(f'| {"BP" if name == "bp" else f"FDG K={k}"} | {median[name] * 1e3:.1f} | '
          f'{ratio:.3f} | {cpu_median[name] * 1e3:.0f} | '
          f'{cpu_median[name] / cpu_median["bp"]:.3f} | {dispatch_ms[k]:.2f}, '
          f'{dispatch_ms_min[k]:.2f} | {dispatch_share[k]:.2%} | '
          f'{statistics.median(share_pipelined[name]):.2%} |')

  result = {
      'benchmark': 'overhead',
      'model': FLAGS.model, 'batch_size': FLAGS.batch_size, 'image_size': FLAGS.image_size,
      'stash': FLAGS.stash, 'num_stages': ks, 'warmup': FLAGS.warmup, 'iters': FLAGS.iters,
      'repeats': FLAGS.repeats,
      'fdg_over_bp': max(ratios.values()),
      'fdg_over_bp_per_k': ratios,
      'fdg_over_bp_paired_median': paired,
      'median_s_per_iteration': {key(n): m for n, m in median.items()},
      'samples_s_per_iteration': {key(n): t for n, t in per_iteration.items()},
      'dispatch_share': dispatch_share,
      'dispatch_ms': dispatch_ms,
      'dispatch_ms_min': dispatch_ms_min,
      'cpu_s_per_iteration': {key(n): c for n, c in cpu_median.items()},
      'fdg_over_bp_cpu_time': {str(k): cpu_median[f'fdg_k{k}'] / cpu_median['bp'] for k in ks},
      'dispatch_share_pipelined': {key(n): statistics.median(s)
                                   for n, s in share_pipelined.items()},
      'device': str(device),
      'machine': common.machine(),
      'command': experiments.command_line(),
  }
  stash = '' if FLAGS.stash == 'vjp' else f'_{FLAGS.stash}'   # the default keeps its old name
  name = f'bench_overhead_{FLAGS.model}_b{FLAGS.batch_size}_{FLAGS.image_size}px{stash}.json'
  common.print_json(result, os.path.join(common.RESULTS_DIR, name))


if __name__ == '__main__':
  app.run(main)
