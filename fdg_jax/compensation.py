"""Stale-gradient compensation for the stages of FDG and DDG (beyond the paper).

A non-last stage k applies the gradient of a batch it forwarded `delay` iterations earlier
(`Schedule.delay(k)`: 2(K-1-k) for FDG, K-1-k for DDG). Each call updates before it forwards, so
between the forward of a batch and the update with its gradient the stage makes s = delay - 1
other updates: the gradient was taken at parameters theta_n and is applied to theta_{n+s}. The
options below act on that; the last stage (delay 0) and K = 1 are never changed.

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

Everything a stage keeps across iterations lives in its optimizer state (optax transformations
chained to the user's optimizer), so checkpoints and the multi-process engine carry it as they
carry momentum.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

NAMES = ('none', 'weight_prediction', 'delay_compensation', 'lr_reschedule')
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

  def __post_init__(self):
    if self.name not in NAMES:
      raise ValueError(f'compensation={self.name!r} is not one of {NAMES}.')
    if self.dc_lambda < 0:
      raise ValueError(f'dc_lambda={self.dc_lambda} is negative; use lambda >= 0.')
    if not 0 <= self.dc_decay < 1:
      raise ValueError(f'dc_decay={self.dc_decay} is outside [0, 1).')
    if self.reschedule_steps < 1:
      raise ValueError(f'reschedule_steps={self.reschedule_steps}: use at least 1 update.')

  def active(self, delay: int) -> bool:
    """Whether a stage with this delay is changed at all (never the last stage, delay 0)."""
    return self.name != 'none' and delay > 0

  def stage_optimizer(self, optimizer: optax.GradientTransformation, delay: int
                      ) -> optax.GradientTransformation:
    """The optimizer of a stage with this delay: the user's, with the compensation chained in."""
    if not self.active(delay):
      return optimizer
    if self.name == 'weight_prediction':
      return optax.chain(optimizer, keep_last_update())
    if self.name == 'delay_compensation':
      return optax.chain(delay_compensated(self.dc_lambda, self.dc_adaptive, self.dc_decay,
                                           self.dc_epsilon), optimizer)
    return optax.chain(optimizer, optax.scale_by_schedule(
        reschedule_factor(max(1, delay), self.reschedule_steps)))


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
