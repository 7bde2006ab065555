"""Stale-gradient compensation against a naive reference of each paper's formula.

The reference is FDG written plainly (one device, no jit, explicit queues) with SGD, momentum,
coupled weight decay and a learning-rate drop written out by hand, so it checks the formulas,
not the optax chain the engine builds: weight prediction (theta + s * last update), DC-ASGD's
g + lambda * g * g * (theta_now - theta_forward) (adaptive and constant lambda) and PipeMare's
learning rate divided by tau ** p, p annealed from 1 to 0.
"""

import dataclasses
import functools

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default as default_config
from fdg_jax.engine import baselines
from fdg_jax.engine import checkpoint
from fdg_jax.engine import compensation as compensation_lib
from fdg_jax.engine import methods
from fdg_jax.engine import optimizers
from fdg_jax.engine import pipeline
from fdg_jax.engine import rotated_adam
from fdg_jax.models import gpt
from fdg_jax.models import partition
from fdg_jax.trainer import configuration
from fdg_jax.trainer import optimizers as optimizer_config
from test_microbatches import naive_fdg_microbatches
from tiny import NUM_CLASSES, RECIPE, initial_variables, make_optimizer, mean_loss, tiny_batches

BETA = 0.7
WEIGHT_DECAY, MOMENTUM = 5e-4, 0.9


def arrays(stages):
  """Every array of the stage states (their optimizers are functions, compared elsewhere)."""
  return jax.device_get([flax.serialization.to_state_dict(s) for s in stages])


def learning_rate(step):   # tiny.make_optimizer's schedule
  return 0.1 if step < 5 else 0.01


def naive_compensated_fdg(modules, variables, batches, comp: compensation_lib.Compensation):
  """FDG with `comp`, every stage on one device, the optimizer by hand. Returns each stage's
  final {'params', 'batch_stats'}."""
  K, N = len(modules), len(batches)
  tree_map = jax.tree_util.tree_map
  params = [v['params'] for v in variables]
  stats = [v['batch_stats'] for v in variables]
  velocity = [tree_map(jnp.zeros_like, p) for p in params]
  last_update = [tree_map(jnp.zeros_like, p) for p in params]
  mean_square = [tree_map(jnp.zeros_like, p) for p in params]
  steps = [0] * K
  saved = [dict() for _ in range(K)]   # batch -> (vjp, parameters of that forward)
  inbox_x, inbox_ct = {}, {}

  def delay(k):
    return 2 * (K - 1 - k)

  def forward(k, p, s, x):
    y, new = modules[k].apply({'params': p, 'batch_stats': s}, x, train=True,
                              mutable=['batch_stats'])
    return y, new['batch_stats']

  def sgd(k, grads, forward_params):
    compensating = comp.name != 'none' and delay(k) > 0
    if compensating and comp.name == 'delay_compensation':
      if comp.dc_adaptive:
        mean_square[k] = tree_map(lambda m, g: comp.dc_decay * m + (1 - comp.dc_decay) * g ** 2,
                                  mean_square[k], grads)
        lam = tree_map(lambda m: comp.dc_lambda / jnp.sqrt(m + comp.dc_epsilon), mean_square[k])
      else:
        lam = tree_map(lambda g: comp.dc_lambda, grads)
      grads = tree_map(lambda g, l, now, old: g + l * g * g * (now - old),
                       grads, lam, params[k], forward_params)
    lr = learning_rate(steps[k])
    if compensating and comp.name == 'lr_reschedule':
      p = max(0.0, 1.0 - steps[k] / comp.reschedule_steps)
      lr = lr / max(1, delay(k)) ** p
    velocity[k] = tree_map(lambda v, g, w: MOMENTUM * v + g + WEIGHT_DECAY * w,
                           velocity[k], grads, params[k])
    last_update[k] = tree_map(lambda v: -lr * v, velocity[k])
    params[k] = tree_map(lambda w, u: w + u, params[k], last_update[k])
    steps[k] += 1

  for t in range(N + 2 * (K - 1)):
    out_x, out_ct = {}, {}
    for k in range(K):
      b = t - k
      if k == K - 1:
        if not 0 <= b < N:
          continue
        x = batches[b][0] if k == 0 else inbox_x.pop(k)[1]   # K = 1: back-propagation

        def loss(p, x):
          logits, new_stats = forward(k, p, stats[k], x)
          return mean_loss(logits, batches[b][1]), new_stats

        (_, stats[k]), (g, x_ct) = jax.value_and_grad(loss, (0, 1), has_aux=True)(params[k], x)
        sgd(k, g, params[k])
        out_ct[k - 1] = (b, x_ct)
        continue
      if k in inbox_ct:
        cb, ct = inbox_ct.pop(k)
        vjp, forward_params = saved[k].pop(cb)
        g, *x_ct = vjp(BETA * ct)
        sgd(k, g, forward_params)
        if k > 0:
          out_ct[k - 1] = (cb, x_ct[0])
      if 0 <= b < N:
        x = batches[b][0] if k == 0 else inbox_x.pop(k)[1]
        forward_params = params[k]
        if comp.name == 'weight_prediction':
          horizon = max(0, delay(k) - 1)
          forward_params = tree_map(lambda w, u: w + horizon * u, params[k], last_update[k])
        if k == 0:
          y, vjp, stats[k] = jax.vjp(lambda p: forward(k, p, stats[k], x), forward_params,
                                     has_aux=True)
        else:
          y, vjp, stats[k] = jax.vjp(lambda p, x: forward(k, p, stats[k], x), forward_params,
                                     x, has_aux=True)
        saved[k][b] = (vjp, forward_params)
        out_x[k + 1] = (b, y)
    inbox_x, inbox_ct = out_x, out_ct
  return [{'params': p, 'batch_stats': s} for p, s in zip(params, stats)]


COMPENSATIONS = [
    compensation_lib.Compensation('weight_prediction'),
    compensation_lib.Compensation('delay_compensation'),
    compensation_lib.Compensation('delay_compensation', dc_lambda=100.0, dc_adaptive=False),
    compensation_lib.Compensation('lr_reschedule', reschedule_steps=8),
]


def run_engine(num_stages, batches, comp, **kwargs):
  modules, variables = initial_variables(num_stages)
  pipe = pipeline.Pipeline(modules, make_optimizer(), beta=BETA, compensation=comp,
                           placements=jax.devices()[:num_stages], **kwargs)
  state = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
  for images, labels in batches:
    state, _ = pipe.step(state, images, labels)
  return pipe, pipe.drain(state)[0]


@pytest.mark.parametrize('comp', COMPENSATIONS, ids=lambda c: f'{c.name}-{c.dc_adaptive}')
def test_compensation_matches_naive_formula(comp):
  """K = 3: stage 0 with delay 4 (horizon 3), stage 1 with delay 2, the last stage."""
  num_stages, batches = 3, tiny_batches(8)   # stage 0's updates cross the lr drop at 5
  pipe, state = run_engine(num_stages, batches, comp)
  modules, variables = initial_variables(num_stages)
  expected = naive_compensated_fdg(modules, variables, batches, comp)
  chex.assert_trees_all_close(jax.device_get(pipe.stage_variables(state)), expected,
                              rtol=1e-5, atol=1e-6)
  # Not a no-op: stage 0 ends far (beyond the tolerance above) from the paper's FDG.
  plain = naive_compensated_fdg(modules, variables, batches, compensation_lib.Compensation())
  moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()),
                                 expected[0]['params'], plain[0]['params'])
  assert max(jax.tree_util.tree_leaves(moved)) > 1e-4, moved


def test_none_is_the_plain_engine_bit_for_bit():
  batches = tiny_batches(8)
  pipe, state = run_engine(3, batches, 'none')
  modules, variables = initial_variables(3)
  plain = pipeline.Pipeline(modules, make_optimizer(), beta=BETA,
                            placements=jax.devices()[:3])
  plain_state = plain.init(jax.random.key(1), batches[0][0], variables=variables)
  for images, labels in batches:
    plain_state, _ = plain.step(plain_state, images, labels)
  plain_state = plain.drain(plain_state)[0]
  chex.assert_trees_all_equal(arrays(state.stages), arrays(plain_state.stages))


def test_naive_reference_without_compensation_is_the_engine():
  """The hand-written optimizer of the reference is make_optimizer's: with 'none' it gives the
  engine's result, so the comparisons above test the compensation alone."""
  batches = tiny_batches(8)
  pipe, state = run_engine(2, batches, 'none')
  modules, variables = initial_variables(2)
  chex.assert_trees_all_close(
      jax.device_get(pipe.stage_variables(state)),
      naive_compensated_fdg(modules, variables, batches, compensation_lib.Compensation()),
      rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', ['weight_prediction', 'delay_compensation', 'lr_reschedule'])
def test_last_stage_and_single_stage_are_untouched(name):
  """K = 1 is plain BP whatever the compensation; the last stage keeps the user's optimizer."""
  batches = tiny_batches(6)
  pipe, state = run_engine(1, batches, name)
  plain, plain_state = run_engine(1, batches, 'none')
  chex.assert_trees_all_equal(arrays(state.stages), arrays(plain_state.stages))
  two = pipeline.Pipeline(initial_variables(2)[0], make_optimizer(), compensation=name,
                          placements=jax.devices()[:2])
  assert two.stage_optimizers[-1] is two.optimizer
  assert two.stage_optimizers[0] is not two.optimizer


def test_ddg_takes_a_compensation():
  """DDG's stage 0 at K = 3 has delay 2: weight prediction and rescheduling change its run."""
  batches = tiny_batches(6)
  modules, variables = initial_variables(3)
  results = {}
  for name in ('none', 'weight_prediction', 'lr_reschedule'):
    pipe = baselines.DDGPipeline(modules, make_optimizer(), compensation=name,
                                 placements=jax.devices()[:3])
    state = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
    for images, labels in batches:
      state, _ = pipe.step(state, images, labels)
    results[name] = jax.device_get(pipe.stage_variables(pipe.drain(state)[0]))
  for name in ('weight_prediction', 'lr_reschedule'):
    assert not np.allclose(jax.tree_util.tree_leaves(results[name][0]['params'])[0],
                           jax.tree_util.tree_leaves(results['none'][0]['params'])[0])


def assert_resumes_bit_for_bit(tmp_path, modules, variables, optimizer, batches, at,
                               check_saved=None, **kwargs):
  """Train on `batches` with a checkpoint after `at` of them (`check_saved(state)` first, if
  given), restore it into a new pipeline and train on the rest: the result equals the run
  straight through, bit for bit."""

  def make():
    pipe = pipeline.Pipeline(modules, optimizer, beta=BETA,
                             placements=jax.devices()[:len(modules)], **kwargs)
    return pipe, pipe.init(jax.random.key(1), batches[0][0], variables=variables)

  pipe, state = make()
  for i, (inputs, labels) in enumerate(batches):
    if i == at:
      if check_saved:
        check_saved(state)
      checkpoint.Checkpointer(str(tmp_path)).save(at, pipe, state)
    state, _ = pipe.step(state, inputs, labels)
  straight = arrays(pipe.drain(state)[0].stages)
  pipe, fresh = make()
  state, _ = checkpoint.Checkpointer(str(tmp_path)).restore(pipe, fresh)
  for inputs, labels in batches[at:]:
    state, _ = pipe.step(state, inputs, labels)
  chex.assert_trees_all_equal(arrays(pipe.drain(state)[0].stages), straight)


@pytest.mark.parametrize('name', ['weight_prediction', 'delay_compensation', 'error_feedback'])
def test_resume_mid_stream_is_bit_exact(tmp_path, name):
  """A checkpoint holds the compensation's state (last update, mean square, the forwards'
  parameters, error feedback's previous update): 5 steps, save, restore into a new pipeline, 5
  more equal 10 straight."""
  assert_resumes_bit_for_bit(tmp_path, *initial_variables(3), make_optimizer(), tiny_batches(10),
                             5, compensation=name)


@pytest.mark.parametrize('settings, kwargs, message', [
    (dict(name='momentum'), {}, 'is not one of'),
    (dict(name='weight_prediction'), dict(stash='recompute'), "needs stash='vjp'"),
    (dict(name='delay_compensation'), dict(stash='recompute'), "needs stash='vjp'"),
    (dict(name='delay_compensation', dc_decay=1.0), {}, 'dc_decay'),
    (dict(name='lr_reschedule', reschedule_steps=0), {}, 'reschedule_steps'),
])
def test_bad_compensations_are_refused(settings, kwargs, message):
  with pytest.raises(ValueError, match=message):
    pipeline.Pipeline(initial_variables(2)[0], make_optimizer(),
                      compensation=compensation_lib.Compensation(**settings),
                      placements=jax.devices()[:2], **kwargs)


# ------------------------------------------------------------ Nesterov and delay momentum
#
# The reference below is FDG / DDG written plainly (one device, no jit, explicit queues) with
# each stage's optimizer written out from docs/algorithm.md's formulas: SGD with (Nesterov)
# momentum and coupled decay, AdamW, and torch's NAdamW, each a loop over the leaves.

LR_DROP = 5   # the schedules drop their learning rate tenfold at update 5


def drop_schedule(peak):
  return optax.piecewise_constant_schedule(peak, {LR_DROP: 0.1})


def lr_at(peak, step):
  return peak if step < LR_DROP else peak * 0.1


SGD = RECIPE   # tiny's optimizer: drop_schedule(0.1), MOMENTUM, WEIGHT_DECAY
ADAMW = optimizers.Recipe('adamw', drop_schedule(0.01), weight_decay=0.1, b1=0.8, b2=0.95,
                          eps=1e-6, decay_mask=lambda p: jax.tree_util.tree_map(
                              lambda x: x.ndim >= 2, p))


class HandOptimizer:
  """One stage's optimizer from the formulas: `kind` 'sgd', 'nesterov_sgd', 'adamw' or 'nadamw'
  with momentum (b1) gamma; the rest from the Recipe. `step(params, grads)` -> params;
  `changes(params, grads)`: the update of each leaf (float64), the parameters left as they are."""

  def __init__(self, recipe, kind, gamma, psi=0.004):
    self.r, self.kind, self.gamma, self.psi = recipe, kind, gamma, psi
    self.n, self.mu_product = 0, 1.0
    self.m = self.v = None

  def step(self, params, grads):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    return jax.tree_util.tree_unflatten(treedef, [
        np.float32(np.asarray(x, np.float64) + change)
        for x, change in zip(leaves, self.changes(params, grads))])

  def changes(self, params, grads):
    r, g1, t = self.r, self.gamma, self.n + 1
    peak = 0.1 if r.name == 'sgd' else 0.01
    lr = lr_at(peak, self.n)
    grads = [np.asarray(g, np.float64) for g in jax.tree_util.tree_leaves(grads)]
    w = [np.asarray(p, np.float64) for p in jax.tree_util.tree_leaves(params)]
    if self.m is None:
      self.m, self.v = [np.zeros_like(x) for x in w], [np.zeros_like(x) for x in w]
    if self.kind == 'nadamw':
      mu = g1 * (1 - 0.5 * 0.96 ** (t * self.psi))
      mu_next = g1 * (1 - 0.5 * 0.96 ** ((t + 1) * self.psi))
      self.mu_product *= mu
    changes = []
    for i, (x, g) in enumerate(zip(w, grads)):
      if self.kind in ('sgd', 'nesterov_sgd'):
        g = g + r.weight_decay * x
        self.m[i] = g1 * self.m[i] + g
        direction = g + g1 * self.m[i] if self.kind == 'nesterov_sgd' else self.m[i]
        changes.append(-lr * direction)
        continue
      self.m[i] = g1 * self.m[i] + (1 - g1) * g
      self.v[i] = r.b2 * self.v[i] + (1 - r.b2) * g * g
      if self.kind == 'adamw':
        m_hat = self.m[i] / (1 - g1 ** t)
        direction = m_hat / (np.sqrt(self.v[i] / (1 - r.b2 ** t)) + r.eps)
      else:
        denominator = np.sqrt(self.v[i] / (1 - r.b2 ** t)) + r.eps
        direction = ((1 - mu) / (1 - self.mu_product) * g / denominator
                     + mu_next / (1 - self.mu_product * mu_next) * self.m[i] / denominator)
      decay = r.weight_decay * x if x.ndim >= 2 else 0.0
      changes.append(-lr * (direction + decay))
    self.n += 1
    return changes


def hand_optimizers(recipe, name, delays, ef_coefficient=1.0):
  """Each stage's HandOptimizer for compensation `name` (the formulas of docs/algorithm.md)."""
  base = recipe.b1 if recipe.name == 'adamw' else recipe.momentum
  plain, looking = (('adamw', 'nadamw') if recipe.name == 'adamw' else ('sgd', 'nesterov_sgd'))
  result = []
  for d in delays:
    gamma = base + d * (0.99 - base) / (max(delays) + 1) if 'delay_momentum' in name else 0.99
    if name == 'error_feedback' and d >= 2:   # the user's update, corrected where it is stale
      result.append(HandErrorFeedback(HandOptimizer(recipe, plain, base), ef_coefficient))
    elif d == 0 or name == 'error_feedback':
      result.append(HandOptimizer(recipe, plain, base))
    elif name == 'delay_momentum':
      result.append(HandOptimizer(recipe, plain, gamma))
    else:
      result.append(HandOptimizer(recipe, looking, gamma))
  return result


def naive_pipeline(modules, variables, batches, hand, method):
  """FDG (activations and cotangents to the neighbour at the next iteration) or DDG (the
  forward runs through every stage within an iteration, cotangents the next): a non-last stage
  applies the cotangent waiting for it (times BETA, through that batch's saved forward), updates,
  then forwards; the last stage takes the loss and updates. Returns each stage's variables."""
  K, N = len(modules), len(batches)
  params = [v['params'] for v in variables]
  stats = [v['batch_stats'] for v in variables]
  saved = [dict() for _ in range(K)]
  inbox_x, inbox_ct = {}, {}
  lag = (lambda k: k) if method == 'fdg' else (lambda k: 0)

  def forward(k, p, s, x):
    y, new = modules[k].apply({'params': p, 'batch_stats': s}, x, train=True,
                              mutable=['batch_stats'])
    return y, new['batch_stats']

  for t in range(N + (2 if method == 'fdg' else 1) * (K - 1)):
    out_x, out_ct = {}, {}
    for k in range(K):
      b = t - lag(k)
      if k == K - 1:
        if not 0 <= b < N:
          continue
        x = batches[b][0] if k == 0 else inbox_x.pop(k)[1]   # K = 1: back-propagation

        def loss(p, x):
          logits, new_stats = forward(k, p, stats[k], x)
          return mean_loss(logits, batches[b][1]), new_stats

        (_, stats[k]), (g, x_ct) = jax.value_and_grad(loss, (0, 1), has_aux=True)(params[k], x)
        params[k] = hand[k].step(params[k], g)
        out_ct[k - 1] = (b, x_ct)
        continue
      if k in inbox_ct:
        cb, ct = inbox_ct.pop(k)
        g, *x_ct = saved[k].pop(cb)(BETA * ct)
        params[k] = hand[k].step(params[k], g)
        if k > 0:
          out_ct[k - 1] = (cb, x_ct[0])
      if 0 <= b < N:
        x = batches[b][0] if k == 0 else inbox_x.pop(k)[1]
        y, saved[k][b], stats[k] = jax.vjp(lambda p, x: forward(k, p, stats[k], x), params[k],
                                           x, has_aux=True)
        (out_x if method == 'fdg' else inbox_x)[k + 1] = (b, y)
    inbox_x.update(out_x)
    inbox_ct = out_ct
  return [{'params': p, 'batch_stats': s} for p, s in zip(params, stats)]


def run_recipe_engine(num_stages, batches, comp, method='fdg', **kwargs):
  modules, variables = initial_variables(num_stages)
  make = pipeline.Pipeline if method == 'fdg' else baselines.DDGPipeline
  pipe = make(modules, optimizers.build(comp.optimizer), beta=BETA, compensation=comp,
              placements=jax.devices()[:num_stages], **kwargs)
  state = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
  for images, labels in batches:
    state, _ = pipe.step(state, images, labels)
  return pipe, pipe.drain(state)[0]


def delays_of(method, num_stages):
  return [(2 if method == 'fdg' else 1) * (num_stages - 1 - k) for k in range(num_stages)]


@pytest.mark.parametrize('name, recipe, method, num_stages', [
    ('nesterov', SGD, 'fdg', 3),
    ('nesterov', ADAMW, 'fdg', 2),
    ('delay_momentum', SGD, 'fdg', 2),
    ('nesterov+delay_momentum', ADAMW, 'fdg', 3),
    ('delay_momentum', ADAMW, 'ddg', 3),
    ('nesterov+delay_momentum', SGD, 'ddg', 3),
    ('error_feedback', SGD, 'fdg', 3),
    ('error_feedback', ADAMW, 'fdg', 2),
    ('error_feedback', SGD, 'ddg', 3),   # stage 1 (delay 1) is not stale: no feedback there
], ids=lambda v: v.name if isinstance(v, optimizers.Recipe) else str(v))
def test_stage_optimizers_match_naive_formula(name, recipe, method, num_stages):
  """The look-ahead options and error feedback (at c = 0.5): every stage against the formulas,
  8 batches (stage 0's updates cross the lr drop)."""
  batches = tiny_batches(8)
  delays = delays_of(method, num_stages)
  comp = compensation_lib.Compensation(name, optimizer=recipe, max_delay=max(delays),
                                       ef_coefficient=0.5)
  pipe, state = run_recipe_engine(num_stages, batches, comp, method)
  modules, variables = initial_variables(num_stages)
  expected = naive_pipeline(modules, variables, batches,
                            hand_optimizers(recipe, name, delays, comp.ef_coefficient), method)
  tolerance = 1e-5 if recipe.name == 'sgd' else 1e-4
  chex.assert_trees_all_close(jax.device_get(pipe.stage_variables(state)), expected,
                              rtol=tolerance, atol=tolerance / 10)
  # Not the user's optimizer: stage 0 ends far (beyond the tolerance) from the uncompensated run.
  plain = naive_pipeline(modules, variables, batches,
                         hand_optimizers(recipe, 'none', [0] * num_stages), method)
  moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()),
                                 expected[0]['params'], plain[0]['params'])
  assert max(jax.tree_util.tree_leaves(moved)) > 1e-3, moved
  assert pipe.stage_optimizers[-1] is pipe.optimizer
  if name == 'error_feedback':   # the stages with a fresh gradient keep the user's optimizer
    assert [o is pipe.optimizer for o in pipe.stage_optimizers] == [d < 2 for d in delays]


def test_delay_momentum_rule():
  """gamma_k = gamma_0 + d_k (0.99 - gamma_0) / (d_max + 1): DDG at K = 4 is the paper's code's
  momentum + (K - 1 - k) (0.99 - momentum) / K."""
  comp = compensation_lib.Compensation('delay_momentum', optimizer=SGD, max_delay=3)
  for k in range(3):
    assert comp.momentum(4 - 1 - k) == pytest.approx(0.9 + (4 - 1 - k) * (0.99 - 0.9) / 4)
  assert compensation_lib.Compensation('nesterov', optimizer=ADAMW).momentum(4) == 0.99


@pytest.mark.parametrize('settings, message', [
    (dict(name='nesterov'), 'needs its description'),
    (dict(name='delay_momentum', optimizer=SGD), 'max_delay=0 is below'),
    (dict(name='delay_momentum', optimizer=dataclasses.replace(SGD, momentum=0.995),
          max_delay=4), 'below it'),
])
def test_lookahead_without_what_it_needs_is_refused(settings, message):
  with pytest.raises(ValueError, match=message):
    pipeline.Pipeline(initial_variables(3)[0], make_optimizer(),
                      compensation=compensation_lib.Compensation(**settings),
                      placements=jax.devices()[:3])


def test_lookahead_bad_hyperparameters_are_refused():
  with pytest.raises(ValueError, match='nesterov_momentum=1.0 is outside'):
    compensation_lib.Compensation('nesterov', nesterov_momentum=1.0)
  with pytest.raises(ValueError, match='not an optimizers.Recipe'):
    compensation_lib.Compensation('nesterov', optimizer=make_optimizer())


@pytest.mark.parametrize('overrides, message', [
    (dict(method='dgl'), 'compensates delayed gradients'),
    (dict(num_stages=1), 'compensates delayed gradients'),
    (dict(compensation='delay_momentum', momentum=0.995), 'below the momentum'),
    (dict(nesterov_momentum=1.5), 'nesterov_momentum'),
])
def test_config_refuses_lookahead_where_it_does_not_apply(overrides, message):
  config = default_config.get_config()
  config.compensation = 'nesterov'
  config.update(overrides)
  with pytest.raises(configuration.ConfigError, match=message):
    configuration.validate_config(config)


def test_lookahead_resume_mid_stream_is_bit_exact(tmp_path):
  """NAdamW's state (count, mu product, moments) is checkpointed: 5 steps, save, restore into a
  new pipeline, 5 more equal 10 straight."""
  comp = compensation_lib.Compensation('nesterov+delay_momentum', optimizer=ADAMW, max_delay=4)
  assert_resumes_bit_for_bit(tmp_path, *initial_variables(3), optimizers.build(ADAMW),
                             tiny_batches(10), 5, compensation=comp)


@pytest.mark.parametrize('method, num_stages, microbatches, max_delay', [
    ('fdg', 3, 1, 4), ('ddg', 4, 1, 3), ('fdg', 3, 4, 2), ('fdg', 4, 2, 4)])
def test_trainer_builds_the_lookahead_from_the_config(method, num_stages, microbatches,
                                                      max_delay):
  """The trainer's compensation rebuilds the config's own optimizer (its recipe: AdamW, its
  schedule and mask) with the config's look-ahead fields, and scales the delay momentum by the
  method's largest delay (stage 0's: FDG 2(K-1), DDG K-1; FDG with M microbatches, in updates,
  1 + ceil((2(K-1) - 1) / M))."""
  from fdg_jax.trainer import train   # pylint: disable=import-outside-toplevel
  config = default_config.get_config()
  config.update(dict(method=method, num_stages=num_stages, optimizer='adamw',
                     microbatches=microbatches,
                     compensation='nesterov+delay_momentum', nesterov_momentum=0.98,
                     nadam_momentum_decay=0.002, delay_momentum_max=0.995))
  configuration.validate_config(config)
  recipe = optimizer_config.recipe(config, steps_per_epoch=10)
  comp = train.create_compensation(config, recipe, steps_per_epoch=10)
  assert (comp.max_delay, comp.nesterov_momentum, comp.nadam_momentum_decay,
          comp.delay_momentum_max) == (max_delay, 0.98, 0.002, 0.995)
  assert comp.optimizer is recipe   # the run's one recipe, not a second reading of the config
  # ... and that recipe is the config's AdamW, written out from the fields:
  assert (recipe.name, recipe.b1, recipe.b2, recipe.eps, recipe.weight_decay) == (
      'adamw', 0.9, 0.95, 1e-8, 5e-4)
  # the paper's schedule, 10 steps an epoch: lr 0.1, divided by 10 at epochs 150, 225, 275.
  assert [float(recipe.learning_rate(s)) for s in (7, 1499, 1500, 2250, 2750)] == pytest.approx(
      [0.1, 0.1, 0.01, 0.001, 0.0001])


# ------------------------------------------- compensations with microbatches (PipeDream-2BW)
# With M microbatches a non-last stage's gradient of batch b reaches its weights
# 1 + ceil((2(K-1-k) - 1) / M) updates after b's forward: the forward misses
# ceil((2(K-1-k) - 1) / M) of them (one once M >= 2(K-1) - 1), and every compensation takes that
# delay in updates (docs/algorithm.md). Written out here from the tick rule, not from schedule.py.


def microbatch_staleness(num_stages, microbatches):
  """Updates each stage's forward misses: ceil((2(K-1-k) - 1) / M), the last stage's 0."""
  return [0 if k == num_stages - 1 else -(-(2 * (num_stages - 1 - k) - 1) // microbatches)
          for k in range(num_stages)]


def hand_microbatch_steps(name, recipe, staleness, comp):
  """Each stage's update by hand, `(params, mean_gradient, batch_params) -> params`, for the
  compensation `name` at these stalenesses (delays d = staleness + 1; the last stage plain)."""
  delays = [s + 1 if s else 0 for s in staleness]
  rebuilt = name in compensation_lib.REBUILDS_OPTIMIZER + ('error_feedback',)
  hands = hand_optimizers(recipe, name, delays if rebuilt else [0] * len(delays),
                          comp.ef_coefficient)   # else the user's optimizer at every stage
  mean_square = [None] * len(delays)
  tree_map = jax.tree_util.tree_map

  def step(k, params, grads, batch_params):
    n = hands[k].n
    if name == 'delay_compensation' and delays[k]:   # DC-ASGD-a on the batch's mean gradient
      m = mean_square[k] or tree_map(jnp.zeros_like, grads)
      mean_square[k] = tree_map(lambda m, g: comp.dc_decay * m + (1 - comp.dc_decay) * g * g,
                                m, grads)
      grads = tree_map(lambda g, m, now, old: g + comp.dc_lambda / jnp.sqrt(m + comp.dc_epsilon)
                       * g * g * (now - old), grads, mean_square[k], params, batch_params)
    new = hands[k].step(params, grads)
    if name == 'lr_reschedule' and delays[k]:   # PipeMare: the update over tau ** p
      factor = max(1, delays[k]) ** -max(0.0, 1.0 - n / comp.reschedule_steps)
      new = tree_map(lambda w, v: w + factor * (v - w), params, new)
    return new

  return [functools.partial(step, k) for k in range(len(delays))]


@pytest.mark.parametrize('name, recipe, num_stages, microbatches', [
    ('weight_prediction', SGD, 3, 2),
    ('delay_compensation', SGD, 2, 2),
    ('nesterov', ADAMW, 3, 4),
    ('error_feedback', SGD, 3, 4),   # M >= 2(K-1) - 1: one update stale, the paper's setting
    pytest.param('error_feedback', ADAMW, 4, 2, marks=pytest.mark.slow),
    pytest.param('weight_prediction', SGD, 4, 2, marks=pytest.mark.slow),
    pytest.param('weight_prediction', SGD, 3, 1, marks=pytest.mark.slow),
    pytest.param('delay_compensation', SGD, 4, 8, marks=pytest.mark.slow),
    pytest.param('lr_reschedule', SGD, 3, 2, marks=pytest.mark.slow),
    pytest.param('delay_momentum', SGD, 4, 2, marks=pytest.mark.slow),
    pytest.param('nesterov+delay_momentum', ADAMW, 2, 4, marks=pytest.mark.slow),
], ids=lambda v: v.name if isinstance(v, optimizers.Recipe) else str(v))
def test_compensation_with_microbatches_matches_naive_formula(name, recipe, num_stages,
                                                              microbatches):
  """FDG with microbatches and each compensation against the tick rule written out, with the
  compensation's formula on the delay in updates (8 batches: the updates cross the lr drop)."""
  batches = tiny_batches(8, batch_size=8)
  staleness = microbatch_staleness(num_stages, microbatches)
  comp = compensation_lib.Compensation(name, optimizer=recipe, max_delay=max(staleness) + 1,
                                       reschedule_steps=6)
  modules, variables = initial_variables(num_stages)
  pipe = pipeline.Pipeline(modules, optimizers.build(recipe), beta=BETA, compensation=comp,
                           placements=jax.devices()[:num_stages],
                           method=methods.Microbatched('fdg', microbatches))
  assert [pipe.delay(k) for k in range(num_stages)] == [s + 1 if s else 0 for s in staleness]
  state = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
  for images, labels in batches:
    state, _ = pipe.step(state, images, labels)
  state, _ = pipe.drain(state)
  horizons = staleness if name == 'weight_prediction' else None
  expected = naive_fdg_microbatches(
      modules, variables, None, batches, microbatches, BETA,
      stage_steps=hand_microbatch_steps(name, recipe, staleness, comp), horizons=horizons)
  tolerance = 1e-5 if recipe.name == 'sgd' else 1e-4
  engine = jax.device_get(pipe.stage_variables(state))
  chex.assert_trees_all_close(engine, expected, rtol=tolerance, atol=tolerance / 10)
  plain = naive_fdg_microbatches(modules, variables, None, batches, microbatches, BETA,
                                 stage_steps=hand_microbatch_steps('none', recipe, staleness,
                                                                   comp))
  with pytest.raises(AssertionError):   # the compensation acted, beyond the tolerance
    chex.assert_trees_all_close(engine, plain, rtol=tolerance, atol=tolerance / 10)


def test_delay_compensation_with_microbatches_resumes_bit_for_bit(tmp_path):
  """The parameters each batch in flight forwarded with go into the checkpoint."""
  def holds_forward_parameters(state):
    assert any(state.microbatches.forward_params)

  assert_resumes_bit_for_bit(tmp_path, *initial_variables(3), make_optimizer(), tiny_batches(6),
                             3, check_saved=holds_forward_parameters,
                             compensation='delay_compensation',
                             method=methods.Microbatched('fdg', 2))


# ------------------------------------------- error feedback and basis rotation (issue 38)
#
# Each written out from docs/algorithm.md in numpy (float64), on top of HandOptimizer: error
# feedback's u + c (u - u_previous) on a stage's whole update, and Adam in the eigenbasis of a
# matrix's gradient covariances (eigh at the first update, a sort and one QR step every
# `frequency` updates). Basis rotation runs on a small MLP of square 'mlp' matrices (the tiny
# conv net has none) with batches large enough that every covariance is full rank: its
# eigenvectors are then unique up to sign, which the rotated Adam does not see.


class HandErrorFeedback:
  """`hand`'s update u_t applied as u_t + c * (u_t - u_{t-1}), the first one plain."""

  def __init__(self, hand, coefficient):
    self.hand, self.c, self.previous = hand, coefficient, None

  @property
  def n(self):
    return self.hand.n

  def step(self, params, grads):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    changes = self.hand.changes(params, grads)
    corrected = changes if self.previous is None else [
        u + self.c * (u - p) for u, p in zip(changes, self.previous)]
    self.previous = changes
    return jax.tree_util.tree_unflatten(treedef, [
        np.float32(np.asarray(x, np.float64) + u) for x, u in zip(leaves, corrected)])


WIDTH = 4   # the MLP's square matrices; its batches of 32 make their covariances full rank
# ADAMW with eps 1e-3. At the first update the rotated gradient Q_L^T G Q_R is diagonal (Q_L, Q_R
# are G's singular vectors) and its other entries are rounding noise, which Adam divides by
# sqrt(v) + eps; float32 (the engine) and float64 (the reference) round differently, so a small
# eps makes the references differ by the noise over eps (3e-4 at eps 1e-6, 5e-7 at 1e-3, against
# 5e-2 for what the rotation changes, measured on this MLP).
ROTATION_ADAMW = dataclasses.replace(ADAMW, eps=1e-3)


class MatrixBlock(nn.Module):
  """A square matrix basis_rotation rotates (a module named 'mlp'), BatchNorm, tanh."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(WIDTH, use_bias=False, name='mlp')(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return jnp.tanh(x)


class MatrixHead(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    del train
    return nn.Dense(NUM_CLASSES)(x)


def matrix_variables(num_stages):
  """Four MatrixBlocks and a head as `num_stages` stages, as tiny.initial_variables."""
  blocks = [MatrixBlock() for _ in range(4)] + [MatrixHead()]
  split = partition.balanced_split([1.0] * len(blocks), num_stages)
  variables = partition.StageModule(tuple(blocks)).init(
      jax.random.key(0), jnp.zeros((2, WIDTH)), train=False)
  return partition.build_stages(blocks, split), partition.split_variables(
      variables, split, len(blocks))


def matrix_batches(num_batches, batch_size=32):
  rng = np.random.default_rng(0)
  return [(rng.normal(size=(batch_size, WIDTH)).astype(np.float32),
           rng.integers(0, NUM_CLASSES, size=(batch_size,)).astype(np.int32))
          for _ in range(num_batches)]


class HandRotatedAdam:
  """basis_rotation's stage optimizer from docs/algorithm.md: the ADAMW recipe's AdamW
  (HandOptimizer) on every leaf but the 2-D 'kernel's under 'mlp', which get Adam in the
  eigenbasis of their gradient covariances (a side not rotated keeps the identity)."""

  def __init__(self, recipe, frequency, decay, geometry):
    self.adamw = HandOptimizer(recipe, 'adamw', recipe.b1)
    self.r, self.frequency, self.decay, self.geometry = recipe, frequency, decay, geometry
    self.matrices = {}

  @property
  def n(self):
    return self.adamw.n

  def step(self, params, grads):
    t = self.n + 1
    lr = lr_at(0.01, self.n)
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    changes = self.adamw.changes(params, grads)   # AdamW's; replaced on the rotated matrices
    for i, ((path, x), g) in enumerate(zip(paths_and_leaves, jax.tree_util.tree_leaves(grads))):
      names = [key.key for key in path]
      if np.ndim(x) == 2 and names[-1] == 'kernel' and 'mlp' in names:
        direction = self.rotated_direction(i, np.asarray(g, np.float64), t)
        changes[i] = -lr * (direction + self.r.weight_decay * np.asarray(x, np.float64))
    return jax.tree_util.tree_unflatten(treedef, [
        np.float32(np.asarray(x, np.float64) + u)
        for (_, x), u in zip(paths_and_leaves, changes)])

  def rotated_direction(self, i, g, t):
    rows, cols = g.shape
    sides = [True, True] if self.geometry == 'bi' else [rows <= cols, rows > cols]
    s = self.matrices.setdefault(i, dict(
        m=np.zeros_like(g), v=np.zeros_like(g), covariance=[np.zeros((rows, rows)),
                                                            np.zeros((cols, cols))],
        basis=[np.eye(rows), np.eye(cols)]))
    b1, b2, eps, d = self.r.b1, self.r.b2, self.r.eps, self.decay
    outer = [g @ g.T, g.T @ g]
    for side in (0, 1):
      if not sides[side]:
        continue
      s['covariance'][side] = d * s['covariance'][side] + (1 - d) * outer[side]
      c, q = s['covariance'][side], s['basis'][side]
      if t == 1:   # eigenvectors by descending eigenvalue
        s['basis'][side] = np.linalg.eigh(c)[1][:, ::-1]
      elif t % self.frequency == 0:   # sort by the current estimate, one QR power step
        order = np.argsort(-np.diag(q.T @ c @ q), kind='stable')
        s['v'] = np.take(s['v'], order, axis=side)
        s['basis'][side] = np.linalg.qr(c @ q[:, order])[0]
    left, right = s['basis']
    s['m'] = b1 * s['m'] + (1 - b1) * g
    s['v'] = b2 * s['v'] + (1 - b2) * (left.T @ g @ right) ** 2
    rotated = (left.T @ s['m'] @ right) / (np.sqrt(s['v']) + eps)
    return np.sqrt(1 - b2 ** t) / (1 - b1 ** t) * left @ rotated @ right.T


def run_rotation(comp, method, num_stages, microbatches, batches):
  """The engine on the MLP: (stage variables after the drain, pipeline)."""
  modules, variables = matrix_variables(num_stages)
  make = pipeline.Pipeline if method == 'fdg' else baselines.DDGPipeline
  pipe = make(modules, optimizers.build(comp.optimizer), beta=BETA, compensation=comp,
              placements=jax.devices()[:num_stages],
              **({'method': methods.Microbatched('fdg', microbatches)} if microbatches > 1
                 else {}))
  state = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
  for inputs, labels in batches:
    state, _ = pipe.step(state, inputs, labels)
  return jax.device_get(pipe.stage_variables(pipe.drain(state)[0])), pipe


def naive_rotation(comp, method, num_stages, microbatches, batches, rotate=True):
  """The naive reference on the MLP, the delayed stages with HandRotatedAdam (or, rotate=False,
  the AdamW they replace)."""
  modules, variables = matrix_variables(num_stages)
  delays = ([0 if k == num_stages - 1 else s + 1 for k, s in
             enumerate(microbatch_staleness(num_stages, microbatches))]
            if microbatches > 1 else delays_of(method, num_stages))
  decay = comp.optimizer.b2 if comp.rotation_decay < 0 else comp.rotation_decay
  hands = [HandRotatedAdam(comp.optimizer, comp.rotation_frequency, decay,
                           comp.rotation_geometry) if d and rotate
           else HandOptimizer(comp.optimizer, 'adamw', comp.optimizer.b1) for d in delays]
  if microbatches == 1:
    return naive_pipeline(modules, variables, batches, hands, method)
  return naive_fdg_microbatches(
      modules, variables, None, batches, microbatches, BETA,
      stage_steps=[lambda p, g, _, hand=hand: hand.step(p, g) for hand in hands])


@pytest.mark.parametrize('method, num_stages, microbatches, settings', [
    ('fdg', 3, 1, dict(rotation_frequency=3)),   # stage 0's 8 updates refresh at 3 and 6
    ('fdg', 3, 4, dict(rotation_frequency=2, rotation_geometry='uni', rotation_decay=0.9)),
    pytest.param('ddg', 3, 1, dict(rotation_frequency=4), marks=pytest.mark.slow),
    pytest.param('fdg', 4, 2, dict(rotation_frequency=1), marks=pytest.mark.slow),
], ids=str)
def test_basis_rotation_matches_naive_formula(method, num_stages, microbatches, settings):
  """Every stage against the formulas written out (8 batches: the updates cross the lr drop),
  in plain FDG or DDG and FDG with microbatches (PipeDream-2BW's one stale update at M = 4)."""
  batches = matrix_batches(8)
  comp = compensation_lib.Compensation('basis_rotation', optimizer=ROTATION_ADAMW, **settings)
  engine, pipe = run_rotation(comp, method, num_stages, microbatches, batches)
  expected = naive_rotation(comp, method, num_stages, microbatches, batches)
  chex.assert_trees_all_close(engine, expected, rtol=1e-4, atol=1e-5)
  assert pipe.stage_optimizers[-1] is pipe.optimizer
  # Not the AdamW it replaces: the rotated matrices end far (beyond the tolerance) from it.
  plain = naive_rotation(comp, method, num_stages, microbatches, batches, rotate=False)
  moved = float(np.abs(expected[0]['params']['blocks_0']['mlp']['kernel']
                       - plain[0]['params']['blocks_0']['mlp']['kernel']).max())
  assert moved > 1e-3, moved


@pytest.mark.parametrize('num_stages', [1, 3])
def test_rotated_adamw_optimizer_rotates_every_stage(num_stages):
  """optimizer 'rotated_adamw' with no compensation: every stage (the last one, and K = 1's BP,
  included) against HandRotatedAdam; BP with it is basis_rotation's reference (which rotates
  the delayed stages only)."""
  batches = matrix_batches(8)
  recipe = dataclasses.replace(ROTATION_ADAMW, name='rotated_adamw', rotation_frequency=3)
  modules, variables = matrix_variables(num_stages)
  pipe = pipeline.Pipeline(modules, optimizers.build(recipe), beta=BETA,
                           placements=jax.devices()[:num_stages])
  state = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
  for inputs, labels in batches:
    state, _ = pipe.step(state, inputs, labels)
  engine = jax.device_get(pipe.stage_variables(pipe.drain(state)[0]))
  hands = [HandRotatedAdam(recipe, 3, recipe.b2, 'bi') for _ in range(num_stages)]
  expected = naive_pipeline(modules, variables, batches, hands, 'fdg')
  # float32 against float64 rounding through eigh and Adam's division: up to 4e-5 here, against
  # 5.5e-2 for what the rotation changes (the same runs with plain AdamW).
  chex.assert_trees_all_close(engine, expected, rtol=1e-4, atol=1e-4)


def test_rotated_matrices_are_the_blocks_attention_and_mlp_kernels():
  """On the GPT: the attention's and the MLP's kernels; not the embeddings, the norms or the
  head (the authors rotate the Linear layers of 'attn' and 'mlp' only)."""
  blocks = gpt.create_blocks(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=11)
  params = partition.StageModule(tuple(blocks)).init(
      jax.random.key(0), jnp.zeros((2, 8), jnp.int32), train=False)['params']
  rotated = {jax.tree_util.keystr(path) for path, r in
             jax.tree_util.tree_flatten_with_path(rotated_adam.rotated_matrices(params))[0]
             if r}
  assert rotated == {f"['blocks_1']['{m}']['{n}']['kernel']" for m, n in (
      ('attn', 'c_attn'), ('attn', 'c_proj'), ('mlp', 'c_fc'), ('mlp', 'c_proj'))}


def test_basis_rotation_resumes_bit_for_bit(tmp_path):
  """The covariances, bases and moments live in the optimizer state: 5 steps (a refresh at 4),
  save, restore into a new pipeline, 5 more equal 10 straight."""
  comp = compensation_lib.Compensation('basis_rotation', optimizer=ROTATION_ADAMW,
                                       rotation_frequency=2)
  assert_resumes_bit_for_bit(tmp_path, *matrix_variables(3), optimizers.build(ROTATION_ADAMW),
                             matrix_batches(10), 5, compensation=comp)


@pytest.mark.parametrize('settings, message', [
    (dict(name='error_feedback', ef_coefficient=0.0), 'ef_coefficient=0.0 is not positive'),
    (dict(name='basis_rotation', rotation_frequency=0), 'rotation_frequency=0'),
    (dict(name='basis_rotation', rotation_decay=1.0), 'rotation_decay=1.0 is not below 1'),
    (dict(name='basis_rotation', rotation_geometry='tri'), "rotation_geometry='tri'"),
])
def test_new_compensations_bad_hyperparameters_are_refused(settings, message):
  with pytest.raises(ValueError, match=message):
    compensation_lib.Compensation(**settings)


@pytest.mark.parametrize('recipe', [None, SGD], ids=['no recipe', 'sgd'])
def test_basis_rotation_without_adamw_is_refused(recipe):
  with pytest.raises(ValueError, match="runs the delayed stages' AdamW in a rotated basis"):
    pipeline.Pipeline(initial_variables(2)[0], make_optimizer(), placements=jax.devices()[:2],
                      compensation=compensation_lib.Compensation('basis_rotation',
                                                                 optimizer=recipe))


@pytest.mark.parametrize('overrides, message', [
    (dict(compensation='basis_rotation'), "which optimizer 'sgd' is not"),
    (dict(compensation='basis_rotation', optimizer='muon'), "which optimizer 'muon' is not"),
    (dict(compensation='basis_rotation', optimizer='rotated_adamw'),
     "optimizer 'rotated_adamw' with --config.compensation=none"),
    (dict(compensation='nesterov', optimizer='rotated_adamw'),
     "not defined for 'rotated_adamw'"),
    (dict(ef_coefficient=-1.0), 'ef_coefficient: -1.0 is not positive'),
    (dict(rotation_frequency=0), 'rotation_frequency: 0 updates'),
    (dict(rotation_decay=1.0), 'rotation_decay: 1.0 is not below 1'),
    (dict(rotation_geometry='tri'), "rotation_geometry: unknown geometry 'tri'"),
])
def test_config_refuses_bad_new_compensations_in_one_line(overrides, message):
  config = default_config.get_config()
  config.update(overrides)
  with pytest.raises(configuration.ConfigError, match=message) as error:
    configuration.validate_config(config)
  assert '\n' not in str(error.value)


def test_trainer_builds_the_new_compensations_from_the_config():
  """create_compensation passes the config's fields; with AdamW the rotation rebuilds the run's
  own recipe at every delayed stage."""
  from fdg_jax.trainer import train   # pylint: disable=import-outside-toplevel
  config = default_config.get_config()
  config.update(dict(num_stages=3, optimizer='adamw', compensation='basis_rotation',
                     rotation_frequency=7, rotation_decay=0.98, rotation_geometry='uni',
                     ef_coefficient=0.5))
  configuration.validate_config(config)
  recipe = optimizer_config.recipe(config, steps_per_epoch=10)
  comp = train.create_compensation(config, recipe, steps_per_epoch=10)
  assert (comp.name, comp.rotation_frequency, comp.rotation_decay, comp.rotation_geometry,
          comp.ef_coefficient) == ('basis_rotation', 7, 0.98, 'uni', 0.5)
  assert comp.optimizer is recipe
  config.update(dict(compensation='error_feedback', optimizer='sgd'))
  configuration.validate_config(config)
  assert train.create_compensation(config, optimizer_config.recipe(config, 10), 10
                                   ).ef_coefficient == 0.5


def test_trainer_recipe_of_rotated_adamw_carries_the_rotation_fields():
  config = default_config.get_config()
  config.update(dict(optimizer='rotated_adamw', rotation_frequency=7, rotation_decay=0.98,
                     rotation_geometry='uni', adam_b1=0.8))
  configuration.validate_config(config)
  recipe = optimizer_config.recipe(config, steps_per_epoch=10)
  assert (recipe.name, recipe.rotation_frequency, recipe.rotation_decay,
          recipe.rotation_geometry, recipe.b1) == ('rotated_adamw', 7, 0.98, 'uni', 0.8)
  with pytest.raises(ValueError, match='rotation_frequency=0'):
    dataclasses.replace(recipe, rotation_frequency=0)
