"""DGL's auxiliary heads by name: each non-last stage's classifier on its own output.

A head factory is `(stage_index, num_classes) -> flax module`, called as
`head.apply(variables, y, train=bool)` on the stage's output y; the engine's DGL method
(`engine.methods.LocalLosses`) takes a factory, and `AUX_HEADS` names the zoo's: the CNN heads on
NHWC features ('mlp-sr', DGL's default; 'conv'), the ViT's ('vit': LayerNorm, mean over tokens,
Dense) and the language model's ('lm': LayerNorm and a linear LM head over the vocabulary).
"""

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from fdg_jax.models import gpt
from fdg_jax.models import vit
from fdg_jax.models import zoo

def adaptive_avg_pool(x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
  """PyTorch's adaptive_avg_pool2d on NHWC: bin i of n covers [floor(iH/n), ceil((i+1)H/n))."""
  n, height, width, channels = x.shape
  out_h, out_w = output_size
  if height % out_h == 0 and width % out_w == 0:
    return x.reshape(n, out_h, height // out_h, out_w, width // out_w, channels).mean((2, 4))
  rows = []
  for i in range(out_h):
    h0, h1 = i * height // out_h, -(-(i + 1) * height // out_h)
    rows.append(jnp.stack(
        [x[:, h0:h1, j * width // out_w:-(-(j + 1) * width // out_w)].mean((1, 2))
         for j in range(out_w)], axis=1))
  return jnp.stack(rows, axis=1)


class MLPSRAuxHead(nn.Module):
  """DGL's "MLP-SR-aux" auxiliary classifier (the default).

  As in the DGL authors' CIFAR code (`auxillary_classifier2` with n_lin=3, mlp_layers=3, used
  for their ResNet comparison with DDG): average-pool the C-channel input to ceil(H/4) x
  ceil(W/4); `num_convs` x [1x1 conv (C -> C, no bias), BatchNorm, ReLU]; average-pool to
  2 x 2; flatten (4C); `num_mlp_layers` x [Dense(4C), BatchNorm, ReLU]; Dense(num_classes).
  """
  num_classes: int
  num_convs: int = 3
  num_mlp_layers: int = 3

  @nn.compact
  def __call__(self, x, train: bool):
    channels = x.shape[-1]
    x = adaptive_avg_pool(x, (math.ceil(x.shape[1] / 4), math.ceil(x.shape[2] / 4)))
    for _ in range(self.num_convs):
      x = nn.relu(zoo.batch_norm(train)(nn.Conv(channels, (1, 1), use_bias=False)(x)))
    x = adaptive_avg_pool(x, (2, 2)).reshape(x.shape[0], -1)
    for _ in range(self.num_mlp_layers):
      x = nn.relu(zoo.batch_norm(train)(nn.Dense(4 * channels)(x)))
    return nn.Dense(self.num_classes)(x)


class ConvAuxHead(nn.Module):
  """A smaller head: 3x3 conv (same width, no bias), BatchNorm, ReLU, global average pool, Dense."""
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(x.shape[-1], (3, 3), use_bias=False)(x)
    x = nn.relu(zoo.batch_norm(train)(x))
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def mlp_sr_aux_head(stage: int, num_classes: int) -> nn.Module:
  del stage
  return MLPSRAuxHead(num_classes)


def conv_aux_head(stage: int, num_classes: int) -> nn.Module:
  del stage
  return ConvAuxHead(num_classes)


def vit_aux_head(stage: int, num_classes: int) -> nn.Module:
  del stage
  return vit.Head(num_classes)


AUX_HEADS: dict[str, Callable[[int, int], nn.Module]] = {
    'mlp-sr': mlp_sr_aux_head, 'conv': conv_aux_head, 'vit': vit_aux_head, 'lm': gpt.aux_head}


def get(name: str) -> Callable[[int, int], nn.Module]:
  """The head factory of a name in AUX_HEADS."""
  if name not in AUX_HEADS:
    raise ValueError(f'aux_head={name!r} is not one of {tuple(AUX_HEADS)}; or pass a factory '
                     '(stage_index, num_classes) -> flax module.')
  return AUX_HEADS[name]


