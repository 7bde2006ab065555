"""Stale-gradient compensation for the stages of FDG and DDG (beyond the paper).

A non-last stage k applies the gradient of a batch it forwarded `delay` iterations earlier
(`Schedule.delay(k)`: 2(K-1-k) for FDG, K-1-k for DDG). Each call updates before it forwards, so
between the forward of a batch and the update with its gradient the stage makes s = delay - 1
other updates: the gradient was taken at parameters theta_n and is applied to theta_{n+s}. The
options below act on that; the last stage (delay 0) and K = 1 are never changed. With
microbatches the delay counts updates (`schedule.delay`: 2 once M >= 2(K-1) - 1), and each
option acts on that delay the same way (docs/algorithm.md).

* 'none': the paper's FDG.
* 'weight_prediction' (linear weight prediction: SpecTrain, Chen et al. 2018; Kosson et al.,
  "Pipelined Backpropagation at Scale", 2020): the forward uses the parameters extrapolated to
  the update its gradient will be applied at, theta_hat = theta + s * delta, where delta is the
  stage's last update (theta_n - theta_{n-1}; for SGD with momentum and a constant learning rate
  it is -lr * velocity, so this is Kosson et al.'s theta - s * lr * v). The delayed backward
  differentiates that forward (at theta_hat) and the update applies to theta. Memory: one copy
  of the stage's parameters (delta, kept in the optimizer state).
* 'delay_compensation' (DC-ASGD, Zheng et al. 2017): the gradient g taken at the forward's
  parameters theta_stale is corrected with the diagonal of its outer product as a Hessian
  estimate, g + lambda * g * g * (theta_now - theta_stale), elementwise, before the optimizer.
  Adaptive lambda (DC-ASGD-a, the paper's better variant and the default): lambda = lambda0 /
  sqrt(m_t + eps) with m_t = decay * m_{t-1} + (1 - decay) * g * g; constant lambda is DC-ASGD-c
  (the paper uses 0.04 there). Memory: the parameters of every forward in flight (one copy per
  saved forward) and, adaptive, one copy for m.
* 'lr_reschedule' (PipeMare, Yang et al. 2021, technique 1): stage k's learning rate is scaled
  by tau_k ** -p, with tau_k = max(1, delay) and p annealed linearly from 1 to 0 over the
  stage's first `reschedule_steps` updates, then the common schedule. Implemented by scaling
  the optimizer's updates, which equals scaling the learning rate for optimizers whose learning
  rate multiplies the final update (SGD with momentum and coupled weight decay, Adam, AdamW).
  Memory: nothing.

* 'nesterov' (Ajanthan et al., "Nesterov method for asynchronous pipeline parallel
  optimization", ICML 2025; their code github.com/PluralisResearch/AsyncPP): the stage's
  optimizer in NAG's look-ahead form with momentum gamma = nesterov_momentum (0.99, theirs):
  AdamW becomes NAdamW as their code runs it (torch.optim.NAdam with decoupled weight decay and
  its momentum schedule: `scale_by_nadam`), SGD becomes Nesterov SGD (optax.sgd(nesterov=True)).
  Memory: nothing beyond the optimizer's.
* 'delay_momentum' (their code's --adaptive_momentum): the user's optimizer with its momentum
  (SGD) or b1 (AdamW) raised with the stage's delay, gamma_k = gamma_0 + d_k * (gamma_max -
  gamma_0) / (d_max + 1) (`Compensation.momentum`); 'nesterov+delay_momentum': 'nesterov' with
  gamma = gamma_k. Memory: nothing.
  These three rebuild the stage's optimizer from its description (`optimizers.Recipe`, the
  `optimizer` field): the optimizer passed to the pipeline is the last stage's.

* 'error_feedback' (Zmushko et al., "One-Step Gradient Delay is Not a Barrier for Large-Scale
  Asynchronous Pipeline Parallel LLM Pretraining", arXiv 2606.30634, 2026): update-level error
  feedback, optimizer-agnostic: with u_t the stage's optimizer update (learning rate and decay
  included), theta <- theta + u_t + c * (u_t - u_{t-1}); the first update plain; c =
  ef_coefficient (1). Only on stages whose gradient is stale (staleness >= 1). Memory: one
  parameter copy (u_{t-1}). The rule is recovered from secondary sources, not the paper's text
  (docs/algorithm.md says which and what is inferred).
* 'basis_rotation' (Jung, Shin, Lee, "Mitigating Staleness in Asynchronous Pipeline Parallelism
  via Basis Rotation", ICML 2026, arXiv 2602.03515): the delayed stages' AdamW becomes
  'rotated_adamw' (rotated_adam.py: Adam in the eigenbasis of the gradient's covariances,
  SOAP-like, on the transformer blocks' matrices, refreshed every rotation_frequency updates;
  the run's AdamW on the rest). The last stage keeps AdamW; optimizer 'rotated_adamw' rotates
  every stage (BP's reference for this one). Memory: per rotated r x c matrix, two r x r and
  two c x c matrices ('bi').

docs/algorithm.md has every formula with its source.

Everything a stage keeps across iterations lives in its optimizer state (optax transformations
chained to the user's optimizer), so checkpoints and the multi-process engine carry it as they
carry momentum.
"""

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from fdg_jax.engine import optimizers
from fdg_jax.engine import rotated_adam

NAMES = ('none', 'weight_prediction', 'delay_compensation', 'lr_reschedule', 'nesterov',
         'delay_momentum', 'nesterov+delay_momentum', 'error_feedback', 'basis_rotation')
# Compensations that build the stage's optimizer anew from its description (optimizers.Recipe).
REBUILDS_OPTIMIZER = ('nesterov', 'delay_momentum', 'nesterov+delay_momentum')
# Compensations that act on the parameters of the forward, which stash='recompute' does not keep
# (its backward redoes the forward at the current parameters).
NEEDS_FORWARD_PARAMETERS = ('weight_prediction', 'delay_compensation')


@dataclasses.dataclass(frozen=True)
class Compensation:
  """Which compensation, and its hyperparameters (defaults: each one's paper)."""
  name: str = 'none'
  dc_lambda: float = 2.0          # lambda0 (adaptive) or lambda (constant; the paper: 0.04)
  dc_adaptive: bool = True        # DC-ASGD-a (True) or DC-ASGD-c (False)
  dc_decay: float = 0.95          # decay of the mean square m (adaptive only)
  dc_epsilon: float = 1e-7        # added to m under the square root (adaptive only)
  reschedule_steps: int = 1000    # updates over which lr_reschedule anneals to the schedule
  # The optimizer's description, for the compensations that rebuild it (REBUILDS_OPTIMIZER).
  optimizer: Optional[optimizers.Recipe] = None
  nesterov_momentum: float = 0.99      # 'nesterov': gamma of the delayed stages (the paper's)
  nadam_momentum_decay: float = 0.004  # NAdamW's psi (torch's default, the paper's runs)
  delay_momentum_max: float = 0.99     # delay_momentum: gamma_max (the paper's code)
  max_delay: int = 0                   # delay_momentum: the pipeline's largest delay, d_max
  ef_coefficient: float = 1.0          # error_feedback: c in u + c (u - u_prev) (the paper's 1)
  rotation_frequency: int = 10         # basis_rotation: updates between basis refreshes (theirs)
  rotation_decay: float = -1.0         # basis_rotation: EMA of the covariances; < 0: AdamW's b2
  rotation_geometry: str = 'bi'        # basis_rotation: 'bi' (both sides) or 'uni' (the smaller)

  def __post_init__(self):
    if self.name not in NAMES:
      raise ValueError(f'compensation={self.name!r} is not one of {NAMES}.')
    if self.dc_lambda < 0:
      raise ValueError(f'dc_lambda={self.dc_lambda} is negative; use lambda >= 0.')
    if not 0 <= self.dc_decay < 1:
      raise ValueError(f'dc_decay={self.dc_decay} is outside [0, 1).')
    if self.reschedule_steps < 1:
      raise ValueError(f'reschedule_steps={self.reschedule_steps}: use at least 1 update.')
    for field in ('nesterov_momentum', 'delay_momentum_max'):
      if not 0 <= getattr(self, field) < 1:
        raise ValueError(f'{field}={getattr(self, field)} is outside [0, 1); use e.g. 0.99.')
    if self.nadam_momentum_decay < 0:
      raise ValueError(f'nadam_momentum_decay={self.nadam_momentum_decay} is negative; use '
                       'e.g. 0.004 (PyTorch\'s NAdam).')
    if self.ef_coefficient <= 0:
      raise ValueError(f'ef_coefficient={self.ef_coefficient} is not positive; use e.g. 1 (the '
                       "paper's; 0 would be compensation 'none').")
    rotated_adam.check_rotation(self.rotation_frequency, self.rotation_decay,
                                self.rotation_geometry)
    if self.optimizer is not None and not isinstance(self.optimizer, optimizers.Recipe):
      raise ValueError(f'optimizer={self.optimizer!r} is not an optimizers.Recipe: describe '
                       'the optimizer with optimizers.Recipe(...).')

  def active(self, delay: int) -> bool:
    """Whether a stage with this delay is changed at all (never the last stage, delay 0)."""
    return self.name != 'none' and delay > 0

  def stage_optimizer(self, optimizer: optax.GradientTransformation, delay: int
                      ) -> optax.GradientTransformation:
    """The optimizer of a stage with this delay: the user's, with the compensation chained in."""
    if not self.active(delay):
      return optimizer
    if self.name in REBUILDS_OPTIMIZER:
      return self.rebuilt_optimizer(delay)
    if self.name == 'basis_rotation':
      return self.rotated_optimizer()
    if self.name == 'error_feedback':   # a gradient taken at the current parameters keeps it
      return (optax.chain(optimizer, error_feedback(self.ef_coefficient))
              if staleness(delay) else optimizer)
    if self.name == 'weight_prediction':
      return optax.chain(optimizer, keep_last_update())
    if self.name == 'delay_compensation':
      return optax.chain(delay_compensated(self.dc_lambda, self.dc_adaptive, self.dc_decay,
                                           self.dc_epsilon), optimizer)
    return optax.chain(optimizer, optax.scale_by_schedule(
        reschedule_factor(max(1, delay), self.reschedule_steps)))


  def momentum(self, delay: int) -> float:
    """gamma of a stage with this delay (> 0), for the compensations that rebuild it."""
    recipe = self.described_optimizer()
    gamma_0 = recipe.b1 if recipe.name == 'adamw' else recipe.momentum
    if self.name == 'nesterov':
      return self.nesterov_momentum
    if self.max_delay < delay:
      raise ValueError(
          f'compensation={self.name!r} sets momentum from delay / (max_delay + 1), but '
          f'max_delay={self.max_delay} is below this stage\'s delay {delay}: pass '
          'Compensation(..., max_delay=<the pipeline\'s largest delay, Schedule.delay(0)>).')
    if gamma_0 > self.delay_momentum_max:
      raise ValueError(
          f'compensation={self.name!r} raises momentum {gamma_0} towards delay_momentum_max='
          f'{self.delay_momentum_max}, which is below it: use a larger delay_momentum_max.')
    return gamma_0 + delay * (self.delay_momentum_max - gamma_0) / (self.max_delay + 1)

  def described_optimizer(self) -> optimizers.Recipe:
    if self.optimizer is None:
      raise ValueError(
          f'compensation={self.name!r} rebuilds each delayed stage\'s optimizer and needs its '
          'description: pass Compensation(..., optimizer=optimizers.Recipe(...)) (the trainer '
          'passes its run\'s recipe, trainer/optimizers.recipe).')
    if self.optimizer.name not in ('sgd', 'adamw'):
      raise ValueError(f'compensation={self.name!r} rebuilds SGD or AdamW with another momentum, '
                       f'not {self.optimizer.name!r}: use another compensation with it.')
    return self.optimizer

  def rotated_optimizer(self) -> optax.GradientTransformation:
    """basis_rotation's stage optimizer: the run's AdamW rebuilt as 'rotated_adamw' (Adam in the
    rotated basis on `rotated_adam.rotated_matrices`, the same AdamW elsewhere) with this
    compensation's rotation hyperparameters."""
    recipe = self.optimizer
    if recipe is None or recipe.name != 'adamw':
      raise ValueError(
          "compensation='basis_rotation' runs the delayed stages' AdamW in a rotated basis and "
          'needs that AdamW described: pass Compensation(..., optimizer=optimizers.Recipe('
          f"'adamw', ...)) (got {None if recipe is None else recipe.name!r}).")
    return optimizers.build(dataclasses.replace(
        recipe, name='rotated_adamw', rotation_frequency=self.rotation_frequency,
        rotation_decay=self.rotation_decay, rotation_geometry=self.rotation_geometry))

  def rebuilt_optimizer(self, delay: int) -> optax.GradientTransformation:
    """The stage's optimizer: the described one with momentum gamma, in look-ahead form for
    'nesterov' (NAdamW for AdamW, Nesterov SGD for SGD)."""
    recipe, gamma = self.described_optimizer(), self.momentum(delay)
    if self.name == 'delay_momentum':
      field = 'b1' if recipe.name == 'adamw' else 'momentum'
      return optimizers.build(dataclasses.replace(recipe, **{field: gamma}))
    if recipe.name == 'adamw':
      return optax.chain(
          *recipe.clipping(),
          scale_by_nadam(gamma, recipe.b2, recipe.eps, self.nadam_momentum_decay),
          optax.add_decayed_weights(recipe.weight_decay, recipe.decay_mask),
          optax.scale_by_learning_rate(recipe.learning_rate))
    return optax.chain(
        *recipe.clipping(),
        optax.add_decayed_weights(recipe.weight_decay),
        optax.sgd(recipe.learning_rate, momentum=gamma, nesterov=True))


def staleness(delay: int) -> int:
  """Updates a stage makes between a forward and the update with that forward's gradient."""
  return max(0, delay - 1)


# ------------------------------------------------------------------------ weight prediction


class LastUpdateState(NamedTuple):
  update: Any   # the last update added to the parameters (zeros before the first)


def keep_last_update() -> optax.GradientTransformation:
  """Passes the updates through and remembers them, for weight prediction."""

  def init_fn(params):
    return LastUpdateState(update=jax.tree_util.tree_map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    del state, params
    return updates, LastUpdateState(update=updates)

  return optax.GradientTransformation(init_fn, update_fn)


def predicted_parameters(params, opt_state, horizon: int):
  """theta + horizon * (last update): the parameters `horizon` updates ahead."""
  last = opt_state[-1]
  assert isinstance(last, LastUpdateState), 'a stage without weight prediction'
  return jax.tree_util.tree_map(
      lambda p, u: p + jnp.asarray(horizon, p.dtype) * u, params, last.update)


# ------------------------------------------------------------------------ delay compensation


class MeanSquareState(NamedTuple):
  mean_square: Any   # m_t of DC-ASGD-a (empty for constant lambda)


def delay_compensated(lam: float, adaptive: bool, decay: float, epsilon: float
                      ) -> optax.GradientTransformationExtraArgs:
  """DC-ASGD's correction g + lambda * g * g * (params - stale_params), elementwise.

  `update(grads, state, params, stale_params=...)`: `params` are the current parameters,
  `stale_params` those the gradient was taken at.
  """

  def init_fn(params):
    return MeanSquareState(
        mean_square=jax.tree_util.tree_map(jnp.zeros_like, params) if adaptive else ())

  def update_fn(updates, state, params=None, *, stale_params=None, **extra_args):
    del extra_args
    if params is None or stale_params is None:
      raise ValueError('delay compensation needs params and stale_params.')
    mean_square = state.mean_square
    if adaptive:
      mean_square = jax.tree_util.tree_map(
          lambda m, g: decay * m + (1 - decay) * g * g, mean_square, updates)
      scales = jax.tree_util.tree_map(lambda m: lam / jnp.sqrt(m + epsilon), mean_square)
    else:
      scales = jax.tree_util.tree_map(lambda g: jnp.asarray(lam, g.dtype), updates)
    corrected = jax.tree_util.tree_map(
        lambda g, s, now, stale: g + s * g * g * (now - stale),
        updates, scales, params, stale_params)
    return corrected, MeanSquareState(mean_square=mean_square)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ------------------------------------------------------------------------ lr rescheduling


def reschedule_factor(tau: int, steps: int) -> optax.Schedule:
  """PipeMare's tau ** -p(n), p(n) = max(0, 1 - n / steps), n the stage's update count."""

  def factor(count):
    p = jnp.maximum(0.0, 1.0 - count.astype(jnp.float32) / steps)
    return jnp.power(jnp.float32(tau), -p)

  return factor


# ------------------------------------------------------------------------ Nesterov (NAdamW)


class NAdamState(NamedTuple):
  count: Any        # updates made (int32)
  mu_product: Any   # mu_1 * ... * mu_t
  mu: Any           # first moment m
  nu: Any           # second moment v


def scale_by_nadam(b1: float, b2: float, eps: float, momentum_decay: float
                   ) -> optax.GradientTransformation:
  """torch.optim.NAdam's direction (before the learning rate and decoupled decay).

  At update t (1 for the first): mu_t = b1 * (1 - 0.5 * 0.96 ** (t * momentum_decay)),
  P_t = mu_1 * ... * mu_t, m <- b1 * m + (1 - b1) * g, v <- b2 * v + (1 - b2) * g * g,
  D = sqrt(v / (1 - b2 ** t)) + eps, and the direction
  (1 - mu_t) / (1 - P_t) * g / D + mu_{t+1} / (1 - P_t * mu_{t+1}) * m / D.
  Chained before optax.add_decayed_weights and optax.scale_by_learning_rate it is PyTorch's
  NAdam(decoupled_weight_decay=True), the optimizer of Ajanthan et al.'s code.
  """

  def init_fn(params):
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    return NAdamState(count=jnp.zeros([], jnp.int32), mu_product=jnp.ones([], jnp.float32),
                      mu=zeros, nu=jax.tree_util.tree_map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_int32_increment(state.count)
    t = count.astype(jnp.float32)
    mu_t = b1 * (1.0 - 0.5 * jnp.power(0.96, t * momentum_decay))
    mu_next = b1 * (1.0 - 0.5 * jnp.power(0.96, (t + 1.0) * momentum_decay))
    mu_product = state.mu_product * mu_t
    m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
    bias_correction2 = 1.0 - jnp.power(jnp.float32(b2), t)
    gradient_weight = (1.0 - mu_t) / (1.0 - mu_product)
    momentum_weight = mu_next / (1.0 - mu_product * mu_next)

    def direction(g, m, v):
      denominator = jnp.sqrt(v / bias_correction2) + eps
      return ((gradient_weight * g + momentum_weight * m) / denominator).astype(g.dtype)

    return (jax.tree_util.tree_map(direction, updates, m, v),
            NAdamState(count=count, mu_product=mu_product, mu=m, nu=v))

  return optax.GradientTransformation(init_fn, update_fn)


# ------------------------------------------------------------------------ error feedback


class ErrorFeedbackState(NamedTuple):
  count: Any      # updates made (int32)
  previous: Any   # the last update as the optimizer made it, u_{t-1} (uncorrected)


def error_feedback(coefficient: float) -> optax.GradientTransformation:
  """Zmushko et al.'s update-level error feedback, chained after the optimizer: its update u_t
  becomes u_t + coefficient * (u_t - u_{t-1}) from the second update on (the first is plain).

  Under a one-step delay u_t is the update the previous step should have made, and u_{t-1} the
  one it made: their difference, the previous step's error, is fed back now.
  """

  def init_fn(params):
    return ErrorFeedbackState(count=jnp.zeros([], jnp.int32),
                              previous=jax.tree_util.tree_map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    del params
    scale = jnp.where(state.count > 0, coefficient, 0.0)
    corrected = jax.tree_util.tree_map(lambda u, p: u + (scale * (u - p)).astype(u.dtype),
                                       updates, state.previous)
    return corrected, ErrorFeedbackState(count=optax.safe_int32_increment(state.count),
                                         previous=updates)

  return optax.GradientTransformation(init_fn, update_fn)
