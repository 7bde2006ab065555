"""Checkpoints hold the pipeline in flight: resuming is bit-exact."""

import chex
import jax
import numpy as np
import pytest

from fdg_jax.engine import baselines
from fdg_jax.engine import checkpoint
from fdg_jax.engine import pipeline
from fdg_jax.models import aux_heads
from test_engine import BETA, initial_variables, make_optimizer
from tiny import NUM_CLASSES, tiny_batches


def new_pipeline(num_stages, stash):
  """stash: 'vjp', 'recompute' or 'vjp+POLICY' (a residual policy)."""
  modules, variables = initial_variables(num_stages)
  stash, _, policy = stash.partition('+')
  pipe = pipeline.Pipeline(modules, make_optimizer(), beta=BETA, stash=stash,
                           residual_policy=policy or None,
                           placements=jax.devices()[:num_stages])
  return pipe, pipe.init(jax.random.key(1), None, variables=variables)


def run(pipe, state, batches):
  for images, labels in batches:
    state, _ = pipe.step(state, images, labels)
  return state


def saved_forms(pipe, state):
  return {entry['form'] for records in checkpoint.to_tree(pipe, state)[1]['saved'].values()
          for entry in records}


@pytest.mark.parametrize('num_stages, stash', [
    (2, 'vjp'), (3, 'vjp'), (2, 'recompute'), (3, 'recompute'), (3, 'vjp+dots_saveable'),
    (2, 'vjp+nothing_saveable')])
def test_resume_mid_stream_is_bit_exact(num_stages, stash, tmp_path):
  """With stash 'vjp' (except 'nothing_saveable', whose residuals are already little more than
  the inputs) the checkpoint holds each saved forward's inputs and rebuilds its residuals."""
  batches = tiny_batches(10)
  pipe, state = new_pipeline(num_stages, stash)
  straight, _ = pipe.drain(run(pipe, state, batches))
  expected = jax.device_get(pipe.stage_variables(straight))

  pipe, state = new_pipeline(num_stages, stash)
  state = run(pipe, state, batches[:5])
  assert state.in_flight   # saved forwards, activations and cotangents are all in the checkpoint
  compact = stash in ('vjp', 'vjp+dots_saveable')
  assert saved_forms(pipe, state) == {'compact' if compact else 'full'}
  if compact:   # stage inputs and activations in flight come from the stage before
    metadata = checkpoint.to_tree(pipe, state)[1]
    for k, records in metadata['saved'].items():
      assert all(e.get('x_from_previous', False) == (k != '0') for e in records), k
    assert metadata['activations_from_previous'] == [str(k) for k in range(1, num_stages)]
  saver = checkpoint.Checkpointer(str(tmp_path))
  saver.save(5, pipe, state, extra={'step': 5})
  del state
  # A new pipeline object: fresh compilation caches and residual structures, as in a new process.
  pipe, fresh = new_pipeline(num_stages, stash)
  restored, extra = checkpoint.Checkpointer(str(tmp_path)).restore(pipe, fresh)
  assert extra == {'step': 5}
  for k, stage in enumerate(restored.stages):
    for leaf in jax.tree_util.tree_leaves(stage):
      assert leaf.devices() == {pipe.shardings[k].device_set.pop()}
  resumed, _ = pipe.drain(run(pipe, restored, batches[5:]))
  chex.assert_trees_all_equal(jax.device_get(pipe.stage_variables(resumed)), expected)


def test_compact_checkpoint_is_smaller_and_falls_back_to_the_full_form(tmp_path, monkeypatch):
  """Where the residuals would not be rebuilt bit for bit, an entry is stored in full (with its
  inputs); both forms restore to the same state."""
  batches = tiny_batches(6)
  pipe, state = new_pipeline(3, 'vjp')
  state = run(pipe, state, batches)
  checkpoint.Checkpointer(str(tmp_path / 'compact')).save(6, pipe, state)
  with monkeypatch.context() as patch:
    patch.setattr(checkpoint, 'rebuilt_output', lambda pipe, k, entry: None)
    assert saved_forms(pipe, state) == {'full'}
    checkpoint.Checkpointer(str(tmp_path / 'full')).save(6, pipe, state)

  def size(name):
    return checkpoint.Checkpointer(str(tmp_path / name)).size_on_disk(6)
  assert size('compact') < size('full')
  def entries(saved):
    return jax.device_get([(e.batch, e.arrays, e.inputs) for queue in saved for e in queue])
  restored = []
  for name in ('compact', 'full'):
    other, fresh = new_pipeline(3, 'vjp')
    restored.append(entries(
        checkpoint.Checkpointer(str(tmp_path / name)).restore(other, fresh)[0].saved))
  chex.assert_trees_all_equal(restored[0], restored[1], entries(state.saved))


def test_stage_inputs_from_the_data_stream(tmp_path):
  """Given the stream's images by batch index (as the trainer does), a checkpoint stores no
  stage-0 inputs; restoring needs the stream and gives the state back bit for bit."""
  batches = tiny_batches(10)
  pipe, state = new_pipeline(3, 'vjp')
  state = run(pipe, state, batches[:5])
  stream = [images for images, _ in batches]
  metadata = checkpoint.to_tree(pipe, state, stream.__getitem__)[1]
  assert all(e['x_from_stream'] for e in metadata['saved']['0'])
  saver = checkpoint.Checkpointer(str(tmp_path))
  saver.save(5, pipe, state, batch_inputs=stream.__getitem__)
  other, fresh = new_pipeline(3, 'vjp')
  with pytest.raises(checkpoint.CheckpointError, match='data stream'):
    saver.restore(other, fresh)
  restored, _ = saver.restore(other, fresh, batch_inputs=stream.__getitem__)
  chex.assert_trees_all_equal(jax.device_get(checkpoint.to_tree(other, restored)[0]),
                              jax.device_get(checkpoint.to_tree(pipe, state)[0]))
  # Another stream (a changed data set, say) is not trusted: the inputs are stored.
  other_stream = [images + 1 for images in stream]
  metadata = checkpoint.to_tree(pipe, state, other_stream.__getitem__)[1]
  assert not any(e['x_from_stream'] for e in metadata['saved']['0'])


def test_checkpoint_without_compact_forms_still_resumes():
  """Checkpoints written before compact forms (residual leaves only, their partition specs as
  a list) restore, and the run goes on bit for bit."""
  batches = tiny_batches(10)
  pipe, state = new_pipeline(3, 'vjp')
  straight, _ = pipe.drain(run(pipe, state, batches))
  expected = jax.device_get(pipe.stage_variables(straight))
  pipe, state = new_pipeline(3, 'vjp')
  state = run(pipe, state, batches[:5])
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(checkpoint, 'rebuilt_output', lambda pipe, k, entry: None)
    arrays, metadata = checkpoint.to_tree(pipe, state)
  for k, records in metadata['saved'].items():   # today's full form, written the old way
    for i, record in enumerate(records):
      arrays['saved'][k][str(i)] = arrays['saved'][k][str(i)]['residuals']
      del record['form']
      record['partition_specs'] = [None] * len(arrays['saved'][k][str(i)])
  pipe, fresh = new_pipeline(3, 'vjp')
  restored = checkpoint.from_tree(pipe, fresh, arrays, metadata)
  resumed, _ = pipe.drain(run(pipe, restored, batches[5:]))
  chex.assert_trees_all_equal(jax.device_get(pipe.stage_variables(resumed)), expected)


def test_asynchronous_save_holds_the_state_of_its_step(tmp_path):
  """Training goes on (donating the stage states) while orbax writes: the checkpoint still
  holds the state of the step it was asked for."""
  batches = tiny_batches(10)
  pipe, state = new_pipeline(3, 'vjp')
  state = run(pipe, state, batches[:5])
  expected = jax.device_get(checkpoint.to_tree(pipe, state)[0])
  saver = checkpoint.Checkpointer(str(tmp_path), asynchronous=True)
  saver.save(5, pipe, state)
  state = run(pipe, state, batches[5:])   # the saved stage states are donated here
  assert saver.latest_step() == 5         # waits for the write
  other, fresh = new_pipeline(3, 'vjp')
  restored, _ = saver.restore(other, fresh)
  chex.assert_trees_all_equal(jax.device_get(checkpoint.to_tree(other, restored)[0]), expected)
  saver.close()


def test_checkpoints_keep_the_last_few(tmp_path):
  pipe, state = new_pipeline(2, 'vjp')
  saver = checkpoint.Checkpointer(str(tmp_path), max_to_keep=2)
  for step, (images, labels) in enumerate(tiny_batches(4), start=1):
    state, _ = pipe.step(state, images, labels)
    saver.save(step, pipe, state)
  assert saver.latest_step() == 4
  assert sorted(int(d.name) for d in (tmp_path / 'checkpoints').iterdir() if d.name.isdigit()) == [3, 4]


def test_checkpoint_of_another_model_is_refused_clearly(tmp_path):
  pipe, state = new_pipeline(2, 'vjp')
  state, _ = pipe.step(state, *tiny_batches(1)[0])
  checkpoint.Checkpointer(str(tmp_path)).save(1, pipe, state)
  other, fresh = new_pipeline(3, 'vjp')
  with pytest.raises(checkpoint.CheckpointError, match='2 stages; this run has 3'):
    checkpoint.Checkpointer(str(tmp_path)).restore(other, fresh)


@pytest.mark.parametrize('method', ['fdg', 'dgl'])
def test_checkpoint_from_before_label_queues_restores_the_same_state(method):
  """Earlier checkpoints carried each batch's labels in its activation record (on the last
  stage's device); restoring one gives the same labels queues as today's layout."""
  modules, variables = initial_variables(3)
  if method == 'dgl':
    pipe = baselines.DGLPipeline(modules, make_optimizer(), num_classes=NUM_CLASSES,
                                 aux_head=aux_heads.get('conv'), placements=jax.devices()[:3])
  else:
    pipe = pipeline.Pipeline(modules, make_optimizer(), placements=jax.devices()[:3])
  batches = tiny_batches(5)
  state = run(pipe, pipe.init(jax.random.key(1), batches[0][0], variables=variables), batches)
  with pytest.MonkeyPatch.context() as patch:   # as then: every array stored
    patch.setattr(checkpoint, 'rebuilt_output', lambda pipe, k, entry: None)
    arrays, metadata = checkpoint.to_tree(pipe, state)
  labels = {entry.batch: entry.value for queue in state.labels for entry in queue}
  old_arrays = {**{k: v for k, v in arrays.items() if k != 'labels'}, 'activations': {
      k: {'value': a['value'], 'labels': jax.device_put(labels[metadata['activations'][k]],
                                                        pipe.shardings[-1])}
      for k, a in arrays['activations'].items()}}
  old_metadata = {k: v for k, v in metadata.items()
                  if k not in ('labels', 'stream_first_batch', 'stream_offset')}
  fresh = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
  restored = checkpoint.from_tree(pipe, fresh, old_arrays, old_metadata)
  assert [[e.batch for e in q] for q in restored.labels] == [
      [e.batch for e in q] for q in state.labels]
  for old, new in zip(restored.labels, state.labels):
    for a, b in zip(old, new):
      assert a.value.devices() == b.value.devices()
      np.testing.assert_array_equal(a.value, b.value)
