"""DDG and DGL against independent, naive, single-device references of docs/algorithm.md."""

import collections
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fdg_jax.engine import baselines
from fdg_jax.engine import checkpoint
from fdg_jax.engine import pipeline
from fdg_jax.models import aux_heads
from fdg_jax.models import partition
from tiny import NUM_CLASSES, initial_variables, make_optimizer, mean_loss, tiny_batches

BETA = 0.7
NUM_BATCHES = 10


def leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                  jax.tree_util.tree_leaves(b)))


def assert_placed(pipe, state):
  """Every array of stage k (params, opt state, statistics, key, saved forwards, the activation
  arriving, the labels waiting) lives on stage k's device."""
  for k, (stage, sharding) in enumerate(zip(state.stages, pipe.shardings)):
    device = sharding.device_set
    for leaf in jax.tree_util.tree_leaves((stage.params, stage.opt_state, stage.batch_stats,
                                           stage.dropout_key)):
      assert leaf.devices() == device, (k, leaf)
    for entry in state.saved[k]:
      assert all(leaf.devices() == device for leaf in jax.tree_util.tree_leaves(entry.arrays))
    if state.activations[k] is not None:   # DDG keeps no activations between iterations
      assert state.activations[k].value.devices() == device
    assert all(entry.value.devices() == device for entry in state.labels[k])


def run(pipe, batches, variables, check_placements=False):
  """Feed every batch, then drain. Returns the final state, all StepInfos and the saved-queue
  lengths just before draining. With check_placements, only explicit device_puts may move data
  and every stage's arrays are checked to stay on its device after every iteration."""
  state = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
  infos = []
  with jax.transfer_guard('disallow' if check_placements else 'allow'):
    for images, labels in batches:
      state, info = pipe.step(state, images, labels)
      infos.append(info)
      if check_placements:
        assert_placed(pipe, state)
    queue_lengths = [len(q) for q in state.saved]
    while state.in_flight:
      state, info = pipe.step(state)
      infos.append(info)
      if check_placements:
        assert_placed(pipe, state)
  return state, infos, queue_lengths


def applied_updates(infos):
  return sorted((info.iteration, k, b) for info in infos for k, b in enumerate(info.updated)
                if b is not None)


# ==================================================================================== DDG


def naive_ddg(modules, variables, optimizer, batches, beta, stash):
  """DDG as docs/algorithm.md and DDGPipeline's docstring describe it: one device, no jit.

  Iteration t forwards batch t through stages 0..K-1 in order. A non-last stage first applies
  the cotangent that stage k+1 sent in the previous iteration (scaled by beta, through the
  forward saved for that batch), updates, then forwards with the updated parameters. The last
  stage takes the loss and updates. Returns final variables, opt states and the list of
  (iteration, stage, batch) of every applied gradient.
  """
  K, N = len(modules), len(batches)
  params = [v['params'] for v in variables]
  stats = [v['batch_stats'] for v in variables]
  opt_states = [optimizer.init(p) for p in params]
  saved = [dict() for _ in range(K)]   # stage -> {batch: vjp function or input}
  inbox_ct = {}                        # stage -> (batch, cotangent) sent last iteration
  applied = []

  def forward(k, p, s, x):
    y, new = modules[k].apply({'params': p, 'batch_stats': s}, x, train=True,
                              mutable=['batch_stats'])
    return y, new['batch_stats']

  def update(k, grads):
    updates, opt_states[k] = optimizer.update(grads, opt_states[k], params[k])
    params[k] = optax.apply_updates(params[k], updates)

  for t in range(N + K - 1):
    out_ct = {}
    x = batches[t][0] if t < N else None   # flows through the stages within this iteration
    for k in range(K):
      if k == K - 1:
        if t >= N:
          continue
        labels = batches[t][1]

        def loss(p, x):
          logits, new_stats = forward(k, p, stats[k], x)
          return mean_loss(logits, labels), new_stats

        (_, stats[k]), (g, x_ct) = jax.value_and_grad(loss, (0, 1), has_aux=True)(params[k], x)
        update(k, g)
        applied.append((t, k, t))
        if k > 0:
          out_ct[k - 1] = (t, x_ct)
        continue
      if k in inbox_ct:
        cb, ct = inbox_ct.pop(k)
        assert cb == t - (K - 1 - k)
        if stash == 'vjp':
          vjp = saved[k].pop(cb)
        else:
          _, vjp, _ = jax.vjp(lambda p, x: forward(k, p, stats[k], x), params[k],
                              saved[k].pop(cb), has_aux=True)
        g, x_ct = vjp(beta * ct)
        update(k, g)
        applied.append((t, k, cb))
        if k > 0:
          out_ct[k - 1] = (cb, x_ct)
      if t < N:
        x_in = x
        x, vjp, stats[k] = jax.vjp(lambda p, x: forward(k, p, stats[k], x), params[k], x_in,
                                   has_aux=True)
        saved[k][t] = vjp if stash == 'vjp' else x_in
    inbox_ct = out_ct
  assert not inbox_ct and not any(saved)
  return ([{'params': p, 'batch_stats': s} for p, s in zip(params, stats)], opt_states,
          applied)


@functools.lru_cache(maxsize=None)
def ddg_pipeline(num_stages, stash, devices=None):
  """Built once per configuration: compiling is most of these tests' time."""
  modules, variables = initial_variables(num_stages)
  placements = [jax.devices()[i] for i in devices or range(num_stages)]
  pipe = baselines.DDGPipeline(modules, make_optimizer(), beta=BETA, stash=stash,
                               placements=placements)
  return pipe, modules, variables


@pytest.mark.parametrize('num_stages, stash, devices', [
    (2, 'vjp', None), (3, 'vjp', (5, 2, 7)), (3, 'recompute', None), (4, 'vjp', None)])
def test_ddg_matches_naive_reference(num_stages, stash, devices):
  batches = tiny_batches(NUM_BATCHES)
  pipe, modules, variables = ddg_pipeline(num_stages, stash, devices)
  state, infos, queue_lengths = run(pipe, batches, variables, check_placements=True)
  expected, expected_opt, expected_applied = naive_ddg(
      modules, variables, make_optimizer(), batches, BETA, stash)

  got = jax.device_get(pipe.stage_variables(state))
  chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(jax.device_get([s.opt_state for s in state.stages]),
                              expected_opt, rtol=1e-5, atol=1e-6)
  assert not np.allclose(jax.tree_util.tree_leaves(got[0]['params'])[0],
                         jax.tree_util.tree_leaves(variables[0]['params'])[0])

  # Delay bookkeeping: at iteration t stage k applies the gradient of batch t - (K-1-k).
  applied = applied_updates(infos)
  assert applied == sorted(expected_applied)
  for t, k, b in applied:
    assert t - b == baselines.ddg_delay(k, num_stages) == pipe.delay(k)
  for info in infos:   # forward locked: every stage forwards the batch fed in this iteration
    fed = info.iteration if info.iteration < NUM_BATCHES else None
    assert info.forwarded == (fed,) * num_stages
  assert collections.Counter(k for _, k, _ in applied) == {
      k: NUM_BATCHES for k in range(num_stages)}
  assert [int(s.step) for s in state.stages] == [NUM_BATCHES] * num_stages
  assert len(infos) == NUM_BATCHES + num_stages - 1
  # In steady state stage k holds K-1-k saved forwards (half of FDG's 2(K-1-k)).
  assert queue_lengths == [baselines.ddg_delay(k, num_stages) for k in range(num_stages)]
  assert not state.in_flight
  # fill, steady and drain each compiled once on the non-last stages; one function on the last.
  assert [{p: f._cache_size() for p, f in fs.items()} for fs in pipe.method.functions] == [
      {p: 1 for p in pipeline.PHASES}] * (num_stages - 1) + [{'steady': 1}]


# ==================================================================================== DGL


def naive_dgl(modules, heads, variables, aux_variables, optimizer, batches):
  """DGL as docs/algorithm.md and DGLPipeline's docstring describe it: one device, no jit.

  Stage k trains on batch t-k at iteration t: one forward, the loss of its head's logits (the
  last stage: of its own output), one update; it sends the output of that forward (the
  pre-update weights) to stage k+1 for the next iteration.
  """
  K, N = len(modules), len(batches)
  params = [{'stage': v['params']} for v in variables]
  stats = [{'stage': v['batch_stats']} for v in variables]
  for k, a in enumerate(aux_variables):
    params[k]['aux'], stats[k]['aux'] = a['params'], a['batch_stats']
  opt_states = [optimizer.init(p) for p in params]
  inbox = {}   # stage -> (batch, activation) sent last iteration
  for t in range(N + K - 1):
    out = {}
    for k in range(K):
      b = t - k
      if not 0 <= b < N:
        continue
      x = batches[b][0] if k == 0 else inbox.pop(k)[1]
      labels = batches[b][1]

      def loss(p):
        y, new = modules[k].apply({'params': p['stage'], 'batch_stats': stats[k]['stage']}, x,
                                  train=True, mutable=['batch_stats'])
        new_stats = {'stage': new['batch_stats']}
        if k == K - 1:
          return mean_loss(y, labels), (new_stats, y)
        logits, new_aux = heads[k].apply(
            {'params': p['aux'], 'batch_stats': stats[k]['aux']}, y, train=True,
            mutable=['batch_stats'])
        new_stats['aux'] = new_aux['batch_stats']
        return mean_loss(logits, labels), (new_stats, y)

      (_, (stats[k], y)), g = jax.value_and_grad(loss, has_aux=True)(params[k])
      updates, opt_states[k] = optimizer.update(g, opt_states[k], params[k])
      params[k] = optax.apply_updates(params[k], updates)
      if k < K - 1:
        out[k + 1] = (b, y)
    inbox = out
  assert not inbox
  return params, stats, opt_states


def make_dgl(num_stages, placements=None, aux_head='mlp-sr'):
  modules, variables = initial_variables(num_stages)
  pipe = baselines.DGLPipeline(modules, make_optimizer(), num_classes=NUM_CLASSES,
                               placements=placements, aux_head=aux_heads.get(aux_head))
  return pipe, modules, variables


# Compiling is most of these tests' time, so two DGL pipelines, each on distinct devices, are
# built once per module and reused (their jitted functions survive new `init`s as long as the
# batch shape stays the same):
# * dgl3: K = 3 with the small conv head, fed batches of 4;
# * dgl2: K = 2 with the default MLP-SR head, fed batches of 64. That head normalises Dense
#   layers over the batch; with the tiny models here and 4 (or even 128) random examples,
#   training is so ill-conditioned that float rounding grows several-fold per step (the naive
#   reference run jitted and not jitted ends far outside rtol 1e-5), so it is compared with the
#   reference where it is well-conditioned.
DGL3_DEVICES = (5, 2, 7)
DGL2_DEVICES = (6, 3)
DGL2_BATCH = 64


@pytest.fixture(scope='module')
def dgl3():
  return make_dgl(3, placements=[jax.devices()[i] for i in DGL3_DEVICES], aux_head='conv')


@pytest.fixture(scope='module')
def dgl2():
  return make_dgl(2, placements=[jax.devices()[i] for i in DGL2_DEVICES])


def run_dgl_against_reference(pipe, modules, variables, heads, batches):
  state = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
  aux_initial = jax.device_get(pipe.aux_variables(state))   # before the first (donating) step
  chex.assert_trees_all_close(jax.device_get(pipe.stage_variables(state)), variables)
  infos = []
  for images, labels in batches:
    state, info = pipe.step(state, images, labels)
    infos.append(info)
  state, drained = pipe.drain(state)
  infos += drained

  params, stats, opt_states = naive_dgl(modules, heads, variables, aux_initial, make_optimizer(),
                                        batches)
  got = jax.device_get(state.stages)
  chex.assert_trees_all_close([s.params for s in got], params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close([s.batch_stats for s in got], stats, rtol=1e-5, atol=1e-6)
  # The momentum traces sum gradients whose entries cancel, so their rounding error has the
  # gradients' size, not the trace's: atol 1e-5. With JAX 0.12.0.1 the reference jitted already
  # differs from itself op by op by 1.05 times rtol 1e-5 + atol 1e-6 on dgl2's traces
  # (docs/record/newest_releases.md).
  chex.assert_trees_all_close([s.opt_state for s in got], opt_states, rtol=1e-5, atol=1e-5)
  assert not leaves_equal(got[0].params['aux'], aux_initial[0]['params'])   # heads trained

  # Pipelined, no delay: stage k trains on batch t-k at iteration t, N updates per stage.
  num_stages, num_batches = len(modules), len(batches)
  for info in infos:
    expected = tuple(info.iteration - k if 0 <= info.iteration - k < num_batches else None
                     for k in range(num_stages))
    assert info.forwarded == info.updated == expected
    assert [m is not None for m in info.local_metrics] == [b is not None for b in expected]
  assert len(infos) == num_batches + num_stages - 1
  assert [int(s.step) for s in state.stages] == [num_batches] * num_stages
  assert not state.in_flight


def test_dgl_matches_naive_reference_k3(dgl3):
  pipe, modules, variables = dgl3
  run_dgl_against_reference(pipe, modules, variables,
                            [aux_heads.ConvAuxHead(NUM_CLASSES) for _ in range(2)],
                            tiny_batches(NUM_BATCHES))


def test_dgl_matches_naive_reference_k2_default_head(dgl2):
  pipe, modules, variables = dgl2
  assert isinstance(pipe.aux_heads[0], aux_heads.MLPSRAuxHead)
  run_dgl_against_reference(pipe, modules, variables, [aux_heads.MLPSRAuxHead(NUM_CLASSES)],
                            tiny_batches(NUM_BATCHES, batch_size=DGL2_BATCH))


def test_dgl_sends_the_output_of_the_pre_update_weights(dgl3):
  pipe, modules, variables = dgl3
  images, labels = tiny_batches(1)[0]
  state = pipe.init(jax.random.key(1), images, variables=variables)
  state, _ = pipe.step(state, images, labels)
  sent = np.asarray(state.activations[1].value)
  # Every stage got the batch's labels on its own device; stage 0 has used its copy.
  assert [[entry.batch for entry in queue] for queue in state.labels] == [[], [0], [0]]
  assert state.labels[1][0].value.devices() == {jax.devices()[DGL3_DEVICES[1]]}

  def train_forward(stage_vars):
    return modules[0].apply(stage_vars, images, train=True, mutable=['batch_stats'])[0]

  np.testing.assert_allclose(sent, train_forward(variables[0]), rtol=1e-5, atol=1e-6)
  after = jax.device_get(pipe.stage_variables(state)[0])
  assert not np.allclose(sent, train_forward(after), rtol=1e-5, atol=1e-6)


def test_dgl_earlier_stages_ignore_later_stages(dgl3):
  """No gradient crosses a stage boundary: a different last stage leaves stages 0 and 1
  bit-identical (network and heads)."""
  pipe, _, variables = dgl3
  batches = tiny_batches(5)
  results = []
  for scale in (1.0, 3.0):
    changed = list(variables)
    changed[-1] = jax.tree_util.tree_map(lambda v: v * scale, variables[-1])
    state, _, _ = run(pipe, batches, changed)
    results.append(jax.device_get(state.stages))
  for k in (0, 1):
    assert leaves_equal(results[0][k].params, results[1][k].params)
    assert leaves_equal(results[0][k].batch_stats, results[1][k].batch_stats)
    assert leaves_equal(results[0][k].opt_state, results[1][k].opt_state)
  assert not leaves_equal(results[0][2].params, results[1][2].params)


def test_dgl_predict_uses_the_network_without_heads(dgl3):
  pipe, modules, variables = dgl3
  batches = tiny_batches(3)
  state, _, _ = run(pipe, batches, variables)
  stage_vars = jax.device_get(pipe.stage_variables(state))
  for v, initial in zip(stage_vars, variables):   # the network only, shaped as FDG's
    assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(initial)
  images = batches[0][0]
  logits = pipe.predict(state, images)
  expected = images
  for module, v in zip(modules, stage_vars):
    expected = module.apply(v, expected, train=False)
  assert logits.shape == (4, NUM_CLASSES)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(jax.device_get(pipe.stage_variables(state)), stage_vars)
  result = pipe.evaluate(state, batches)
  assert set(result) == {'loss', 'accuracy'}


@pytest.mark.parametrize('aux_head', ['mlp-sr', 'conv'])
def test_dgl_extra_params_are_the_heads(aux_head, dgl2, dgl3):
  pipe, modules, variables = dgl2 if aux_head == 'mlp-sr' else dgl3
  x = jnp.zeros((DGL2_BATCH if aux_head == 'mlp-sr' else 4, 6, 6, 2))
  state = pipe.init(jax.random.key(1), x, variables=variables)
  expected_counts = []
  for k in range(pipe.num_stages - 1):
    x = modules[k].apply(variables[k], x, train=False)
    head = aux_heads.AUX_HEADS[aux_head](k, NUM_CLASSES)
    expected_counts.append(partition.count_params(
        jax.eval_shape(lambda x: head.init(jax.random.key(0), x, train=False), x)['params']))
    if aux_head == 'mlp-sr':   # DGL's MLP-SR-aux on C channels: 3 x (1x1 conv + BN),
      c, n = x.shape[-1], NUM_CLASSES   # 3 x (Dense 4C -> 4C + BN), Dense 4C -> classes.
      assert expected_counts[-1] == 3 * (c * c + 2 * c) + 3 * (16 * c * c + 4 * c + 8 * c) + (
          4 * c * n + n)
  assert pipe.aux_param_counts(state) == expected_counts + [0]
  assert pipe.num_extra_params(state) == sum(expected_counts) > 0
  assert partition.count_params([v['params'] for v in pipe.stage_variables(state)]) == (
      partition.count_params([v['params'] for v in variables]))


def test_dgl_init_without_variables_gives_fdg_initial_network(dgl3):
  pipe, modules, _ = dgl3
  x = jnp.asarray(tiny_batches(1)[0][0])
  fdg = pipeline.Pipeline(modules, make_optimizer(), placements=pipe.shardings)
  chex.assert_trees_all_equal(jax.device_get(pipe.stage_variables(pipe.init(jax.random.key(3), x))),
                              jax.device_get(fdg.stage_variables(fdg.init(jax.random.key(3), x))))


def test_dgl_rejects_bad_arguments():
  modules, _ = initial_variables(2)
  conv = aux_heads.get('conv')
  with pytest.raises(ValueError, match='num_classes'):
    baselines.DGLPipeline(modules, make_optimizer(), aux_head=conv)
  with pytest.raises(ValueError, match='aux_head'):   # a factory, not a name
    baselines.DGLPipeline(modules, make_optimizer(), num_classes=3, aux_head='conv')
  with pytest.raises(ValueError, match='aux_head'):
    baselines.DGLPipeline(modules, make_optimizer(), num_classes=3)
  with pytest.raises(ValueError, match="'nope' is not one of"):
    aux_heads.get('nope')
  pipe = baselines.DGLPipeline(modules, make_optimizer(), num_classes=3, aux_head=conv)
  with pytest.raises(ValueError, match='sample_input'):
    pipe.init(jax.random.key(0), None)


def test_adaptive_avg_pool_matches_pytorch_bins():
  x = jnp.arange(2 * 5 * 7 * 3, dtype=jnp.float32).reshape(2, 5, 7, 3)
  got = aux_heads.adaptive_avg_pool(x, (2, 3))
  # PyTorch: bin i of n over size s covers [floor(i*s/n), ceil((i+1)*s/n)).
  rows, cols = [(0, 3), (2, 5)], [(0, 3), (2, 5), (4, 7)]
  expected = np.stack([np.stack([np.asarray(x)[:, r0:r1, c0:c1].mean((1, 2)) for c0, c1 in cols],
                                axis=1) for r0, r1 in rows], axis=1)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(aux_heads.adaptive_avg_pool(x[:, :4, :6], (2, 3))),
                             np.asarray(x[:, :4, :6]).reshape(2, 2, 2, 3, 2, 3).mean((2, 4)))


# ==================================================================================== both


def test_single_stage_ddg_and_dgl_are_fdg_single_stage():
  """K = 1: one last stage, ordinary back-propagation, for every method."""
  batches = tiny_batches(6)
  modules, variables = initial_variables(1)
  results = {}
  for name, cls, kwargs in [('fdg', pipeline.Pipeline, dict(beta=0.5)),
                            ('ddg', baselines.DDGPipeline, dict(beta=0.5)),
                            ('dgl', baselines.DGLPipeline, dict(num_classes=NUM_CLASSES))]:
    pipe = cls(modules, make_optimizer(), placements=jax.devices()[:1], **kwargs)
    state, infos, _ = run(pipe, batches, variables)
    assert len(infos) == len(batches)
    assert all(info.forwarded == info.updated == (info.iteration,) for info in infos)
    results[name] = (jax.device_get(pipe.stage_variables(state)),
                     jax.device_get(state.stages[0].opt_state))
  assert pipe.num_extra_params(state) == 0
  chex.assert_trees_all_close(results['ddg'], results['fdg'], rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(results['dgl'][0], results['fdg'][0], rtol=1e-6, atol=1e-7)
  # DGL's opt state is over {'stage': params}: same leaves in the same order.
  chex.assert_trees_all_close(jax.tree_util.tree_leaves(results['dgl'][1]),
                              jax.tree_util.tree_leaves(results['fdg'][1]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('which', ['dgl2', 'dgl3'])
def test_dgl_stages_live_on_their_own_devices_and_compile_once(which, request):
  pipe, _, variables = request.getfixturevalue(which)
  devices = [jax.devices()[i] for i in (DGL2_DEVICES if which == 'dgl2' else DGL3_DEVICES)]
  assert [s.device_set for s in pipe.shardings] == [{d} for d in devices]
  batches = tiny_batches(4, batch_size=DGL2_BATCH if which == 'dgl2' else 4)
  state, _, _ = run(pipe, batches, variables, check_placements=True)
  assert all('aux' in s.params for s in state.stages[:-1])
  assert all(f._cache_size() == 1 for fs in pipe.method.functions for f in fs.values())


@pytest.mark.parametrize('method', ['ddg', 'dgl'])
def test_checkpoint_resume_mid_stream_is_bit_exact(method, dgl3, tmp_path):
  pipe, _, variables = ddg_pipeline(3, 'vjp', (5, 2, 7)) if method == 'ddg' else dgl3
  batches = tiny_batches(7)
  straight, _, _ = run(pipe, batches, variables)
  expected = jax.device_get(straight.stages)

  state = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
  for images, labels in batches[:4]:
    state, _ = pipe.step(state, images, labels)
  assert state.in_flight
  checkpoint.Checkpointer(str(tmp_path)).save(4, pipe, state)
  fresh = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
  state, _ = checkpoint.Checkpointer(str(tmp_path)).restore(pipe, fresh)
  for images, labels in batches[4:]:
    state, _ = pipe.step(state, images, labels)
  state, _ = pipe.drain(state)
  chex.assert_trees_all_equal(jax.device_get(state.stages), expected)
