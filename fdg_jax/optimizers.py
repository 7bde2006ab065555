"""The trainer's optimizers and learning-rate schedules, for every task, from a config.

* `config.optimizer`: 'sgd' (momentum, weight decay coupled into the gradient, as PyTorch's SGD:
  the paper's CIFAR recipe) or 'adamw' (Adam with decoupled weight decay on weight matrices
  only: the language models' recipe, nanoGPT's).
* `config.lr_schedule`: 'piecewise' (warm-up for warmup_epochs, then learning_rate multiplied by
  lr_decay_factor at each of lr_boundaries_epochs) or 'warmup_cosine' (nanoGPT's `get_lr`, in
  steps: `warmup_cosine_schedule`).
* `config.grad_clip` > 0: `optax.clip_by_global_norm` first in the chain. In a decoupled
  pipeline every stage has its own optimizer and state and sees only its own gradient, so this
  clips each stage's gradient by that stage's global norm: no stage sees the whole model's
  gradient (with one stage, 'bp', it is the whole model's norm, as nanoGPT's
  `clip_grad_norm_`).

`recipe(config, steps_per_epoch)` describes the optimizer (a `Recipe`) and `build(recipe)`
makes it; a compensation that rebuilds a stage's optimizer (compensation.py: 'nesterov',
'delay_momentum') starts from the same Recipe. `validate(config)` lists what is wrong with these
fields, before any compute.
"""

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ('sgd', 'adamw')
LR_SCHEDULES = ('piecewise', 'warmup_cosine')


# ---------------------------------------------------------------- schedules


def create_learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  """The learning rate of each optimizer step: config.lr_schedule's schedule."""
  if config.lr_schedule == 'warmup_cosine':
    return warmup_cosine_schedule(config.learning_rate, config.min_learning_rate,
                                  config.warmup_steps, config.lr_decay_steps)
  return piecewise_schedule(config, steps_per_epoch)


def piecewise_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  """Warm-up, then learning_rate divided at each boundary (in optimizer steps).

  Warm-up lasts warmup_epochs: at warmup_lr throughout (warmup_shape 'constant', the paper's),
  or rising in a straight line from warmup_lr at step 0 to learning_rate at its end ('linear',
  Goyal et al., 2017), which gives SGD without momentum the ramp that momentum's build-up gives.
  """
  warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
  boundaries = {int(round(epoch * steps_per_epoch)) - warmup_steps: config.lr_decay_factor
                for epoch in config.lr_boundaries_epochs}
  main = optax.piecewise_constant_schedule(config.learning_rate, boundaries)
  if not warmup_steps:
    return main
  warmup = (optax.constant_schedule(config.warmup_lr) if config.warmup_shape == 'constant' else
            optax.linear_schedule(config.warmup_lr, config.learning_rate, warmup_steps))
  return optax.join_schedules([warmup, main], [warmup_steps])


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


def recipe(config, steps_per_epoch: int) -> Recipe:
  """config's optimizer, with its schedule (create_learning_rate_schedule)."""
  schedule = create_learning_rate_schedule(config, steps_per_epoch)
  if config.optimizer == 'adamw':
    def mask(params):
      return weight_decay_mask(params, config.decay_embeddings)
    return Recipe('adamw', schedule, weight_decay=config.weight_decay, b1=config.adam_b1,
                  b2=config.adam_b2, eps=config.adam_eps, decay_mask=mask,
                  grad_clip=config.grad_clip)
  return Recipe('sgd', schedule, momentum=config.momentum, weight_decay=config.weight_decay,
                grad_clip=config.grad_clip)


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


def create_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
  """config.optimizer with its schedule, after gradient clipping if config.grad_clip > 0
  (`Recipe` says what each is)."""
  return build(recipe(config, steps_per_epoch))


# ---------------------------------------------------------------- checks


def validate(config) -> list[str]:
  """One message per bad optimizer or schedule field ('config.FIELD: problem. Fix.')."""
  errors = []

  def fail(field, problem, fix):
    errors.append(f'config.{field}: {problem}. {fix}')

  if config.optimizer not in OPTIMIZERS:
    fail('optimizer', f'unknown optimizer {config.optimizer!r}', f'Choose one of {OPTIMIZERS}.')
  if config.lr_schedule not in LR_SCHEDULES:
    fail('lr_schedule', f'unknown schedule {config.lr_schedule!r}',
         f'Choose one of {LR_SCHEDULES}.')
  if not 0 <= config.adam_b1 < 1:
    fail('adam_b1', f'{config.adam_b1} is outside [0, 1)', 'Use e.g. 0.9.')
  if not 0 < config.adam_b2 < 1:
    fail('adam_b2', f'{config.adam_b2} is outside (0, 1)', 'Use e.g. 0.95 or 0.99.')
  if not config.adam_eps > 0:
    fail('adam_eps', f'{config.adam_eps} is not positive', 'Use e.g. 1e-8.')
  if config.weight_decay < 0:
    fail('weight_decay', f'{config.weight_decay} is negative', 'Use 0 or more.')
  if config.momentum < 0:
    fail('momentum', f'{config.momentum} is negative', 'Use 0 (plain SGD) or e.g. 0.9.')
  if config.grad_clip < 0:
    fail('grad_clip', f'{config.grad_clip} is negative',
         'Use a positive global norm (e.g. 1.0), or 0 to turn clipping off.')
  if config.lr_schedule == 'warmup_cosine':
    if config.warmup_steps < 0:
      fail('warmup_steps', f'{config.warmup_steps} is negative', 'Use 0 or more steps.')
    if config.lr_decay_steps <= config.warmup_steps:
      fail('lr_decay_steps', f'{config.lr_decay_steps} is not after warmup_steps='
           f'{config.warmup_steps}', 'Use the step where the cosine ends, e.g. the run length.')
    if not 0 <= config.min_learning_rate <= config.learning_rate:
      fail('min_learning_rate', f'{config.min_learning_rate} is outside [0, learning_rate='
           f'{config.learning_rate}]', 'Use e.g. learning_rate / 10 (nanoGPT).')
    if config.warmup_epochs:
      fail('warmup_epochs', f"{config.warmup_epochs} is the 'piecewise' schedule's warm-up",
           "'warmup_cosine' warms up for warmup_steps: set --config.warmup_epochs=0.")
  elif config.warmup_steps:
    fail('warmup_steps', f"{config.warmup_steps} is the 'warmup_cosine' schedule's warm-up",
         "'piecewise' warms up for warmup_epochs: set --config.warmup_steps=0, or "
         "--config.lr_schedule=warmup_cosine.")
  return errors
