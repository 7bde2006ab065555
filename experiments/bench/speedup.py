"""The real speed-up of FDG: stages in separate processes on separate cores, against BP.

Simulated CPU devices share one thread pool, so only separate processes pinned to separate cores
work in parallel on a CPU. Each configuration runs in a fresh set of processes, interleaved over
`--repeats`; medians are reported:

  bp_1core   BP, one process pinned to one core;
  bp_2core   BP, one process on every core the benchmark may use;
  bp_dp      data-parallel BP: two processes pinned to one core each, each with half of the
             batch, the gradients (and BatchNorm statistics) reduced across them by XLA's
             collectives (one stage on a mesh of both processes' devices, config.data_parallel);
  fdg        FDG with K = 2 (FLOP-balanced split), two processes pinned to one core each
             (`fdg_jax.launch`, stages exchanging activations and cotangents by cross-process
             device_put);
  fdg_time   the same with the split balanced by measured block times (config.split_by);
  bp_pair    two copies of bp_1core at once, one per core: C = 2 t(bp_1core) / t(bp_pair)
             is how much two concurrent single-core processes get done on this machine
             (cores share caches and memory bandwidth, so C < 2).

Over microbatches (`--microbatches=2,4,8` adds, for each M, the three; or name them in
`--configs`), all K = 2 in two processes pinned to one core each, as `fdg`, the FLOP split, the
batch split by the engine into M microbatches of `--batch_size` / M:

  gpipe_mM   GPipe: per batch, M forwards, M backwards, one update (a flush per batch);
  1f1b_mM    1F1B (PipeDream-flush): the same update, one forward one backward in turn;
  fdg_mM     FDG with microbatches (PipeDream-2BW's rule): no flush, weights change between
             batches only.

For the FDG configurations also: `exchange_ms`, one activation forward and one array of its
shape back between the two processes alone (round trip, median), and each stage's device time per
call in the running pipeline (`stage_compute_ms`, the median steady call of a profiler timeline
of both processes over `--timeline_iters` iterations after the timed ones) with its share of
the iteration (`busy_share`); the first FDG run of each split draws that timeline beside the
result (by default `experiments/results/bench_speedup_MODEL_bBATCH_SPLIT_timeline.png`). For a
configuration over microbatches the same: `exchange_ms` of one microbatch's activation, and from
a timeline of every action (`experiments/bench/action_timeline.py`) each stage's device time per
batch (`stage_compute_ms`, the union of its actions' spans over `--timeline_iters` batches), its
`busy_share` of the timed batch and `bubble` = 1 - busy_share, beside GPipe's and 1F1B's
(K-1)/(M+K-1) (`microbatched`, with the time per batch over BP on one core and over C, and
`fdg_over_1f1b`: 1F1B's time per batch over FDG's, at each M). The first repeat draws, for each
M, the timelines of FDG and the methods at that M one above the other (`..._mM_timelines.png`
beside the result). Each process times its own loop of `--iters` iterations after `--warmup`
(compilation and the pipeline's fill), with random data; the slowest process's time is the
configuration's. The last stdout line is JSON.

`--task=language_model` benchmarks a GPT (sized by --n_layer, --n_embd, --n_head, --block_size;
vocabulary 65, tiny Shakespeare's characters; AdamW as configs/shakespeare_char_cpu.py) on random
token windows instead of the ResNet on random images; its files are named by the GPT's sizes.

`--probe` (plain FDG only) looks inside FDG's timed loop itself, without a profiler: a thread
polls when each array a stage sends is ready and when it has arrived at the other process, which
gives each stage's compute in the running pipeline, how long it waited for its input, and each
transfer's latency (`in_loop`, see experiments/probes/transfers.py). `--configs` runs a subset
(the speed-up factors need all six); `--variant_env` runs each configuration also under other
environment variables (e.g. another allocator, or glibc's malloc tunables), interleaved. Every
process records the allocator variables it saw (`env`) and, per timed iteration, its system and
user CPU time and minor page faults (`kernel`).

    python -m experiments.bench.speedup --model=resnet20 --batch_size=128
    python -m experiments.bench.speedup --configs=bp_1core,fdg --repeats=5 --probe
    python -m experiments.bench.speedup --configs=bp_1core,bp_pair,fdg --microbatches=2,4,8
    python -m experiments.bench.speedup --task=language_model --n_layer=8 --n_embd=256 \
        --n_head=8 --block_size=128 --batch_size=16 \
        --variant_env=MALLOC_ARENA_MAX=2,MALLOC_TRIM_THRESHOLD_=1000000000
"""

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

from absl import app
from absl import flags
import jax
import numpy as np

import experiments
from experiments.bench import action_timeline
from experiments.bench import common
from experiments.probes import transfers
from fdg_jax.engine import distributed
from fdg_jax.engine import methods
from fdg_jax.engine import timeline
from fdg_jax import tasks
from fdg_jax.trainer import configuration

FLAGS = flags.FLAGS
flags.DEFINE_enum('task', 'image_classification', list(tasks.BUILTIN),
                  'image_classification (a model of the zoo on 32x32 images) or language_model '
                  '(a GPT on token windows).')
flags.DEFINE_string('model', 'resnet20', 'image_classification: model of the zoo.')
flags.DEFINE_integer('n_layer', 8, 'language_model: transformer blocks.')
flags.DEFINE_integer('n_embd', 256, 'language_model: width.')
flags.DEFINE_integer('n_head', 8, 'language_model: attention heads.')
flags.DEFINE_integer('block_size', 128, 'language_model: context (tokens per window).')
flags.DEFINE_integer('batch_size', 128, 'Images or token windows per batch.')
flags.DEFINE_integer('warmup', 4, 'Iterations before timing (compilation, pipeline fill).')
flags.DEFINE_integer('iters', 8, 'Timed iterations per run.')
flags.DEFINE_integer('repeats', 3, 'Interleaved repeats of every configuration.')
flags.DEFINE_integer('timeline_iters', 4, 'FDG: iterations recorded for the stage times.')
flags.DEFINE_list('configs', ['bp_1core', 'bp_2core', 'bp_dp', 'fdg', 'fdg_time', 'bp_pair'],
                  'Configurations to run (the speed-up factors need all of them); also '
                  'gpipe_mM, 1f1b_mM, fdg_mM (M microbatches).')
flags.DEFINE_list('microbatches', [], 'M values: runs gpipe_mM, 1f1b_mM and fdg_mM for each, '
                  'after --configs. Worker: its one M.')
flags.DEFINE_list('variant_env', [], 'NAME=VALUE,...: every configuration also runs with these '
                  'environment variables (as CONFIG+env), interleaved with the plain runs; e.g. '
                  'LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.')
flags.DEFINE_bool('probe', False, 'FDG: also time, inside the timed loop, when each stage '
                  "output is ready and when it arrives at the other process (`in_loop`).")
flags.DEFINE_string('output', '', 'JSON file for the result (default: experiments/results/'
                    'bench_speedup_MODEL_bBATCH.json).')
# Set by the benchmark itself for its worker processes.
flags.DEFINE_string('method', None, 'Worker: bp, fdg, gpipe or 1f1b.')
flags.DEFINE_string('split_by', 'flops', 'Worker: config.split_by.')
flags.DEFINE_integer('data_parallel', 1, 'Worker: config.data_parallel.')
flags.DEFINE_string('timeline_png', '', 'Worker: where to draw the FDG timeline, if anywhere.')
flags.DEFINE_bool('timeline_events', False, 'Worker: return the timeline\'s events (drawn side '
                  'by side by the benchmark).')
flags.DEFINE_string('coordinator_address', None, 'Worker: set by fdg_jax.launch.')
flags.DEFINE_integer('num_processes', None, 'Worker: set by fdg_jax.launch.')
flags.DEFINE_integer('process_id', None, 'Worker: set by fdg_jax.launch.')

REPO = experiments.REPO
CONFIGS = ('bp_1core', 'bp_2core', 'bp_dp', 'fdg', 'fdg_time', 'bp_pair')
MICROBATCHED = ('gpipe', '1f1b', 'fdg')   # configurations METHOD_mM
# What a process reports of its environment: the allocator's settings a variant may change.
ALLOCATOR_ENV = ('LD_PRELOAD', 'GLIBC_TUNABLES')
ALLOCATOR_PREFIXES = ('MALLOC_', 'TCMALLOC_', 'JEMALLOC_')   # glibc's and jemalloc's MALLOC_*


def language_model() -> bool:
  return FLAGS.task == 'language_model'


def model_label() -> str:
  """The model in file names and titles: the zoo's name, or the GPT's sizes."""
  if language_model():
    return f'gpt{FLAGS.n_layer}x{FLAGS.n_embd}_h{FLAGS.n_head}_t{FLAGS.block_size}'
  return FLAGS.model


def make_config(method: str, num_stages: int, microbatches: int = 1):
  if language_model():
    config = common.make_gpt_config(method, num_stages, FLAGS.batch_size, FLAGS.n_layer,
                                    FLAGS.n_embd, FLAGS.n_head, FLAGS.block_size)
  else:
    config = common.make_config(FLAGS.model, method, num_stages, FLAGS.batch_size, 32)
  config.microbatches = microbatches
  return config


def microbatched(name: str) -> Optional[tuple[str, int]]:
  """(method, M) of a configuration METHOD_mM over microbatches, else None (fdg_m1 too: FDG with
  one microbatch is `fdg`)."""
  method, sep, count = name.rpartition('_m')
  if sep and method in MICROBATCHED and count.isdigit() and int(count) >= 1 + (method == 'fdg'):
    return method, int(count)
  return None


def config_names() -> list[str]:
  """The configurations to run: --configs, then for each --microbatches M the three methods."""
  names = list(FLAGS.configs) + [f'{method}_m{count}' for count in FLAGS.microbatches
                                 for method in MICROBATCHED]
  return list(dict.fromkeys(names))   # once each, in order


def worker_microbatches() -> int:
  return int(FLAGS.microbatches[0]) if FLAGS.microbatches else 1


def allocator_env() -> dict:
  return {k: v for k, v in sorted(os.environ.items())
          if k in ALLOCATOR_ENV or k.startswith(ALLOCATOR_PREFIXES)}


def kernel_share(before, after) -> dict:
  """Per timed iteration, every process's CPU time in the kernel and in user space (ms) and its
  minor page faults: fresh buffers are faulted in page by page, which costs kernel time."""
  mine = [1e3 * (after.ru_stime - before.ru_stime) / FLAGS.iters,
          1e3 * (after.ru_utime - before.ru_utime) / FLAGS.iters,
          (after.ru_minflt - before.ru_minflt) / FLAGS.iters]
  every = distributed.all_processes([int(round(v)) for v in mine])
  return {'system_ms': every[:, 0].tolist(), 'user_ms': every[:, 1].tolist(),
          'minor_faults': every[:, 2].tolist()}


def worker() -> None:
  """One process of one configuration: prints {'ms_per_iter': ...} (process 0)."""
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  num_stages = 1 if FLAGS.method == 'bp' else 2
  config = make_config(FLAGS.method, num_stages, worker_microbatches())
  config.split_by = FLAGS.split_by
  config.data_parallel = FLAGS.data_parallel
  run_setup = common.initial_run(config)
  pipe, state = run_setup.pipe, run_setup.state
  rng = np.random.default_rng(0)
  batches = [common.random_host_batch(config, rng) for _ in range(2)]

  def run(count, state, recorder=None):
    for t in range(count):
      state, info = pipe.step(state, *batches[t % 2])
      if recorder:
        recorder.add(info)
    jax.block_until_ready([s for s in state.stages if s is not None])
    return state

  state = run(FLAGS.warmup, state)
  over_microbatches = isinstance(pipe.method, methods.Microbatched)
  probe = (transfers.TransferProbe(pipe) if FLAGS.probe and num_stages == 2
           and not over_microbatches else None)   # the probe knows FDG's transfers only
  distributed.all_processes([0])   # every process starts the clock together
  usage = resource.getrusage(resource.RUSAGE_SELF)
  start = time.perf_counter()
  state = run(FLAGS.iters, state)
  elapsed = time.perf_counter() - start
  slowest = distributed.all_processes([int(elapsed * 1e6)]).max() / 1e6
  result = {'ms_per_iter': 1e3 * slowest / FLAGS.iters,
            'kernel': kernel_share(usage, resource.getrusage(resource.RUSAGE_SELF)),
            'env': allocator_env()}
  if probe:
    ready = sum(distributed.all_processes_json(probe.stop()), [])
    result['in_loop'] = transfers.in_loop_times([tuple(r) for r in ready])
  if over_microbatches:
    result['exchange_ms'] = exchange_ms(pipe, config, FLAGS.batch_size // config.microbatches)
    state = microbatch_timeline(pipe, state, run, result)
  elif num_stages == 2:
    result['exchange_ms'] = exchange_ms(pipe, config, FLAGS.batch_size)
    # Each stage's device time per call in the running pipeline, from a timeline of both
    # processes, against the iteration: the share of the iteration the stage is busy.
    with tempfile.TemporaryDirectory() as trace_dir:
      recorder = timeline.TimelineRecorder(pipe, trace_dir)
      recorder.start(state)
      state = run(FLAGS.timeline_iters, state, recorder)
      events = recorder.stop(state)
    result['stage_compute_ms'] = [
        statistics.median(e.end_ms - e.start_ms for e in events
                          if e.stage == k and e.phase == 'steady') for k in range(num_stages)]
    result['busy_share'] = [ms / result['ms_per_iter'] for ms in result['stage_compute_ms']]
    if FLAGS.timeline_png and jax.process_index() == 0:
      timeline.draw_timeline(events, FLAGS.timeline_png, title=(
          f'{model_label()} FDG K=2, batch {FLAGS.batch_size}, two processes on one core each, '
          f'split by {FLAGS.split_by}'))
    if FLAGS.timeline_events:   # FDG's calls as actions, for the side-by-side drawing
      result['timeline_events'] = [dataclasses.asdict(action_timeline.ActionEvent(
          stage=e.stage, kind={'fill': 'F', 'drain': 'U'}.get(e.phase, 'UF'), index=e.batch,
          batch=e.batch, start_ms=e.start_ms, end_ms=e.end_ms)) for e in events]
  if jax.process_index() == 0:
    print(json.dumps(result), flush=True)


def microbatch_timeline(pipe, state, run, result: dict):
  """A method over microbatches: each stage's device time per batch from a timeline of every
  action of both processes over --timeline_iters batches, its share of the timed batch, and
  the bubble (1 - the share). Returns the state after."""
  with tempfile.TemporaryDirectory() as trace_dir:
    recorder = action_timeline.ActionRecorder(pipe, trace_dir)
    recorder.start(state)
    state = run(FLAGS.timeline_iters, state)
    events = recorder.stop(state)
  result['stage_compute_ms'] = [action_timeline.busy_ms(events, k) / FLAGS.timeline_iters
                                for k in range(pipe.num_stages)]
  result['busy_share'] = [ms / result['ms_per_iter'] for ms in result['stage_compute_ms']]
  result['bubble'] = [1 - share for share in result['busy_share']]
  result['timeline_ms_per_iter'] = action_timeline.span_ms(events) / FLAGS.timeline_iters
  if FLAGS.timeline_events:
    result['timeline_events'] = [dataclasses.asdict(e) for e in events]
  return state


def exchange_ms(pipe, config, batch_size: int) -> float:
  """One iteration's exchange alone: the activation to stage 1 and an array of its shape back
  (the cotangent), as cross-process device_puts, round trip, ms (median of --iters): the
  executor's own transfer, `distributed.move_tree`. `batch_size`: of what one transfer carries
  (a microbatch's, over microbatches)."""
  task = configuration.create_task(config)
  spec = pipe.io_specs(task.input_spec(batch_size))[1]
  first, second = pipe.shardings
  x = (jax.device_put(np.zeros(spec.shape, spec.dtype), first) if pipe.is_local[0] else None)
  samples = []
  for _ in range(FLAGS.iters + 1):   # the first round trip opens the connections
    distributed.all_processes([0])
    start = time.perf_counter()
    y = distributed.move_tree(x, first, second, spec)
    z = distributed.move_tree(y, second, first, spec)
    jax.block_until_ready(z if z is not None else y)
    samples.append(time.perf_counter() - start)
  return 1e3 * statistics.median(samples[1:])


def _result(output: str) -> dict:
  for line in reversed(output.splitlines()):
    line = line.split('] ', 1)[-1] if line.startswith('[') else line
    if line.startswith('{"ms_per_iter"'):
      return json.loads(line)
  raise RuntimeError(f'no timing in the output:\n{output[-3000:]}')


def measure(name: str, cores: list[int], extra_env: dict, timeline_stem: str = '',
            events: bool = False) -> list[dict]:
  """Runs one configuration in fresh processes, with `extra_env` in their environment; its
  results (two for bp_pair). FDG draws its timeline to TIMELINE_STEM_SPLIT_timeline.png if
  `timeline_stem`; FDG and the methods over microbatches return its events if `events`."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
             PYTHONPATH=REPO, **extra_env)
  processes = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
               for c in commands(name, cores, timeline_stem, events)]
  try:
    outputs = [p.communicate(timeout=1800)[0] for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=10)
  for p, output in zip(processes, outputs):
    if p.returncode:
      raise RuntimeError(f'{name} failed:\n{output[-3000:]}')
  return [_result(output) for output in outputs]


def commands(name: str, cores: list[int], timeline_stem: str = '', events: bool = False
             ) -> list[list[str]]:
  """The processes' command lines of one configuration (measure's arguments)."""
  worker_flags = [f'--task={FLAGS.task}', f'--model={FLAGS.model}', f'--n_layer={FLAGS.n_layer}',
                  f'--n_embd={FLAGS.n_embd}', f'--n_head={FLAGS.n_head}',
                  f'--block_size={FLAGS.block_size}', f'--batch_size={FLAGS.batch_size}',
                  f'--warmup={FLAGS.warmup}', f'--iters={FLAGS.iters}', f'--probe={FLAGS.probe}']
  bp = ['experiments.bench.speedup', '--method=bp', *worker_flags]
  two_processes = [sys.executable, '-m', 'fdg_jax.launch', '--num_processes=2', '--module',
                   'experiments.bench.speedup', '--']
  if microbatched(name):   # as fdg: K = 2, two processes pinned to one core each, FLOP split
    method, count = microbatched(name)
    return [two_processes + [f'--method={method}', f'--microbatches={count}', '--split_by=flops',
                             f'--timeline_events={events}',
                             f'--timeline_iters={FLAGS.timeline_iters}', *worker_flags]]
  if name in ('fdg', 'fdg_time'):
    split_by = 'time' if name == 'fdg_time' else 'flops'
    png = f'{timeline_stem}_{split_by}_timeline.png' if timeline_stem else ''
    return [two_processes + ['--method=fdg', f'--split_by={split_by}', f'--timeline_png={png}',
                             f'--timeline_events={events}',
                             f'--timeline_iters={FLAGS.timeline_iters}', *worker_flags]]
  if name == 'bp_dp':
    return [two_processes + ['--data_parallel=2', *bp[1:]]]
  if name == 'bp_2core':
    return [distributed.module_command(bp[0], bp[1:], cores)]
  if name == 'bp_1core':
    return [distributed.module_command(bp[0], bp[1:], cores[:1])]
  # bp_pair
  return [distributed.module_command(bp[0], bp[1:], cores[:1]),
          distributed.module_command(bp[0], bp[1:], cores[1:2])]


def main(argv):
  del argv
  if FLAGS.method:
    worker()
    return
  if any(not m.isdigit() or int(m) < 2 for m in FLAGS.microbatches):
    raise app.UsageError(f'--microbatches={",".join(FLAGS.microbatches)}: give numbers >= 2 '
                         '(one microbatch is the configurations without).')
  names = config_names()
  unknown = [name for name in names if name not in CONFIGS and not microbatched(name)]
  if unknown:
    raise app.UsageError(f'--configs: unknown {unknown}; choose from {CONFIGS}, or METHOD_mM '
                         f'with METHOD one of {MICROBATCHED} and M >= 1 microbatches (fdg: '
                         'M >= 2; with one, it is fdg).')
  uneven = [name for name in names if microbatched(name)
            and FLAGS.batch_size % microbatched(name)[1]]
  if uneven:
    raise app.UsageError(f'{uneven}: --batch_size={FLAGS.batch_size} does not split into that '
                         'many microbatches.')
  if language_model() and FLAGS['model'].present:
    raise app.UsageError('--model is for image_classification; size the GPT with --n_layer, '
                         '--n_embd, --n_head and --block_size.')
  if language_model() and FLAGS.n_embd % FLAGS.n_head:
    raise app.UsageError(f'--n_embd={FLAGS.n_embd} is not a multiple of --n_head={FLAGS.n_head}.')
  variants = [('', {})]
  if FLAGS.variant_env:
    pairs = [item.partition('=') for item in FLAGS.variant_env]
    if any(not name or not sep for name, sep, _ in pairs):
      raise app.UsageError(f'--variant_env={",".join(FLAGS.variant_env)}: give NAME=VALUE pairs.')
    variant = {name: value for name, _, value in pairs}
    # The loader only warns of a library it cannot preload, and the variant would time the default.
    missing = [p for p in variant.get('LD_PRELOAD', '').replace(':', ' ').split()
               if not os.path.exists(p)]
    if missing:
      raise app.UsageError(f'--variant_env: LD_PRELOAD {", ".join(missing)} does not exist; '
                           'install the library or give its path.')
    variants.append(('+env', variant))
  cores = sorted(os.sched_getaffinity(0))
  if len(cores) < 2:
    raise app.UsageError('The benchmark needs two cores.')
  path = FLAGS.output or os.path.join(
      experiments.RESULTS_DIR, f'bench_speedup_{model_label()}_b{FLAGS.batch_size}.json')
  timeline_stem = os.path.splitext(path)[0]   # the timelines lie beside the result
  runs = [(name, suffix, env) for name in names for suffix, env in variants]
  times = {name + suffix: [] for name, suffix, _ in runs}
  details = {name + suffix: [] for name, suffix, _ in runs
             if name in ('fdg', 'fdg_time') or microbatched(name)}
  side_by_side = any(microbatched(name) for name in names)
  drawn = {}   # configuration -> its timeline's events, from the first repeat
  kernel = {name: [] for name in times}   # per repeat, each process's
  env_seen = {}
  for repeat in range(FLAGS.repeats):
    for config, suffix, extra_env in runs:
      name = config + suffix
      draw = repeat == 0 and not FLAGS.probe and not suffix
      events = draw and side_by_side and (config == 'fdg' or bool(microbatched(config)))
      results = measure(config, cores, extra_env, timeline_stem if draw else '', events)
      if events:
        drawn[config] = [action_timeline.ActionEvent(**e)
                         for e in results[0].pop('timeline_events')]
      ms = [r['ms_per_iter'] for r in results]
      times[name].append(statistics.mean(ms))
      kernel[name].append([r['kernel'] for r in results])
      env_seen[name] = results[0]['env']
      if name in details:
        details[name].append(results[0])
      extra = ''.join(f'  {k} {v}' for k, v in results[0].items()
                      if k not in ('ms_per_iter', 'in_loop', 'env', 'timeline_events'))
      if 'in_loop' in results[0]:
        in_loop = results[0]['in_loop']
        extra += '  in loop: ' + ', '.join(
            f'{k} {json.dumps(in_loop[k])}' for k in ('period_ms', 'busy_ms', 'idle_ms',
                                                      'latency_ms'))
      print(f'repeat {repeat}  {name:13s} {" ".join(f"{m:.0f}" for m in ms)} ms/iter{extra}',
            flush=True)
    if repeat == 0 and drawn:
      draw_side_by_side(drawn, timeline_stem)
  median = {name: statistics.median(values) for name, values in times.items()}
  result = {
      'task': FLAGS.task, 'model': model_label(), 'batch_size': FLAGS.batch_size,
      'iters': FLAGS.iters,
      'repeats': FLAGS.repeats, 'cores': len(cores), 'ms_per_iter': median, 'runs': times,
      'exchange_ms': {name: statistics.median(r['exchange_ms'] for r in runs)
                      for name, runs in details.items()},
      'stage_compute_ms': {name: runs[0]['stage_compute_ms'] for name, runs in details.items()},
      'busy_share': {name: [statistics.median(r['busy_share'][k] for r in runs)
                            for k in range(2)] for name, runs in details.items()},
      'kernel': kernel,
      'machine': common.machine(),
      'variant_env': FLAGS.variant_env,
      'env': env_seen,   # the allocator variables each configuration's processes saw
  }
  if language_model():
    result['gpt'] = {'n_layer': FLAGS.n_layer, 'n_embd': FLAGS.n_embd, 'n_head': FLAGS.n_head,
                     'block_size': FLAGS.block_size, 'vocab_size': common.VOCAB_SIZE}
  if FLAGS.probe:
    result['in_loop'] = {name: [r['in_loop'] for r in runs] for name, runs in details.items()
                         if 'in_loop' in runs[0]}
  capacity = (2 * median['bp_1core'] / median['bp_pair']
              if {'bp_1core', 'bp_pair'} <= set(median) else None)
  if capacity is not None:
    result['capacity'] = capacity
  if side_by_side:
    result.update(microbatched_summary(median, details, capacity))
  if set(CONFIGS) <= set(names):
    best = min(('fdg', 'fdg_time'), key=median.get)   # the goals are for the better split
    result.update({
        'capacity': capacity,
        'best_split': best,
        'fdg_over_bp_1core': median['bp_1core'] / median[best],
        'fdg_over_bp_2core': median['bp_2core'] / median[best],
        'fdg_over_dp': median['bp_dp'] / median[best],
        'fdg_over_capacity': median['bp_1core'] / median[best] / capacity,
    })
  with open(path, 'w') as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, sort_keys=True), flush=True)


def microbatched_summary(median: dict, details: dict, capacity: Optional[float]) -> dict:
  """The configurations over microbatches (medians over the repeats): time per batch, over BP
  on one core and over C, each stage's device time per batch, busy share and bubble beside
  (K-1)/(M+K-1) (GPipe, 1F1B); and 1F1B's time per batch over FDG's at each M (with
  microbatches, and plain FDG)."""
  num_stages, summary = 2, {}
  for name, runs in details.items():
    config, _, variant = name.partition('+')
    if not microbatched(config):
      continue
    method, count = microbatched(config)
    per_stage = lambda key: [statistics.median(r[key][k] for r in runs)
                             for k in range(num_stages)]
    entry = {'method': method, 'microbatches': count, 'ms_per_iter': median[name],
             'stage_compute_ms': per_stage('stage_compute_ms'),
             'busy_share': per_stage('busy_share'), 'bubble': per_stage('bubble'),
             'timeline_ms_per_iter': statistics.median(r['timeline_ms_per_iter'] for r in runs),
             'exchange_ms': statistics.median(r['exchange_ms'] for r in runs)}
    if method != 'fdg':   # a flush per batch: the bubble with equal stages and no latency
      entry['bubble_theory'] = (num_stages - 1) / (count + num_stages - 1)
    if 'bp_1core' in median:
      entry['over_bp_1core'] = median['bp_1core'] / median[name]
      if capacity:
        entry['over_capacity'] = entry['over_bp_1core'] / capacity
    summary[name] = entry
  fdg_over_1f1b, plain_fdg_over_1f1b = {}, {}
  for name in summary:
    config, _, variant = name.partition('+')
    method, count = microbatched(config)
    one_f_one_b = f'1f1b_m{count}' + ('+' + variant if variant else '')
    if method != 'fdg' or one_f_one_b not in median:
      continue
    fdg_over_1f1b[str(count)] = median[one_f_one_b] / median[name]
    plain = 'fdg' + ('+' + variant if variant else '')
    if plain in median:
      plain_fdg_over_1f1b[str(count)] = median[one_f_one_b] / median[plain]
  return {'microbatched': summary, 'fdg_over_1f1b': fdg_over_1f1b,
          'plain_fdg_over_1f1b': plain_fdg_over_1f1b}


def draw_side_by_side(drawn: dict, timeline_stem: str) -> None:
  """For each M, the first repeat's timelines of plain FDG and of the methods at that M, one
  above the other: TIMELINE_STEM_mM_timelines.png."""
  counts = sorted({microbatched(name)[1] for name in drawn if microbatched(name)})
  for count in counts:
    panels = [(name, drawn[name]) for name in ['fdg', *(f'{m}_m{count}' for m in MICROBATCHED)]
              if name in drawn]
    action_timeline.draw_side_by_side(panels, f'{timeline_stem}_m{count}_timelines.png', title=(
        f'{model_label()}, batch {FLAGS.batch_size}, K = 2 in two processes on one core each, '
        f'{FLAGS.timeline_iters} batches; M = {count} microbatches (fdg: plain, one call a '
        'batch)\nColour: batch; hatched: backward; black: update; FB: the last stage\'s '
        'forward, loss and backward; UF: plain FDG\'s update then forward'))


if __name__ == '__main__':
  app.run(main)
