"""CIFAR models expressed as ordered lists of blocks.

Pipeline training with delayed gradients (FDG) splits a network into K
consecutive stages. To make any split possible, every model here is built as a
flat list of blocks -- stem, residual blocks, head -- each one an ``nn.Module``
with the signature ``__call__(x, train)``. ``fdg_jax.models.partition.StageModule``
chains a contiguous slice of this list into one stage.

Models:

* ``resnet20``, ``resnet56``, ``resnet110``: CIFAR ResNets of He et al. (2016),
  section 4.2, with a 1x1 conv + BN projection shortcut where the shape changes
  (option B, as in common PyTorch CIFAR code).
* ``resnet8``: the same family with one block per group (n = 1), the model of
  MLPerf Tiny's image classification benchmark; five blocks, for quick runs and
  the tests, where compiling ResNet-20 would dominate.
* ``resnet18``: ResNet-18 adapted to 32x32 inputs (3x3 stem, no max-pool), as
  in kuangliu/pytorch-cifar.
* ``wrn28_10``: pre-activation Wide ResNet-28-10 of Zagoruyko & Komodakis
  (2016).
* ``vit_tiny``: a small Vision Transformer (``fdg_jax.models.vit``): 4x4 patches (64
  tokens), width 192, 3 heads, depth 6, global average pooling; blocks
  patch_embedding, block1..block6, head. Listed in ``VIT_NAMES``, not in
  ``MODEL_NAMES`` (the CNNs).

All layers follow PyTorch's defaults where it matters for reproducing published
results: BatchNorm momentum 0.9 (PyTorch's 0.1) and epsilon 1e-5, convolutions
without bias and He (fan_out) initialisation as in torchvision.
"""

import functools
from typing import Any

from flax import linen as nn
import jax.numpy as jnp

from fdg_jax.models import vit

MODEL_NAMES = ('resnet8', 'resnet20', 'resnet56', 'resnet110', 'resnet18', 'wrn28_10')
# Per ViT: depth, heads, width, patch size (32x32 inputs). ViT-Tiny's width and heads (Touvron
# et al., 2021) at half its depth: 2.7M parameters; small enough for CPU runs on a CIFAR subset
# (a training step of 128 images took 7 s on 2 busy CPU cores), a GPU for full runs.
_VIT_CONFIGS = {'vit_tiny': (6, 3, 192, 4)}
VIT_NAMES = tuple(_VIT_CONFIGS)

# torchvision's kaiming_normal_(mode='fan_out', nonlinearity='relu'). Flax's
# 'normal' is a truncated normal rescaled to the same variance.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _conv(features: int, kernel: int, strides: int, dtype, name: str):
  """Bias-free square convolution; padding 1 for 3x3 and 0 for 1x1, as in
  PyTorch CIFAR code (so strided convs sample the same pixels)."""
  padding = (kernel - 1) // 2
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(strides, strides),
      padding=[(padding, padding), (padding, padding)],
      use_bias=False,
      kernel_init=conv_kernel_init,
      dtype=dtype,
      name=name,
  )


# Running statistics <- momentum * running statistics + (1 - momentum) * a batch's statistics.
BATCH_NORM_MOMENTUM = 0.9


def batch_norm(train: bool, dtype=None, name=None):
  """BatchNorm with PyTorch BatchNorm2d's defaults."""
  return nn.BatchNorm(
      use_running_average=not train,
      momentum=BATCH_NORM_MOMENTUM,
      epsilon=1e-5,
      dtype=dtype,
      name=name,
  )


class Stem(nn.Module):
  """3x3 stride-1 conv, optionally followed by BN + ReLU.

  Pre-activation networks (WRN) use the bare conv: the first block normalises
  its input itself.
  """

  features: int
  post_activation: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = _conv(self.features, 3, 1, self.dtype, 'conv')(x)
    if self.post_activation:
      x = batch_norm(train, self.dtype, 'bn')(x)
      x = nn.relu(x)
    return x


class BasicBlock(nn.Module):
  """Post-activation residual block: conv-BN-ReLU-conv-BN + shortcut, ReLU.

  The shortcut is the identity unless the shape changes, then a 1x1 conv + BN
  projection (option B of He et al.).
  """

  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    residual = x
    y = _conv(self.features, 3, self.strides, self.dtype, 'conv1')(x)
    y = batch_norm(train, self.dtype, 'bn1')(y)
    y = nn.relu(y)
    y = _conv(self.features, 3, 1, self.dtype, 'conv2')(y)
    y = batch_norm(train, self.dtype, 'bn2')(y)

    if self.strides != 1 or x.shape[-1] != self.features:
      residual = _conv(self.features, 1, self.strides, self.dtype,
                       'shortcut_conv')(x)
      residual = batch_norm(train, self.dtype, 'shortcut_bn')(residual)

    return nn.relu(y + residual)


class WideBasicBlock(nn.Module):
  """Pre-activation wide block: BN-ReLU-conv-(dropout)-BN-ReLU-conv + shortcut.

  As in the official WRN code, the 1x1 projection shortcut (used when the shape
  changes) reads the pre-activated input, while the identity shortcut reads the
  raw input.
  """

  features: int
  strides: int = 1
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    preactivated = nn.relu(batch_norm(train, self.dtype, 'bn1')(x))
    y = _conv(self.features, 3, self.strides, self.dtype, 'conv1')(preactivated)
    if self.dropout_rate > 0.0:
      # Draws from the 'dropout' rng collection; only needed when train=True.
      y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = nn.relu(batch_norm(train, self.dtype, 'bn2')(y))
    y = _conv(self.features, 3, 1, self.dtype, 'conv2')(y)

    if self.strides != 1 or x.shape[-1] != self.features:
      residual = _conv(self.features, 1, self.strides, self.dtype,
                       'shortcut_conv')(preactivated)
    else:
      residual = x
    return y + residual


class Head(nn.Module):
  """(BN-ReLU for pre-activation nets,) global average pool, Dense -> logits.

  The Dense layer keeps flax's default init (LeCun normal kernel, zero bias);
  pooling over H and W makes the head independent of the input resolution.
  """

  num_classes: int
  pre_activation: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    if self.pre_activation:
      x = nn.relu(batch_norm(train, self.dtype, 'bn')(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(x)
    # Losses and metrics are computed in float32 even for bf16 compute.
    return jnp.asarray(x, jnp.float32)


# Per model: (stem width, blocks per group, group widths, block kind).
# The first block of every group but the first has stride 2.
_CONFIGS = {
    'resnet8': (16, (1, 1, 1), (16, 32, 64), 'basic'),
    'resnet20': (16, (3, 3, 3), (16, 32, 64), 'basic'),
    'resnet56': (16, (9, 9, 9), (16, 32, 64), 'basic'),
    'resnet110': (16, (18, 18, 18), (16, 32, 64), 'basic'),
    'resnet18': (64, (2, 2, 2, 2), (64, 128, 256, 512), 'basic'),
    # Depth 28 = 6n + 4 -> n = 4 blocks per group; widths 16k with k = 10.
    'wrn28_10': (16, (4, 4, 4), (160, 320, 640), 'wide'),
}


def _config(model_name: str):
  if model_name not in _CONFIGS:
    raise ValueError(
        f'Unknown model {model_name!r}; choose one of {MODEL_NAMES + VIT_NAMES}.')
  return _CONFIGS[model_name]


def create_blocks(model_name: str, num_classes: int, *,
                  dropout_rate: float = 0.0,
                  dtype=jnp.float32) -> list[nn.Module]:
  """The model as an ordered list of blocks: stem, residual blocks, head.

  ``dropout_rate`` applies to the wide blocks of WRN only and is ignored
  otherwise (the ResNets of the papers have no dropout).
  """
  if model_name in _VIT_CONFIGS:   # ViTs: dropout on attention weights and residual branches
    depth, heads, width, patch = _VIT_CONFIGS[model_name]
    return vit.create_blocks(num_classes, depth, heads, width, patch_size=patch,
                             dropout_rate=dropout_rate, dtype=dtype)
  stem_width, group_sizes, group_widths, kind = _config(model_name)
  if num_classes < 1:
    raise ValueError(f'num_classes must be positive, got {num_classes}.')
  pre_activation = kind == 'wide'

  blocks: list[nn.Module] = [
      Stem(stem_width, post_activation=not pre_activation, dtype=dtype)
  ]
  if pre_activation:
    make_block = functools.partial(
        WideBasicBlock, dropout_rate=dropout_rate, dtype=dtype)
  else:
    make_block = functools.partial(BasicBlock, dtype=dtype)
  for group, (size, width) in enumerate(zip(group_sizes, group_widths)):
    for index in range(size):
      strides = 2 if group > 0 and index == 0 else 1
      blocks.append(make_block(width, strides=strides))
  blocks.append(Head(num_classes, pre_activation=pre_activation, dtype=dtype))
  return blocks


def block_names(model_name: str) -> list[str]:
  """Human-readable name of each block, in the order of ``create_blocks``.

  For example ``['stem', 'group1.block0', ..., 'group3.block2', 'head']``.
  """
  if model_name in _VIT_CONFIGS:
    return vit.block_names(_VIT_CONFIGS[model_name][0])
  _, group_sizes, _, _ = _config(model_name)
  names = ['stem']
  for group, size in enumerate(group_sizes, start=1):
    names.extend(f'group{group}.block{index}' for index in range(size))
  names.append('head')
  return names
