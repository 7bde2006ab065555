"""Tiny stage modules and batches for fast engine tests (conv + BatchNorm blocks on 6x6 images),
and the set-up that the engine and baseline tests share: their optimizer, initial variables and
loss. The naive references they are checked against stay in each test file.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fdg_jax.engine import optimizers
from fdg_jax.models import partition

NUM_CLASSES = 3


class ConvBlock(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.features, (3, 3), use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.relu(x)


class Head(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool):
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def tiny_blocks(num_classes: int = NUM_CLASSES):
  """Five blocks: enough for K = 1..5 stages."""
  return [ConvBlock(4), ConvBlock(5), ConvBlock(4), ConvBlock(3), Head(num_classes)]


def tiny_batches(num_batches: int, batch_size: int = 4, num_classes: int = NUM_CLASSES,
                 seed: int = 0):
  rng = np.random.default_rng(seed)
  return [(rng.normal(size=(batch_size, 6, 6, 2)).astype(np.float32),
           rng.integers(0, num_classes, size=(batch_size,)).astype(np.int32))
          for _ in range(num_batches)]


# Coupled weight decay, momentum, and an lr drop at step 5: a stage that counted its steps
# wrongly would use the wrong learning rate.
LEARNING_RATE = optax.piecewise_constant_schedule(0.1, {5: 0.1})
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4


def make_optimizer():
  return optax.chain(optax.add_decayed_weights(WEIGHT_DECAY),
                     optax.sgd(LEARNING_RATE, momentum=MOMENTUM))


# make_optimizer()'s optimizer as an optimizers.Recipe: what the look-ahead compensations rebuild.
RECIPE = optimizers.Recipe('sgd', LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def initial_variables(num_stages: int, split=None, num_classes: int = NUM_CLASSES):
  """The tiny blocks as `num_stages` stage modules (split balanced by block count unless `split`
  is given) and each stage's variables, cut from one initialisation of the whole network."""
  blocks = tiny_blocks(num_classes)
  split = split or partition.balanced_split([1.0] * len(blocks), num_stages)
  full = partition.StageModule(tuple(blocks))
  variables = full.init(jax.random.key(0), jnp.zeros((4, 6, 6, 2)), train=False)
  return partition.build_stages(blocks, split), partition.split_variables(
      variables, split, len(blocks))


def mean_loss(logits, labels):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def assert_matches(pipe, state, expected_variables, expected_opt_states=None):
  """Every stage's variables (and optimizer state) equal a reference's, to rel 1e-5."""
  chex.assert_trees_all_close(jax.device_get(pipe.stage_variables(state)), expected_variables,
                              rtol=1e-5, atol=1e-6)
  if expected_opt_states is not None:
    chex.assert_trees_all_close(jax.device_get([s.opt_state for s in state.stages]),
                                expected_opt_states, rtol=1e-5, atol=1e-6)
