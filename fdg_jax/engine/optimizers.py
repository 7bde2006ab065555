"""Optimizers described as data (`Recipe`), so a compensation can rebuild a variant of one.

* 'sgd' (momentum, weight decay coupled into the gradient, as PyTorch's SGD: the paper's CIFAR
  recipe) or 'adamw' (Adam with decoupled weight decay on weight matrices only: the language
  models' recipe, nanoGPT's), each with any learning rate or optax schedule
  (`warmup_cosine_schedule` is nanoGPT's).
* 'muon' (Keller Jordan's Muon, from optax.contrib's pieces: `muon`) on the hidden layers'
  matrices and conv kernels, with the 'adamw' recipe's AdamW on everything else.
* 'rotated_adamw' (Jung, Shin, Lee, ICML 2026: rotated_adam.py) Adam in the eigenbasis of each
  attention and MLP matrix's gradient covariances, the 'adamw' recipe's AdamW on the rest
  (`rotated_adamw`): what compensation 'basis_rotation' gives the delayed stages, here for
  every stage (BP's reference for that compensation).
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

from fdg_jax.engine import rotated_adam

OPTIMIZERS = ('sgd', 'adamw', 'muon', 'rotated_adamw')


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


# The names of embedding tables: flax `nn.Embed`'s 'embedding' (the GPT's token and position
# embeddings) and the ViT's learned 'position_embedding' (models/vit.py).
EMBEDDINGS = ('embedding', 'position_embedding')


def weight_decay_mask(params, decay_embeddings: bool = False):
  """True for the parameters AdamW decays: weight matrices and kernels (ndim >= 2); False for
  biases, LayerNorm/BatchNorm scales, and embedding tables (`EMBEDDINGS`) unless
  `decay_embeddings`.

  nanoGPT decays every parameter with ndim >= 2, its token and position embeddings included;
  decay_embeddings=True does the same. The ViTs of DeiT and timm (`no_weight_decay`: pos_embed,
  cls_token) and of big_vision (decay on '.*/kernel$' only) leave the position embedding
  undecayed, as the default here does.
  """
  def decays(path, leaf):
    name = getattr(path[-1], 'key', None) if path else None
    return jnp.ndim(leaf) >= 2 and (decay_embeddings or name not in EMBEDDINGS)
  return jax.tree_util.tree_map_with_path(decays, params)


# Modules whose kernels Muon leaves to AdamW: a network's first layer and its last (Muon is for
# the hidden layers): the ResNets' stem 'conv', the ViT's patch 'projection', the GPT's
# 'lm_head', the ResNets' and the ViT's classifier 'fc'. (The GPT's embeddings 'wte' and 'wpe'
# hold tables named 'embedding', not kernels.)
ADAMW_MODULES = ('conv', 'projection', 'lm_head', 'fc')
# The key of DGL's auxiliary heads in a stage's parameters (methods.LocalLosses): heads, so AdamW.
AUX_HEADS_KEY = 'aux'


def muon_dimension_numbers(params):
  """Per parameter, how Muon reads it as a matrix (optax's `MuonDimensionNumbers`), or None where
  AdamW trains it: Muon's routing, decided by names within one stage's tree (so a parameter is
  routed alike whatever K and wherever the split falls).

  Muon: every 'kernel' of ndim >= 2 outside ADAMW_MODULES and DGL's heads: a Dense kernel
  (in, out) is the matrix it is; a conv kernel (h, w, in, out) is the (h * w * in, out) matrix,
  as Keller Jordan's Muon flattens conv filters. AdamW: embeddings, the first and last layers,
  biases, LayerNorm and BatchNorm scales, DGL's auxiliary heads.
  """
  def route(path, leaf):
    names = [getattr(key, 'key', None) for key in path]
    ndim = jnp.ndim(leaf)
    if (ndim < 2 or len(names) < 2 or names[-1] != 'kernel' or names[-2] in ADAMW_MODULES
        or names[0] == AUX_HEADS_KEY):
      return None
    return optax.contrib.MuonDimensionNumbers(reduction_axis=tuple(range(ndim - 1)),
                                              output_axis=ndim - 1)
  return jax.tree_util.tree_map_with_path(route, params)


@dataclasses.dataclass(frozen=True)
class Recipe:
  """An optimizer described (what `build` makes), so a compensation can rebuild a variant.

  'sgd': SGD with momentum (0: none) and weight decay coupled into the gradient, as PyTorch's
  SGD (every parameter decays). 'adamw': optax.adamw (PyTorch's AdamW: decay lr * weight_decay *
  param, decoupled from the moments) with b1, b2, eps, decaying only where `decay_mask(params)`
  is True (None: every parameter). 'muon': optax.contrib.muon (momentum muon_momentum, Nesterov
  if muon_nesterov, muon_ns_steps Newton-Schulz steps, decay lr * muon_weight_decay * param) at
  muon_learning_rate on the parameters `muon_routing(params)` gives dimension numbers (None:
  `muon_dimension_numbers`), and the 'adamw' recipe's AdamW, at learning_rate, on the rest.
  'rotated_adamw': that AdamW with Adam in a rotated basis on `rotated_adam.rotated_matrices`
  (basis refreshed every rotation_frequency updates; covariance decay rotation_decay, negative
  for b2; rotation_geometry 'bi' or 'uni').
  grad_clip > 0: clipped to that global norm first (per stage: module docstring).
  """
  name: str
  learning_rate: Any                    # a float or an optax schedule
  momentum: float = 0.0                 # sgd
  weight_decay: float = 0.0
  b1: float = 0.9                       # adamw, and muon's AdamW
  b2: float = 0.999
  eps: float = 1e-8
  decay_mask: Optional[Callable] = None
  grad_clip: float = 0.0
  muon_learning_rate: Any = 0.02        # muon: a float or an optax schedule
  muon_momentum: float = 0.95
  muon_nesterov: bool = True
  muon_ns_steps: int = 5
  muon_weight_decay: float = 0.0
  muon_routing: Optional[Callable] = None
  rotation_frequency: int = 10          # rotated_adamw (the authors' defaults)
  rotation_decay: float = -1.0
  rotation_geometry: str = 'bi'

  def __post_init__(self):
    if self.name not in OPTIMIZERS:
      raise ValueError(f'Recipe name {self.name!r} is not one of {OPTIMIZERS}.')
    rotated_adam.check_rotation(self.rotation_frequency, self.rotation_decay,
                                self.rotation_geometry)

  def clipping(self) -> list:
    """The transformations before the optimizer's own: clipping when grad_clip > 0."""
    return [optax.clip_by_global_norm(self.grad_clip)] if self.grad_clip > 0 else []


def build(recipe: Recipe) -> optax.GradientTransformation:
  """The optimizer a Recipe describes."""
  if recipe.name == 'adamw':
    return optax.chain(*recipe.clipping(), adamw(recipe))
  if recipe.name == 'muon':
    return optax.chain(*recipe.clipping(), muon(recipe))
  if recipe.name == 'rotated_adamw':
    return optax.chain(*recipe.clipping(), rotated_adamw(recipe))
  return optax.chain(
      *recipe.clipping(),
      optax.add_decayed_weights(recipe.weight_decay),
      optax.sgd(recipe.learning_rate, momentum=recipe.momentum or None))


def adamw(recipe: Recipe) -> optax.GradientTransformation:
  """The recipe's AdamW (no clipping)."""
  return optax.adamw(recipe.learning_rate, b1=recipe.b1, b2=recipe.b2, eps=recipe.eps,
                     weight_decay=recipe.weight_decay, mask=recipe.decay_mask)


def muon(recipe: Recipe) -> optax.GradientTransformation:
  """optax.contrib.muon on the parameters the routing gives dimension numbers, the recipe's
  AdamW on the others (no clipping).

  Not optax.contrib.muon's own AdamW for the rest: that one shares Muon's Nesterov flag (NAdam
  where Muon is Nesterov, as by default) and decays every parameter it trains; Keller Jordan's
  MuonWithAuxAdam runs plain Adam there, and this AdamW decays only where decay_mask says. So
  the parameters are split here, and optax.contrib.muon sees only the Muon ones (its own AdamW
  branch then holds nothing).
  """
  routing = recipe.muon_routing or muon_dimension_numbers

  def labels(params):
    return jax.tree_util.tree_map(
        lambda numbers, _: 'adamw' if numbers is None else 'muon', routing(params), params,
        is_leaf=lambda x: x is None or isinstance(x, optax.contrib.MuonDimensionNumbers))

  return optax.partition(
      {'muon': optax.contrib.muon(
          recipe.muon_learning_rate, ns_steps=recipe.muon_ns_steps, beta=recipe.muon_momentum,
          weight_decay=recipe.muon_weight_decay, nesterov=recipe.muon_nesterov,
          muon_weight_dimension_numbers=routing),
       'adamw': adamw(recipe)},
      labels)


def rotated_adamw(recipe: Recipe) -> optax.GradientTransformation:
  """Adam in the rotated basis (`rotated_adam.scale_by_rotated_adam`, then the recipe's
  decoupled decay and learning rate) on `rotated_adam.rotated_matrices`, the recipe's AdamW on
  the others (no clipping)."""
  decay = recipe.b2 if recipe.rotation_decay < 0 else recipe.rotation_decay
  rotated = optax.chain(
      rotated_adam.scale_by_rotated_adam(recipe.b1, recipe.b2, recipe.eps, decay,
                                         recipe.rotation_frequency, recipe.rotation_geometry),
      optax.add_decayed_weights(recipe.weight_decay, recipe.decay_mask),
      optax.scale_by_learning_rate(recipe.learning_rate))

  def labels(params):
    return jax.tree_util.tree_map(lambda r: 'rotated' if r else 'adamw',
                                  rotated_adam.rotated_matrices(params))

  return optax.partition({'rotated': rotated, 'adamw': adamw(recipe)}, labels)
