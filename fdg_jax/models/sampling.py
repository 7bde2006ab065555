"""Text generation from a GPT's parameters, with a key-value cache.

nanoGPT's `generate` (model.py): the context is the last block_size tokens; each step takes the
logits of the last position, divides them by the temperature, optionally keeps the top k, and
draws the next token from their softmax. Draws come from a numpy generator, so a seed gives the
same text on any device.

With the cache (`use_cache=True`, the default) the prompt is encoded once and each new token
costs one position's work: the blocks run with `decode=True` (fdg_jax/models/gpt.py), whose
attention keeps the keys and values of earlier positions. Once the text outgrows the context,
every position of the window moves (the position embeddings are absolute), so each further
token re-encodes its window of block_size tokens, as nanoGPT does for every token. Without the
cache every token re-encodes its whole context (the same numbers: tests/test_sample.py checks
the two token for token).

The model is the composed one: `composed` joins a pipeline's stage modules and variables.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fdg_jax.models import partition


def composed(stage_modules: Sequence[partition.StageModule], stage_variables: Sequence[dict]
             ) -> tuple[list[nn.Module], dict]:
  """The whole model's blocks and variables from a split model's stages (`pipe.modules` and
  `pipe.gathered_variables(state)`)."""
  blocks = [block for module in stage_modules for block in module.blocks]
  split = tuple(np.cumsum([len(module.blocks) for module in stage_modules])[:-1].tolist())
  return blocks, partition.merge_variables(stage_variables, split, len(blocks))


def decoding(blocks: Sequence[nn.Module]) -> list[nn.Module]:
  """The blocks in decode mode (those that have one: the embedding and the transformer blocks;
  the head has nothing to cache)."""
  return [block.clone(decode=True) if hasattr(block, 'decode') else block for block in blocks]


class Sampler:
  """Generates tokens from a GPT, the model `StageModule(blocks)`, on `device` (default: this
  process's first). Compiles its functions on first use, once per batch size and prompt length,
  and keeps them for later calls with other variables of the same model."""

  def __init__(self, blocks: Sequence[nn.Module], device: Optional[jax.Device] = None):
    self.block_size = blocks[0].block_size   # the embedding's context
    self.device = device or jax.local_devices()[0]
    self.model = partition.StageModule(tuple(blocks))
    self.decoder = partition.StageModule(tuple(decoding(blocks)))
    self._forward = jax.jit(functools.partial(self.model.apply, train=False))
    self._decode = jax.jit(self._decode_step)

  def _decode_step(self, variables, cache, tokens):
    logits, updated = self.decoder.apply({**variables, 'cache': cache}, tokens, train=False,
                                         mutable=['cache'])
    return logits[:, -1], updated['cache']

  def empty_cache(self, batch: int):
    """Zeros of every block's cache for `batch` sequences of block_size tokens."""
    shapes = jax.eval_shape(lambda: self.decoder.init(
        jax.random.key(0), jnp.zeros((batch, self.block_size), jnp.int32), train=False))
    return jax.device_put(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes['cache']),
                          self.device)

  def last_logits(self, variables, tokens: np.ndarray) -> np.ndarray:
    """Logits after each row of `tokens` (B, T) from its last block_size tokens, without the
    cache: the window is padded after the context (causal: the padding changes nothing), so
    one compiled shape serves every length."""
    context = tokens[:, -self.block_size:]
    window = np.zeros((len(tokens), self.block_size), np.int32)
    window[:, :context.shape[1]] = context
    logits = self._forward(variables, window)
    return np.asarray(logits[:, context.shape[1] - 1])

  def generate(self, variables: dict, prompts: np.ndarray, num_tokens: int, *,
               temperature: float = 1.0, top_k: Optional[int] = None,
               rng: np.random.Generator, use_cache: bool = True) -> np.ndarray:
    """`prompts` (B, P) int token ids followed by `num_tokens` drawn tokens, (B, P + num_tokens),
    from the model with `variables`.

    Each row draws from `rng` in turn, token by token (so a row's tokens depend on the batch
    it is in). `temperature` > 0 divides the logits; `top_k` keeps the k most likely tokens.
    """
    tokens = np.asarray(prompts, np.int32)
    if tokens.ndim != 2 or tokens.shape[1] < 1:
      raise ValueError(f'prompts must be token ids of shape (batch, length >= 1); got shape '
                       f'{tokens.shape}. Encode at least one token.')
    if temperature <= 0:
      raise ValueError(f'temperature={temperature} is not positive. Use e.g. 0.8.')
    if top_k is not None and top_k < 1:
      raise ValueError(f'top_k={top_k} keeps no token. Use 1 or more, or None for all.')
    if num_tokens <= 0:
      return tokens
    variables = jax.device_put(variables, self.device)
    cache, position = None, 0   # position: tokens in the cache
    if use_cache:
      context = tokens[:, -self.block_size:]
      logits, cache = self._decode(variables, self.empty_cache(len(tokens)),
                                   jnp.asarray(context))
      logits, position = np.asarray(logits), context.shape[1]
    else:
      logits = self.last_logits(variables, tokens)
    for i in range(num_tokens):
      drawn = draw(logits, temperature, top_k, rng)
      tokens = np.concatenate([tokens, drawn[:, None]], axis=1)
      if i == num_tokens - 1:
        break
      if use_cache and position < self.block_size:
        logits, cache = self._decode(variables, cache, jnp.asarray(drawn[:, None]))
        logits, position = np.asarray(logits), position + 1
      else:   # no cache, or the window has moved past the cached positions
        logits = self.last_logits(variables, tokens)
    return tokens


def draw(logits: np.ndarray, temperature: float, top_k: Optional[int],
         rng: np.random.Generator) -> np.ndarray:
  """One token per row of `logits` (B, V): softmax(logits / temperature) over the `top_k` most
  likely tokens (all if None; ties with the k-th are kept, as nanoGPT's), in float64."""
  logits = np.asarray(logits, np.float64)
  logits = (logits - logits.max(axis=-1, keepdims=True)) / temperature
  if top_k is not None and top_k < logits.shape[-1]:
    kth = np.sort(logits, axis=-1)[:, -top_k][:, None]
    logits = np.where(logits < kth, -np.inf, logits)
  probabilities = np.exp(logits)
  probabilities /= probabilities.sum(axis=-1, keepdims=True)
  return np.asarray([rng.choice(len(row), p=row) for row in probabilities], np.int32)
