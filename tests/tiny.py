"""Tiny stage modules for fast engine tests: conv + BatchNorm blocks on 6x6 images."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


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


def tiny_blocks(num_classes: int = 3):
  """Five blocks: enough for K = 1..5 stages."""
  return [ConvBlock(4), ConvBlock(5), ConvBlock(4), ConvBlock(3), Head(num_classes)]


def tiny_batches(num_batches: int, batch_size: int = 4, num_classes: int = 3, seed: int = 0):
  rng = np.random.default_rng(seed)
  return [(rng.normal(size=(batch_size, 6, 6, 2)).astype(np.float32),
           rng.integers(0, num_classes, size=(batch_size,)).astype(np.int32))
          for _ in range(num_batches)]
