"""Tests for fdg_jax.engine.optimizers: SGD unchanged, AdamW's decay mask, nanoGPT's schedule, clipping."""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fdg_jax.engine import optimizers
from fdg_jax.trainer import optimizers as optimizer_config


def _config(**overrides):
  """The fields optimizers.py reads, at the defaults of the config snippet (SGD, piecewise)."""
  config = ml_collections.ConfigDict(dict(
      optimizer='sgd', learning_rate=0.1, momentum=0.9, weight_decay=5e-4,
      lr_boundaries_epochs=(3, 5), lr_decay_factor=0.1, warmup_epochs=0.0, warmup_lr=0.01,
      warmup_shape='constant', adam_b1=0.9, adam_b2=0.95, adam_eps=1e-8,
      decay_embeddings=False, lr_schedule='piecewise', warmup_steps=0, lr_decay_steps=0,
      min_learning_rate=0.0, grad_clip=0.0))
  config.update(overrides)
  return config


def _todays_sgd(config, steps_per_epoch):
  """train.create_optimizer and create_learning_rate_schedule before optimizers.py, verbatim."""
  warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
  boundaries = {int(round(epoch * steps_per_epoch)) - warmup_steps: config.lr_decay_factor
                for epoch in config.lr_boundaries_epochs}
  main = optax.piecewise_constant_schedule(config.learning_rate, boundaries)
  schedule = main
  if warmup_steps:
    warmup = (optax.constant_schedule(config.warmup_lr) if config.warmup_shape == 'constant' else
              optax.linear_schedule(config.warmup_lr, config.learning_rate, warmup_steps))
    schedule = optax.join_schedules([warmup, main], [warmup_steps])
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(schedule, momentum=config.momentum or None))


def _run(tx, params, num_steps):
  """`num_steps` updates with gradients that change every step; the final params."""
  state = tx.init(params)
  for t in range(num_steps):
    grads = jax.tree.map(lambda p, t=t: jnp.sin(p * (t + 1)) + 0.1 * t, params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


@pytest.mark.parametrize('overrides', [
    {}, {'warmup_epochs': 1.5}, {'warmup_epochs': 1.0, 'warmup_shape': 'linear'},
    {'momentum': 0.0}])
def test_sgd_bit_identical_to_todays(overrides):
  config = _config(**overrides)
  params = {'conv': {'kernel': jnp.linspace(-1, 1, 24).reshape(2, 3, 4)},
            'bn': {'scale': jnp.ones(4), 'bias': jnp.zeros(4)}}
  # 12 steps at 2 per epoch: through the warm-up and both boundaries (epochs 3 and 5).
  ours, our_state = _run(optimizers.build(optimizer_config.recipe(config, 2)), params, 12)
  today, today_state = _run(_todays_sgd(config, 2), params, 12)
  assert jax.tree.structure(our_state) == jax.tree.structure(today_state)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(today)):
    np.testing.assert_array_equal(a, b)
  schedule = optimizer_config.learning_rate_schedule(config, 2)
  assert float(schedule(11)) == pytest.approx(0.1 * 0.1 * 0.1)


class _TinyLM(nn.Module):

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(10, 8)(tokens)
    x = nn.LayerNorm()(x)
    x = nn.Dense(8)(x)
    return nn.Conv(4, (3,))(x)


@pytest.mark.parametrize('decay_embeddings', [False, True])
def test_adamw_decays_weight_matrices_only(decay_embeddings):
  params = _TinyLM().init(jax.random.key(0), jnp.zeros((2, 5), jnp.int32))['params']
  mask = optimizers.weight_decay_mask(params, decay_embeddings)
  assert mask == {'Embed_0': {'embedding': decay_embeddings},
                  'LayerNorm_0': {'scale': False, 'bias': False},
                  'Dense_0': {'kernel': True, 'bias': False},
                  'Conv_0': {'kernel': True, 'bias': False}}
  # With zero gradients Adam's step is 0: only the decoupled decay, lr * wd * param, moves.
  config = _config(optimizer='adamw', learning_rate=0.5, weight_decay=0.1,
                   decay_embeddings=decay_embeddings)
  tx = optimizers.build(optimizer_config.recipe(config, 1))
  params = jax.tree.map(lambda p: p + 1.0, params)  # no zero biases: decay would show
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  expected = jax.tree.map(lambda p, decays: -0.5 * 0.1 * p if decays else jnp.zeros_like(p),
                          params, mask)
  chex.assert_trees_all_close(updates, expected, rtol=1e-6)


def test_adamw_moments_follow_config():
  config = _config(optimizer='adamw', learning_rate=0.01, lr_boundaries_epochs=(),
                   weight_decay=0.0, adam_b1=0.8, adam_b2=0.99, adam_eps=1e-6)
  params = {'w': jnp.array([0.5, -1.0, 2.0])}
  ours, _ = _run(optimizers.build(optimizer_config.recipe(config, 1)), params, 5)
  reference, _ = _run(optax.adam(0.01, b1=0.8, b2=0.99, eps=1e-6), params, 5)
  chex.assert_trees_all_close(ours, reference, rtol=1e-6)


def _nanogpt_get_lr(it, learning_rate, min_lr, warmup_iters, lr_decay_iters):
  """nanoGPT train.py's get_lr."""
  if it < warmup_iters:
    return learning_rate * (it + 1) / (warmup_iters + 1)
  if it > lr_decay_iters:
    return min_lr
  decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
  coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
  return min_lr + coeff * (learning_rate - min_lr)


@pytest.mark.parametrize('warmup', [0, 100])
def test_warmup_cosine_is_nanogpts_get_lr(warmup):
  config = _config(lr_schedule='warmup_cosine', learning_rate=1e-3, min_learning_rate=1e-4,
                   warmup_steps=warmup, lr_decay_steps=5000)
  schedule = jax.jit(optimizer_config.learning_rate_schedule(config, steps_per_epoch=7))
  for it in (0, 1, 50, 99, 100, 101, 1234, 2550, 4999, 5000, 5001, 9000):
    assert float(schedule(jnp.int32(it))) == pytest.approx(
        _nanogpt_get_lr(it, 1e-3, 1e-4, warmup, 5000), rel=1e-6, abs=1e-12), it


def test_grad_clip_is_per_stage():
  """Each stage's optimizer clips its own gradient by its own norm, not the model's."""
  config = _config(optimizer='sgd', momentum=0.0, weight_decay=0.0, learning_rate=1.0,
                   lr_boundaries_epochs=(), grad_clip=1.0)
  stage_grads = [{'w': jnp.array([3.0, 4.0])}, {'w': jnp.array([0.3, 0.4])}]  # norms 5, 0.5
  tx = optimizers.build(optimizer_config.recipe(config, 1))
  updates = [tx.update(g, tx.init(g), g)[0] for g in stage_grads]
  chex.assert_trees_all_close(updates[0], {'w': -jnp.array([0.6, 0.8])})  # clipped to norm 1
  chex.assert_trees_all_close(updates[1], {'w': -jnp.array([0.3, 0.4])})  # under: unchanged
  # Clipping the whole model's gradient (norm ~5.02) would have scaled the second stage too.
  whole = {'a': stage_grads[0]['w'], 'b': stage_grads[1]['w']}
  clipped, _ = optax.clip_by_global_norm(1.0).update(whole, None)
  assert float(jnp.abs(clipped['b'] + updates[1]['w']).max()) > 0.2
  no_clip = optimizers.build(optimizer_config.recipe(_config(grad_clip=0.0), 1))
  assert len(no_clip.init(stage_grads[0])) == 2  # decay and SGD only: today's state


def test_validate_names_each_bad_field():
  assert optimizer_config.validate(_config()) == []
  assert optimizer_config.validate(_config(optimizer='adamw', lr_schedule='warmup_cosine',
                                     warmup_steps=10, lr_decay_steps=100)) == []
  bad = optimizer_config.validate(_config(
      optimizer='adam', lr_schedule='cosine', adam_b1=1.0, adam_b2=1.0, adam_eps=0.0,
      weight_decay=-1.0, momentum=-0.5, grad_clip=-1.0,
      warmup_steps=5))
  fields = [message.split(':')[0] for message in bad]
  assert fields == ['config.optimizer', 'config.lr_schedule', 'config.adam_b1',
                    'config.adam_b2', 'config.adam_eps', 'config.weight_decay',
                    'config.momentum', 'config.grad_clip', 'config.warmup_steps']
  assert "Choose one of ('sgd', 'adamw', 'muon', 'rotated_adamw')" in bad[0]
  cosine = optimizer_config.validate(_config(
      lr_schedule='warmup_cosine', warmup_steps=100, lr_decay_steps=100,
      min_learning_rate=1.0, warmup_epochs=2.0))
  assert [m.split(':')[0] for m in cosine] == [
      'config.lr_decay_steps', 'config.min_learning_rate', 'config.warmup_epochs']
  assert 'is not after warmup_steps=100' in cosine[0]
