"""A small Vision Transformer for CIFAR as an ordered list of blocks.

  patch_embedding: non-overlapping patch_size x patch_size patches, each linearly projected
    (a Conv with kernel = stride = patch_size, the same as a Dense on flattened patches), plus
    a learned position embedding, dropout: (B, H, W, C) -> (B, N, embed_dim);
  block x depth: pre-LayerNorm encoder blocks, `gpt.Block` with `causal=False` (biases on);
  head: final LayerNorm, global average pool over the N tokens, Dense -> class logits.

Global average pooling rather than a class token: "Better plain ViT baselines for
ImageNet-1k" (Beyer et al., 2022; big_vision) found it as good or better for ViTs trained from
scratch on small data, and it keeps the sequence at N = (32/4)^2 = 64 tokens and the first stage
free of a token that only the head reads. Init: patch projection and head LeCun normal (flax's
default), position embedding normal(0.02), the encoder blocks as `gpt.Block`. `dtype` as in
`fdg_jax.models.gpt`: bfloat16 compute, float32 parameters, residual stream and logits.
"""

from typing import Any

from flax import linen as nn
import jax.numpy as jnp

from fdg_jax.models import gpt


class PatchEmbedding(nn.Module):
  """Images (B, H, W, C) -> patch tokens (B, (H/p)(W/p), embed_dim), position-embedded."""
  embed_dim: int
  patch_size: int
  image_size: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool):
    if images.ndim != 4 or images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f'The ViT takes images of shape (batch, {self.image_size}, '
                       f'{self.image_size}, channels); got {images.shape}. Build it with '
                       'image_size= the input resolution.')
    p = self.patch_size
    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                param_dtype=jnp.float32, name='projection')(images)
    x = x.reshape(x.shape[0], -1, self.embed_dim)
    position = self.param('position_embedding', gpt.normal_init, (1, *x.shape[1:]), jnp.float32)
    x = x + position   # float32 from here on, whatever the compute dtype
    return nn.Dropout(self.dropout_rate, deterministic=not train)(x)


class Head(nn.Module):
  """Final LayerNorm, mean over tokens, Dense -> float32 class logits."""
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    x = gpt.layer_norm(True, self.dtype, 'ln_f')(x)
    x = jnp.mean(x, axis=1)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name='fc')(x)
    return logits.astype(jnp.float32)


def create_blocks(num_classes: int, depth: int, num_heads: int, embed_dim: int,
                  patch_size: int = 4, image_size: int = 32, dropout_rate: float = 0.0,
                  dtype='float32') -> list[nn.Module]:
  """The ViT as [patch_embedding, block x depth, head]."""
  gpt.check_transformer(depth, num_heads, embed_dim, dropout_rate,
                        names=('depth', 'num_heads', 'embed_dim'))
  if num_classes < 1:
    raise ValueError(f'num_classes must be positive, got {num_classes}.')
  if patch_size < 1 or image_size % patch_size:
    raise ValueError(f'patch_size={patch_size} does not tile image_size={image_size}; pick a '
                     'patch size that divides the image size.')
  dtype = gpt.compute_dtype(dtype)
  return ([PatchEmbedding(embed_dim, patch_size, image_size, dropout_rate, dtype)]
          + [gpt.Block(num_heads, embed_dim, depth, dropout_rate, bias=True, causal=False,
                       dtype=dtype) for _ in range(depth)]
          + [Head(num_classes, dtype)])


def block_names(depth: int) -> list[str]:
  """['patch_embedding', 'block1', ..., 'block{depth}', 'head']."""
  return ['patch_embedding'] + [f'block{i}' for i in range(1, depth + 1)] + ['head']
