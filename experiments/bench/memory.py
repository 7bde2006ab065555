r"""Memory FDG holds for the delayed backward: bytes saved per stage, per stash mode and K.

Stage k keeps d_k = 2(K-1-k) saved forwards (DESIGN.md section 2). One entry is, with
stash='vjp', the residuals of `jax.vjp` (the activations the backward needs and the weights
they were computed with), with stash='vjp+POLICY' only what that `jax.checkpoint` policy of
`pipeline.RESIDUAL_POLICIES` keeps (`--config.residual_policy`), and with stash='recompute', the
stage input and a dropout key. This
script runs the real engine (every stage on device 0) for 2(K-1)+1 iterations, which reaches the
steady state, and sums the `nbytes` of the leaves of every `Saved.arrays` in `state.saved[k]`;
it checks that stage k holds d_k entries, i.e. saved bytes = d_k x one entry. It also reports
what the entries keep for compact checkpoints (`Saved.inputs`), on top of those bytes.

Each (stash, K) runs in its own process (`--isolate`, the default) so that the peak RSS reported
(`resource.getrusage`, includes compilation) belongs to that configuration alone.

    python -m experiments.bench.memory   # ResNet-56, batch 128, K = 2, 3, 4
    python -m experiments.bench.memory --num_stages=2 \
        --stash=vjp,vjp+dots_saveable,vjp+nothing_saveable --output=bench_memory_policies.json

Prints a markdown table; the last stdout line is one JSON object, also written to
experiments/results/bench_memory_<model>.json.

`--schedules=gpipe,1f1b --microbatches=M` measures the synchronous schedules instead (issue 36):
their residuals live only within a step, so one step's every action is watched and each stage's
peak of saved microbatch forwards (entries and bytes) recorded: 1F1B holds at most min(K-k, M)
entries at stage k, GPipe M, each one microbatch's residuals.

    python -m experiments.bench.memory --schedules=gpipe,1f1b --microbatches=8 \
        --num_stages=2,4 --output=bench_memory_schedules_resnet56_b128_m8.json
"""

import json
import os
import resource
import subprocess
import sys

from absl import app
from absl import flags
import jax

import experiments
from experiments.bench import common
from fdg_jax.engine import pipeline

flags.DEFINE_string('model', 'resnet56', 'Model of the zoo (fdg_jax.models.MODEL_NAMES).')
flags.DEFINE_integer('batch_size', 128, 'Images per batch.')
flags.DEFINE_string('num_stages', '2,3,4', 'Comma-separated K values.')
flags.DEFINE_string('stash', 'vjp,recompute', "Comma-separated stash modes: 'vjp', "
                    "'recompute' or 'vjp+POLICY' (POLICY in pipeline.RESIDUAL_POLICIES).")
flags.DEFINE_string('output', '', "File name under experiments/results/ (or an absolute path); "
                    "'' = bench_memory_<model>_b<batch>_<size>px.json.")
flags.DEFINE_integer('image_size', 32, 'Side of the square input images.')
flags.DEFINE_bool('isolate', True, 'Run each configuration in its own process (own peak RSS).')
flags.DEFINE_string('schedules', '', "Comma-separated synchronous schedules ('gpipe', '1f1b') "
                    'to measure over --microbatches instead of the stash modes.')
flags.DEFINE_integer('microbatches', 4, 'Microbatches per batch for --schedules.')
flags.DEFINE_string('only', '', 'Internal: run one "stash:K" (or "schedule:K") here and print '
                    'its JSON line.')
FLAGS = flags.FLAGS

MODULE = 'experiments.bench.memory'   # --isolate runs each configuration as this module
MIB = 2 ** 20


def tree_bytes(tree) -> int:
  return int(sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(tree)))


def measure(mode: str, num_stages: int) -> dict:
  """Runs one configuration into its steady state and sizes what each stage has saved."""
  config = common.make_config(FLAGS.model, 'fdg', num_stages, FLAGS.batch_size,
                              FLAGS.image_size, mode, stage_devices=(0,) * num_stages)
  pipe, state = common.build_pipeline(config)
  batches = common.random_batches(pipe, FLAGS.batch_size, FLAGS.image_size, 2)
  # Stage k first updates at iteration 2(K-1)-k; one more iteration puts every stage past it.
  for t in range(2 * (num_stages - 1) + 1):
    state, _ = pipe.step(state, *batches[t % 2])
    jax.block_until_ready(state)
  stages = []
  for k in range(num_stages):
    entries = state.saved[k]
    saved_bytes = sum(tree_bytes(entry.arrays) for entry in entries)
    entry_bytes = tree_bytes(entries[-1].arrays) if entries else 0
    stage_input = batches[0][0] if k == 0 else state.activations[k].value
    stages.append({
        'stage': k, 'delay': pipeline.delay(k, num_stages), 'entries': len(entries),
        'saved_bytes': saved_bytes, 'entry_bytes': entry_bytes,
        'delay_times_entry_bytes': pipeline.delay(k, num_stages) * entry_bytes,
        # What each entry keeps for compact checkpoints (Saved.inputs: the forward's input,
        # parameters, statistics and key), beside its residuals.
        'kept_inputs_bytes': sum(tree_bytes(entry.inputs) for entry in entries
                                 if entry.inputs is not None),
        'input_bytes': tree_bytes(stage_input),
        'params_bytes': tree_bytes(state.stages[k].params),
    })
  live = sum(a.nbytes for a in jax.live_arrays())
  return {
      'stash': mode, 'num_stages': num_stages, 'stages': stages,
      'saved_bytes': sum(s['saved_bytes'] for s in stages),
      'entries_equal_delay': all(s['entries'] == s['delay'] for s in stages),
      'live_array_bytes': int(live),
      # Linux reports ru_maxrss in KiB.
      'peak_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
  }


def measure_schedule(name: str, num_stages: int) -> dict:
  """One step of a synchronous schedule watched action by action: each stage's peak of saved
  microbatch forwards (a step's residuals are gone when it ends)."""
  microbatches = FLAGS.microbatches
  config = common.make_config(FLAGS.model, name, num_stages, FLAGS.batch_size,
                              FLAGS.image_size, stage_devices=(0,) * num_stages)
  config.microbatches = microbatches
  pipe, state = common.build_pipeline(config)
  batches = common.random_batches(pipe, FLAGS.batch_size, FLAGS.image_size, 2)
  for inputs, targets in batches:   # compiles every action
    state, _ = pipe.step(state, inputs, targets)
  jax.block_until_ready(state)
  peaks = [{'entries': 0, 'bytes': 0, 'entry_bytes': 0} for _ in range(num_stages)]
  act = pipe._act   # pylint: disable=protected-access

  def watched(flight, k, action, *rest):
    act(flight, k, action, *rest)
    for j, entries in enumerate(flight.saved):
      held = sum(tree_bytes(entry.arrays) for entry in entries.values())
      if held > peaks[j]['bytes']:
        peaks[j].update(entries=len(entries), bytes=held,
                        entry_bytes=max(tree_bytes(e.arrays) for e in entries.values()))

  pipe._act = watched   # pylint: disable=protected-access
  state, _ = pipe.step(state, *batches[0])
  jax.block_until_ready(state)
  del pipe._act   # pylint: disable=protected-access
  bound = (lambda k: min(num_stages - k, microbatches)) if name == '1f1b' else (
      lambda k: microbatches)
  stages = [{'stage': k, 'peak_entries': p['entries'], 'bound': bound(k) if k < num_stages - 1
             else 0, 'peak_saved_bytes': p['bytes'], 'entry_bytes': p['entry_bytes']}
            for k, p in enumerate(peaks)]
  return {
      'schedule': name, 'num_stages': num_stages, 'microbatches': microbatches,
      'stages': stages, 'saved_bytes': sum(s['peak_saved_bytes'] for s in stages),
      'peaks_equal_bounds': all(s['peak_entries'] == s['bound'] for s in stages),
      'peak_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
  }


def schedules_main() -> None:
  """--schedules: GPipe's and 1F1B's peaks, a table and the JSON result."""
  rows = []
  for name in FLAGS.schedules.split(','):
    for k in (int(k) for k in FLAGS.num_stages.split(',')):
      print(f'{name} K={k} M={FLAGS.microbatches} ...', flush=True)
      rows.append(run_isolated(name, k) if FLAGS.isolate else measure_schedule(name, k))
  print(f'\n{FLAGS.model}, batch {FLAGS.batch_size}, {FLAGS.microbatches} microbatches, every '
        'stage on one device (MiB = 2^20 bytes; the last stage keeps no residuals: its forward '
        'and backward are one call)\n')
  print('| schedule | K | stage | peak entries | bound | one entry MiB | peak saved MiB |')
  print('|---|---|---|---|---|---|---|')
  for row in rows:
    for s in row['stages']:
      print(f'| {row["schedule"]} | {row["num_stages"]} | {s["stage"]} | {s["peak_entries"]} | '
            f'{s["bound"]} | {s["entry_bytes"] / MIB:.2f} | {s["peak_saved_bytes"] / MIB:.2f} |')
  print('\n| schedule | K | peak saved MiB (all stages) | peak RSS MiB |')
  print('|---|---|---|---|')
  for row in rows:
    print(f'| {row["schedule"]} | {row["num_stages"]} | {row["saved_bytes"] / MIB:.1f} | '
          f'{row["peak_rss_bytes"] / MIB:.0f} |')
  result = {
      'benchmark': 'memory_schedules', 'model': FLAGS.model, 'batch_size': FLAGS.batch_size,
      'image_size': FLAGS.image_size, 'microbatches': FLAGS.microbatches,
      'isolated_processes': FLAGS.isolate,
      'peaks_equal_bounds': all(r['peaks_equal_bounds'] for r in rows), 'configs': rows,
      'device': str(jax.devices()[0]), 'machine': common.machine(),
      'command': experiments.command_line(),
  }
  name = (FLAGS.output or f'bench_memory_schedules_{FLAGS.model}_b{FLAGS.batch_size}_'
          f'm{FLAGS.microbatches}.json')
  common.print_json(result, os.path.join(common.RESULTS_DIR, name))


def run_isolated(stash: str, num_stages: int) -> dict:
  argv = [sys.executable, '-m', MODULE, f'--model={FLAGS.model}',
          f'--batch_size={FLAGS.batch_size}', f'--image_size={FLAGS.image_size}',
          f'--microbatches={FLAGS.microbatches}', f'--only={stash}:{num_stages}']
  done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        cwd=experiments.REPO, check=False)
  if done.returncode:
    raise RuntimeError(f'{" ".join(argv)} failed:\n{done.stderr[-3000:]}')
  return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if FLAGS.only:
    mode, num_stages = FLAGS.only.split(':')
    measured = (measure_schedule(mode, int(num_stages)) if mode in ('gpipe', '1f1b') else
                measure(mode, int(num_stages)))
    print(json.dumps(measured), flush=True)
    return
  if FLAGS.schedules:
    schedules_main()
    return
  ks = [int(k) for k in FLAGS.num_stages.split(',')]
  modes = FLAGS.stash.split(',')
  rows = []
  for stash in modes:
    for k in ks:
      print(f'stash={stash} K={k} ...', flush=True)
      rows.append(run_isolated(stash, k) if FLAGS.isolate else measure(stash, k))

  print(f'\n{FLAGS.model}, batch {FLAGS.batch_size}, {FLAGS.image_size}x{FLAGS.image_size}, '
        'every stage on one device (MiB = 2^20 bytes)\n')
  print('| stash | K | stage | d_k | entries | one entry MiB | saved MiB | d_k x entry MiB '
        '| stage input MiB | stage params MiB |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for row in rows:
    for s in row['stages']:
      print(f'| {row["stash"]} | {row["num_stages"]} | {s["stage"]} | {s["delay"]} | '
            f'{s["entries"]} | {s["entry_bytes"] / MIB:.2f} | {s["saved_bytes"] / MIB:.2f} | '
            f'{s["delay_times_entry_bytes"] / MIB:.2f} | {s["input_bytes"] / MIB:.2f} | '
            f'{s["params_bytes"] / MIB:.3f} |')
  print('\n| stash | K | saved MiB (all stages) | kept inputs MiB | live arrays MiB | '
        'peak RSS MiB |')
  print('|---|---|---|---|---|---|')
  for row in rows:
    kept = sum(s['kept_inputs_bytes'] for s in row['stages'])
    print(f'| {row["stash"]} | {row["num_stages"]} | {row["saved_bytes"] / MIB:.1f} | '
          f'{kept / MIB:.1f} | {row["live_array_bytes"] / MIB:.1f} | '
          f'{row["peak_rss_bytes"] / MIB:.0f} |')

  result = {
      'benchmark': 'memory', 'model': FLAGS.model, 'batch_size': FLAGS.batch_size,
      'image_size': FLAGS.image_size, 'isolated_processes': FLAGS.isolate,
      'entries_equal_delay': all(r['entries_equal_delay'] for r in rows),
      'saved_bytes': {f'{r["stash"]}_k{r["num_stages"]}': r['saved_bytes'] for r in rows},
      'peak_rss_bytes': {f'{r["stash"]}_k{r["num_stages"]}': r['peak_rss_bytes'] for r in rows},
      'configs': rows,
      'device': str(jax.devices()[0]),
      'machine': common.machine(),
      'command': experiments.command_line(),
  }
  name = (FLAGS.output or
          f'bench_memory_{FLAGS.model}_b{FLAGS.batch_size}_{FLAGS.image_size}px.json')
  common.print_json(result, os.path.join(common.RESULTS_DIR, name))


if __name__ == '__main__':
  app.run(main)
