"""Stages that pass pytrees: a dict {'h', 'skip'} of float arrays, and a tuple (float array, bool
mask) whose mask changes the output. FDG and DDG against a naive single-device reference that
differentiates only the floating-point leaves (docs/algorithm.md); a checkpoint of a pipeline in
flight resumes bit for bit; a data-parallel stage moves the pytrees between meshes.
tests/mp_engine_child.py runs these pipelines across processes."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fdg_jax.engine import baselines
from fdg_jax.engine import checkpoint
from fdg_jax.engine import pipeline
from tiny import NUM_CLASSES, mean_loss

WIDTH = 6
KINDS = ('dict', 'mask')


# ---------------------------------------------------------------- stages that pass pytrees


class DictIn(nn.Module):
  """x -> {'h': a BatchNorm'd hidden state, 'skip': a projection of x}."""

  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Dense(WIDTH)(x))
    return {'h': nn.relu(h), 'skip': nn.Dense(WIDTH, use_bias=False)(x)}


class DictMiddle(nn.Module):
  @nn.compact
  def __call__(self, tree, train: bool):
    h = jnp.tanh(nn.Dense(WIDTH)(tree['h'])) + tree['skip']
    return {'h': h, 'skip': 0.5 * tree['skip'] + nn.Dense(WIDTH)(h)}


class DictOut(nn.Module):
  @nn.compact
  def __call__(self, tree, train: bool):
    return nn.Dense(NUM_CLASSES)(tree['h'] * tree['skip'] + tree['h'])


class MaskIn(nn.Module):
  """(x, mask) -> (h, mask): rows whose mask is False are zeroed."""

  @nn.compact
  def __call__(self, inputs, train: bool):
    x, mask = inputs
    return jnp.where(mask, nn.relu(nn.Dense(WIDTH)(x)), 0.0), mask


class MaskMiddle(nn.Module):
  @nn.compact
  def __call__(self, inputs, train: bool):
    h, mask = inputs
    return jnp.where(mask, jnp.tanh(nn.Dense(WIDTH)(h)), -h), mask


class MaskOut(nn.Module):
  @nn.compact
  def __call__(self, inputs, train: bool):
    h, mask = inputs
    return nn.Dense(NUM_CLASSES)(jnp.where(mask, h, 0.0))


def pytree_stages(kind: str, num_stages: int) -> list[nn.Module]:
  first, middle, last = {'dict': (DictIn, DictMiddle, DictOut),
                         'mask': (MaskIn, MaskMiddle, MaskOut)}[kind]
  return [first()] + [middle() for _ in range(num_stages - 2)] + [last()]


def pytree_batches(kind: str, num_batches: int, batch_size: int = 8, seed: int = 0):
  """(inputs, labels) batches; the mask kind's inputs are (x, mask), both values of the mask in
  every batch."""
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(num_batches):
    x = rng.normal(size=(batch_size, 5)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=(batch_size,)).astype(np.int32)
    mask = (np.arange(batch_size) % 3 != 1)[:, None]
    batches.append(((x, mask) if kind == 'mask' else x, labels))
  return batches


def pytree_variables(modules, sample_input) -> list[dict]:
  """Each stage's initial variables, the stages initialised in turn on the sample's outputs."""
  variables, x = [], sample_input
  for k, module in enumerate(modules):
    stage = module.init(jax.random.key(10 + k), x, train=False)
    variables.append({'params': stage['params'], 'batch_stats': stage.get('batch_stats', {})})
    x = module.apply(stage, x, train=False)
  return variables


def make_optimizer():
  return optax.sgd(0.05, momentum=0.9)


def pytree_pipeline(kind, num_stages, method='fdg', stash='vjp', placements=None, beta=0.5):
  """A pipeline of the `kind` stages and their initial variables."""
  modules = pytree_stages(kind, num_stages)
  engine = baselines.DDGPipeline if method == 'ddg' else pipeline.Pipeline
  pipe = engine(modules, make_optimizer(), beta=beta, stash=stash,
                placements=placements or jax.devices()[:num_stages])
  return pipe, pytree_variables(modules, pytree_batches(kind, 1)[0][0])


def run(pipe, state, batches):
  for inputs, labels in batches:
    state, _ = pipe.step(state, inputs, labels)
  return state


# ---------------------------------------------------------------- the naive reference


def float_leaves(tree):
  """(the floating-point leaves of `tree`, a function that puts new ones in their places)."""
  leaves, structure = jax.tree_util.tree_flatten(tree)
  is_float = [jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) for a in leaves]

  def join(floats):
    floats = iter(floats)
    return jax.tree_util.tree_unflatten(
        structure, [next(floats) if f else a for a, f in zip(leaves, is_float)])
  return [a for a, f in zip(leaves, is_float) if f], join


def naive_delayed(modules, variables, optimizer, batches, beta, stash, method):
  """FDG or DDG from docs/algorithm.md, on one device, without jit, on pytrees: stage k forwards
  batch t - forward_lag(k) at iteration t and (non-last) applies the beta-scaled cotangent of
  batch t - update_lag(k) first, through the forward it saved (stash 'vjp') or a forward redone
  at the current weights ('recompute'). A cotangent is the list of float leaves of a stage's
  output and reaches the stage below for the next iteration; an activation is used the next
  iteration (FDG) or the same one (DDG, forward locked)."""
  K, N = len(modules), len(batches)
  forward_lag = (lambda k: k) if method == 'fdg' else (lambda k: 0)
  update_lag = (lambda k: 2 * (K - 1) - k) if method == 'fdg' else (lambda k: K - 1 - k)
  params = [v['params'] for v in variables]
  stats = [v['batch_stats'] for v in variables]
  opt_states = [optimizer.init(p) for p in params]
  inputs = {(0, b): batch[0] for b, batch in enumerate(batches)}   # (stage, batch) -> input
  cotangents, saved = {}, {}                                       # (stage, batch) -> ...

  def vjp_of(k, p, x):
    """(output, pullback of the output's float leaves -> (param grads, input float leaves'),
    new batch stats)."""
    x_floats, join = float_leaves(x)

    def forward(p, floats):
      y, mutated = modules[k].apply({'params': p, 'batch_stats': stats[k]}, join(floats),
                                    train=True, mutable=['batch_stats'])
      return float_leaves(y)[0], (y, mutated.get('batch_stats', stats[k]))
    _, pullback, (y, new_stats) = jax.vjp(forward, p, x_floats, has_aux=True)
    return y, pullback, new_stats

  def update(k, grads):
    updates, opt_states[k] = optimizer.update(grads, opt_states[k], params[k])
    params[k] = optax.apply_updates(params[k], updates)

  for t in range(N + update_lag(0)):
    arriving = {}
    for k in range(K):
      b = t - forward_lag(k)
      if k == K - 1:
        if 0 <= b < N:
          x_floats, join = float_leaves(inputs.pop((k, b)))

          def loss(p, floats):
            logits, mutated = modules[k].apply(
                {'params': p, 'batch_stats': stats[k]}, join(floats), train=True,
                mutable=['batch_stats'])
            return mean_loss(logits, batches[b][1]), mutated.get('batch_stats', stats[k])
          (_, stats[k]), (grads, x_ct) = jax.value_and_grad(loss, (0, 1), has_aux=True)(
              params[k], x_floats)
          update(k, grads)
          arriving[k - 1, b] = x_ct
        continue
      done = t - update_lag(k)
      if 0 <= done < N:
        ct = [beta * c for c in cotangents.pop((k, done))]
        if stash == 'vjp':
          pullback = saved.pop((k, done))
        else:
          _, pullback, _ = vjp_of(k, params[k], saved.pop((k, done)))
        grads, x_ct = pullback(ct)
        update(k, grads)
        if k > 0:
          arriving[k - 1, done] = x_ct
      if 0 <= b < N:
        x = inputs.pop((k, b))
        y, pullback, stats[k] = vjp_of(k, params[k], x)
        saved[k, b] = pullback if stash == 'vjp' else x
        inputs[k + 1, b] = y
    cotangents.update(arriving)
  assert not inputs and not cotangents and not saved
  return [{'params': p, 'batch_stats': s} for p, s in zip(params, stats)]


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize('stash', ['vjp', 'recompute'])
@pytest.mark.parametrize('method', ['fdg', 'ddg'])
@pytest.mark.parametrize('num_stages', [2, 3])
@pytest.mark.parametrize('kind', KINDS)
def test_pytree_stages_match_the_naive_reference(kind, num_stages, method, stash):
  beta = 0.5 if method == 'fdg' else 1.0
  batches = pytree_batches(kind, 7)
  pipe, variables = pytree_pipeline(kind, num_stages, method, stash, beta=beta)
  state, _ = pipe.drain(run(pipe, pipe.init(jax.random.key(1), batches[0][0], variables),
                            batches))
  expected = naive_delayed(pytree_stages(kind, num_stages), variables, make_optimizer(),
                           batches, beta, stash, method)
  got = jax.device_get(pipe.stage_variables(state))
  chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)
  for k in range(num_stages):   # every stage trained
    assert not np.allclose(jax.tree_util.tree_leaves(got[k]['params'])[0],
                           jax.tree_util.tree_leaves(variables[k]['params'])[0])


def test_the_mask_changes_the_output():
  """The bool leaf is not decoration: flipping it changes the logits."""
  (x, mask), _ = pytree_batches('mask', 1)[0]
  pipe, variables = pytree_pipeline('mask', 3)
  state = pipe.init(jax.random.key(1), (x, mask), variables)
  assert not np.allclose(pipe.predict(state, (x, mask)), pipe.predict(state, (x, ~mask)))


@pytest.mark.parametrize('kind', KINDS)
def test_checkpoint_in_flight_with_pytree_activations_resumes_bit_exactly(kind, tmp_path):
  batches = pytree_batches(kind, 8)
  pipe, variables = pytree_pipeline(kind, 3)
  straight, _ = pipe.drain(run(pipe, pipe.init(jax.random.key(1), batches[0][0], variables),
                               batches))
  expected = jax.device_get(pipe.stage_variables(straight))

  pipe, variables = pytree_pipeline(kind, 3)
  state = run(pipe, pipe.init(jax.random.key(1), batches[0][0], variables), batches[:4])
  assert state.in_flight and state.saved[1]   # a saved forward of a pytree stage input
  checkpoint.Checkpointer(str(tmp_path)).save(4, pipe, state, extra={'step': 4})
  del state
  pipe, variables = pytree_pipeline(kind, 3)   # as a new process would
  fresh = pipe.init(jax.random.key(1), batches[0][0], variables)
  restored, extra = checkpoint.Checkpointer(str(tmp_path)).restore(pipe, fresh)
  assert extra == {'step': 4}
  resumed, _ = pipe.drain(run(pipe, restored, batches[4:]))
  chex.assert_trees_all_equal(jax.device_get(pipe.stage_variables(resumed)), expected)


@pytest.mark.parametrize('kind', KINDS)
def test_data_parallel_stages_move_pytrees_between_meshes(kind):
  """Stage 0 on devices 0-1 and stage 1 on devices 2-3 (each batch split over a stage's two
  devices), stage 2 on device 4: every leaf of what arrives is split over the stage's mesh, and
  the result is the single-device reference's."""
  devices = jax.devices()
  batches = pytree_batches(kind, 6)
  pipe, variables = pytree_pipeline(kind, 3, placements=[devices[0:2], devices[2:4], devices[4]])
  state = pipe.init(jax.random.key(1), batches[0][0], variables)
  state = run(pipe, state, batches[:2])
  for k in (1, 2):
    for leaf in jax.tree_util.tree_leaves(state.activations[k].value):
      assert leaf.sharding.device_set == pipe.shardings[k].device_set
  assert not jax.tree_util.tree_leaves(state.activations[1].value)[0].sharding.is_fully_replicated
  state, _ = pipe.drain(run(pipe, state, batches[2:]))
  expected = naive_delayed(pytree_stages(kind, 3), variables, make_optimizer(), batches, 0.5,
                           'vjp', 'fdg')
  chex.assert_trees_all_close(jax.device_get(pipe.stage_variables(state)), expected,
                              rtol=1e-5, atol=1e-6)
