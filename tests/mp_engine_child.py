"""One process of a multi-process engine run (tests/test_multiprocess.py starts them through
fdg_jax.launch): the tiny pipeline of tests/tiny.py (or, for a method 'fdg+dict' or 'fdg+mask',
the stages of tests/test_pytree_stages.py that pass pytrees; for 'fdg@NAME', a compensation;
for 'gpipe.m2', '1f1b.m4.clip' or 'fdg.m4', that method over microbatches) with stage k on
process k, fed the same batches as the single-process reference, drained;
process 0 writes every stage's variables."""

import argparse
import os

import jax
import numpy as np

from fdg_jax.engine import baselines
from fdg_jax.engine import checkpoint
from fdg_jax.engine import compensation as compensation_lib
from fdg_jax.engine import distributed
from fdg_jax.engine import methods
from fdg_jax.engine import pipeline
from fdg_jax.engine import schedule
from fdg_jax.models import aux_heads
from test_pytree_stages import pytree_batches, pytree_pipeline
from tiny import NUM_CLASSES, RECIPE, initial_variables, make_optimizer, tiny_batches

NUM_BATCHES = 12
BETA = 0.7
# The whole model's clipping of a synchronous schedule ('.clip'): small enough that every batch
# of tiny's run is clipped, so each stage's update depends on every stage's squared norm.
GRAD_CLIP = 0.05


def parse(name):
  """'METHOD[+KIND][@COMPENSATION]' -> (method, pytree kind or '', compensation or '')."""
  name, _, compensation = name.partition('@')
  method, _, kind = name.partition('+')
  return method, kind, compensation


def microbatched(method):
  """'NAME.mM[.clip]' (NAME gpipe, 1f1b or fdg) -> its `methods.Microbatched`; None otherwise."""
  name, *options = method.split('.')
  if not options:
    return None
  microbatches = int(options[0].removeprefix('m'))
  return methods.Microbatched(name, microbatches,
                              grad_clip=GRAD_CLIP if 'clip' in options[1:] else 0.0)


def make_pipeline(method, num_stages, stash, placements):
  method, kind, compensation = parse(method)
  micro = microbatched(method)
  if compensation:
    name, microbatches = (micro.name, micro.microbatches) if micro else (method, 1)
    compensation = compensation_lib.Compensation(
        compensation, optimizer=RECIPE,
        max_delay=schedule.delay(0, num_stages, name, microbatches))
  if micro:   # tiny's stages, a method over microbatches
    modules, variables = initial_variables(num_stages)
    return pipeline.Pipeline(modules, make_optimizer(), beta=BETA, stash=stash,
                             placements=placements, method=micro,
                             compensation=compensation or 'none'), variables
  if kind:   # stages that pass a pytree of kind 'dict' or 'mask'
    return pytree_pipeline(kind, num_stages, method, stash, placements, beta=BETA)
  modules, variables = initial_variables(num_stages)
  if method == 'dgl':
    pipe = baselines.DGLPipeline(modules, make_optimizer(), num_classes=NUM_CLASSES,
                                 aux_head=aux_heads.get('conv'), placements=placements)
  else:
    engine = baselines.DDGPipeline if method == 'ddg' else pipeline.Pipeline
    pipe = engine(modules, make_optimizer(), beta=BETA, stash=stash, placements=placements,
                  compensation=compensation or 'none')
  return pipe, variables


def run(method, num_stages, stash, placements, checkpoint_dir=None):
  """Every stage's final variables (numpy, on process 0; None on the others). With
  `checkpoint_dir`, the pipeline is checkpointed half-way, rebuilt and restored, and goes on."""
  pipe, variables = make_pipeline(method, num_stages, stash, placements)
  kind = parse(method)[1]
  batches = pytree_batches(kind, NUM_BATCHES) if kind else tiny_batches(NUM_BATCHES)
  state = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
  for t, (inputs, labels) in enumerate(batches):
    if checkpoint_dir and t == NUM_BATCHES // 2:
      checkpoint.Checkpointer(checkpoint_dir).save(t, pipe, state)
      del state
      pipe, variables = make_pipeline(method, num_stages, stash, placements)
      fresh = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
      state, _ = checkpoint.Checkpointer(checkpoint_dir).restore(pipe, fresh)
    state, _ = pipe.step(state, inputs, labels)
  state, _ = pipe.drain(state)
  logits = pipe.predict(state, batches[0][0])
  gathered = pipe.gathered_variables(state)
  return gathered, logits


def placements_of(layout, num_stages):
  if layout == 'process0':
    return [jax.devices()[0]] * num_stages
  if layout.startswith('on'):
    return [[jax.devices()[int(i)] for i in group] for group in layout[2:].split('-')]
  return jax.devices()[:num_stages]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--coordinator_address')
  parser.add_argument('--num_processes', type=int)
  parser.add_argument('--process_id', type=int)
  parser.add_argument('--num_stages', type=int)
  parser.add_argument('--out_dir')
  # METHOD:STASH[:LAYOUT] runs, one after the other in the same processes. Without a layout,
  # stage k is on process k; 'process0' puts every stage on process 0's device; 'onA-B-..'
  # puts stage k on the devices whose indices are the digits of its group, e.g. 'on01-2':
  # stage 0 split over devices 0 and 1 (processes 0 and 1), stage 1 on device 2. A fourth
  # part, 'resume', checkpoints the run half-way and restores it into a new pipeline. METHOD
  # 'fdg+dict' or 'fdg+mask' (any method, '+' a kind): stages that pass that pytree. METHOD
  # 'fdg@nesterov' (FDG or DDG, '@' a compensation): tiny's optimizer, with that compensation.
  # METHOD '1f1b.m4.clip' ('gpipe', '1f1b' or 'fdg', '.mM' microbatches, '.clip' the whole
  # model's clipping of a synchronous schedule): that method over M microbatches.
  parser.add_argument('--runs')
  args = parser.parse_args()
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  for name in args.runs.split(','):
    method, stash, *placement = name.split(':')
    placements = placements_of(placement[0] if placement else '', args.num_stages)
    out = os.path.join(args.out_dir, name.replace(':', '-'))
    gathered, logits = run(method, len(placements), stash, placements,
                           checkpoint_dir=out + '-checkpoints' if 'resume' in placement else None)
    if jax.process_index() == 0:
      leaves = {jax.tree_util.keystr(path): leaf
                for path, leaf in jax.tree_util.tree_flatten_with_path(gathered)[0]}
      np.savez(out + '.npz', **leaves)
    if logits is not None and logits.is_fully_addressable:   # the last stage's process
      np.save(out + '-logits.npy', np.asarray(logits))
  print(f'process {jax.process_index()} done', flush=True)


if __name__ == '__main__':
  main()
