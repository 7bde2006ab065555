"""A nanoGPT-style character (or byte) GPT as an ordered list of blocks.

The model of Karpathy's nanoGPT (model.py), cut where FDG can split it:

  embedding: token embedding + learned position embedding, dropout;
  block x n_layer: x + attn(ln_1(x)), then x + mlp(ln_2(x)) (pre-LayerNorm);
  head: final LayerNorm, linear LM head (no bias) -> vocabulary logits.

Attention is nanoGPT's: the scores scaled by 1/sqrt(head size), future positions masked, the
softmax taken in float32, dropout on the weights. How it runs is chosen per platform
(`attention_implementation`): on a GPU through `jax.nn.dot_product_attention`, cuDNN's fused
(flash) attention in bfloat16 where cuDNN takes the shapes and XLA's otherwise; on CPUs written
out with einsums ('plain'), which XLA:CPU runs about 7% faster per training step than
`dot_product_attention`'s XLA form (docs/record/language_model.md) with the same numbers. With
attention dropout in training (dropout_rate > 0) it is always written out, since
`dot_product_attention` has no dropout. Dropout also acts on each residual branch's output.
The MLP is 4x wide with the exact (erf) GELU of PyTorch's nn.GELU(). Linear and embedding
weights start as normal(0.02), biases at zero, and the two residual projections of each block
(attention and MLP `c_proj`) as normal(0.02 / sqrt(2 n_layer)), as in GPT-2.
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

`decode=True` (`create_blocks(..., decode=True)`) builds the same model for generation: each
attention keeps the keys and values of the positions seen so far in a 'cache' collection, and
the embedding its next position, so that each new token costs one position's work
(`fdg_jax.models.sampling`). The parameters are the same; training never builds it (the
engine takes only 'params' and 'batch_stats').
"""

import math
from typing import Any, Optional

from flax import linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

DTYPES = ('float32', 'bfloat16')
# How attention runs: None (per platform: 'cudnn' where it can run, else 'xla' on a GPU and
# 'plain' elsewhere), 'plain' (written out with einsums), 'xla' (jax.nn.dot_product_attention's
# XLA form) or 'cudnn' (its cuDNN fused attention where it can run: a GPU, bfloat16 or float16,
# a head size cuDNN takes; 'xla' elsewhere).
ATTENTION_IMPLEMENTATIONS = (None, 'plain', 'xla', 'cudnn')
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


def _next_positions(module: nn.Module, length: int) -> tuple[bool, jax.Array]:
  """In decode mode: whether the module's cache exists yet (the first call only creates it),
  and the positions of this call's `length` tokens (from the cache's 'index', then moved on)."""
  initialized = module.has_variable('cache', 'index')
  index = module.variable('cache', 'index', lambda: jnp.zeros((), jnp.int32))
  start = index.value
  if initialized:
    index.value = start + length
  return initialized, start + jnp.arange(length)


class Embedding(nn.Module):
  """Int tokens (B, T) -> token + position embeddings (B, T, n_embd), float32, dropout.

  `decode=True`: the positions continue from the previous call's (a 'cache' variable)."""
  vocab_size: int
  block_size: int
  n_embd: int
  dropout_rate: float = 0.0
  decode: bool = False

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
    positions = _next_positions(self, length)[1] if self.decode else jnp.arange(length)
    x = wte(tokens) + wpe(positions)
    return nn.Dropout(self.dropout_rate, deterministic=not train)(x)


def attention_implementation(requested: Optional[str], dtype) -> str:
  """What `attention` runs for `requested` (ATTENTION_IMPLEMENTATIONS) at this compute dtype on
  the default platform: 'cudnn' where cuDNN's fused attention may run (a GPU, bfloat16 or
  float16; cuDNN may still refuse the shapes, and `attention` then runs 'xla'), else 'xla' on
  a GPU and 'plain' elsewhere, unless asked for one."""
  if requested not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f'attention implementation {requested!r} is not one of '
                     f'{ATTENTION_IMPLEMENTATIONS}.')
  gpu = jax.default_backend() == 'gpu'
  if requested in (None, 'cudnn'):
    if gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
      return 'cudnn'
    return 'xla' if gpu or requested == 'cudnn' else 'plain'
  return requested


def attention(q, k, v, causal: bool, implementation: Optional[str] = None, mask=None):
  """Softmax attention of (B, T, heads, head size) queries over (B, S, ...) keys and values, as
  `attention_implementation` chooses; `mask` (broadcast to (B, heads, T, S), True where a query
  may attend) replaces the causal mask."""
  chosen = attention_implementation(implementation, q.dtype)
  if chosen == 'plain':
    return plain_attention(q, k, v, causal, mask=mask)
  kwargs = dict(mask=mask, is_causal=causal and mask is None)
  if chosen == 'cudnn':
    try:
      return jax.nn.dot_product_attention(q, k, v, implementation='cudnn', **kwargs)
    except (NotImplementedError, RuntimeError, ValueError):   # shapes or versions cuDNN refuses
      pass
  return jax.nn.dot_product_attention(q, k, v, implementation='xla', **kwargs)


def plain_attention(q, k, v, causal: bool, dropout=None, mask=None):
  """The attention written out (nanoGPT's non-flash path): float32 scores, -inf where a query
  may not attend, softmax, `dropout` (a module or None) on the weights."""
  length, head_size = q.shape[1], q.shape[-1]
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
  scores = scores * (1.0 / math.sqrt(head_size))
  if mask is None and causal:
    mask = jnp.tril(jnp.ones((length, length), bool))
  if mask is not None:
    scores = jnp.where(mask, scores, -jnp.inf)
  weights = nn.softmax(scores, axis=-1)
  if dropout is not None:
    weights = dropout(weights)
  return jnp.einsum('bhqk,bkhd->bqhd', weights.astype(v.dtype), v)


class SelfAttention(nn.Module):
  """Multi-head softmax self-attention (causal unless `causal=False`), output projection.

  `decode=True` (causal only): keys and values of earlier calls are kept in the 'cache'
  collection, sized by the first call's length (the context), which only creates them."""
  n_head: int
  n_embd: int
  n_layer: int
  dropout_rate: float = 0.0
  bias: bool = False
  causal: bool = True
  dtype: Any = jnp.float32
  decode: bool = False
  implementation: Optional[str] = None   # ATTENTION_IMPLEMENTATIONS

  @nn.compact
  def __call__(self, x, train: bool):
    batch, length, _ = x.shape
    head_size = self.n_embd // self.n_head
    qkv = dense(3 * self.n_embd, self.bias, self.dtype, 'c_attn')(x)
    q, k, v = (a.reshape(batch, length, self.n_head, head_size)
               for a in jnp.split(qkv, 3, axis=-1))
    if self.decode:
      if not self.causal:
        raise ValueError('decode=True needs causal attention: there is nothing to cache.')
      y = self._attend_cached(q, k, v)
    elif train and self.dropout_rate > 0:
      y = plain_attention(q, k, v, self.causal, nn.Dropout(self.dropout_rate, deterministic=False))
    else:
      y = attention(q, k, v, self.causal, self.implementation)
    y = y.reshape(batch, length, self.n_embd)
    y = dense(self.n_embd, self.bias, self.dtype, 'c_proj', residual_init(self.n_layer))(y)
    return nn.Dropout(self.dropout_rate, deterministic=not train)(y)

  def _attend_cached(self, q, k, v):
    """Attention of this call's queries over the cached keys and values and their own."""
    cached_key = self.variable('cache', 'key', jnp.zeros, k.shape, k.dtype)
    cached_value = self.variable('cache', 'value', jnp.zeros, v.shape, v.dtype)
    initialized, positions = _next_positions(self, q.shape[1])
    # A few queries against the cache: cuDNN's fused kernel is made for long ones.
    implementation = ('plain' if attention_implementation(self.implementation, q.dtype) == 'plain'
                      else 'xla')
    if not initialized:   # the call that sizes the cache: causal attention on its own
      return attention(q, k, v, True, implementation)
    start = positions[0]
    cached_key.value = lax.dynamic_update_slice(cached_key.value, k, (0, start, 0, 0))
    cached_value.value = lax.dynamic_update_slice(cached_value.value, v, (0, start, 0, 0))
    # A query sees the keys up to its own position; the cache's later slots are still zeros.
    allowed = jnp.arange(cached_key.value.shape[1])[None, :] <= positions[:, None]
    return attention(q, cached_key.value, cached_value.value, True, implementation,
                     mask=allowed[None, None])


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
  `decode` and `implementation` as SelfAttention's.
  """
  n_head: int
  n_embd: int
  n_layer: int
  dropout_rate: float = 0.0
  bias: bool = False
  causal: bool = True
  dtype: Any = jnp.float32
  decode: bool = False
  implementation: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool):
    x = x + SelfAttention(self.n_head, self.n_embd, self.n_layer, self.dropout_rate, self.bias,
                          self.causal, self.dtype, self.decode, self.implementation,
                          name='attn')(layer_norm(self.bias, self.dtype, 'ln_1')(x), train)
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
                  dropout_rate: float = 0.0, bias: bool = False, dtype='float32',
                  decode: bool = False, implementation: Optional[str] = None
                  ) -> list[nn.Module]:
  """The GPT as [embedding, block x n_layer, head]; call each as `block(x, train=bool)`.
  `decode=True`: the same parameters, with the key-value cache of generation (module
  docstring); `implementation`: the attention's (ATTENTION_IMPLEMENTATIONS)."""
  check_transformer(n_layer, n_head, n_embd, dropout_rate)
  if block_size < 1 or vocab_size < 1:
    raise ValueError(f'block_size={block_size} and vocab_size={vocab_size} must be positive.')
  attention_implementation(implementation, jnp.float32)   # a bad name fails here
  dtype = compute_dtype(dtype)
  return ([Embedding(vocab_size, block_size, n_embd, dropout_rate, decode)]
          + [Block(n_head, n_embd, n_layer, dropout_rate, bias, True, dtype, decode,
                   implementation) for _ in range(n_layer)]
          + [Head(vocab_size, bias, dtype)])


def flops_per_token(n_layer: int, n_head: int, n_embd: int, block_size: int, vocab_size: int,
                    bias: bool = False) -> int:
  """Model FLOPs of training on one token (forward and backward), PaLM's estimate (appendix B)
  as nanoGPT's `estimate_mfu`: 6 N + 12 L H Q T, with N the parameters that multiply (all but
  the two embedding tables, which are looked up; the LM head counts, as in nanoGPT whose head
  is its tied token embedding), L layers, H heads of Q features, T = block_size."""
  width = n_embd
  # Attention 4 C^2 and MLP 8 C^2, two LayerNorm scales; biases: 9 C in the Dense layers, 2 C.
  block = 12 * width * width + 2 * width + (11 * width if bias else 0)
  params = n_layer * block + width * (2 if bias else 1) + width * vocab_size   # ln_f, the head
  return 6 * params + 12 * n_layer * n_head * (n_embd // n_head) * block_size


def block_names(n_layer: int) -> list[str]:
  """['embedding', 'block1', ..., 'block{n_layer}', 'head'], in the order of `create_blocks`."""
  return ['embedding'] + [f'block{i}' for i in range(1, n_layer + 1)] + ['head']
