"""A nanoGPT-style character (or byte) GPT as an ordered list of blocks.

The model of Karpathy's nanoGPT (model.py), cut where FDG can split it:

  embedding: token embedding + learned position embedding, dropout;
  block x n_layer: x + attn(ln_1(x)), then x + mlp(ln_2(x)) (pre-LayerNorm);
  head: final LayerNorm, linear LM head (no bias) -> vocabulary logits.

Attention is nanoGPT's plain (non-flash) causal softmax attention written out: the scores
are scaled by 1/sqrt(head size), future positions set to -inf and the softmax taken in
float32; dropout acts on the attention weights and on each residual branch's output, as in
nanoGPT. The MLP is 4x wide with the exact (erf) GELU of PyTorch's nn.GELU(). Linear and
embedding weights start as normal(0.02), biases at zero, and the two residual projections of
each block (attention and MLP `c_proj`) as normal(0.02 / sqrt(2 n_layer)), as in GPT-2.
`bias=False` (nanoGPT's train.py default) drops the biases of the Dense and LayerNorm layers.

Unlike nanoGPT, the input embedding (`wte`) and the LM head are NOT tied: the embedding
block and the head become different pipeline stages, and each stage owns and updates its own
parameters on its own device; a shared matrix would need its two gradients summed across
stages every step, which FDG's stage-local updates do not do. Untying adds
vocab_size x n_embd parameters: nanoGPT's shakespeare_char model (6 layers, 6 heads, n_embd
384, block 256, vocab 65, no biases) has 10,770,048 here against 10,745,088 tied (+0.2%).

`dtype='bfloat16'` computes the matrix products, attention and LayerNorms in bfloat16 with
float32 parameters. The residual stream -- and so what one stage sends the next -- stays in
float32, as under PyTorch's autocast in nanoGPT (a bfloat16 branch output added to a float32
stream gives float32), and the logits are float32.
"""

import math
from typing import Any

from flax import linen as nn
from jax import lax
import jax.numpy as jnp
import numpy as np

DTYPES = ('float32', 'bfloat16')
LAYER_NORM_EPSILON = 1e-5   # PyTorch's, as nanoGPT's LayerNorm

normal_init = nn.initializers.normal(stddev=0.02)


def residual_init(n_layer: int):
  """GPT-2's scaled init of the projections that write into the residual stream."""
  return nn.initializers.normal(stddev=0.02 / math.sqrt(2 * n_layer))


def layer_norm(bias: bool, dtype, name: str):
  return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, use_bias=bias, use_fast_variance=False,
                      dtype=dtype, param_dtype=jnp.float32, name=name)


class Dense(nn.Dense):
  """nn.Dense applied to (..., features) as one 2-D matrix product. On XLA:CPU the kernel's
  gradient through (batch, time, features) contracts two axes and is markedly slower than the
  same product on (batch * time, features) (docs/record/language_model.md)."""

  def __call__(self, x):
    y = super().__call__(x.reshape(-1, x.shape[-1]))
    return y.reshape(*x.shape[:-1], self.features)


def dense(features: int, bias: bool, dtype, name: str, kernel_init=normal_init):
  return Dense(features, use_bias=bias, kernel_init=kernel_init,
               bias_init=nn.initializers.zeros, dtype=dtype, param_dtype=jnp.float32,
               name=name)


def gelu(x):
  """The exact GELU, x * Phi(x), as PyTorch's nn.GELU(). Written with erf: jax.nn.gelu's exact
  form uses erfc, whose gradient XLA:CPU computes more slowly."""
  return 0.5 * x * (1 + lax.erf(x * np.sqrt(0.5).astype(x.dtype)))


class Embedding(nn.Module):
  """Int tokens (B, T) -> token + position embeddings (B, T, n_embd), float32, dropout."""
  vocab_size: int
  block_size: int
  n_embd: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, tokens, train: bool):
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f'The GPT takes integer tokens of shape (batch, time); got {tokens.dtype} '
                       f'{tokens.shape}. Feed token ids, not one-hot vectors or embeddings.')
    length = tokens.shape[1]
    if length > self.block_size:
      raise ValueError(f'Sequence length {length} exceeds block_size={self.block_size}; '
                       'crop the sequences or build the model with a larger block_size.')
    wte = nn.Embed(self.vocab_size, self.n_embd, embedding_init=normal_init, name='wte')
    wpe = nn.Embed(self.block_size, self.n_embd, embedding_init=normal_init, name='wpe')
    x = wte(tokens) + wpe(jnp.arange(length))
    return nn.Dropout(self.dropout_rate, deterministic=not train)(x)


class SelfAttention(nn.Module):
  """Multi-head softmax self-attention (causal unless `causal=False`), output projection."""
  n_head: int
  n_embd: int
  n_layer: int
  dropout_rate: float = 0.0
  bias: bool = False
  causal: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    batch, length, _ = x.shape
    head_size = self.n_embd // self.n_head
    qkv = dense(3 * self.n_embd, self.bias, self.dtype, 'c_attn')(x)
    q, k, v = (a.reshape(batch, length, self.n_head, head_size)
               for a in jnp.split(qkv, 3, axis=-1))
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(head_size))
    if self.causal:
      allowed = jnp.tril(jnp.ones((length, length), bool))
      scores = jnp.where(allowed, scores, -jnp.inf)
    weights = nn.softmax(scores, axis=-1)
    weights = nn.Dropout(self.dropout_rate, deterministic=not train)(weights)
    y = jnp.einsum('bhqk,bkhd->bqhd', weights.astype(v.dtype), v)
    y = y.reshape(batch, length, self.n_embd)
    y = dense(self.n_embd, self.bias, self.dtype, 'c_proj', residual_init(self.n_layer))(y)
    return nn.Dropout(self.dropout_rate, deterministic=not train)(y)


class MLP(nn.Module):
  """Dense 4 n_embd, exact GELU, Dense back to n_embd, dropout."""
  n_embd: int
  n_layer: int
  dropout_rate: float = 0.0
  bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = dense(4 * self.n_embd, self.bias, self.dtype, 'c_fc')(x)
    x = gelu(x)
    x = dense(self.n_embd, self.bias, self.dtype, 'c_proj', residual_init(self.n_layer))(x)
    return nn.Dropout(self.dropout_rate, deterministic=not train)(x)


class Block(nn.Module):
  """Pre-LayerNorm transformer block; `causal=False` makes it a ViT encoder block.

  `n_layer` is the depth of the whole network: it sets the residual projections' init scale.
  """
  n_head: int
  n_embd: int
  n_layer: int
  dropout_rate: float = 0.0
  bias: bool = False
  causal: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = x + SelfAttention(self.n_head, self.n_embd, self.n_layer, self.dropout_rate, self.bias,
                          self.causal, self.dtype, name='attn')(
                              layer_norm(self.bias, self.dtype, 'ln_1')(x), train)
    x = x + MLP(self.n_embd, self.n_layer, self.dropout_rate, self.bias, self.dtype,
                name='mlp')(layer_norm(self.bias, self.dtype, 'ln_2')(x), train)
    return x


class Head(nn.Module):
  """Final LayerNorm and the LM head (no bias, as nanoGPT's lm_head) -> float32 logits."""
  vocab_size: int
  bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    x = layer_norm(self.bias, self.dtype, 'ln_f')(x)
    logits = dense(self.vocab_size, False, self.dtype, 'lm_head')(x)
    return logits.astype(jnp.float32)


class AuxHead(Head):
  """DGL's auxiliary head for a language model: the LM head (LayerNorm + linear) on a stage's
  (B, T, n_embd) output, giving next-token logits for the stage's local loss."""


def aux_head(stage_index: int, vocab_size: int) -> nn.Module:
  """Factory for `baselines.DGLPipeline(aux_head=...)`: `(stage, num_classes) -> module`."""
  del stage_index
  return AuxHead(vocab_size)


def compute_dtype(dtype) -> Any:
  """'float32' / 'bfloat16' (or the jnp dtypes) -> the jnp dtype; anything else is an error."""
  name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
  if name not in DTYPES:
    raise ValueError(f'dtype={dtype!r} is not one of {DTYPES}.')
  return jnp.dtype(name)


def check_transformer(depth: int, heads: int, width: int, dropout_rate: float,
                      names=('n_layer', 'n_head', 'n_embd')) -> None:
  """Shared argument checks of the GPT and the ViT; `names` are the caller's argument names."""
  for name, value in zip(names, (depth, heads, width)):
    if value < 1:
      raise ValueError(f'{name}={value} must be positive.')
  if width % heads:
    raise ValueError(f'{names[2]}={width} is not divisible by {names[1]}={heads}; each head '
                     f'gets {names[2]} // {names[1]} features: pick a multiple of {names[1]}.')
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f'dropout_rate={dropout_rate} is outside [0, 1).')


def create_blocks(n_layer: int, n_head: int, n_embd: int, block_size: int, vocab_size: int,
                  dropout_rate: float = 0.0, bias: bool = False,
                  dtype='float32') -> list[nn.Module]:
  """The GPT as [embedding, block x n_layer, head]; call each as `block(x, train=bool)`."""
  check_transformer(n_layer, n_head, n_embd, dropout_rate)
  if block_size < 1 or vocab_size < 1:
    raise ValueError(f'block_size={block_size} and vocab_size={vocab_size} must be positive.')
  dtype = compute_dtype(dtype)
  return ([Embedding(vocab_size, block_size, n_embd, dropout_rate)]
          + [Block(n_head, n_embd, n_layer, dropout_rate, bias, True, dtype)
             for _ in range(n_layer)]
          + [Head(vocab_size, bias, dtype)])


def block_names(n_layer: int) -> list[str]:
  """['embedding', 'block1', ..., 'block{n_layer}', 'head'], in the order of `create_blocks`."""
  return ['embedding'] + [f'block{i}' for i in range(1, n_layer + 1)] + ['head']
