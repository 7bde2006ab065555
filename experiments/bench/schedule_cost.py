r"""The schedules' cost model: time per batch of GPipe, 1F1B and FDG over M microbatches, and of
DGL, on K stages, one per device, predicted from measured stage times by an event simulation.

Each stage runs its program (`fdg_jax.engine.schedule.program`: F and B of every microbatch, U
of every batch, in the order the engine runs them) and `schedule.simulate` times it: an action
starts when its stage is free and its inputs are in (an F waits for stage k-1's F of the same
microbatch, a B for its own F and stage k+1's B), each transfer arriving `latency` after its
sender's action ends. The last stage's F is the engine's fused forward, loss and backward (its
`loss` function), and its B takes no time (it only sends what F made). DGL (M = 1) has no B:
its F is the stage's forward, its auxiliary head's forward and backward and its own backward
(the last stage's: the fused loss, its own head), waiting only for stage k-1's F. What is
assumed: no host dispatch cost, no contention between devices, a synchronous schedule's clipping
norm exchange (one scalar) hidden, the same latency between every pair of stages.

Time per batch: from programs of `--batches` batches, the slowest stage's mean time between the
ends of consecutive updates U(b), over the middle batches (b from the end of the fill, at least
N/4, to 3N/4): the steady state, without the fill and the drain that total / N would include.

Three modes:

* `--measure=gpt,resnet20` times, on this machine, each stage's jitted functions of a K = 2
  split (the FLOP split, as `experiments.bench.speedup` runs): stage 0's microbatch forward and
  backward, the last stage's fused forward, loss and backward, each stage's update (with the
  squared norm where the config clips), at each microbatch size --batch / M (M = 1 and each of
  --microbatches), and DGL's auxiliary head (the task's default: forward and backward to its
  weights and its input, on stage 0's output of a whole batch; its own update left out), in one
  process pinned to one core with one CPU device (as each of speedup's processes), calling
  `pipe.method`'s functions with `jax.block_until_ready` after each; medians of --repeats, but
  the update's mean over at least UPDATE_CALLS calls (an optimizer that refreshes something
  every few updates, as rotated Adam's bases every 10, pays it at its rate).
  `--optimizer` sets the config's optimizer (default: the model's config's own, AdamW for the
  GPT), and names the times `MODEL_OPTIMIZER` (e.g. gpt8x128_h4_t64_muon_b16). An item is `gpt` (the GPT sized by --n_layer, --n_embd, --n_head, --block_size,
  speedup's defaults) or a model of the zoo, with `:BATCH` (default 16 for the GPT, 128 for the
  zoo). The times go to --times, merged by model and batch.
* (default) prints, for every measured model, the predicted time per batch of each schedule for
  K = --stages and M = --microbatches: K = 2 from the two measured stages; K > 2 assuming K
  equal stages, each 1/K of the model's forward, backward and update (the model's: stage 0's
  plus the last stage's, whose fused loss is split into forward and backward in stage 0's
  ratio), DGL's non-last stages each with an auxiliary head more; with the speed-up over one
  device doing all of the work, and 1F1B's bubble (its busiest stage's idle share) beside
  (K-1)/(M+K-1). The latency: --latency_ms, else half of
  the round trip `exchange_ms` that --latency_from (a speedup result) measured for the same
  model, batch and M, else 0.
* `--validate=RESULTS.json` compares the K = 2 predictions with a speedup result's configurations
  over microbatches (and plain FDG, M = 1), each with the latency its own `exchange_ms` gives
  (half the round trip), and prints the relative error of each.

    python -m experiments.bench.schedule_cost --measure=gpt,resnet20
    python -m experiments.bench.schedule_cost --stages=2,4,8 --microbatches=2,4,8
    python -m experiments.bench.schedule_cost \
        --validate=experiments/results/bench_speedup_gpt8x256_h8_t128_b16.json
"""

import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Optional, Sequence

from absl import app
from absl import flags

import experiments
from fdg_jax.engine import schedule

FLAGS = flags.FLAGS
SCHEDULES = schedule.PROGRAMS   # gpipe, 1f1b, fdg, dgl (M = 1, where its head was timed)
TIMES = os.path.join(experiments.RESULTS_DIR, 'schedule_cost_times.json')
DEFAULT_BATCH = {'gpt': 16}     # the zoo's: 128 (speedup's defaults)
# The fewest updates timed (their mean): two refreshes of rotated Adam's bases (every 10).
UPDATE_CALLS = 20


def define_flags() -> None:
  flags.DEFINE_list('measure', [], 'Models to time: gpt or a zoo model, each [:BATCH].')
  flags.DEFINE_string('times', TIMES, 'JSON of the measured stage times (read, or written by '
                      '--measure).')
  flags.DEFINE_string('validate', '', 'A speedup result (JSON): compare the K = 2 predictions '
                      'with its measured time per batch.')
  flags.DEFINE_list('stages', ['2', '4', '8'], 'K values of the table.')
  flags.DEFINE_list('microbatches', ['2', '4', '8'], 'M values of the table and of --measure.')
  flags.DEFINE_integer('batches', 24, 'Batches in each simulated program.')
  flags.DEFINE_float('latency_ms', None, 'One-way transfer latency between stages, ms.')
  flags.DEFINE_string('latency_from', '', 'A speedup result whose exchange_ms / 2 is the latency '
                      '(per M) of its model where --latency_ms is not given (else 0).')
  flags.DEFINE_string('output', '', 'JSON file for the table or the validation.')
  flags.DEFINE_integer('repeats', 7, '--measure: timed calls of each function (median).')
  flags.DEFINE_integer('warmup', 2, '--measure: untimed calls first (compilation).')
  flags.DEFINE_integer('n_layer', 8, 'GPT: transformer blocks.')
  flags.DEFINE_integer('n_embd', 256, 'GPT: width.')
  flags.DEFINE_integer('n_head', 8, 'GPT: attention heads.')
  flags.DEFINE_integer('block_size', 128, 'GPT: context.')
  flags.DEFINE_string('optimizer', '', '--measure: the config\'s optimizer (e.g. muon, '
                      'rotated_adamw); empty: the model config\'s own. Named in the times\' key.')
  flags.DEFINE_string('measure_one', '', 'Set by --measure for its pinned process.')


# ---------------------------------------------------------------------------------- the model


def stage_times(entry: dict, microbatches: int, num_stages: int
                ) -> tuple[list[float], list[float], list[float]]:
  """Per-stage (forward, backward, update) ms of a measured model (`entry`, one of the times
  file's) at M microbatches: the two measured stages for K = 2 (the last stage's forward is its
  fused forward, loss and backward, its backward 0); else K equal stages (module doc)."""
  micro = entry['micro'][str(microbatches)]
  f0, b0, loss = micro['forward_ms'], micro['backward_ms'], micro['loss_ms']
  u0, u1 = entry['update_ms']
  if num_stages == 2:
    return [f0, loss], [b0, 0.0], [u0, u1]
  share = f0 / (f0 + b0)   # stage 0's forward share of F + B, assumed for the last stage's loss
  forward, backward = f0 + share * loss, b0 + (1 - share) * loss
  K = num_stages
  return ([forward / K] * (K - 1) + [(forward + backward) / K], [backward / K] * (K - 1) + [0.0],
          [(u0 + u1) / K] * K)


def dgl_stage_times(entry: dict, num_stages: int) -> tuple[list[float], list[float], list[float]]:
  """DGL's per-stage (F, B, U) ms: F is a stage's forward and backward at M = 1 (`stage_times`),
  plus the auxiliary head's (`aux_head_ms`) on every stage but the last; no B."""
  forward, backward, update = stage_times(entry, 1, num_stages)
  heads = [entry['aux_head_ms']] * (num_stages - 1) + [0.0]
  return [f + b + h for f, b, h in zip(forward, backward, heads)], [0.0] * num_stages, update


def simulate(name: str, num_stages: int, microbatches: int, forward, backward, update=0.0,
             latency: float = 0.0, num_batches: int = 24):
  """`schedule.simulate` of the programs of `num_batches` batches: per stage [(action, start,
  end)]. Times: numbers or per-stage lists."""
  programs = [schedule.program(name, k, num_stages, microbatches, num_batches)
              for k in range(num_stages)]
  return schedule.simulate(programs, forward, backward, update, latency)


def steady_window(num_stages: int, microbatches: int, num_batches: int) -> tuple[int, int]:
  """The batches (first, last) whose updates time the steady state: after FDG's fill of
  2(K-1) microbatches and at least N/4, up to 3N/4."""
  fill = math.ceil(2 * (num_stages - 1) / microbatches) + 1
  first, last = max(num_batches // 4, fill), num_batches - 1 - num_batches // 4
  if last - first < 2:
    raise ValueError(f'{num_batches} batches are too few for a steady state at K = {num_stages}, '
                     f'M = {microbatches}: use more (--batches).')
  return first, last


def time_per_batch(name: str, num_stages: int, microbatches: int, forward, backward,
                   update=0.0, latency: float = 0.0, num_batches: int = 24) -> float:
  """The steady time per batch (module doc): the slowest stage's mean time between updates."""
  timed = simulate(name, num_stages, microbatches, forward, backward, update, latency,
                   num_batches)
  first, last = steady_window(num_stages, microbatches, num_batches)
  periods = []
  for stage in timed:
    ends = {action.index: end for action, _, end in stage if action.kind == 'U'}
    periods.append((ends[last] - ends[first]) / (last - first))
  return max(periods)


def per_stage(value, num_stages: int) -> list[float]:
  return list(value) if isinstance(value, (list, tuple)) else [value] * num_stages


def predict(name: str, num_stages: int, microbatches: int, forward, backward, update=0.0,
            latency: float = 0.0, num_batches: int = 24) -> dict:
  """Time per batch, the speed-up over one device doing all the work, and the busiest stage's
  idle share (the bubble) of one schedule."""
  period = time_per_batch(name, num_stages, microbatches, forward, backward, update, latency,
                          num_batches)
  work = [microbatches * (f + b) + u for f, b, u in zip(
      per_stage(forward, num_stages), per_stage(backward, num_stages),
      per_stage(update, num_stages))]
  return {'ms_per_batch': period, 'speedup': sum(work) / period, 'bubble': 1 - max(work) / period}


def bubble_theory(num_stages: int, microbatches: int) -> float:
  """GPipe's and 1F1B's bubble with equal stages, no update time and no latency."""
  return (num_stages - 1) / (microbatches + num_stages - 1)


def table(entry: dict, stages: Sequence[int], counts: Sequence[int], latency_of,
          num_batches: int) -> list[dict]:
  """Every (K, M, schedule) of a measured model: `latency_of(M)` is the latency in ms."""
  rows = []
  for K in stages:
    for M in counts:
      for name in SCHEDULES:
        if name == 'dgl' and (M != 1 or 'aux_head_ms' not in entry):
          continue   # no microbatches; stage times measured before its head was timed
        times = dgl_stage_times(entry, K) if name == 'dgl' else stage_times(entry, M, K)
        rows.append({'num_stages': K, 'microbatches': M, 'schedule': name,
                     'latency_ms': latency_of(M),
                     **predict(name, K, M, *times, latency_of(M), num_batches)})
  return rows


def validation(result: dict, entry: dict, num_batches: int,
               latency_ms: Optional[float] = None) -> list[dict]:
  """The K = 2 prediction of each configuration of a speedup result over microbatches (and of
  plain FDG, M = 1, where measured) against its measured time per batch."""
  configs = [(name, info['method'], info['microbatches'])
             for name, info in result.get('microbatched', {}).items() if '+' not in name]
  if 'fdg' in result['ms_per_iter'] and '1' in entry['micro']:
    configs.insert(0, ('fdg', 'fdg', 1))
  rows = []
  for name, method, M in configs:
    if str(M) not in entry['micro']:
      continue
    latency = (latency_ms if latency_ms is not None
               else result['exchange_ms'].get(name, 0.0) / 2)
    predicted = time_per_batch(method, 2, M, *stage_times(entry, M, 2), latency, num_batches)
    measured = result['ms_per_iter'][name]
    rows.append({'config': name, 'schedule': method, 'microbatches': M, 'latency_ms': latency,
                 'measured_ms': measured, 'predicted_ms': predicted,
                 'error': predicted / measured - 1})
  return rows


# ------------------------------------------------------------------------------- measuring


def parse_item(item: str) -> tuple[str, int]:
  model, _, batch = item.partition(':')
  return model, int(batch) if batch else DEFAULT_BATCH.get(model, 128)


def label_of(model: str) -> str:
  """The model as experiments.bench.speedup names it in its results."""
  name = (f'gpt{FLAGS.n_layer}x{FLAGS.n_embd}_h{FLAGS.n_head}_t{FLAGS.block_size}'
          if model == 'gpt' else model)
  return f'{name}_{FLAGS.optimizer}' if FLAGS.optimizer else name


def measure_one(item: str, counts: Sequence[int]) -> dict:
  """This process (pinned, one device): the stage times of one model (module doc)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from experiments.bench import common  # pylint: disable=import-outside-toplevel

  model, batch = parse_item(item)
  method = '1f1b'   # its functions are every schedule's (FDG's only scale the cotangent)
  config = (common.make_gpt_config(method, 2, batch, FLAGS.n_layer, FLAGS.n_embd, FLAGS.n_head,
                                   FLAGS.block_size) if model == 'gpt' else
            common.make_config(model, method, 2, batch, 32))
  if FLAGS.optimizer:
    config.optimizer = FLAGS.optimizer
  config.stage_devices = (0,)   # both stages on this process's one device
  config.split_by = 'flops'     # as speedup's configurations
  run = common.initial_run(config)
  pipe, stages = run.pipe, list(run.state.stages)
  fns = pipe.method
  inputs, targets = common.random_host_batch(config, np.random.default_rng(0))

  def timed(call, samples):
    start = time.perf_counter()
    out = jax.block_until_ready(call())
    samples.append(1e3 * (time.perf_counter() - start))
    return out

  micro, totals = {}, [None, None]
  full_batch = None   # stage 0's output of a whole batch and its targets: DGL's head's input
  for M in counts:
    size = batch // M
    x = jax.device_put(inputs[:size], pipe.shardings[0])
    y = jax.device_put(targets[:size], pipe.shardings[1])
    samples = {'forward_ms': [], 'loss_ms': [], 'backward_ms': []}
    for r in range(FLAGS.warmup + FLAGS.repeats):
      keep = (lambda key: samples[key]) if r >= FLAGS.warmup else (lambda key: [])
      stages[0], h, entry = timed(lambda: fns.forward(0, stages[0], x), keep('forward_ms'))
      stages[1], totals[1], cotangent, _ = timed(
          lambda: fns.loss(1, stages[1], totals[1], h, y), keep('loss_ms'))
      totals[0], _ = timed(lambda: fns.backward(0, totals[0], entry, cotangent),
                           keep('backward_ms'))
    micro[str(M)] = {'microbatch_size': size,
                     **{key: statistics.median(v) for key, v in samples.items()}}
    if M == 1:
      full_batch = (h, y)

  update = [[], []]
  for r in range(FLAGS.warmup + max(FLAGS.repeats, UPDATE_CALLS)):
    for k in range(2):
      def step(k=k):
        norms = ([fns.squared_norm(j, totals[j]) for j in range(2)] if fns.grad_clip > 0
                 else None)
        return fns.update(k, stages[k], totals[k], norms)
      stages[k] = timed(step, update[k] if r >= FLAGS.warmup else [])
  return {'model': label_of(model), 'task': config.task, 'batch_size': batch,
          'split': list(run.split),   # blocks per stage
          'grad_clip': fns.grad_clip, 'repeats': FLAGS.repeats, 'micro': micro,
          'optimizer': config.optimizer, 'update_ms': [statistics.mean(u) for u in update],
          'aux_head_ms': aux_head_ms(config, *full_batch, timed)}


def aux_head_ms(config, h, targets, timed) -> float:
  """DGL's work beyond the network's on a non-last stage: its auxiliary head's (the task's
  default) forward and backward, to the head's weights and to `h` (stage 0's output of a whole
  batch), median of --repeats. The head's update is left out (the GPT's: LayerNorm and a
  n_embd x vocabulary matrix)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from experiments.bench import common  # pylint: disable=import-outside-toplevel

  config = config.copy_and_resolve_references()
  config.method = 'dgl'
  run = common.initial_run(config)
  head, stage = run.pipe.method.aux_heads[0], run.state.stages[0]
  batch_stats, key = stage.batch_stats['aux'], jax.random.key(0)

  def loss(params, y):
    outputs, _ = head.apply({'params': params, 'batch_stats': batch_stats}, y, train=True,
                            mutable=['batch_stats'], rngs={'dropout': key})
    return jnp.mean(run.pipe.loss_fn(outputs, targets))

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  samples = []
  for r in range(FLAGS.warmup + FLAGS.repeats):
    timed(lambda: step(stage.params['aux'], h), samples if r >= FLAGS.warmup else [])
  return statistics.median(samples)


def measure(items: Sequence[str], counts: Sequence[int]) -> dict:
  """Each item in its own process pinned to one core, with one CPU device; merged into --times."""
  from experiments.bench import common  # pylint: disable=import-outside-toplevel
  from fdg_jax.engine import distributed  # pylint: disable=import-outside-toplevel

  cores = sorted(os.sched_getaffinity(0))
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
             PYTHONPATH=experiments.REPO)
  passed = [f'--{name}={FLAGS[name].value}' for name in
            ('n_layer', 'n_embd', 'n_head', 'block_size', 'repeats', 'warmup', 'optimizer')]
  times = {'models': {}}
  if os.path.exists(FLAGS.times):
    with open(FLAGS.times) as f:
      times = json.load(f)
  for item in items:
    command = distributed.module_command(
        'experiments.bench.schedule_cost',
        [f'--measure_one={item}', f'--microbatches={",".join(map(str, counts))}', *passed],
        cores[:1])
    done = subprocess.run(command, cwd=experiments.REPO, env=env, capture_output=True, text=True,
                          timeout=3600)
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"')]
    if done.returncode or not lines:
      raise RuntimeError(f'--measure={item} failed:\n{(done.stdout + done.stderr)[-3000:]}')
    entry = json.loads(lines[-1])
    entry['machine'] = common.machine()
    entry['command'] = experiments.command_line()
    times['models'][f'{entry["model"]}_b{entry["batch_size"]}'] = entry
    print(f'{item}: ' + json.dumps(entry), flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.times)), exist_ok=True)
  with open(FLAGS.times, 'w') as f:
    json.dump(times, f, indent=2)
  return times


# ---------------------------------------------------------------------------------- the command


def latency_from(result: dict):
  """M -> half the round trip a speedup result measured at M (fdg_mM, else 1f1b_mM, gpipe_mM;
  plain FDG for M = 1), 0 where it has none."""
  exchange = result.get('exchange_ms', {})

  def latency(M):
    names = ['fdg'] if M == 1 else [f'{m}_m{M}' for m in ('fdg', '1f1b', 'gpipe')]
    found = [exchange[n] for n in names if n in exchange]
    return found[0] / 2 if found else 0.0
  return latency


def print_table(key: str, rows: list[dict]) -> None:
  print(f'\n{key}: ms per batch (speed-up over one device doing all the work)')
  print('| K | M | latency ms | GPipe | 1F1B | FDG | DGL | 1F1B bubble | (K-1)/(M+K-1) | '
        '1F1B / FDG |')
  print('| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |')
  cells = {(r['num_stages'], r['microbatches'], r['schedule']): r for r in rows}
  for K, M in dict.fromkeys((r['num_stages'], r['microbatches']) for r in rows):
    got = lambda name: cells[(K, M, name)]
    cell = lambda name: (f'{got(name)["ms_per_batch"]:.0f} ({got(name)["speedup"]:.2f})'
                         if (K, M, name) in cells else '–')
    print(f'| {K} | {M} | {got("fdg")["latency_ms"]:.1f} | {cell("gpipe")} | {cell("1f1b")} | '
          f'{cell("fdg")} | {cell("dgl")} | {got("1f1b")["bubble"]:.2f} | '
          f'{bubble_theory(K, M):.2f} | '
          f'{got("1f1b")["ms_per_batch"] / got("fdg")["ms_per_batch"]:.2f} |')


def main(argv):
  del argv
  counts = [int(m) for m in FLAGS.microbatches]
  if FLAGS.measure_one:
    print(json.dumps(measure_one(FLAGS.measure_one, sorted({1, *counts}))), flush=True)
    return
  if FLAGS.measure:
    times = measure(FLAGS.measure, sorted({1, *counts}))
  elif not os.path.exists(FLAGS.times):
    raise app.UsageError(f'No stage times at {FLAGS.times}: measure them first with '
                         '--measure=gpt,resnet20.')
  else:
    with open(FLAGS.times) as f:
      times = json.load(f)
  if FLAGS.validate:
    with open(FLAGS.validate) as f:
      result = json.load(f)
    key = f'{result["model"]}_b{result["batch_size"]}'
    if key not in times['models']:
      raise app.UsageError(f'{FLAGS.times} has no stage times of {key}: measure them with '
                           f'--measure=... at batch {result["batch_size"]}.')
    rows = validation(result, times['models'][key], FLAGS.batches, FLAGS.latency_ms)
    print(f'\n{key}, K = 2: measured (speedup) against predicted ms per batch')
    print('| configuration | latency ms | measured | predicted | error |')
    print('| --- | --- | --- | --- | --- |')
    for r in rows:
      print(f'| {r["config"]} | {r["latency_ms"]:.1f} | {r["measured_ms"]:.0f} | '
            f'{r["predicted_ms"]:.0f} | {100 * r["error"]:+.1f}% |')
    output = {'validate': FLAGS.validate, 'model': key, 'rows': rows,
              'max_abs_error': max((abs(r['error']) for r in rows), default=None)}
  else:
    measured = {}
    if FLAGS.latency_from:
      with open(FLAGS.latency_from) as f:
        measured = json.load(f)
    stages = [int(k) for k in FLAGS.stages]
    output = {'tables': {}}
    for key, entry in times['models'].items():
      if FLAGS.latency_ms is not None:
        latency = lambda M: FLAGS.latency_ms
      elif measured and key == f'{measured["model"]}_b{measured["batch_size"]}':
        latency = latency_from(measured)   # only for the model and batch it measured
      else:
        latency = lambda M: 0.0
      present = [M for M in counts if str(M) in entry['micro']]
      rows = table(entry, stages, present, latency, FLAGS.batches)
      print_table(key, rows)
      output['tables'][key] = rows
    print('\nK = 2: the two measured stages; K > 2: K equal stages of the model\'s times / K.')
  output.update({'times': os.path.relpath(FLAGS.times, experiments.REPO), 'batches': FLAGS.batches,
                 'command': experiments.command_line()})
  from experiments.bench import common  # pylint: disable=import-outside-toplevel
  common.print_json(output, FLAGS.output or None)


if __name__ == '__main__':
  define_flags()
  app.run(main)
