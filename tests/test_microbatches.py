"""Synchronous schedules (GPipe, 1F1B) against back-propagation: each batch as M microbatches,
one update per batch with the mean of their gradients, BatchNorm per microbatch (as GPipe), and
gradient clipping by the whole model's norm. The reference is written from that rule alone: one
device, no jit, the stages composed."""

import functools

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

from fdg_jax.engine import checkpoint
from fdg_jax.engine import methods
from fdg_jax.engine import pipeline
from fdg_jax.engine import schedule
from tiny import initial_variables
from tiny import make_optimizer
from tiny import mean_loss
from tiny import tiny_batches


def naive_microbatched_bp(modules, variables, optimizer, batches, microbatches):
  """BP of the composed stages with per-microbatch BatchNorm: for each batch, each microbatch's
  mean-loss gradient at the batch's parameters (running statistics updated microbatch after
  microbatch), their mean, one optimizer step."""
  params = [v['params'] for v in variables]
  stats = [v['batch_stats'] for v in variables]
  opt_state = optimizer.init(params)
  for inputs, labels in batches:
    size = len(labels) // microbatches
    grads = None
    for m in range(microbatches):
      x, y = inputs[m * size:(m + 1) * size], labels[m * size:(m + 1) * size]

      def loss(p, x=x, y=y):
        new_stats, h = [], x
        for module, p_k, s_k in zip(modules, p, stats):
          h, mutated = module.apply({'params': p_k, 'batch_stats': s_k}, h, train=True,
                                    mutable=['batch_stats'])
          new_stats.append(mutated['batch_stats'])
        return mean_loss(h, y), new_stats

      g, stats = jax.grad(loss, has_aux=True)(params)
      grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
    grads = jax.tree.map(lambda g: g / microbatches, grads)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  return [{'params': p, 'batch_stats': s} for p, s in zip(params, stats)]


def train(name, num_stages, microbatches, optimizer, batches, grad_clip=0.0, devices=None):
  modules, variables = initial_variables(num_stages)
  method = methods.Microbatched(name, microbatches, grad_clip=grad_clip)
  pipe = pipeline.Pipeline(modules, optimizer, mean_loss_per_example,
                           placements=devices or jax.devices()[:num_stages], method=method)
  state = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
  infos = []
  for inputs, labels in batches:
    state, info = pipe.step(state, inputs, labels)
    infos.append(info)
  return pipe, state, infos, modules, variables


def mean_loss_per_example(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


SLOW = pytest.mark.slow   # more stages and microbatches: more to compile


@pytest.mark.parametrize('name', ['gpipe', '1f1b'])
@pytest.mark.parametrize('num_stages, microbatches', [
    (1, 2), (2, 4), (4, 2), pytest.param(1, 1, marks=SLOW), pytest.param(2, 1, marks=SLOW),
    pytest.param(3, 4, marks=SLOW), pytest.param(4, 8, marks=SLOW),
    pytest.param(3, 8, marks=SLOW)])
def test_synchronous_schedule_is_bp_with_sgd(name, num_stages, microbatches):
  batches = tiny_batches(3, batch_size=8)
  pipe, state, infos, modules, variables = train(name, num_stages, microbatches,
                                                 make_optimizer(), batches)
  expected = naive_microbatched_bp(modules, variables, make_optimizer(), batches, microbatches)
  chex.assert_trees_all_close(jax.device_get(pipe.stage_variables(state)), expected,
                              rtol=1e-5, atol=1e-6)
  assert [int(s.step) for s in state.stages] == [3] * num_stages   # one update per batch
  assert [info.updated for info in infos] == [(b,) * num_stages for b in range(3)]
  assert not state.in_flight and pipe.drain(state) == (state, [])


@pytest.mark.parametrize('name', ['gpipe', '1f1b'])
@pytest.mark.parametrize('num_stages, microbatches, grad_clip', [
    (2, 4, 0.05), pytest.param(2, 4, 0.0, marks=SLOW), pytest.param(1, 2, 0.05, marks=SLOW),
    pytest.param(4, 2, 0.05, marks=SLOW)])
def test_synchronous_schedule_is_bp_with_adamw_and_the_whole_models_clipping(
    name, num_stages, microbatches, grad_clip):
  batches = tiny_batches(3, batch_size=8)
  adamw = optax.adamw(1e-2, weight_decay=0.1)
  pipe, state, _, modules, variables = train(name, num_stages, microbatches, adamw, batches,
                                             grad_clip=grad_clip)
  reference = optax.chain(optax.clip_by_global_norm(grad_clip), adamw) if grad_clip else adamw
  expected = naive_microbatched_bp(modules, variables, reference, batches, microbatches)
  chex.assert_trees_all_close(jax.device_get(pipe.stage_variables(state)), expected,
                              rtol=1e-5, atol=1e-6)
  if grad_clip:   # the clip took effect: per-stage clipping would give other numbers
    unclipped = naive_microbatched_bp(modules, variables, adamw, batches, microbatches)
    with pytest.raises(AssertionError):
      chex.assert_trees_all_close(expected, unclipped, rtol=1e-5, atol=1e-6)


def test_gpipe_with_re_materialisation_is_bp():
  """residual_policy='nothing_saveable' keeps only each microbatch's stage input and
  recomputes the rest in its backward (GPipe's re-materialisation): still BP's update."""
  batches = tiny_batches(3, batch_size=8)
  modules, variables = initial_variables(2)
  pipe = pipeline.Pipeline(modules, make_optimizer(), mean_loss_per_example,
                           placements=jax.devices()[:2], residual_policy='nothing_saveable',
                           method=methods.Microbatched('gpipe', 4))
  state = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
  for inputs, labels in batches:
    state, _ = pipe.step(state, inputs, labels)
  expected = naive_microbatched_bp(modules, variables, make_optimizer(), batches, 4)
  chex.assert_trees_all_close(jax.device_get(pipe.stage_variables(state)), expected,
                              rtol=1e-5, atol=1e-6)


def test_microbatch_metrics_cover_the_batch():
  """The last stage's metrics of a step merge its M microbatches: the batch's mean loss at the
  parameters it started from, each microbatch normalised on its own."""
  batches = tiny_batches(1, batch_size=8)
  _, _, infos, modules, variables = train('1f1b', 2, 4, make_optimizer(), batches)
  inputs, labels = batches[0]
  losses = []
  for m in range(4):
    h = inputs[2 * m:2 * m + 2]
    for module, v in zip(modules, variables):
      h = module.apply(v, h, train=True, mutable=['batch_stats'])[0]
    losses.append(mean_loss(h, labels[2 * m:2 * m + 2]))
  metrics = infos[0].local_metrics[-1].compute()
  assert float(metrics['loss']) == pytest.approx(float(jnp.mean(jnp.stack(losses))), rel=1e-5)


def test_a_batch_the_microbatches_do_not_divide_is_refused():
  batches = tiny_batches(1, batch_size=6)
  with pytest.raises(ValueError, match='does not split into 4 microbatches'):
    train('gpipe', 2, 4, make_optimizer(), batches)


# ------------------------------------------------------------- FDG with microbatches (2BW)


def naive_fdg_microbatches(modules, variables, optimizer, batches, microbatches, beta,
                           stage_steps=None, horizons=None):
  """FDG with microbatches from DESIGN section 8, one device, no jit. Lockstep tick t: a
  non-last stage k first back-propagates the cotangent of microbatch t - 2(K-1) + k through the
  forward it made (its parameters, statistics and input then; the cotangent scaled by beta) and
  adds the gradient to its batch's sum; if the microbatch it forwards next starts a batch, it
  applies the mean gradient of every batch whose backwards are all in (in batch order); then it
  forwards microbatch t - k (BatchNorm in training mode). The last stage forwards, takes the
  gradient of the microbatch's mean loss and its input cotangent at its current parameters. With
  no forward left (the drain), completed batches are applied at once.

  The update is `optimizer`'s, or `stage_steps[k](params, mean_gradient, batch_params)` (a
  compensation written by hand; batch_params: the parameters the batch's forwards were made
  at); with `horizons`, stage k forwards at params + horizons[k] * (its last change of params),
  weight prediction."""
  K, M = len(modules), microbatches
  params = [v['params'] for v in variables]
  stats = [v['batch_stats'] for v in variables]
  if stage_steps is None:
    opt_states = [optimizer.init(p) for p in params]

    def optax_step(k, p, g, _):
      updates, opt_states[k] = optimizer.update(g, opt_states[k], p)
      return optax.apply_updates(p, updates)

    stage_steps = [functools.partial(optax_step, k) for k in range(K)]
  last_change = [jax.tree.map(jnp.zeros_like, p) for p in params]
  batch_params = [{} for _ in range(K)]   # batch -> the parameters its forwards were made at
  xs, ys = [], []
  for inputs, labels in batches:
    size = len(labels) // M
    xs += [inputs[m * size:(m + 1) * size] for m in range(M)]
    ys += [labels[m * size:(m + 1) * size] for m in range(M)]
  total = len(xs)
  sums = [{} for _ in range(K)]
  done = [{} for _ in range(K)]
  applied = [0] * K
  forwards = [{} for _ in range(K)]    # microbatch -> (params, stats, input) of its forward
  activation, cotangent = {}, {}       # (stage, microbatch) -> value, arriving next tick

  def forward(k, p, s, x):
    y, new = modules[k].apply({'params': p, 'batch_stats': s}, x, train=True,
                              mutable=['batch_stats'])
    return y, new['batch_stats']

  def add(k, i, g):
    b = i // M
    sums[k][b] = g if b not in sums[k] else jax.tree.map(jnp.add, sums[k][b], g)
    done[k][b] = done[k].get(b, 0) + 1

  def apply_completed(k):
    while done[k].get(applied[k]) == M:
      g = jax.tree.map(lambda a: a / M, sums[k].pop(applied[k]))
      before = params[k]
      params[k] = stage_steps[k](before, g, batch_params[k].pop(applied[k]))
      last_change[k] = jax.tree.map(jnp.subtract, params[k], before)
      applied[k] += 1

  for t in range(total + 2 * (K - 1) + 1):
    arriving_activation, arriving_cotangent = {}, {}
    for k in range(K):
      f, b = t - k, t - (2 * (K - 1) - k)
      f = f if 0 <= f < total else None
      b = b if 0 <= b < total else None
      if k < K - 1 and b is not None:
        p, s, x = forwards[k].pop(b)
        c = cotangent.pop((k, b)) * beta
        if k == 0:
          g = jax.vjp(lambda q: forward(k, q, s, x)[0], p)[1](c)[0]
        else:
          g, dx = jax.vjp(lambda q, h: forward(k, q, s, h)[0], p, x)[1](c)
          arriving_cotangent[k - 1, b] = dx
        add(k, b, g)
      if f is not None and f % M == 0:
        apply_completed(k)
      if f is not None:
        x = xs[f] if k == 0 else activation.pop((k, f))
        batch_params[k].setdefault(f // M, params[k])
        if k < K - 1:
          p = params[k]
          if horizons:
            p = jax.tree.map(lambda w, u: w + horizons[k] * u, p, last_change[k])
          forwards[k][f] = (p, stats[k], x)
          y, stats[k] = forward(k, p, stats[k], x)
          arriving_activation[k + 1, f] = y
        else:
          def loss(q, h, s=stats[k], f=f):
            y, new_stats = forward(k, q, s, h)
            return mean_loss(y, ys[f]), new_stats
          (g, dx), stats[k] = jax.grad(loss, argnums=(0, 1), has_aux=True)(params[k], x)
          if k > 0:
            arriving_cotangent[k - 1, f] = dx
          add(k, f, g)
      if f is None:
        apply_completed(k)
    activation.update(arriving_activation)
    cotangent.update(arriving_cotangent)
  assert applied == [len(batches)] * K and not activation and not cotangent
  return [{'params': p, 'batch_stats': s} for p, s in zip(params, stats)]


def train_fdg(num_stages, microbatches, optimizer, batches, beta):
  modules, variables = initial_variables(num_stages)
  method = methods.Microbatched('fdg', microbatches)
  pipe = pipeline.Pipeline(modules, optimizer, mean_loss_per_example, beta=beta,
                           placements=jax.devices()[:num_stages], method=method)
  state = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
  infos = []
  for inputs, labels in batches:
    state, info = pipe.step(state, inputs, labels)
    infos.append(info)
  state, drained = pipe.drain(state)
  return pipe, state, infos + drained, modules, variables


@pytest.mark.parametrize('num_stages, microbatches', [
    (2, 2), (3, 4), (4, 2), pytest.param(1, 4, marks=SLOW), pytest.param(2, 1, marks=SLOW),
    pytest.param(3, 1, marks=SLOW), pytest.param(4, 8, marks=SLOW),
    pytest.param(4, 4, marks=SLOW)])
def test_fdg_with_microbatches_matches_its_naive_reference(num_stages, microbatches):
  batches = tiny_batches(5, batch_size=8)
  pipe, state, _, modules, variables = train_fdg(num_stages, microbatches, make_optimizer(),
                                                 batches, beta=0.5)
  expected = naive_fdg_microbatches(modules, variables, make_optimizer(), batches,
                                    microbatches, beta=0.5)
  chex.assert_trees_all_close(jax.device_get(pipe.stage_variables(state)), expected,
                              rtol=1e-5, atol=1e-6)
  assert [int(s.step) for s in state.stages] == [5] * num_stages   # one update per batch
  assert not state.in_flight


@pytest.mark.parametrize('num_stages, microbatches', [(2, 4), pytest.param(3, 2, marks=SLOW)])
def test_fdg_with_microbatches_and_adamw_matches_its_naive_reference(num_stages, microbatches):
  batches = tiny_batches(4, batch_size=8)
  adamw = optax.adamw(1e-2, weight_decay=0.1)
  pipe, state, _, modules, variables = train_fdg(num_stages, microbatches, adamw, batches,
                                                 beta=1.0)
  expected = naive_fdg_microbatches(modules, variables, adamw, batches, microbatches, beta=1.0)
  chex.assert_trees_all_close(jax.device_get(pipe.stage_variables(state)), expected,
                              rtol=1e-5, atol=1e-6)


def test_fdg_with_one_microbatch_is_fdg():
  """M = 1 through the microbatch programs computes what the FDG engine computes."""
  batches = tiny_batches(5, batch_size=8)
  pipe, state, _, modules, variables = train_fdg(3, 1, make_optimizer(), batches, beta=0.5)
  fdg = pipeline.Pipeline(modules, make_optimizer(), mean_loss_per_example, beta=0.5,
                          placements=jax.devices()[:3])
  fdg_state = fdg.init(jax.random.key(1), batches[0][0], variables=variables)
  for inputs, labels in batches:
    fdg_state, _ = fdg.step(fdg_state, inputs, labels)
  fdg_state, _ = fdg.drain(fdg_state)
  chex.assert_trees_all_close(jax.device_get(pipe.stage_variables(state)),
                              jax.device_get(fdg.stage_variables(fdg_state)),
                              rtol=1e-5, atol=1e-6)


def fdg_pipeline(name, num_stages, microbatches, batches, compensation='none'):
  """A fresh pipeline (new compilation caches and residual structures, as a new process) over
  tiny.py's BatchNorm blocks, and its initial state."""
  modules, variables = initial_variables(num_stages)
  pipe = pipeline.Pipeline(modules, make_optimizer(), mean_loss_per_example, beta=0.5,
                           placements=jax.devices()[:num_stages], compensation=compensation,
                           method=methods.Microbatched(name, microbatches))
  return pipe, pipe.init(jax.random.key(1), batches[0][0], variables=variables)


def run_batches(pipe, state, batches):
  for inputs, labels in batches:
    state, _ = pipe.step(state, inputs, labels)
  return state


@pytest.mark.parametrize('name, num_stages, microbatches, compensation', [
    ('fdg', 3, 2, 'none'), ('fdg', 2, 4, 'weight_prediction'), ('1f1b', 2, 2, 'none'),
    pytest.param('fdg', 2, 4, 'none', marks=SLOW),
    pytest.param('fdg', 3, 2, 'weight_prediction', marks=SLOW)])
def test_a_checkpoint_with_microbatches_in_flight_resumes_bit_for_bit(
    name, num_stages, microbatches, compensation, tmp_path):
  """FDG's microbatches in flight (activations, cotangents, saved forwards, gradient sums,
  inputs and targets not yet used, each stage's progress) go into the checkpoint; a synchronous
  schedule has none between batches. Each saved forward is stored compactly (what determines
  it: its statistics and key, its batch's parameters once per batch; its stage input from the
  previous stage's rebuilt forward or, at stage 0, from the data stream, as the trainer saves),
  and so is every activation in flight. Resumed, the run equals the uninterrupted one bit for
  bit; weight prediction's extrapolated parameters are the ones kept."""
  batches = tiny_batches(6, batch_size=8)
  stream = [inputs for inputs, _ in batches]
  pipe, state = fdg_pipeline(name, num_stages, microbatches, batches, compensation)
  straight = jax.device_get(pipe.stage_variables(pipe.drain(run_batches(pipe, state, batches))[0]))
  pipe, state = fdg_pipeline(name, num_stages, microbatches, batches, compensation)
  state = run_batches(pipe, state, batches[:3])
  assert state.in_flight == (name == 'fdg')
  if name == 'fdg':
    kept = checkpoint.to_tree(pipe, state, stream.__getitem__)[1]['microbatches']
    records = [(int(k), record) for k, d in kept['saved'].items() for record in d.values()]
    assert len(records) == sum(map(len, state.microbatches.saved)) > 0
    for k, record in records:
      assert record['form'] == 'compact'
      assert record['x_from_stream' if k == 0 else 'x_from_previous'], (k, record)
    arrived = [k for k, d in enumerate(state.microbatches.arrived) for kind, _ in d if kind == 'F']
    assert sorted(int(k) for k, d in kept['arrived_from_previous'].items()
                  for _ in d) == sorted(arrived)
  checkpointer = checkpoint.Checkpointer(str(tmp_path))
  checkpointer.save(3, pipe, state, batch_inputs=stream.__getitem__)
  checkpointer.wait()
  pipe, fresh = fdg_pipeline(name, num_stages, microbatches, batches, compensation)
  state, _ = checkpointer.restore(pipe, fresh, batch_inputs=stream.__getitem__)
  state = run_batches(pipe, state, batches[3:])
  chex.assert_trees_all_equal(jax.device_get(pipe.stage_variables(pipe.drain(state)[0])),
                              straight)


def written_before_compact_forms(arrays: dict, metadata: dict) -> tuple[dict, dict]:
  """A checkpoint tree of microbatches in flight stored in full (every `rebuilt_output` None,
  no stream) as the code before compact forms wrote it (commit 8cbdf1f and earlier): each saved
  forward as its residual leaves, their input specs apart, no parameters per batch (delay
  compensation's apart), every activation in flight stored."""
  kept, meta = dict(arrays['microbatches']), dict(metadata['microbatches'])
  kept['saved'] = {k: {i: stored['residuals'] for i, stored in d.items()}
                   for k, d in kept['saved'].items()}
  del kept['forward_params']
  meta['input_specs'] = {k: {i: record['input_spec'] for i, record in d.items()}
                         for k, d in meta.pop('saved').items()}
  assert not meta.pop('arrived_from_previous')   # nothing is rebuilt: everything is stored
  return {**arrays, 'microbatches': kept}, {**metadata, 'microbatches': meta}


def test_compact_microbatch_checkpoint_is_smaller_and_older_forms_restore(tmp_path, monkeypatch):
  """FDG, K = 3, M = 2: the compact checkpoint's arrays are a fraction of the full form's
  (every residual leaf; what the code before compact forms wrote) and it is smaller on disk
  than the full form with inputs (the fallback where a rebuild would not be bit for bit). All
  three restore the same microbatches in flight, bit for bit."""
  batches = tiny_batches(4, batch_size=8)
  stream = [inputs for inputs, _ in batches]
  pipe, state = fdg_pipeline('fdg', 3, 2, batches)
  straight = jax.device_get(pipe.stage_variables(pipe.drain(run_batches(pipe, state, batches))[0]))
  pipe, state = fdg_pipeline('fdg', 3, 2, batches)
  state = run_batches(pipe, state, batches[:3])

  def shares_batch_parameters(kept):   # one copy of the parameters per batch in flight
    assert [len(p) for p in kept.forward_params] == [
        schedule.delay(k, 3, 'fdg', 2) for k in range(2)] + [0]
    return all(entry.inputs['params'] is kept.forward_params[k][i // 2]
               for k, entries in enumerate(kept.saved) for i, entry in entries.items())
  assert shares_batch_parameters(state.microbatches)
  compact_bytes = checkpoint.Checkpointer(str(tmp_path / 'compact')).save(
      3, pipe, state, batch_inputs=stream.__getitem__)
  with monkeypatch.context() as patch:
    patch.setattr(checkpoint, 'rebuilt_output', lambda pipe, k, entry: None)
    full_bytes = checkpoint.Checkpointer(str(tmp_path / 'full')).save(3, pipe, state)
    old = written_before_compact_forms(*checkpoint.to_tree(pipe, state))
  forms = {record['form'] for d in checkpoint.to_tree(pipe, state)[1]['microbatches'][
      'saved'].values() for record in d.values()}
  assert forms == {'compact'}
  old_bytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(old[0]))
  assert 5 * compact_bytes < old_bytes < full_bytes, (compact_bytes, old_bytes, full_bytes)

  def size(name):
    return checkpoint.Checkpointer(str(tmp_path / name)).size_on_disk(3)
  assert size('compact') < size('full')

  def in_flight(restored):   # what the next steps use
    kept = restored.microbatches
    assert kept.progress == state.microbatches.progress
    return jax.device_get((kept.arrived, [{i: e.arrays for i, e in d.items()} for d in kept.saved],
                           kept.sums, kept.held, kept.inputs, kept.targets))

  expected = in_flight(state)
  expected_inputs = jax.device_get([{i: e.inputs for i, e in d.items()}
                                    for d in state.microbatches.saved])
  for name in ('compact', 'full'):
    other, fresh = fdg_pipeline('fdg', 3, 2, batches)
    restored, _ = checkpoint.Checkpointer(str(tmp_path / name)).restore(
        other, fresh, batch_inputs=stream.__getitem__)
    chex.assert_trees_all_equal(in_flight(restored), expected)
    chex.assert_trees_all_equal(jax.device_get([{i: e.inputs for i, e in d.items()}
                                                for d in restored.microbatches.saved]),
                                expected_inputs)
    assert shares_batch_parameters(restored.microbatches)
  # The older form has no inputs and no parameters per batch (a batch half forwarded keeps them
  # from its next forward); it resumes bit for bit.
  other, fresh = fdg_pipeline('fdg', 3, 2, batches)
  restored = checkpoint.from_tree(other, fresh, *old)
  chex.assert_trees_all_equal(in_flight(restored), expected)
  resumed = other.drain(run_batches(other, restored, batches[3:]))[0]
  chex.assert_trees_all_equal(jax.device_get(other.stage_variables(resumed)), straight)


@pytest.mark.parametrize('name, grad_clip, shared_device', [
    ('1f1b', 0.05, False), ('fdg', 0.0, False), pytest.param('gpipe', 0.0, True, marks=SLOW)])
def test_the_timeline_has_one_event_per_jitted_call(name, grad_clip, shared_device, tmp_path):
  """The profiler timeline of a method over microbatches (K = 3, M = 2): each step's jitted
  calls (`StepInfo.calls`: F, B, the last stage's fused F and B, the norm, the update; a call
  that starts its batch's gradient sum is a program of its own) each tied to one execution on
  its stage's device, and drawn."""
  from fdg_jax.engine import timeline   # pylint: disable=import-outside-toplevel
  num_stages, microbatches = 3, 2
  batches = tiny_batches(5, batch_size=8)
  modules, variables = initial_variables(num_stages)
  pipe = pipeline.Pipeline(
      modules, make_optimizer(), mean_loss_per_example, beta=0.5,
      placements=[jax.devices()[0]] * num_stages if shared_device else None,
      method=methods.Microbatched(name, microbatches, grad_clip=grad_clip))
  state = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
  for inputs, labels in batches[:3]:   # compiles every program outside the trace
    state, _ = pipe.step(state, inputs, labels)
  infos = []
  recorder = timeline.TimelineRecorder(pipe, str(tmp_path / 'trace'))
  recorder.start(state)
  for inputs, labels in batches[3:]:
    state, info = pipe.step(state, inputs, labels)
    recorder.add(info)
    infos.append(info)
  events = recorder.stop(state)
  calls = [call for info in infos for call in info.calls]
  per_batch = 2 * microbatches * (num_stages - 1) + microbatches + num_stages * (
      1 + (grad_clip > 0))   # F and B, the last stage's F+B, the updates (and norms)
  assert len(calls) == len(events) == 2 * per_batch
  assert sorted((e.stage, e.phase, e.batch) for e in events) == sorted(calls)
  assert {e.phase for e in events} >= {'forward', 'backward first', 'backward', 'loss first',
                                       'loss', 'update'} | ({'norm'} if grad_clip else set())
  for e in events:
    assert e.start_ms <= e.end_ms and e.devices == ((0,) if shared_device else (e.stage,)), e
    assert e.dispatch_start_ms is not None and e.start_ms >= e.dispatch_start_ms, e
  png = tmp_path / 'timeline.png'
  timeline.draw_timeline(events, str(png))
  assert png.stat().st_size > 1000
