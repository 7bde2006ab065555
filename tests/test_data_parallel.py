"""A stage on several devices (its batch split over them, its state replicated) computes what
the same stage computes on one device: FDG, DDG and DGL against their naive single-device
references, uneven meshes between stages, BP on 2 devices against 1, and bit-exact resume; GPipe,
1F1B and FDG over microbatches against one device per stage, also fed batches already split over
the stage's devices."""

import chex
import jax
import numpy as np
import pytest

from fdg_jax.engine import baselines
from fdg_jax.engine import checkpoint
from fdg_jax.engine import distributed
from fdg_jax.engine import methods
from fdg_jax.engine import pipeline
from fdg_jax.models import aux_heads
from test_baselines import naive_ddg, naive_dgl, run as run_fed
from test_engine import BETA, naive_fdg
from tiny import NUM_CLASSES, assert_matches, initial_variables, make_optimizer, tiny_batches

NUM_BATCHES = 8


def devices(*indices):
  return [jax.devices()[i] for i in indices]


def assert_spread(pipe, state):
  """Stage k's state is replicated on all its devices, and what arrives at it (activation,
  labels) is split over them along the batch axis."""
  for k, stage in enumerate(state.stages):
    stage_devices = pipe.shardings[k].device_set
    for leaf in jax.tree_util.tree_leaves(stage):
      assert leaf.sharding.device_set == stage_devices and leaf.sharding.is_fully_replicated
    arriving = [state.activations[k]] if state.activations[k] is not None else []
    for entry in arriving + list(state.labels[k]):
      assert entry.value.sharding == pipe.shardings[k]
      if len(stage_devices) > 1:
        assert not entry.value.sharding.is_fully_replicated


def fdg(placements, stash='vjp', engine=pipeline.Pipeline):
  modules, variables = initial_variables(len(placements))
  pipe = engine(modules, make_optimizer(), beta=BETA, stash=stash, placements=placements)
  return pipe, modules, variables


@pytest.mark.parametrize('stash', ['vjp', 'recompute'])
def test_fdg_on_two_by_two_devices_matches_the_single_device_reference(stash):
  """K = 2 x D = 2: every stage's variables and optimizer state equal the naive reference
  that runs the whole batch on one device."""
  batches = tiny_batches(NUM_BATCHES)
  pipe, modules, variables = fdg([devices(0, 1), devices(2, 3)], stash)
  state, _, _ = run_fed(pipe, batches, variables)
  expected, expected_opt, _ = naive_fdg(modules, variables, make_optimizer(), batches, BETA,
                                        stash)
  assert_matches(pipe, state, expected, expected_opt)


def test_spread_stages_keep_their_arrays_on_their_devices():
  """Mid-stream, state is replicated and arriving batches are split on each stage's mesh, and
  every saved forward stays on its stage's devices."""
  batches = tiny_batches(3)
  pipe, _, variables = fdg([devices(0, 1), devices(2, 3)])
  state = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
  for images, labels in batches:
    state, _ = pipe.step(state, images, labels)
    assert_spread(pipe, state)
  assert state.saved[0]
  for entry in state.saved[0]:
    for leaf in jax.tree_util.tree_leaves(entry.arrays):
      assert leaf.sharding.device_set == pipe.shardings[0].device_set


@pytest.mark.parametrize('layout', [((0, 1, 2, 3), (4, 5)), ((0,), (1, 2, 3, 4), (5, 6))])
def test_uneven_meshes_between_stages_match_the_reference(layout):
  """Stages on different numbers of devices: the transfers reshard between them."""
  batches = tiny_batches(NUM_BATCHES)
  pipe, modules, variables = fdg([devices(*d) for d in layout])
  state, _, _ = run_fed(pipe, batches, variables)
  expected, _, _ = naive_fdg(modules, variables, make_optimizer(), batches, BETA, 'vjp')
  assert_matches(pipe, state, expected)
  logits = pipe.predict(state, batches[0][0])
  assert logits.sharding == pipe.shardings[-1]


def test_ddg_on_two_by_two_devices_matches_the_reference():
  batches = tiny_batches(NUM_BATCHES)
  pipe, modules, variables = fdg([devices(0, 1), devices(2, 3)], engine=baselines.DDGPipeline)
  state, _, _ = run_fed(pipe, batches, variables)
  expected, expected_opt, _ = naive_ddg(modules, variables, make_optimizer(), batches, BETA,
                                        'vjp')
  assert_matches(pipe, state, expected, expected_opt)


def test_dgl_on_two_by_two_devices_matches_the_reference():
  batches = tiny_batches(NUM_BATCHES)
  modules, variables = initial_variables(2)
  pipe = baselines.DGLPipeline(modules, make_optimizer(), num_classes=NUM_CLASSES,
                               aux_head=aux_heads.get('conv'), placements=[devices(4, 5), devices(6, 7)])
  state = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
  aux_initial = jax.device_get(pipe.aux_variables(state))
  for images, labels in batches:
    state, _ = pipe.step(state, images, labels)
  state, _ = pipe.drain(state)
  params, stats, _ = naive_dgl(modules, [aux_heads.ConvAuxHead(NUM_CLASSES)], variables,
                               aux_initial, make_optimizer(), batches)
  got = jax.device_get(state.stages)
  chex.assert_trees_all_close([s.params for s in got], params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close([s.batch_stats for s in got], stats, rtol=1e-5, atol=1e-6)
  assert pipe.num_extra_params(state) == sum(pipe.aux_param_counts(state))


def test_backprop_on_two_devices_equals_one_device():
  """K = 1, D = 2 is data-parallel back-propagation: the gradients of the split batch are
  summed, so it computes what one device computes."""
  batches = tiny_batches(NUM_BATCHES)
  results = []
  for placement in (devices(0), devices(0, 1)):
    pipe, _, variables = fdg([placement])
    state, _, _ = run_fed(pipe, batches, variables)
    results.append(jax.device_get(pipe.stage_variables(state)))
    evaluated = pipe.evaluate(state, [(images, labels) for images, labels in batches[:2]])
    results.append(evaluated)
  chex.assert_trees_all_close(results[2], results[0], rtol=1e-5, atol=1e-6)
  assert results[3] == pytest.approx(results[1], rel=1e-5)


@pytest.mark.parametrize('stash', ['vjp', 'recompute'])
def test_resume_with_spread_stages_is_bit_exact(stash, tmp_path):
  """A checkpoint of K = 2 x D = 2 mid-stream restores every array with the sharding it had,
  and the resumed run ends bit for bit where the straight one does."""
  batches = tiny_batches(NUM_BATCHES)
  placements = [devices(0, 1), devices(2, 3)]
  pipe, _, variables = fdg(placements, stash)
  straight, _, _ = run_fed(pipe, batches, variables)
  expected = jax.device_get(pipe.stage_variables(straight))

  pipe, _, variables = fdg(placements, stash)
  state = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
  for images, labels in batches[:3]:
    state, _ = pipe.step(state, images, labels)
  def shardings(state):
    return [leaf.sharding for leaf in jax.tree_util.tree_leaves((state.stages, state.saved))]
  saved_shardings = shardings(state)
  checkpoint.Checkpointer(str(tmp_path)).save(3, pipe, state)
  del state
  pipe, _, variables = fdg(placements, stash)
  fresh = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
  restored, _ = checkpoint.Checkpointer(str(tmp_path)).restore(pipe, fresh)
  assert shardings(restored) == saved_shardings
  for images, labels in batches[3:]:
    restored, _ = pipe.step(restored, images, labels)
  resumed, _ = pipe.drain(restored)
  chex.assert_trees_all_equal(jax.device_get(pipe.stage_variables(resumed)), expected)


@pytest.mark.parametrize('placement, message', [
    ('not devices', 'must be a device, a list of devices or a sharding'),
    (jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ('data', 'model')),
        jax.sharding.PartitionSpec('data', 'model')), 'must split at most the batch axis')])
def test_bad_placements_are_refused(placement, message):
  modules, _ = initial_variables(1)
  with pytest.raises(ValueError, match=message):
    pipeline.Pipeline(modules, make_optimizer(), placements=[placement])


# ------------------------------------------------------------- methods over microbatches


def microbatched(placements, name, microbatches, grad_clip=0.0):
  modules, variables = initial_variables(len(placements))
  pipe = pipeline.Pipeline(
      modules, make_optimizer(), beta=BETA, placements=placements,
      method=methods.Microbatched(name, microbatches, grad_clip=grad_clip))
  return pipe, variables


@pytest.mark.parametrize('name, microbatches, grad_clip', [
    ('gpipe', 2, 0.0), ('1f1b', 4, 0.05), ('fdg', 2, 0.0), ('fdg', 4, 0.0)])
def test_methods_over_microbatches_on_two_by_two_devices_equal_one_device_per_stage(
    name, microbatches, grad_clip):
  """GPipe, 1F1B (clipped by the whole model's norm: a stage's squared norm is reduced over its
  devices, then moved to the other stage's) and FDG with microbatches at K = 2 x D = 2: each
  microbatch split over its stage's devices computes what one device per stage computes (batch 8:
  a microbatch of 2 or 4, split in 1 or 2 per device)."""
  batches = tiny_batches(NUM_BATCHES, batch_size=8)
  results = []
  for placements in ([devices(0), devices(1)], [devices(0, 1), devices(2, 3)]):
    pipe, variables = microbatched(placements, name, microbatches, grad_clip)
    state, _, _ = run_fed(pipe, batches, variables)
    assert [int(s.step) for s in state.stages] == [NUM_BATCHES] * 2
    results.append(jax.device_get(pipe.stage_variables(state)))
  chex.assert_trees_all_close(results[1], results[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', ['1f1b', 'fdg'])
@pytest.mark.parametrize('layout, batch_size, microbatches', [
    (((0, 1), (2, 3)), 6, 3), (((0, 1, 2), (3, 4)), 12, 2)])
def test_batches_already_split_over_a_stage_split_into_microbatches(
    name, layout, batch_size, microbatches):
  """What the trainer feeds: each batch already on its stage's devices (inputs on stage 0's,
  targets on the last stage's), split over them. The microbatches are cut from that split
  batch, and their boundaries need not be the devices' (a batch of 6 on 2 devices as 3 + 3, its
  microbatches 2 + 2 + 2): the batch over M dividing by each stage's D is enough. Every
  microbatch in flight stays split over its stage's devices, and the run computes what one
  device per stage computes from host batches."""
  batches = tiny_batches(NUM_BATCHES, batch_size=batch_size)
  pipe, variables = microbatched([devices(0), devices(1)], name, microbatches)
  state, _, _ = run_fed(pipe, batches, variables)
  expected = jax.device_get(pipe.stage_variables(state))

  pipe, variables = microbatched([devices(*d) for d in layout], name, microbatches)
  state = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
  for inputs, labels in batches:
    inputs = distributed.put(inputs, pipe.shardings[0])
    labels = distributed.put(labels, pipe.shardings[-1])
    assert len(inputs.sharding.device_set) == len(layout[0])
    state, _ = pipe.step(state, inputs, labels)
    kept = state.microbatches
    if name == 'fdg':   # what is in flight between batches: on its stage's devices, split
      assert kept.in_flight
      batch_shaped = ([(pipe.shardings[k], v) for k, d in enumerate(kept.arrived)
                       for v in d.values()] +
                      [(pipe.shardings[0], v) for v in kept.inputs.values()] +
                      [(pipe.shardings[-1], v) for v in kept.targets.values()] +
                      [(pipe.shardings[-1], v) for v in kept.held.values()])
      assert batch_shaped
      for sharding, value in batch_shaped:
        for leaf in jax.tree_util.tree_leaves(value):
          assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
          assert not leaf.sharding.is_fully_replicated
    else:
      assert kept is None
  state, _ = pipe.drain(state)
  chex.assert_trees_all_close(jax.device_get(pipe.stage_variables(state)), expected,
                              rtol=1e-5, atol=1e-6)


def test_resume_of_fdg_with_microbatches_on_spread_stages_is_bit_exact(tmp_path):
  """FDG over 4 microbatches at K = 2 x D = 2, checkpointed with microbatches in flight: every
  array (the stages' states, gradient sums, saved forwards, activations, cotangents, inputs and
  targets in flight) restores with the sharding it had, and the resumed run ends bit for bit
  where the straight one does."""
  batches = tiny_batches(NUM_BATCHES, batch_size=8)
  placements = [devices(0, 1), devices(2, 3)]
  pipe, variables = microbatched(placements, 'fdg', 4)
  straight, _, _ = run_fed(pipe, batches, variables)
  expected = jax.device_get(pipe.stage_variables(straight))

  pipe, variables = microbatched(placements, 'fdg', 4)
  state = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
  for images, labels in batches[:3]:
    state, _ = pipe.step(state, images, labels)
  def shardings(state):
    return [leaf.sharding for leaf in jax.tree_util.tree_leaves((state.stages,
                                                                 state.microbatches))]
  saved_shardings = shardings(state)
  assert len(saved_shardings) > len(jax.tree_util.tree_leaves(state.stages))
  checkpointer = checkpoint.Checkpointer(str(tmp_path))
  checkpointer.save(3, pipe, state)
  checkpointer.wait()
  del state
  pipe, variables = microbatched(placements, 'fdg', 4)
  fresh = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
  restored, _ = checkpointer.restore(pipe, fresh)
  assert shardings(restored) == saved_shardings
  for images, labels in batches[3:]:
    restored, _ = pipe.step(restored, images, labels)
  resumed, _ = pipe.drain(restored)
  chex.assert_trees_all_equal(jax.device_get(pipe.stage_variables(resumed)), expected)
