"""Optimizers described as data (`Recipe`), so a compensation can rebuild a variant of one.

* 'sgd' (momentum, weight decay coupled into the gradient, as PyTorch's SGD: the paper's CIFAR
  recipe) or 'adamw' (Adam with decoupled weight decay on weight matrices only: the language
  models' recipe, nanoGPT's), each with any learning rate or optax schedule
  (`warmup_cosine_schedule` is nanoGPT's).
* grad_clip > 0: `optax.clip_by_global_norm` first in the chain. In a decoupled pipeline every
  stage has its own optimizer and state and sees only its own gradient, so this clips each
  stage's gradient by that stage's global norm: no stage sees the whole model's gradient (with
  one stage, BP, it is the whole model's norm, as nanoGPT's `clip_grad_norm_`).

`build(recipe)` makes the optax transformation; a compensation that rebuilds a stage's optimizer
(compensation.py: 'nesterov', 'delay_momentum') starts from the same Recipe. The trainer makes
the Recipe from its config (`fdg_jax.trainer.optimizers`).
"""

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ('sgd', 'adamw')


# ---------------------------------------------------------------- schedules


def warmup_cosine_schedule(peak_value: float, end_value: float, warmup_steps: int,
                           decay_steps: int) -> optax.Schedule:
  """nanoGPT's `get_lr(it)`: a linear warm-up, a cosine to `end_value`, then constant.

      it < warmup_steps:   peak * (it + 1) / (warmup_steps + 1)
      it > decay_steps:    end
      otherwise:           end + 0.5 * (1 + cos(pi * (it - warmup_steps)
                                                / (decay_steps - warmup_steps))) * (peak - end)

  `it` is the number of updates made before this one (0 for the first), as nanoGPT's iter_num.
  Not optax.warmup_cosine_decay_schedule: its warm-up is peak * it / warmup_steps (0 at the
  first update, where nanoGPT's is peak / (warmup_steps + 1)).
  """
  if not 0 <= warmup_steps < decay_steps:
    raise ValueError(f'warmup_steps={warmup_steps}, decay_steps={decay_steps}: use '
                     '0 <= warmup_steps < decay_steps.')

  def schedule(count):
    it = jnp.asarray(count, jnp.float32)
    warmup = peak_value * (it + 1) / (warmup_steps + 1)
    ratio = jnp.clip((it - warmup_steps) / (decay_steps - warmup_steps), 0.0, 1.0)
    cosine = end_value + 0.5 * (1.0 + jnp.cos(math.pi * ratio)) * (peak_value - end_value)
    return jnp.where(it < warmup_steps, warmup, cosine)

  return schedule


# ---------------------------------------------------------------- optimizers


def weight_decay_mask(params, decay_embeddings: bool = False):
  """True for the parameters AdamW decays: weight matrices and kernels (ndim >= 2); False for
  biases, LayerNorm/BatchNorm scales, and embedding tables (flax `nn.Embed`'s 'embedding')
  unless `decay_embeddings`.

  nanoGPT decays every parameter with ndim >= 2, its token and position embeddings included;
  decay_embeddings=True does the same.
  """
  def decays(path, leaf):
    name = getattr(path[-1], 'key', None) if path else None
    return jnp.ndim(leaf) >= 2 and (decay_embeddings or name != 'embedding')
  return jax.tree_util.tree_map_with_path(decays, params)


@dataclasses.dataclass(frozen=True)
class Recipe:
  """An optimizer described (what `build` makes), so a compensation can rebuild a variant.

  'sgd': SGD with momentum (0: none) and weight decay coupled into the gradient, as PyTorch's
  SGD (every parameter decays). 'adamw': optax.adamw (PyTorch's AdamW: decay lr * weight_decay *
  param, decoupled from the moments) with b1, b2, eps, decaying only where `decay_mask(params)`
  is True (None: every parameter). grad_clip > 0: clipped to that global norm first (per stage:
  module docstring).
  """
  name: str
  learning_rate: Any                    # a float or an optax schedule
  momentum: float = 0.0                 # sgd
  weight_decay: float = 0.0
  b1: float = 0.9                       # adamw
  b2: float = 0.999
  eps: float = 1e-8
  decay_mask: Optional[Callable] = None
  grad_clip: float = 0.0

  def __post_init__(self):
    if self.name not in OPTIMIZERS:
      raise ValueError(f'Recipe name {self.name!r} is not one of {OPTIMIZERS}.')

  def clipping(self) -> list:
    """The transformations before the optimizer's own: clipping when grad_clip > 0."""
    return [optax.clip_by_global_norm(self.grad_clip)] if self.grad_clip > 0 else []


def build(recipe: Recipe) -> optax.GradientTransformation:
  """The optimizer a Recipe describes."""
  if recipe.name == 'adamw':
    return optax.chain(*recipe.clipping(), optax.adamw(
        recipe.learning_rate, b1=recipe.b1, b2=recipe.b2, eps=recipe.eps,
        weight_decay=recipe.weight_decay, mask=recipe.decay_mask))
  return optax.chain(
      *recipe.clipping(),
      optax.add_decayed_weights(recipe.weight_decay),
      optax.sgd(recipe.learning_rate, momentum=recipe.momentum or None))
