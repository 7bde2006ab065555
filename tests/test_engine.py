"""The engine against an independent, naive, single-device reference of docs/algorithm.md."""

import collections

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fdg_jax.engine import pipeline
from fdg_jax.engine import stage_functions
from fdg_jax.models import partition
from tiny import (assert_matches, initial_variables, make_optimizer, mean_loss, tiny_batches,
                  tiny_blocks)

BETA = 0.7


def naive_fdg(modules, variables, optimizer, batches, beta, stash, compounded=True):
  """docs/algorithm.md written as plainly as possible: one device, no jit, explicit queues.

  Stage k forwards batch t-k at iteration t; the cotangent it receives at iteration t belongs to
  batch t-k-2(K-1-k). Not `compounded`: each delayed stage's gradient is beta times its true
  delayed gradient, and the cotangent it sends down is unscaled. Returns every stage's final {'params', 'batch_stats'} and opt state, and
  the list of (iteration, stage, batch) of every applied gradient.
  """
  K, N = len(modules), len(batches)
  params = [v['params'] for v in variables]
  stats = [v['batch_stats'] for v in variables]
  opt_states = [optimizer.init(p) for p in params]
  saved = [dict() for _ in range(K)]          # stage -> {batch: what the backward needs}
  inbox_x, inbox_ct = {}, {}                  # stage -> (batch, array), sent last iteration
  applied = []

  def forward(k, p, s, x):
    y, new = modules[k].apply({'params': p, 'batch_stats': s}, x, train=True,
                              mutable=['batch_stats'])
    return y, new['batch_stats']

  def update(k, grads):
    updates, opt_states[k] = optimizer.update(grads, opt_states[k], params[k])
    params[k] = optax.apply_updates(params[k], updates)

  for t in range(N + 2 * (K - 1)):
    out_x, out_ct = {}, {}
    for k in range(K):
      b = t - k   # the batch stage k forwards now
      if k == K - 1:
        if not 0 <= b < N:
          continue
        x = batches[b][0] if K == 1 else inbox_x.pop(k)[1]
        labels = batches[b][1]

        def loss(p, x):
          logits, new_stats = forward(k, p, stats[k], x)
          return mean_loss(logits, labels), new_stats

        (_, stats[k]), (g, x_ct) = jax.value_and_grad(loss, (0, 1), has_aux=True)(params[k], x)
        update(k, g)
        applied.append((t, k, b))
        if k > 0:
          out_ct[k - 1] = (b, x_ct)
        continue
      # 1. backward of the delayed cotangent, scaled by beta; 2. update.
      if k in inbox_ct:
        cb, ct = inbox_ct.pop(k)
        assert cb == t - k - 2 * (K - 1 - k)
        if compounded:
          ct = beta * ct
        if stash == 'vjp':
          vjp = saved[k].pop(cb)
        else:
          x_old = saved[k].pop(cb)
          _, vjp, _ = jax.vjp(lambda p, x: forward(k, p, stats[k], x), params[k], x_old,
                              has_aux=True)
        g, x_ct = vjp(ct)
        if not compounded:
          g = jax.tree_util.tree_map(lambda leaf: beta * leaf, g)
        update(k, g)
        applied.append((t, k, cb))
        if k > 0:
          out_ct[k - 1] = (cb, x_ct)
      # 3. forward with the updated parameters.
      if 0 <= b < N:
        x = batches[b][0] if k == 0 else inbox_x.pop(k)[1]
        y, vjp, stats[k] = jax.vjp(lambda p, x: forward(k, p, stats[k], x), params[k], x,
                                   has_aux=True)
        saved[k][b] = vjp if stash == 'vjp' else x
        out_x[k + 1] = (b, y)
    inbox_x, inbox_ct = out_x, out_ct
  assert not inbox_x and not inbox_ct and not any(saved)
  return ([{'params': p, 'batch_stats': s} for p, s in zip(params, stats)], opt_states,
          applied)


def run_engine(num_stages, batches, beta=BETA, stash='vjp', placements=None,
               residual_policy=None):
  modules, variables = initial_variables(num_stages)
  if placements is None:
    placements = jax.devices()[:num_stages]
  pipe = pipeline.Pipeline(modules, make_optimizer(), pipeline.cross_entropy_loss, beta=beta,
                           stash=stash, residual_policy=residual_policy, placements=placements)
  state = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
  infos = []
  for images, labels in batches:
    state, info = pipe.step(state, images, labels)
    infos.append(info)
  state, drained = pipe.drain(state)
  return pipe, state, infos + drained


@pytest.mark.parametrize('stash', ['vjp', 'recompute'])
@pytest.mark.parametrize('num_stages', [2, 3, 4])
def test_engine_matches_naive_reference(num_stages, stash):
  batches = tiny_batches(12)
  pipe, state, _ = run_engine(num_stages, batches, stash=stash)
  modules, variables = initial_variables(num_stages)
  expected, expected_opt, _ = naive_fdg(modules, variables, make_optimizer(), batches, BETA,
                                        stash)
  got = jax.device_get(pipe.stage_variables(state))
  chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(jax.device_get([s.opt_state for s in state.stages]),
                              expected_opt, rtol=1e-5, atol=1e-6)
  # The run really trained: parameters moved away from the initial ones.
  assert not np.allclose(jax.tree_util.tree_leaves(got[0]['params'])[0],
                         jax.tree_util.tree_leaves(variables[0]['params'])[0])


@pytest.mark.parametrize('policy', ['dots_saveable', 'nothing_saveable'])   # some, all redone
def test_residual_policies_keep_the_delayed_gradient_and_save_less(policy):
  """A jax.checkpoint policy recomputes from the saved input and old weights: the naive
  reference's 'vjp' result, from fewer saved bytes."""
  batches = tiny_batches(10)
  pipe, state, _ = run_engine(3, batches, residual_policy=policy)
  modules, variables = initial_variables(3)
  expected, expected_opt, _ = naive_fdg(modules, variables, make_optimizer(), batches, BETA,
                                        'vjp')
  assert_matches(pipe, state, expected, expected_opt)

  def saved_bytes(residual_policy):   # stage 0's one saved forward after the first step
    modules, variables = initial_variables(2)
    pipe = pipeline.Pipeline(modules, make_optimizer(), beta=BETA,
                             residual_policy=residual_policy)
    state = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
    state, _ = pipe.step(state, *batches[0])
    [entry] = state.saved[0]
    return sum(a.nbytes for a in jax.tree_util.tree_leaves(entry.arrays))
  assert saved_bytes(policy) < saved_bytes(None)


def test_stash_modes_differ_when_stale():
  """'recompute' uses current weights, 'vjp' the old ones: with K > 1 they must differ."""
  batches = tiny_batches(8)
  results = [run_engine(2, batches, stash=s) for s in ('vjp', 'recompute')]
  a, b = (jax.device_get(p.stage_variables(s)[0]['params']) for p, s, _ in results)
  assert not all(np.allclose(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                   jax.tree_util.tree_leaves(b)))


@pytest.mark.parametrize('num_stages', [2, 3, 4])
def test_beta_once_per_stage_matches_naive_reference(num_stages):
  """stage_betas(compounded=False): every delayed stage's gradient carries beta once, as the
  reference that scales each stage's gradient and passes unscaled cotangents down."""
  batches = tiny_batches(10)
  pipe, state, _ = run_engine(num_stages, batches,
                              beta=pipeline.stage_betas(BETA, num_stages, compounded=False))
  modules, variables = initial_variables(num_stages)
  expected, expected_opt, _ = naive_fdg(modules, variables, make_optimizer(), batches, BETA,
                                        'vjp', compounded=False)
  assert_matches(pipe, state, expected, expected_opt)
  if num_stages > 2:   # and it is not the compounded run
    compounded, _, _ = naive_fdg(modules, variables, make_optimizer(), batches, BETA, 'vjp')
    got = jax.device_get(pipe.stage_variables(state))
    assert not np.allclose(jax.tree_util.tree_leaves(got[0]['params'])[0],
                           jax.tree_util.tree_leaves(compounded[0]['params'])[0])


def test_stage_betas_table():
  assert pipeline.stage_betas(0.5, 4) == (0.5, 0.5, 0.5, 0.5)
  assert pipeline.stage_betas(0.5, 4, compounded=False) == (1.0, 1.0, 0.5, 1.0)
  assert pipeline.stage_betas(0.5, 1, compounded=False) == (1.0,)
  modules, _ = initial_variables(2)
  pipe = pipeline.Pipeline(modules, optax.sgd(0.1), beta=np.float32(0.5))
  assert (pipe.beta, pipe.betas) == (0.5, (0.5, 0.5))
  with pytest.raises(ValueError, match='3 factors for 2 stages'):
    pipeline.Pipeline(modules, optax.sgd(0.1), beta=(0.5, 1.0, 1.0))
  with pytest.raises(ValueError, match='outside'):
    pipeline.Pipeline(modules, optax.sgd(0.1), beta=(0.0, 1.0))


@pytest.mark.parametrize('num_stages', [2, 3])
def test_beta_compounds_per_hop(num_stages):
  """Eq. 7: stage k's gradient carries beta^(K-1-k). One batch, plain SGD: the update is the
  gradient times -lr, so stage k's parameter change scales exactly with beta^(K-1-k)."""
  batches = tiny_batches(1)
  deltas = {}
  for beta in (1.0, 0.5):
    modules, variables = initial_variables(num_stages)
    pipe = pipeline.Pipeline(modules, optax.sgd(0.1), beta=beta)
    state = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
    state, _ = pipe.step(state, *batches[0])
    state, _ = pipe.drain(state)
    deltas[beta] = [jax.tree_util.tree_map(lambda new, old: new - old, got['params'], v['params'])
                    for got, v in zip(jax.device_get(pipe.stage_variables(state)), variables)]
  for k in range(num_stages):
    scale = 0.5 ** (num_stages - 1 - k)
    chex.assert_trees_all_close(deltas[0.5][k],
                                jax.tree_util.tree_map(lambda d: scale * d, deltas[1.0][k]),
                                rtol=1e-4, atol=1e-7)
    assert max(float(np.abs(d).max()) for d in jax.tree_util.tree_leaves(deltas[1.0][k])) > 0


def test_single_stage_is_plain_backprop():
  blocks = tiny_blocks()
  model = partition.StageModule(tuple(blocks))
  batches = tiny_batches(7)
  variables = model.init(jax.random.key(0), jnp.zeros((4, 6, 6, 2)), train=False)
  optimizer = make_optimizer()

  @jax.jit
  def bp_step(params, batch_stats, opt_state, images, labels):
    def loss(p):
      logits, new = model.apply({'params': p, 'batch_stats': batch_stats}, images, train=True,
                                mutable=['batch_stats'])
      return mean_loss(logits, labels), new['batch_stats']
    (_, batch_stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state

  params, batch_stats = variables['params'], variables['batch_stats']
  opt_state = optimizer.init(params)
  for images, labels in batches:
    params, batch_stats, opt_state = bp_step(params, batch_stats, opt_state, images, labels)

  pipe = pipeline.Pipeline([model], optimizer, pipeline.cross_entropy_loss, beta=0.5,
                           placements=jax.devices()[:1])
  state = pipe.init(jax.random.key(1), batches[0][0], variables=[variables])
  for images, labels in batches:
    state, info = pipe.step(state, images, labels)
    assert info.forwarded == info.updated == (info.iteration,)   # no delay, no fill
  assert not state.in_flight
  chex.assert_trees_all_close(jax.device_get(pipe.stage_variables(state)[0]),
                              {'params': params, 'batch_stats': batch_stats},
                              rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('num_stages', [2, 3, 4])
def test_each_stage_applies_gradients_with_delay(num_stages):
  num_batches = 9
  batches = tiny_batches(num_batches)
  _, state, infos = run_engine(num_stages, batches)
  modules, variables = initial_variables(num_stages)
  _, _, reference_applied = naive_fdg(modules, variables, make_optimizer(), batches, BETA, 'vjp')
  applied = [(info.iteration, k, b) for info in infos for k, b in enumerate(info.updated)
             if b is not None]
  assert sorted(applied) == sorted(reference_applied)
  for t, k, b in applied:
    forward_iteration = b + k   # stage k forwarded batch b at iteration b + k
    assert t - forward_iteration == pipeline.delay(k, num_stages)
  per_stage = collections.Counter(k for _, k, _ in applied)
  assert per_stage == {k: num_batches for k in range(num_stages)}   # drained: N updates each
  for k, stage in enumerate(state.stages):
    assert int(stage.step) == num_batches
  assert len(infos) == num_batches + 2 * (num_stages - 1)


def test_saved_entries_per_stage_equal_delay():
  num_stages = 4
  batches = tiny_batches(10)
  modules, variables = initial_variables(num_stages)
  pipe = pipeline.Pipeline(modules, make_optimizer(), beta=BETA)
  state = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
  for images, labels in batches:
    state, _ = pipe.step(state, images, labels)
  # In steady state stage k holds d_k saved forwards (the last stage none).
  assert [len(q) for q in state.saved] == [pipeline.delay(k, num_stages)
                                           for k in range(num_stages)]


def test_stages_live_on_their_own_devices_and_trace_once(monkeypatch):
  traced = collections.Counter()

  def counting(make):
    def wrapped(spec):
      fn = make(spec)
      name = f'{make.__name__}#{traced["made"]}'
      traced['made'] += 1

      def counted(*a, **kw):
        traced[name] += 1
        return fn(*a, **kw)
      counted.__name__ = name  # chex keys its trace counter on the name
      return chex.assert_max_traces(counted, n=1)
    return wrapped

  chex.clear_trace_counter()
  for make in (stage_functions.update_then_forward, stage_functions.last_update):
    monkeypatch.setattr(stage_functions, make.__name__, counting(make))
  devices = jax.devices()[:3]
  batches = tiny_batches(8)
  modules, variables = initial_variables(3)
  pipe = pipeline.Pipeline(modules, make_optimizer(), beta=BETA, placements=devices)
  state = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
  with jax.transfer_guard('disallow'):   # only explicit device_put moves data
    for images, labels in batches:
      state, _ = pipe.step(state, images, labels)
      for k, stage in enumerate(state.stages):
        for leaf in jax.tree_util.tree_leaves(stage):
          assert leaf.devices() == {devices[k]}, (k, leaf)
      for k, queue in enumerate(state.saved):
        for entry in queue:
          for leaf in jax.tree_util.tree_leaves(entry.arrays):
            assert leaf.devices() == {devices[k]}
    state, _ = pipe.drain(state)
  # Each (stage, phase) function traced exactly once (assert_max_traces raises otherwise).
  assert all(v == 1 for name, v in traced.items() if name != 'made')
  assert sum(v for name, v in traced.items() if name != 'made') == 2 * 3 + 1


def test_predict_composes_stages_without_disturbing_the_pipeline():
  batches = tiny_batches(5)
  modules, variables = initial_variables(3)
  pipe = pipeline.Pipeline(modules, make_optimizer(), beta=BETA)
  state = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
  for images, labels in batches[:3]:
    state, _ = pipe.step(state, images, labels)
  snapshot = jax.device_get(pipe.stage_variables(state))
  logits = pipe.predict(state, batches[4][0])
  expected = batches[4][0]
  for module, stage_vars in zip(modules, snapshot):
    expected = module.apply(stage_vars, expected, train=False)
  chex.assert_trees_all_close(np.asarray(logits), np.asarray(expected), rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(jax.device_get(pipe.stage_variables(state)), snapshot)
  result = pipe.evaluate(state, [(images, labels, np.ones(4, bool)) for images, labels in batches])
  assert set(result) == {'loss', 'accuracy'} and 0.0 <= result['accuracy'] <= 1.0


@pytest.mark.parametrize('kwargs, message', [
    (dict(beta=0.0), 'beta'),
    (dict(beta=1.5), 'beta'),
    (dict(stash='nope'), 'stash'),
    (dict(residual_policy='save_everything'), 'residual_policy'),
    (dict(stash='recompute', residual_policy='dots_saveable'), "stash='vjp' only"),
])
def test_pipeline_rejects_bad_arguments(kwargs, message):
  modules, _ = initial_variables(2)
  with pytest.raises(ValueError, match=message):
    pipeline.Pipeline(modules, make_optimizer(), **kwargs)


def test_more_stages_than_devices_needs_explicit_placement():
  modules = partition.build_stages(tiny_blocks(), (1, 2, 3, 4))
  with pytest.raises(ValueError, match='placements'):
    pipeline.Pipeline(modules * 2, make_optimizer())
  pipe = pipeline.Pipeline(modules, make_optimizer(), placements=[jax.devices()[0]] * 5)
  assert len(pipe.shardings) == 5


class PlainDense(nn.Module):
  """A user's module with no `train` argument."""
  features: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.features)(x.reshape(x.shape[0], -1))


class DenseWithTrain(nn.Module):
  """The same computation, called with `train` (which it ignores)."""
  features: int

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    return PlainDense(self.features, name='PlainDense_0')(x)


def test_modules_without_a_train_argument_are_called_without_it():
  batches = tiny_batches(5)
  plain_modules = [PlainDense(8), PlainDense(3)]
  x, plain_variables = batches[0][0], []
  for k, module in enumerate(plain_modules):
    plain_variables.append(module.init(jax.random.key(k), x))
    x = module.apply(plain_variables[-1], x)
  wrapped_variables = [{'params': {'PlainDense_0': v['params']}} for v in plain_variables]

  def run(modules, variables):
    pipe = pipeline.Pipeline(modules, make_optimizer(), beta=0.5,
                             placements=jax.devices()[:2])
    state = pipe.init(jax.random.key(0), batches[0][0], variables=variables)
    for images, labels in batches:
      state, _ = pipe.step(state, images, labels)
    state, _ = pipe.drain(state)
    return jax.device_get(pipe.stage_variables(state)), pipe.predict(state, batches[0][0])

  plain = run(plain_modules, plain_variables)
  with_train = run([DenseWithTrain(8), DenseWithTrain(3)], wrapped_variables)
  assert pipeline.takes_train_argument(DenseWithTrain(3))
  assert not pipeline.takes_train_argument(PlainDense(3))
  for k in range(2):
    chex.assert_trees_all_close(plain[0][k]['params'],
                                with_train[0][k]['params']['PlainDense_0'], rtol=1e-6)
  chex.assert_trees_all_close(np.asarray(plain[1]), np.asarray(with_train[1]), rtol=1e-6)
  # And without variables: init calls them without `train` too.
  pipe = pipeline.Pipeline(plain_modules, make_optimizer(), placements=jax.devices()[:2])
  assert pipe.predict(pipe.init(jax.random.key(1), batches[0][0]), batches[0][0]).shape == (4, 3)
