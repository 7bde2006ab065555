"""Checkpoints of the whole pipeline in flight, with orbax.

Resuming FDG exactly needs more than the parameters: every stage's optimizer state, BatchNorm
statistics and dropout key, the saved forwards waiting for their delayed cotangents, and the
activations, labels and cotangents travelling between stages. All of them are saved; each array
is restored onto the device of the stage that owns it. The host-side bookkeeping (which batch
each entry belongs to, the data position) goes into a JSON item beside the arrays.
"""

import functools
import json
import os
import weakref
from typing import Callable, Optional

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fdg_jax.engine import distributed
from fdg_jax.engine import pipeline as pipeline_lib
from fdg_jax.engine import schedule
from fdg_jax.engine import stage_functions

CHECKPOINT_DIR = 'checkpoints'


class CheckpointError(ValueError):
  """A checkpoint that cannot be restored into this pipeline; the message says why and what to do."""


def _indexed(items) -> dict:
  return {str(i): item for i, item in enumerate(items)}


def _unindexed(tree: dict) -> list:
  return [tree[str(i)] for i in range(len(tree))]


def _stored(value):
  """What travels between stages, as a checkpoint stores it: one array as itself (as before
  stages could pass pytrees), a pytree as its leaves (its structure comes from the pipeline)."""
  if isinstance(value, jax.Array):
    return value
  return {'leaves': _indexed(jax.tree_util.tree_leaves(value))}


def _restored(stored, spec):
  """The value `_stored` stored, in the structure of `spec` (a stage's input or output spec)."""
  if isinstance(stored, dict) and set(stored) == {'leaves'}:
    spec = spec() if callable(spec) else spec
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(spec),
                                        _unindexed(stored['leaves']))
  return stored


def _leaves(value) -> list:
  return jax.tree_util.tree_leaves(value)


# ---------------------------------------------------------------- saved forwards, rebuilt


@jax.jit
def _bits_equal(a: list[jax.Array], b: list[jax.Array]) -> jax.Array:
  def bits(x):
    if jnp.issubdtype(x.dtype, jnp.floating):
      return jax.lax.bitcast_convert_type(x, jnp.dtype(f'uint{8 * x.dtype.itemsize}'))
    return x
  return jnp.all(jnp.stack([jnp.all(bits(x) == bits(y)) for x, y in zip(a, b)]))


def bits_equal(a, b) -> bool:
  """Whether two lists of arrays (pairwise on the same devices) are equal bit for bit."""
  a, b = list(a), list(b)
  return (len(a) == len(b) and all(x.shape == y.shape and x.dtype == y.dtype
                                   for x, y in zip(a, b))
          and bool(distributed.fetch(_bits_equal(a, b))))


# Each pipeline's jitted rebuilds of its stages' forwards, made on first use.
_REBUILDERS: 'weakref.WeakKeyDictionary' = weakref.WeakKeyDictionary()


def rebuild_forward(pipe: pipeline_lib.Pipeline, k: int, inputs: dict):
  """Stage k's forward from a saved entry's `inputs` (see `Saved`): (output, residual leaves)."""
  if pipe not in _REBUILDERS:
    _REBUILDERS[pipe] = tuple(jax.jit(stage_functions.rebuild(spec)) for spec in pipe.specs)
  return _REBUILDERS[pipe][k](inputs)


def rebuilt_output(pipe: pipeline_lib.Pipeline, k: int, entry: pipeline_lib.Saved):
  """The output of `entry`'s forward rebuilt from its inputs, if the rebuild gives its
  residuals bit for bit; None if not (or if it has no inputs).

  The rebuild is exact where XLA compiles the standalone forward like the forward inside the
  stage function (so far everywhere on this CPU); a checkpoint asks before relying on it.
  """
  if entry.inputs is None:
    return None
  y, leaves = rebuild_forward(pipe, k, entry.inputs)
  return y if bits_equal(leaves, entry.arrays) else None


def input_spec_of(pipe: pipeline_lib.Pipeline, k: int, input_spec):
  """Stage k's input spec tree from a `Residuals.input_spec` record (a checkpoint's JSON): a
  single array's (shape, dtype), or each leaf's, in the structure of the stage's input."""
  if input_spec and isinstance(input_spec[1], str):   # one array
    shape, dtype = input_spec
    return jax.ShapeDtypeStruct(tuple(shape), dtype)
  if pipe.batch_spec is None:
    raise ValueError('Restoring saved forwards of a pytree stage input needs the batch shape: '
                     'call init(rng, sample_input) first.')
  structure = jax.tree_util.tree_structure(pipe.io_specs(pipe.batch_spec)[k])
  return jax.tree_util.tree_unflatten(
      structure, [jax.ShapeDtypeStruct(tuple(shape), dtype) for shape, dtype in input_spec])


class _Forwards:
  """Saved forwards as a checkpoint stores and restores them, FDG's queues (keyed by batch) and
  FDG's microbatches in flight (keyed by microbatch) alike.

  An entry is stored compactly, as what determines its residuals (`Saved.inputs`), where the
  rebuild gives them bit for bit (`rebuilt_output`); otherwise in full, its residual leaves
  (with its inputs, if it has them). The stage input of a compact entry is not stored either
  where the restore reproduces it bit for bit: in one process, from the previous stage's rebuilt
  forward of the same key ('x_from_previous'), or at stage 0 from the data stream
  ('x_from_stream': `stream(key)`, stage 0's input as fed, on its devices); `reproduced` says
  the same of an activation in flight. Stages are stored and restored in order, so the previous
  stage's rebuilt outputs are there when a stage asks for them.
  """

  def __init__(self, pipe: pipeline_lib.Pipeline, stream: Optional[Callable] = None):
    self.pipe = pipe
    self.stream = stream
    self.chained = pipe.num_processes == 1   # no chaining across processes
    self.outputs = {}   # (stage, key) -> the output of a forward stored compactly, rebuilt

  def previous_output(self, k: int, key: int):
    """Stage k-1's rebuilt output for `key`, on stage k's devices (None if there is none)."""
    output = self.outputs.get((k - 1, key))
    return None if output is None else jax.device_put(output, self.pipe.shardings[k])

  def reproduced(self, k: int, key: int, value) -> bool:
    """Whether stage k's input `value` for `key` is rebuilt on restore: from the data stream
    (stage 0) or from the previous stage's rebuilt forward."""
    if not self.chained:
      return False
    source = (None if self.stream is None else self.stream(key)) if k == 0 else (
        self.previous_output(k, key))
    return source is not None and bits_equal(_leaves(source), _leaves(value))

  def store(self, k: int, key: int, entry: pipeline_lib.Saved, elsewhere=()) -> tuple[dict, dict]:
    """(arrays, record) of stage k's saved forward `entry`; its inputs named in `elsewhere` are
    stored elsewhere in the checkpoint (and handed back to `restore`)."""
    output = rebuilt_output(self.pipe, k, entry)
    record = {'form': 'full' if output is None else 'compact'}
    inputs = None if entry.inputs is None else {
        name: value for name, value in entry.inputs.items() if name not in elsewhere}
    if output is None:
      stored = _indexed(jax.tree_util.tree_leaves(entry.arrays))
      if inputs is not None:
        stored = {'residuals': stored, 'inputs': {**inputs, 'x': _stored(inputs['x'])}}
      return stored, record
    self.outputs[(k, key)] = output
    source = 'x_from_stream' if k == 0 else 'x_from_previous'
    record[source] = self.reproduced(k, key, inputs['x'])
    if record[source]:
      del inputs['x']
    else:
      inputs['x'] = _stored(inputs['x'])
    return {'inputs': inputs}, record

  def restore(self, k: int, key: int, stored: dict, record: dict, input_spec: Callable,
              elsewhere: Optional[dict] = None) -> tuple[list, Optional[dict]]:
    """(residual leaves, inputs) of an entry `store` stored (a record without 'form': one
    written before compact forms, its residual leaves); `input_spec()` the stage input's spec
    tree, `elsewhere` the inputs stored elsewhere."""
    form = record.get('form')
    inputs = stored.get('inputs') if form else None
    if inputs is not None:
      inputs = {**(elsewhere or {}), **inputs}
      if 'x' in inputs:
        inputs['x'] = _restored(inputs['x'], input_spec)
    if form != 'compact':
      return _unindexed(stored['residuals'] if inputs is not None else stored), inputs
    if record.get('x_from_stream'):
      if self.stream is None:
        raise CheckpointError(
            "This checkpoint takes stage 0's inputs from the training data stream; restore "
            'it through the trainer, or pass batch_inputs to Checkpointer.restore.')
      inputs['x'] = self.stream(key)
    if record.get('x_from_previous'):
      inputs['x'] = self.previous_output(k, key)
    self.outputs[(k, key)], leaves = rebuild_forward(self.pipe, k, inputs)
    return leaves, inputs


def _stream(pipe: pipeline_lib.Pipeline, batch_inputs: Optional[Callable[[int], np.ndarray]]
            ) -> Optional[Callable]:
  """Stage 0's input as fed, on its devices, by `_Forwards` key: a batch's (`batch_inputs`:
  batch index -> its inputs, the trainer's data stream), or with microbatches, microbatch
  i = b M + m's, the m-th of batch b's; None without `batch_inputs`."""
  if batch_inputs is None:
    return None
  if pipe.microbatches is None:
    return lambda batch: jax.device_put(batch_inputs(batch), pipe.shardings[0])
  M = pipe.microbatches
  return lambda i: jax.device_put(pipeline_lib.split_batch(batch_inputs(i // M), M)[i % M],
                                  pipe.shardings[0])


def to_tree(pipe: pipeline_lib.Pipeline, state: pipeline_lib.PipelineState,
            batch_inputs: Optional[Callable[[int], np.ndarray]] = None) -> tuple[dict, dict]:
  """(arrays, metadata) of a pipeline state: nested dicts of arrays, and JSON-able bookkeeping.

  Only the stages this process holds are in it (all of them in a single-process run). A saved
  forward is stored in its compact form, what determines its residuals (`Saved.inputs`), where
  `pipe` rebuilds them from that bit for bit; otherwise (or without inputs) as it is. In one
  process, a stage input or an activation in flight that the previous stage's rebuilt forward of
  the same batch reproduces bit for bit is not stored either ('from_previous'): a batch in
  flight then costs each stage's parameters, not its activations. With `batch_inputs` (batch
  index -> its images, as fed: the trainer's data stream), stage 0's inputs that it reproduces
  are not stored either ('x_from_stream'); restoring then needs the same function.
  FDG's microbatches in flight are stored likewise (`_microbatches_tree`), by microbatch.
  """
  forwards = _Forwards(pipe, _stream(pipe, batch_inputs))
  saved, saved_metadata = {}, {}
  for k, queue in enumerate(state.saved):
    entries, records = {}, []
    for i, entry in enumerate(queue):
      stored, record = forwards.store(k, entry.batch, entry)
      record.update(batch=entry.batch, partition_specs=_partition_specs(stored),
                    input_spec=entry.structure.input_spec if entry.structure else None)
      entries[str(i)] = stored
      records.append(record)
    if queue:
      saved[str(k)], saved_metadata[str(k)] = entries, records
  activations_from_previous = [
      str(k) for k, a in enumerate(state.activations)
      if a is not None and k > 0 and forwards.reproduced(k, a.batch, a.value)]
  arrays = {
      'stages': {str(k): flax.serialization.to_state_dict(s)
                 for k, s in enumerate(state.stages) if s is not None},
      'saved': saved,
      'activations': {str(k): {'value': _stored(a.value)} for k, a in enumerate(state.activations)
                      if a is not None and str(k) not in activations_from_previous},
      'cotangents': {str(k): _stored(c.value) for k, c in enumerate(state.cotangents)
                     if c is not None},
      'labels': {str(k): _indexed(entry.value for entry in queue)
                 for k, queue in enumerate(state.targets) if queue},
  }
  metadata = {
      'activations_from_previous': activations_from_previous,
      'iteration': state.iteration,
      'batches_fed': state.batches_fed,
      'stream_first_batch': state.stream_first_batch,
      'stream_offset': state.stream_offset,
      'saved': saved_metadata,
      'activations': {str(k): a.batch for k, a in enumerate(state.activations) if a is not None},
      'cotangents': {str(k): c.batch for k, c in enumerate(state.cotangents) if c is not None},
      'labels': {str(k): [entry.batch for entry in queue]
                 for k, queue in enumerate(state.targets) if queue},
  }
  if state.microbatches is not None:
    arrays['microbatches'], metadata['microbatches'] = _microbatches_tree(
        state.microbatches, forwards)
  return arrays, metadata


# What a method over microbatches holds, by group: the stage whose devices hold it (None: the
# stage named in the tree's path).
_MICROBATCH_GROUPS = {'arrived': None, 'saved': None, 'sums': None, 'forward_params': None,
                      'held': -1, 'inputs': 0, 'targets': -1}


def _microbatches_tree(kept, forwards: _Forwards) -> tuple[dict, dict]:
  """(arrays, metadata) of FDG's microbatches in flight (`state.Microbatches`). Each saved
  forward as `forwards` stores it (keyed by microbatch), without the parameters it shares with
  its batch ('forward_params', stored once per batch); an activation that arrived, not at all
  where the previous stage's rebuilt forward reproduces it ('arrived_from_previous'); the rest
  as it is."""
  M = forwards.pipe.microbatches
  saved, records = [{} for _ in kept.saved], [{} for _ in kept.saved]
  for k, entries in enumerate(kept.saved):   # in stage order: a stage's inputs chain back
    for i, entry in sorted(entries.items()):
      shared = (entry.inputs is not None
                and entry.inputs['params'] is kept.forward_params[k].get(i // M))
      saved[k][str(i)], records[k][str(i)] = forwards.store(
          k, i, entry, elsewhere=('params',) if shared else ())
      records[k][str(i)]['input_spec'] = entry.structure.input_spec
  from_previous = [sorted(i for (kind, i), value in d.items()
                          if kind == 'F' and k > 0 and forwards.reproduced(k, i, value))
                   for k, d in enumerate(kept.arrived)]
  by_stage = lambda group, store: {str(k): {key: store(value) for key, value in entries.items()}
                                   for k, entries in enumerate(group) if entries}
  arrays = {
      'arrived': by_stage([{f'{kind}{i}': v for (kind, i), v in d.items()
                            if not (kind == 'F' and i in from_previous[k])}
                           for k, d in enumerate(kept.arrived)], _stored),
      'saved': by_stage(saved, lambda stored: stored),
      'sums': by_stage([{str(b): g for b, g in d.items()} for d in kept.sums],
                       flax.serialization.to_state_dict),
      'forward_params': by_stage([{str(b): p for b, p in d.items()} for d in kept.forward_params],
                                 flax.serialization.to_state_dict),
      'held': {str(i): _stored(v) for i, v in kept.held.items()},
      'inputs': {str(i): _stored(v) for i, v in kept.inputs.items()},
      'targets': {str(i): _stored(v) for i, v in kept.targets.items()},
  }
  arrays = {group: tree for group, tree in arrays.items() if tree}
  metadata = {
      'progress': [[[list(item) for item in p.done], p.applied] for p in kept.progress],
      'saved': {str(k): d for k, d in enumerate(records) if d},
      'arrived_from_previous': {str(k): d for k, d in enumerate(from_previous) if d},
      'partition_specs': _partition_specs(arrays),
  }
  return arrays, metadata


def _microbatches_from_tree(pipe: pipeline_lib.Pipeline, stages, arrays: dict, metadata: dict,
                            forwards: _Forwards):
  """`state.Microbatches` from `_microbatches_tree`'s arrays and metadata (or those written
  before compact forms: every saved forward's residual leaves, their input specs apart)."""
  micro_spec = pipeline_lib.microbatch_spec(pipe)
  specs = pipe.io_specs(micro_spec)
  cotangent_of = lambda k: stage_functions.differentiable_part(specs[k])
  num_stages, last, M = pipe.num_stages, pipe.num_stages - 1, pipe.microbatches
  group = lambda name: arrays.get(name, {})

  def by_batch(name):   # per stage, trees shaped as the stage's parameters, by batch
    trees = [{} for _ in range(num_stages)]
    for k, entries in group(name).items():
      trees[int(k)] = {int(b): flax.serialization.from_state_dict(stages[int(k)].params, tree)
                       for b, tree in entries.items()}
    return tuple(trees)

  forward_params = by_batch('forward_params')
  records = metadata.get('saved') or {
      k: {i: {'input_spec': spec} for i, spec in d.items()}
      for k, d in metadata.get('input_specs', {}).items()}
  saved = [{} for _ in range(num_stages)]
  for k in sorted(map(int, records)):   # in stage order: a stage's inputs chain back
    for i, record in records[str(k)].items():
      i = int(i)
      input_spec = functools.partial(input_spec_of, pipe, k, record['input_spec'])
      batch_params = forward_params[k].get(i // M)
      leaves, inputs = forwards.restore(
          k, i, group('saved')[str(k)][str(i)], record, input_spec,
          elsewhere=None if batch_params is None else {'params': batch_params})
      saved[k][i] = pipeline_lib.Saved(
          arrays=leaves, batch=i, structure=pipe.method.residual_structure(k, stages[k],
                                                                           input_spec()),
          inputs=inputs if pipe.keeps_inputs else None)
  arrived = [{} for _ in range(num_stages)]
  for k, entries in group('arrived').items():
    for key, value in entries.items():
      kind, i, k = key[0], int(key[1:]), int(k)
      arrived[k][kind, i] = _restored(value, specs[k] if kind == 'F' else cotangent_of(k + 1))
  for k, indices in metadata.get('arrived_from_previous', {}).items():
    for i in indices:
      arrived[int(k)]['F', i] = forwards.previous_output(int(k), i)
  return pipeline_lib.Microbatches(
      arrived=tuple(arrived), saved=tuple(saved), sums=by_batch('sums'),
      forward_params=forward_params,
      held={int(i): _restored(v, cotangent_of(last)) for i, v in group('held').items()},
      inputs={int(i): _restored(v, specs[0]) for i, v in group('inputs').items()},
      targets={int(i): v for i, v in group('targets').items()},
      progress=tuple(schedule.FdgProgress(tuple(tuple(item) for item in done), applied)
                     for done, applied in metadata['progress']))


def _partition_spec(array: jax.Array) -> Optional[list]:
  """How an array of a stage on several devices is split (JSON), None on one device."""
  if not isinstance(array.sharding, jax.sharding.NamedSharding):
    return None
  return [list(axes) if isinstance(axes, tuple) else axes for axes in array.sharding.spec]


def _partition_specs(tree) -> dict:
  """{'a/b/c': `_partition_spec`} of every array of a nested dict, by its path."""
  return {'/'.join(str(p.key) for p in path): _partition_spec(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _named_sharding(pipe: pipeline_lib.Pipeline, stage: int, spec: list
                    ) -> jax.sharding.NamedSharding:
  """A `_partition_spec` record as a sharding over stage `stage`'s mesh."""
  return jax.sharding.NamedSharding(
      pipe.state_shardings[stage].mesh,
      jax.sharding.PartitionSpec(*(tuple(a) if isinstance(a, list) else a for a in spec)))


def _sharding_for(pipe: pipeline_lib.Pipeline, keys: tuple[str, ...], metadata: dict
                  ) -> jax.sharding.Sharding:
  """Where an array of the checkpoint tree belongs, from its path: a stage's state on all its
  devices, batch-shaped arrays split over them, a saved forward's arrays as they were saved."""
  if keys[0] == 'microbatches':
    where = _MICROBATCH_GROUPS[keys[1]]
    stage = int(keys[2]) if where is None else where % pipe.num_stages
    spec = metadata['microbatches']['partition_specs'].get('/'.join(keys[1:]))
    if spec is None:
      return pipe.state_shardings[stage] if keys[1] in ('saved', 'sums') else pipe.shardings[stage]
    return _named_sharding(pipe, stage, spec)
  group, stage = keys[0], int(keys[1])
  if group == 'activations' and keys[2] == 'labels':
    return pipe.shardings[-1]   # a checkpoint from before labels had their own queues
  if group == 'stages':
    return pipe.state_shardings[stage]
  if group == 'saved':
    record = metadata['saved'][keys[1]][int(keys[2])]
    specs = record.get('partition_specs')   # None: older checkpoints; a list: residuals only
    spec = (specs.get('/'.join(keys[3:])) if isinstance(specs, dict) else
            specs[int(keys[3])] if specs else None)
    if spec is None:
      return pipe.state_shardings[stage]
    return _named_sharding(pipe, stage, spec)
  return pipe.shardings[stage]


def _labels_from_old_activations(pipe: pipeline_lib.Pipeline, arrays: dict, metadata: dict):
  """Checkpoints written before labels had their own queues kept each batch's labels in its
  activation record (on the last stage's device). A batch arriving at stage j goes to the queue
  of every stage from j on that will compute a loss on it: the last (FDG, DDG), or all (DGL)."""
  queues = [[] for _ in range(pipe.num_stages)]
  for j, batch in metadata['activations'].items():
    for stage in range(int(j), pipe.num_stages):
      if pipe.schedule.needs_labels(stage):
        labels = jax.device_put(arrays['activations'][j]['labels'], pipe.shardings[stage])
        queues[stage].append(pipeline_lib.Targets(value=labels, batch=batch))
  return tuple(tuple(sorted(q, key=lambda entry: entry.batch)) for q in queues)


def from_tree(pipe: pipeline_lib.Pipeline, fresh: pipeline_lib.PipelineState, arrays: dict,
              metadata: dict, batch_inputs: Optional[Callable[[int], np.ndarray]] = None
              ) -> pipeline_lib.PipelineState:
  """Rebuild a PipelineState; `fresh` (from `pipe.init`) gives the TrainState structure, and
  `batch_inputs` the images of stage 0's saved forwards that `to_tree` took from it."""
  stages = tuple(None if fresh.stages[k] is None else
                 flax.serialization.from_state_dict(fresh.stages[k], arrays['stages'][str(k)])
                 for k in range(pipe.num_stages))
  forwards = _Forwards(pipe, _stream(pipe, batch_inputs))
  saved = []
  specs = {}   # stage k -> its input spec (from the first saved entry that says it)

  def input_spec(k, entry):
    if k not in specs:
      specs[k] = input_spec_of(pipe, k, entry['input_spec'])
    return specs[k]

  def stage_input(k):   # the spec of stage k's input, for values stored as leaves
    return specs.get(k) if k in specs else pipe.io_specs(pipe.batch_spec)[k]

  for k in range(pipe.num_stages):
    queue = []
    for i, entry in enumerate(metadata['saved'].get(str(k), [])):
      leaves, inputs = forwards.restore(k, entry['batch'], arrays['saved'][str(k)][str(i)],
                                        entry, functools.partial(input_spec, k, entry))
      if inputs is None and pipe.compensation.name == 'delay_compensation':
        raise CheckpointError(
            f'Delay compensation needs the parameters of each saved forward, and stage {k}\'s '
            'entries in this checkpoint do not hold them (another stash or residual policy wrote '
            'it): resume with the config it was written with, or start in a new --workdir.')
      if pipe.stash == 'vjp':
        structure = pipe.method.residual_structure(k, stages[k], input_spec(k, entry))
        queue.append(pipeline_lib.Saved(arrays=leaves, batch=entry['batch'], structure=structure,
                                        inputs=inputs if pipe.keeps_inputs else None))
      else:   # stash='recompute': (the stage input, its dropout key)
        x = (leaves[0] if len(leaves) == 2 else jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(stage_input(k)), leaves[:-1]))
        queue.append(pipeline_lib.Saved(arrays=(x, leaves[-1]), batch=entry['batch']))
    saved.append(tuple(queue))
  activations = [None] * pipe.num_stages
  for k, batch in metadata['activations'].items():
    value = (forwards.previous_output(int(k), batch)
             if k in metadata.get('activations_from_previous', ()) else
             _restored(arrays['activations'][k]['value'], lambda: stage_input(int(k))))
    activations[int(k)] = pipeline_lib.Activation(value=value, batch=batch)
  cotangents = [None] * pipe.num_stages
  for k, batch in metadata['cotangents'].items():
    cotangents[int(k)] = pipeline_lib.Cotangent(
        value=_restored(arrays['cotangents'][k],
                        lambda: stage_functions.differentiable_part(stage_input(int(k) + 1))),
        batch=batch)
  if 'labels' in metadata:
    labels = tuple(
        tuple(pipeline_lib.Targets(value=value, batch=batch) for value, batch in zip(
            _unindexed(arrays['labels'].get(str(k), {})), metadata['labels'].get(str(k), [])))
        for k in range(pipe.num_stages))
  else:
    labels = _labels_from_old_activations(pipe, arrays, metadata)
  return pipeline_lib.PipelineState(
      stages=stages, saved=tuple(saved), activations=tuple(activations),
      cotangents=tuple(cotangents), targets=labels, iteration=metadata['iteration'],
      batches_fed=metadata['batches_fed'],
      stream_first_batch=metadata.get('stream_first_batch', 0),
      stream_offset=metadata.get('stream_offset', 0),
      microbatches=(_microbatches_from_tree(pipe, stages, arrays.get('microbatches', {}),
                                            metadata['microbatches'], forwards)
                    if 'microbatches' in metadata else None))


def _index_key(index: tuple, shape: tuple) -> str:
  """A shard's place in its array, as text: 'start:stop' per axis."""
  return ','.join('{}:{}'.format(*i.indices(n)[:2]) for i, n in zip(index, shape))


class _ProcessFiles:
  """One process's own checkpoints in a multi-process run: `STEP.msgpack` files (flax's
  serialization of the arrays, from the host, and the JSON bookkeeping), each written to a
  temporary name and renamed when complete. An array of a stage whose devices span several
  processes is saved by each of them as its own distinct shards.

  Why not orbax here: orbax 0.12 saves jax.Arrays of a multi-process run only as global arrays
  that every process writes together, refuses arrays of one process's own devices, and writes
  numpy arrays from process 0 alone. A pipeline stage lives on its own processes' devices.
  """

  SUFFIX = '.msgpack'
  SPANNING = 'spanning_array_shape'   # marks this process's shards of an array across processes

  def __init__(self, directory: str, max_to_keep: int):
    self.directory = directory
    self.max_to_keep = max_to_keep

  def steps(self) -> list[int]:
    if not os.path.isdir(self.directory):
      return []
    return sorted(int(name[:-len(self.SUFFIX)]) for name in os.listdir(self.directory)
                  if name.endswith(self.SUFFIX) and name[:-len(self.SUFFIX)].isdigit())

  def path(self, step: int) -> str:
    return os.path.join(self.directory, f'{step}{self.SUFFIX}')

  def save(self, step: int, arrays: dict, metadata: dict) -> None:
    def to_host(array):
      if array.is_fully_addressable:
        return jax.device_get(array)
      return {self.SPANNING: np.asarray(array.shape, np.int64), 'shards': {
          _index_key(shard.index, array.shape): np.asarray(shard.data)
          for shard in array.addressable_shards}}
    os.makedirs(self.directory, exist_ok=True)
    data = flax.serialization.msgpack_serialize(
        {'arrays': jax.tree_util.tree_map(to_host, arrays), 'meta': json.dumps(metadata)})
    with open(self.path(step) + '.tmp', 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(self.path(step) + '.tmp', self.path(step))
    for old in self.steps()[:-self.max_to_keep]:
      os.remove(self.path(old))

  def load(self, step: int, sharding_for) -> tuple[dict, dict]:
    """The arrays saved at `step`, each placed on `sharding_for(metadata)(path keys)`."""
    with open(self.path(step), 'rb') as f:
      data = flax.serialization.msgpack_restore(f.read())
    metadata = json.loads(data['meta'])
    sharding_of = sharding_for(metadata)

    def place(node, keys):
      if isinstance(node, dict) and self.SPANNING in node:
        shape = tuple(int(n) for n in node[self.SPANNING])
        sharding = sharding_of(keys)
        return jax.make_array_from_single_device_arrays(shape, sharding, [
            jax.device_put(node['shards'][_index_key(index, shape)], device)
            for device, index in sharding.addressable_devices_indices_map(shape).items()])
      if isinstance(node, dict):
        return {key: place(value, keys + (key,)) for key, value in node.items()}
      return jax.device_put(node, sharding_of(keys))

    return place(data['arrays'], ()), metadata


# Who wrote a workdir's checkpoints: one process (orbax's numbered folders) or the processes of
# a multi-process run (each its own `process_I/STEP.msgpack` files).
ONE_PROCESS, PROCESSES = 'one process', 'processes'
_PROCESS_DIR = 'process_{}'


def written_by(workdir: str) -> Optional[str]:
  """ONE_PROCESS or PROCESSES for the checkpoints in `workdir`; None if there are none."""
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  names = os.listdir(directory) if os.path.isdir(directory) else []
  if any(name.isdigit() for name in names):
    return ONE_PROCESS
  if any(_ProcessFiles(os.path.join(directory, name), max_to_keep=0).steps() for name in names
         if name.startswith(_PROCESS_DIR.format(''))):
    return PROCESSES
  return None


class Checkpointer:
  """Saves and restores pipeline states under `workdir/checkpoints`, keeping the last few.

  Orbax writes each checkpoint to a temporary folder and renames it when complete, so a crash
  mid-save leaves the previous checkpoints intact. With `asynchronous=True` (the trainer's
  choice) `save` returns once the arrays are copied off the devices (training may then donate
  them) and the files are written in a background thread; every other method, and `close`,
  waits for that first. In a
  multi-process run each process saves and restores its own stages in `checkpoints/process_I`
  (`_ProcessFiles`, synchronous), and the step resumed from is the latest that every process
  holds.
  """

  def __init__(self, workdir: str, max_to_keep: int = 3, asynchronous: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    self.asynchronous = asynchronous and jax.process_count() == 1
    self._process_files = None
    if jax.process_count() > 1:
      self.directory = os.path.join(self.directory, _PROCESS_DIR.format(jax.process_index()))
      self._process_files = _ProcessFiles(self.directory, max_to_keep)
      return
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=False,
                                             enable_async_checkpointing=asynchronous))

  def wait(self) -> None:
    """Until the last save is on disk."""
    if self._process_files is None:
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Wait for the last save and release orbax's threads."""
    if self._process_files is None:
      self._manager.close()

  def latest_step(self) -> Optional[int]:
    """The latest step saved (by every process, in a multi-process run; all must call it)."""
    if self._process_files is None:
      self.wait()
      return self._manager.latest_step()
    keep = self._process_files.max_to_keep
    steps = self._process_files.steps()[-keep:]
    rows = distributed.all_processes([-1] * (keep - len(steps)) + steps)
    common = set(rows[0]).intersection(*map(set, rows[1:])) - {-1}
    latest = int(max(common)) if common else None
    newer = sorted({int(s) for s in rows.flatten() if s > (-1 if latest is None else latest)})
    if newer:
      logging.warning(
          'Steps %s are saved by some processes only (an interrupted save) and are ignored; %s',
          newer, f'the latest complete checkpoint is step {latest}.' if latest is not None
          else 'no checkpoint is complete: the run starts from step 0.')
    return latest

  def size_on_disk(self, step: int) -> int:
    """Bytes of the files of the checkpoint at `step`."""
    self.wait()
    if self._process_files is not None:
      return os.path.getsize(self._process_files.path(step))
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(os.path.join(self.directory, str(step)))
               for name in names)

  def save(self, step: int, pipe: pipeline_lib.Pipeline, state: pipeline_lib.PipelineState,
           extra: Optional[dict] = None,
           batch_inputs: Optional[Callable[[int], np.ndarray]] = None) -> int:
    """Start writing the checkpoint of `state` at `step` (`to_tree` says what it holds); returns
    its arrays' bytes. Returns once `state` may be changed or donated."""
    arrays, metadata = to_tree(pipe, state, batch_inputs)
    metadata['extra'] = extra or {}
    size = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(arrays))
    if self._process_files is not None:
      self._process_files.save(step, arrays, metadata)
      # Complete only when every process has written its part. No process goes on (or exits,
      # after a preemption save) before: its peers may still be receiving arrays from it that
      # they must save (a cotangent in flight).
      distributed.exchange_json(step)
      return size
    os.makedirs(self.directory, exist_ok=True)
    self.wait()   # one save at a time
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(metadata)), force=True)
    return size

  def restore(self, pipe: pipeline_lib.Pipeline, fresh: pipeline_lib.PipelineState,
              step: Optional[int] = None,
              batch_inputs: Optional[Callable[[int], np.ndarray]] = None
              ) -> tuple[pipeline_lib.PipelineState, dict]:
    """The pipeline state saved at `step` (default: the latest), and its `extra` dict;
    `batch_inputs` as given to `save`."""
    self.wait()
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'No checkpoint in {self.directory}.')
    try:
      if self._process_files is not None:
        arrays, metadata = self._process_files.load(
            step, lambda metadata: functools.partial(_sharding_for, pipe, metadata=metadata))
        _check_matches(fresh, arrays, self.directory, step)
      else:
        metadata = self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
        target = jax.tree_util.tree_map_with_path(
            lambda path, m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=_sharding_for(
                pipe, tuple(str(p.key) for p in path), metadata)),
            self._manager.item_metadata(step)['state'].tree)
        _check_matches(fresh, target, self.directory, step)
        arrays = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))['state']
      state = from_tree(pipe, fresh, arrays, metadata, batch_inputs)
    except CheckpointError:
      raise
    except Exception as e:  # orbax/tensorstore raise many kinds; name the file and the fix
      raise CheckpointError(
          f'Cannot restore the checkpoint at step {step} in {self.directory}: {e}. If it comes '
          'from another model or config, start in a new --workdir.') from e
    return state, metadata.get('extra', {})


def _shapes(tree) -> dict:
  return {jax.tree_util.keystr(path): (tuple(x.shape), jnp.dtype(x.dtype).name)
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_matches(fresh: pipeline_lib.PipelineState, target: dict, directory: str, step: int):
  """Refuse a checkpoint whose stage arrays do not match this pipeline's, naming the first."""
  fix = 'Use the config it was written with, or a new --workdir.'
  local = sum(s is not None for s in fresh.stages)
  if len(target['stages']) != local:
    raise CheckpointError(
        f'The checkpoint at step {step} in {directory} has {len(target["stages"])} stages; this '
        f'run has {local} here. {fix}')
  want = _shapes({str(k): flax.serialization.to_state_dict(s)
                  for k, s in enumerate(fresh.stages) if s is not None})
  have = _shapes(target['stages'])
  for key, spec in want.items():
    if have.get(key) != spec:
      raise CheckpointError(
          f'The checkpoint at step {step} in {directory} does not match the model: stage array '
          f'{key} is {have.get(key, "missing")} there and {spec} here. {fix}')


def restore_joined(workdir: str, pipe, fresh, batch_inputs=None):
  """(state, step): a multi-process run's checkpoint (each process's files under
  checkpoints/process_I) restored into this one process's pipeline (sampling, evaluation): the
  latest step every process saved, each process's stages and what they held in flight joined."""
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  files = [_ProcessFiles(os.path.join(directory, name), max_to_keep=0)
           for name in sorted(os.listdir(directory)) if name.startswith('process_')]
  common = set.intersection(*(set(f.steps()) for f in files))
  if not common:
    raise CheckpointError(f'No step in {directory} is saved by every process.')
  step, arrays, metadata = max(common), {}, {}
  for f in files:
    try:
      part, meta = f.load(step, lambda m: functools.partial(_sharding_for, pipe,
                                                            metadata=m))
    except KeyError as e:
      raise CheckpointError(
          f'The checkpoint at step {step} in {directory} splits an array across processes '
          f'({e}), which one process cannot join. Sample it with the processes it trained in.'
          ) from None
    _join(arrays, part)
    _join(metadata, meta)
  return from_tree(pipe, fresh, arrays, metadata, batch_inputs), step


def _join(into: dict, part: dict) -> None:
  """Nested dicts joined: the processes' parts of a checkpoint are keyed by their own stages;
  what every process holds (counters, schedule progress) is the same in all."""
  for key, value in part.items():
    if isinstance(value, dict) and isinstance(into.get(key), dict):
      _join(into[key], value)
    elif key not in into:
      into[key] = value
