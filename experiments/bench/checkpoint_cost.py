r"""Checkpoint size and save / restore time: every residual (before) against the compact form.

FDG's checkpoint holds the pipeline in flight. Before issue 16 each saved forward went to disk as
all its `jax.vjp` residuals ('full'); now a checkpoint stores what determines them (the stage
input, the parameters and BatchNorm statistics of that forward, its dropout key) and rebuilds the
residuals on restore ('compact', `checkpoint.rebuild_forward`), taking stage inputs and
activations in flight from the previous stage's rebuilt forward and stage 0's inputs from the
data stream (here: the random batches, as the trainer passes its stream). For each K this
script runs the real engine (all stages on device 0, stash 'vjp', random data) into its steady
state, 2(K-1)+1 iterations, then for each form saves a checkpoint synchronously with orbax,
restores it into a new pipeline, and checks that the restored saved forwards are bit-equal to
the ones in flight.
'full' is the state of a pipeline that keeps no inputs (`keeps_inputs = False`), which is
exactly what checkpoints held before. With `--microbatches=M` (> 1) it is FDG with microbatches,
whose saved forwards are microbatches in flight ('full': as checkpoints held them before issue
36 item 4, without the parameters kept per batch).

    python -m experiments.bench.checkpoint_cost   # ResNet-56, batch 128, K = 2, 4
    python -m experiments.bench.checkpoint_cost --model=resnet20 --microbatches=4

Prints a markdown table; the last stdout line is one JSON object, also written to
experiments/results/bench_checkpoint_<model>_b<batch>[_m<M>].json. Restore time includes
compiling the rebuild (a new process restores the same way); save time includes checking that
the rebuild is exact.
"""

import os
import shutil
import tempfile
import time

from absl import app
from absl import flags
import jax
import numpy as np

from experiments.bench import common
from fdg_jax.engine import checkpoint

flags.DEFINE_string('model', 'resnet56', 'Model of the zoo (fdg_jax.models.MODEL_NAMES).')
flags.DEFINE_integer('batch_size', 128, 'Images per batch.')
flags.DEFINE_list('num_stages', ['2', '4'], 'K values.')
flags.DEFINE_string('stash', 'vjp', "'vjp' or 'vjp+POLICY' (a residual policy).")
flags.DEFINE_integer('microbatches', 1, 'M: FDG with M microbatches per batch (1: plain FDG).')
flags.DEFINE_string('output', '', "File name under experiments/results/ (or an absolute path); "
                    "'' = bench_checkpoint_<model>_b<batch>[_m<M>].json.")
FLAGS = flags.FLAGS

MIB = 2 ** 20
IMAGE_SIZE = 32


def build(num_stages: int, keeps_inputs: bool):
  config = common.make_config(FLAGS.model, 'fdg', num_stages, FLAGS.batch_size, IMAGE_SIZE,
                              FLAGS.stash, stage_devices=(0,) * num_stages)
  config.microbatches = FLAGS.microbatches
  pipe, state = common.build_pipeline(config)
  pipe.keeps_inputs = pipe.keeps_inputs and keeps_inputs
  return pipe, state


def saved_entries(state) -> list:
  """(batch or microbatch, Saved) of every saved forward: FDG's queues, or its microbatches."""
  if state.microbatches is None:
    return [(entry.batch, entry) for queue in state.saved for entry in queue]
  return [(i, entry) for entries in state.microbatches.saved for i, entry in
          sorted(entries.items())]


def held_bytes(state) -> dict:
  """What the saved forwards hold in memory: their residuals, and what they keep beside them
  for compact checkpoints (`Saved.inputs`; with microbatches, the parameters once per batch),
  each buffer counted once (a stage input may be a residual too; a batch's microbatches share
  its parameters)."""
  seen = set()

  def new_bytes(tree) -> int:
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
      if leaf.unsafe_buffer_pointer() not in seen:
        seen.add(leaf.unsafe_buffer_pointer())
        total += leaf.nbytes
    return total
  entries = [entry for _, entry in saved_entries(state)]
  residuals = sum(new_bytes(entry.arrays) for entry in entries)
  return {'residual_bytes': residuals,
          'kept_inputs_bytes': sum(new_bytes(entry.inputs) for entry in entries)}


def without_inputs(state):
  """The state as a pipeline that keeps no inputs holds it (with microbatches: no parameters
  per batch either)."""
  if state.microbatches is None:
    return state.replace(saved=tuple(tuple(entry.replace(inputs=None) for entry in queue)
                                     for queue in state.saved))
  kept = state.microbatches
  return state.replace(microbatches=kept.replace(
      saved=tuple({i: entry.replace(inputs=None) for i, entry in entries.items()}
                  for entries in kept.saved),
      forward_params=tuple({} for _ in kept.forward_params)))


def measure(num_stages: int, form: str, directory: str) -> dict:
  pipe, state = build(num_stages, keeps_inputs=form == 'compact')
  batches = common.random_batches(pipe, FLAGS.batch_size, IMAGE_SIZE, 2 * (num_stages - 1) + 1)
  for images, labels in batches:
    state, _ = pipe.step(state, images, labels)
  if form == 'full':   # the stage functions keep inputs by their StageSpec: drop them here
    state = without_inputs(state)
  jax.block_until_ready(state)
  held = held_bytes(state)
  # The trainer gives the checkpoint its data stream, so stage 0's inputs are not stored.
  stream = [np.asarray(images) for images, _ in batches]
  batch_inputs = stream.__getitem__ if form == 'compact' else None
  saver = checkpoint.Checkpointer(directory)
  start = time.perf_counter()
  logical = saver.save(1, pipe, state, batch_inputs=batch_inputs)
  save_s = time.perf_counter() - start
  on_disk = saver.size_on_disk(1)
  other, fresh = build(num_stages, keeps_inputs=form == 'compact')
  start = time.perf_counter()
  restored, _ = saver.restore(other, fresh, batch_inputs=batch_inputs)
  jax.block_until_ready(restored)
  restore_s = time.perf_counter() - start
  exact = all(
      a_key == b_key and checkpoint.bits_equal(a.arrays, b.arrays)
      for (a_key, a), (b_key, b) in zip(saved_entries(state), saved_entries(restored),
                                        strict=True))
  metadata = checkpoint.to_tree(pipe, state)[1]
  records = [record for records in metadata['saved'].values() for record in records] + [
      record for records in metadata.get('microbatches', {}).get('saved', {}).values()
      for record in records.values()]
  forms = sorted({record['form'] for record in records})
  return {'num_stages': num_stages, 'microbatches': FLAGS.microbatches, 'form': form,
          'stored_forms': forms, 'saved_entries': len(saved_entries(state)),
          'bytes_on_disk': on_disk, **held,
          'array_bytes': logical, 'save_s': round(save_s, 3), 'restore_s': round(restore_s, 3),
          'restored_bit_exact': exact}


def main(argv):
  del argv
  rows = []
  for k in (int(k) for k in FLAGS.num_stages):
    for form in ('full', 'compact'):
      directory = tempfile.mkdtemp(prefix='bench_checkpoint_')
      try:
        rows.append(measure(k, form, directory))
      finally:
        shutil.rmtree(directory, ignore_errors=True)
      print(rows[-1], flush=True)
  print(f'\n{FLAGS.model}, batch {FLAGS.batch_size}, M = {FLAGS.microbatches}, stash '
        f'{FLAGS.stash}, steady state:\n')
  print('| K | form | saved forwards | on disk (MiB) | save (s) | restore (s) | bit-exact |')
  print('| --- | --- | --- | --- | --- | --- | --- |')
  ratios = {}
  for row in rows:
    print(f"| {row['num_stages']} | {row['form']} ({'/'.join(row['stored_forms'])}) | "
          f"{row['saved_entries']} | {row['bytes_on_disk'] / MIB:.1f} | {row['save_s']:.2f} | "
          f"{row['restore_s']:.2f} | {row['restored_bit_exact']} |")
  print('\nIn memory (MiB): the saved forwards\' residuals, and what they keep beside them '
        'for compact checkpoints:\n')
  print('| K | residuals | kept inputs |')
  print('| --- | --- | --- |')
  for row in rows:
    if row['form'] == 'compact':
      print(f"| {row['num_stages']} | {row['residual_bytes'] / MIB:.2f} | "
            f"{row['kept_inputs_bytes'] / MIB:.2f} |")
  for k in {row['num_stages'] for row in rows}:
    full, compact = (next(r for r in rows if r['num_stages'] == k and r['form'] == f)
                     for f in ('full', 'compact'))
    ratios[str(k)] = round(full['bytes_on_disk'] / compact['bytes_on_disk'], 1)
  print(f'\nfull / compact bytes on disk, per K: {ratios}\n')
  output = FLAGS.output or 'bench_checkpoint_{}_b{}{}.json'.format(
      FLAGS.model, FLAGS.batch_size, f'_m{FLAGS.microbatches}' if FLAGS.microbatches > 1 else '')
  common.print_json({'model': FLAGS.model, 'batch_size': FLAGS.batch_size,
                     'microbatches': FLAGS.microbatches,
                     'stash': FLAGS.stash, 'rows': rows, 'full_over_compact': ratios,
                     'machine': common.machine()},
                    output if os.path.isabs(output) else os.path.join(common.RESULTS_DIR, output))


if __name__ == '__main__':
  app.run(main)
