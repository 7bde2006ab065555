"""What one stage computes in one call: plain functions built from a `StageSpec`.

The executor (`pipeline.Pipeline`) jits these once per stage (and per phase) and calls them with
what arrived from the neighbours; a method (`methods.py`) says which function a call uses.

* `update_then_forward` (a stage with a delayed gradient, FDG and DDG): scale the cotangent that
  arrived by beta, back-propagate it through the forward saved `delay` iterations ago, update,
  then forward the new input with the updated parameters and save what its backward will need.
* `last_update` (the stage that computes the loss): forward, loss against the targets, gradient
  and input cotangent at the current parameters, update. Ordinary back-propagation.
* `local_update` (DGL): forward, an auxiliary head's local loss, update; no cotangent.
* `predict` (inference mode) and `rebuild` (a saved forward's residuals from its inputs, for
  compact checkpoints).

What travels between stages may be any pytree of arrays (a hidden state and a mask, a residual
skip beside the activation). Gradients flow through its floating-point leaves only; a cotangent
has the structure of `differentiable_part` of the value it belongs to (None at the other leaves).
"""

import dataclasses
import inspect
from typing import Any, Callable, Optional

from clu import metrics as clu_metrics
import flax
import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import optax

from fdg_jax.engine import compensation as compensation_lib

STASH_MODES = ('vjp', 'recompute')
# Policies of jax.checkpoint_policies that a 'vjp' stash may use to keep fewer residuals: what a
# policy does not save is recomputed in the delayed backward from the saved stage input and old
# weights, so the gradient is the same; 'nothing_saveable' keeps only those inputs.
RESIDUAL_POLICIES = ('dots_saveable', 'dots_with_no_batch_dims_saveable', 'nothing_saveable')
# The variable collections a stage state carries; a module with others is refused (`check_collections`).
COLLECTIONS = ('params', 'batch_stats')


class TrainState(train_state.TrainState):
  """A stage's parameters, optimizer state, BatchNorm statistics and dropout key."""
  batch_stats: Any
  dropout_key: jax.Array


@flax.struct.dataclass
class LossAndAccuracy(clu_metrics.Collection):
  """The default metrics: mean loss and accuracy of argmax(logits) against integer labels."""
  loss: clu_metrics.Average.from_output('loss')
  accuracy: clu_metrics.Accuracy


def metric_names(metrics: type) -> tuple[str, ...]:
  """The names of a clu metrics Collection's metrics (without clu's own bookkeeping fields)."""
  return tuple(field.name for field in dataclasses.fields(metrics)
               if not field.name.startswith('_'))


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example (or per-token) softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def takes_train_argument(module: nn.Module) -> bool:
  """Whether `module` is called as `module(x, train=...)`; a module without that argument (a
  plain Dense MLP, say) is called as `module(x)`, and then has no train/eval difference."""
  try:
    parameters = inspect.signature(module.__call__).parameters
  except (TypeError, ValueError):   # no signature to read: assume the library's convention
    return True
  return 'train' in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def check_collections(variables: dict, stage: int) -> None:
  """Refuse variables the engine would drop silently (a cache, intermediates, ...)."""
  extra = sorted(set(variables) - set(COLLECTIONS))
  if extra:
    raise ValueError(
        f'Stage {stage} uses the variable collection(s) {extra}, which the pipeline does not '
        f'carry between iterations (it carries {COLLECTIONS}). Remove them from the module '
        '(e.g. sow nothing, use no decode cache in training), or keep that state in params.')


def apply_gradients(state: TrainState, grads, **extra_args) -> TrainState:
  """`state.apply_gradients`, passing extra arguments to an optimizer that takes them."""
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params, **extra_args)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       opt_state=opt_state)


def _is_differentiable(leaf) -> bool:
  return jnp.issubdtype(leaf.dtype, jnp.inexact)


def differentiable_part(tree):
  """`tree` with its non-floating-point leaves (token ids, masks) replaced by None."""
  return jax.tree_util.tree_map(lambda a: a if _is_differentiable(a) else None, tree)


def with_differentiable_part(tree, part):
  """`tree` with its floating-point leaves taken from `part` (as `differentiable_part` gives)."""
  leaves, structure = jax.tree_util.tree_flatten(tree)
  replacements = iter(jax.tree_util.tree_leaves(part))
  return jax.tree_util.tree_unflatten(
      structure, [next(replacements) if _is_differentiable(a) else a for a in leaves])


@dataclasses.dataclass(frozen=True, eq=False)
class StageSpec:
  """What a stage's functions are built from.

  module: the stage's Flax module, called as `module.apply(variables, x, train=bool)` (or
    without `train` if its `__call__` has no such argument).
  loss_fn: `(outputs, targets) -> per-example (or per-token) losses`; training uses their mean.
  metrics: a clu `Collection` made by `single_from_model_output(loss=, logits=, labels=)`.
  first: whether this is stage 0 (no input cotangent to compute).
  delay: iterations between its forward of a batch and its update with that batch; with
    microbatches, updates (`schedule.delay`).
  """
  module: nn.Module
  loss_fn: Callable[[Any, Any], jax.Array] = cross_entropy_loss
  metrics: type = LossAndAccuracy
  first: bool = True
  delay: int = 0
  beta: float = 1.0
  stash: str = 'vjp'
  residual_policy: Optional[str] = None
  compensation: compensation_lib.Compensation = compensation_lib.Compensation('none')

  @property
  def takes_train(self) -> bool:
    return takes_train_argument(self.module)

  def mode(self, train: bool) -> dict:
    """The `train=` keyword for the module, if it takes one."""
    return {'train': train} if self.takes_train else {}

  @property
  def predicts_weights(self) -> bool:
    """Whether its forwards use the parameters weight prediction extrapolates."""
    return (self.compensation.active(self.delay)
            and self.compensation.name == 'weight_prediction')

  @property
  def keeps_forward_parameters(self) -> bool:
    """Whether its updates need the parameters each forward used (delay compensation)."""
    return (self.compensation.active(self.delay)
            and self.compensation.name == 'delay_compensation')

  @property
  def keeps_inputs(self) -> bool:
    """Whether a saved forward also keeps what determines its residuals (stash='vjp'), so that
    a checkpoint can store that instead; 'nothing_saveable' keeps little else, so its residuals
    are stored as they are, unless delay compensation needs the forward's parameters."""
    return self.stash == 'vjp' and (self.residual_policy != 'nothing_saveable'
                                    or self.compensation.name == 'delay_compensation')


def train_forward(spec: StageSpec, params, batch_stats, x, key):
  """The stage's forward in training mode: (output, updated BatchNorm statistics)."""
  y, mutated = spec.module.apply(
      {'params': params, 'batch_stats': batch_stats}, x, **spec.mode(True),
      mutable=['batch_stats'], rngs={'dropout': key})
  return y, mutated.get('batch_stats', batch_stats)


def stage_vjp(spec: StageSpec, params, batch_stats, x, key):
  """(output, pullback, batch_stats): `jax.vjp` of the training forward w.r.t. the parameters
  and (except at stage 0) the input's floating-point leaves; the pullback takes a cotangent of
  `differentiable_part(output)`."""
  def forward(p, h):
    h = x if spec.first else with_differentiable_part(x, h)
    y, stats = train_forward(spec, p, batch_stats, h, key)
    return differentiable_part(y), (y, stats)
  if spec.residual_policy is not None:
    forward = jax.checkpoint(forward, policy=getattr(jax.checkpoint_policies,
                                                     spec.residual_policy))
  if spec.first:
    _, pullback, (y, stats) = jax.vjp(lambda p: forward(p, None), params, has_aux=True)
  else:
    _, pullback, (y, stats) = jax.vjp(forward, params, differentiable_part(x), has_aux=True)
  return y, pullback, stats


def forward_parameters(spec: StageSpec, state: TrainState):
  """The parameters a training forward uses: the current ones, or with weight prediction
  those `staleness(delay)` updates ahead (the update still applies to the current ones)."""
  if not spec.predicts_weights:
    return state.params
  return compensation_lib.predicted_parameters(
      state.params, state.opt_state, compensation_lib.staleness(spec.delay))


def saved_forward(spec: StageSpec, state: TrainState, x, keeps_inputs: bool):
  """A training forward kept for a later backward (stash 'vjp'), at `forward_parameters`:
  (state with its new BatchNorm statistics and dropout key, output, the vjp's residual leaves,
  inputs). `inputs`, with `keeps_inputs` (else None), is what determines the residuals besides
  the stage input (which the caller keeps): {'params' the forward used, 'batch_stats' before
  it, its dropout 'key'}; `rebuild` reruns the forward from them."""
  dropout_key, key = jax.random.split(state.dropout_key)
  params = forward_parameters(spec, state)
  y, pullback, batch_stats = stage_vjp(spec, params, state.batch_stats, x, key)
  inputs = ({'params': params, 'batch_stats': state.batch_stats, 'key': key}
            if keeps_inputs else None)
  return (state.replace(batch_stats=batch_stats, dropout_key=dropout_key), y,
          jax.tree_util.tree_leaves(pullback), inputs)


def residual_tree(spec: StageSpec, state: TrainState, x):
  """The pytree of `stage_vjp`'s residuals (for `jax.eval_shape`: its structure)."""
  return stage_vjp(spec, state.params, state.batch_stats, x, state.dropout_key)[1]


class Residuals:
  """Hashable-by-identity box of a residual tree structure, a static jit argument.

  `jax.vjp` returns a pytree whose structure holds the backward computation; a jitted function
  hands back only its leaves, and the backward rebuilds the pullback from this one structure so
  every call hits the same compiled function. `input_spec` says which stage input it is for.
  """

  def __init__(self, value, input_spec):
    self.value = value
    self.input_spec = input_spec


def update_then_forward(spec: StageSpec) -> Callable:
  """A stage with a delayed gradient: `(state, saved, forward_params, cotangent, x, *,
  residuals) -> (state, y, new_saved, inputs, input_cotangent)`. saved/cotangent or x may be
  None (fill, drain); `inputs` is what determines the new residuals (`StageSpec.keeps_inputs`),
  the stage input apart."""
  def update_then_forward(state: TrainState, saved, forward_params, cotangent, x, *,
                          residuals=None):
    input_cotangent = None
    if cotangent is not None:
      cotangent = jax.tree_util.tree_map(lambda c: c * jnp.asarray(spec.beta, c.dtype), cotangent)
      if spec.stash == 'vjp':
        pullback = jax.tree_util.tree_unflatten(residuals.value, saved)
      else:  # recompute the forward with the current weights; running stats are not touched
        saved_x, saved_key = saved
        _, pullback, _ = stage_vjp(spec, state.params, state.batch_stats, saved_x, saved_key)
      grads, *rest = pullback(cotangent)
      input_cotangent = rest[0] if rest else None
      if spec.keeps_forward_parameters:   # delay compensation: each forward's, saved
        state = apply_gradients(state, grads, stale_params=forward_params)
      else:
        state = state.apply_gradients(grads=grads)
    y = new_saved = inputs = None
    if x is not None and spec.stash == 'vjp':
      state, y, new_saved, inputs = saved_forward(spec, state, x, spec.keeps_inputs)
    elif x is not None:   # stash='recompute': the input and key, to redo the forward
      dropout_key, key = jax.random.split(state.dropout_key)
      y, batch_stats = train_forward(spec, forward_parameters(spec, state), state.batch_stats, x,
                                     key)
      new_saved = (x, key)
      state = state.replace(batch_stats=batch_stats, dropout_key=dropout_key)
    return state, y, new_saved, inputs, input_cotangent

  return update_then_forward


def _loss_gradients(spec: StageSpec, state: TrainState, x, targets):
  """The loss-computing stage's training forward at its current parameters: (state with its
  new BatchNorm statistics and dropout key, parameter gradient, input cotangent, metrics)."""
  dropout_key, key = jax.random.split(state.dropout_key)

  def loss_of(params, h):
    h = x if spec.first else with_differentiable_part(x, h)
    outputs, batch_stats = train_forward(spec, params, state.batch_stats, h, key)
    return jnp.mean(spec.loss_fn(outputs, targets)), (outputs, batch_stats)

  (loss, (outputs, batch_stats)), (grads, input_cotangent) = jax.value_and_grad(
      loss_of, argnums=(0, 1), has_aux=True)(
          state.params, None if spec.first else differentiable_part(x))
  metrics = spec.metrics.single_from_model_output(loss=loss, logits=outputs, labels=targets)
  return (state.replace(batch_stats=batch_stats, dropout_key=dropout_key), grads,
          input_cotangent, metrics)


def last_update(spec: StageSpec) -> Callable:
  """The stage that computes the loss: `(state, x, targets) -> (state, input_cotangent,
  metrics)`, at its current parameters (no staleness)."""
  def update_then_forward(state: TrainState, x, targets):   # the name profiles look for
    state, grads, input_cotangent, metrics = _loss_gradients(spec, state, x, targets)
    return state.apply_gradients(grads=grads), input_cotangent, metrics

  return update_then_forward


# ------------------------------------------------ microbatches (GPipe, 1F1B, FDG with M > 1)


def microbatch_forward(spec: StageSpec, keeps_inputs: bool = False) -> Callable:
  """One microbatch's forward: `(state, x, *, with_params) -> (state, y, saved, inputs)`, saved
  the vjp's residual leaves (at `forward_parameters`: FDG's weight prediction extrapolates),
  `inputs` what determines them besides x (`saved_forward`; None unless `keeps_inputs`), the
  parameters only `with_params` (static): every microbatch of a batch forwards with the same
  ones, which the caller keeps once per batch (a copy per microbatch cost the character GPT's
  forward 4-7% on CPU: experiments/probes/microbatch_forward_inputs.py). BatchNorm normalises
  the microbatch and its running statistics are updated once per microbatch, as GPipe does."""
  def forward(state: TrainState, x, *, with_params: bool = False):
    state, y, saved, inputs = saved_forward(spec, state, x, keeps_inputs)
    if inputs is not None and not with_params:
      del inputs['params']
    return state, y, saved, inputs
  return forward


def _accumulate(total, grads):
  return grads if total is None else jax.tree_util.tree_map(jnp.add, total, grads)


def microbatch_backward(spec: StageSpec) -> Callable:
  """`(total, saved, cotangent, *, residuals) -> (total + gradient, input_cotangent)`: one
  microbatch's backward through its saved forward, the cotangent scaled by the stage's beta,
  its gradient added to the batch's sum (None before the batch's first)."""
  def backward(total, saved, cotangent, *, residuals):
    cotangent = jax.tree_util.tree_map(lambda c: c * jnp.asarray(spec.beta, c.dtype), cotangent)
    grads, *rest = jax.tree_util.tree_unflatten(residuals.value, saved)(cotangent)
    return _accumulate(total, grads), (rest[0] if rest else None)
  return backward


def microbatch_loss(spec: StageSpec) -> Callable:
  """The last stage in a synchronous schedule: `(state, total, x, targets) -> (state, total +
  gradient, input_cotangent, metrics)`, the gradient of the microbatch's mean loss."""
  def forward_backward(state: TrainState, total, x, targets):
    state, grads, input_cotangent, metrics = _loss_gradients(spec, state, x, targets)
    return state, _accumulate(total, grads), input_cotangent, metrics
  return forward_backward


def squared_norm(tree) -> jax.Array:
  """The squared global norm of a pytree (a stage's share of the whole model's)."""
  return sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree_util.tree_leaves(tree))


def apply_mean(spec: StageSpec, microbatches: int, grad_clip: float) -> Callable:
  """`(state, total, squared_norms, forward_params) -> state`: the update with the batch's mean
  gradient, total / M, clipped when grad_clip > 0 by the whole model's norm, the root of the
  stages' summed `squared_norms` of their gradient sums, over M (optax.clip_by_global_norm's
  rule); with delay compensation corrected with `forward_params`, the parameters every
  microbatch of the batch forwarded with (None otherwise)."""
  def update(state: TrainState, total, squared_norms, forward_params):
    grads = jax.tree_util.tree_map(lambda g: g / microbatches, total)
    if grad_clip > 0:
      norm = jnp.sqrt(sum(squared_norms)) / microbatches
      scale = jnp.where(norm < grad_clip, 1.0, grad_clip / norm)
      grads = jax.tree_util.tree_map(lambda g: (g * scale).astype(g.dtype), grads)
    if spec.keeps_forward_parameters:
      return apply_gradients(state, grads, stale_params=forward_params)
    return state.apply_gradients(grads=grads)
  return update


def local_update(spec: StageSpec, aux_head: Optional[nn.Module]) -> Callable:
  """DGL's stage: `(state, x, targets) -> (state, y, metrics)`; trains the stage (and its
  auxiliary head, without one: the stage's own output is scored) on its local loss, and sends
  the output of the pre-update weights. params = {'stage', 'aux'}, likewise batch_stats."""
  def train_then_send(state: TrainState, x, targets):
    dropout_key, key = jax.random.split(state.dropout_key)

    def loss_of(params):
      y, stage_stats = train_forward(spec, params['stage'], state.batch_stats['stage'], x, key)
      if aux_head is None:
        outputs, batch_stats = y, {'stage': stage_stats}
      else:
        outputs, mutated = aux_head.apply(
            {'params': params['aux'], 'batch_stats': state.batch_stats['aux']}, y, train=True,
            mutable=['batch_stats'], rngs={'dropout': jax.random.fold_in(key, 1)})
        batch_stats = {'stage': stage_stats,
                       'aux': mutated.get('batch_stats', state.batch_stats['aux'])}
      return jnp.mean(spec.loss_fn(outputs, targets)), (y, outputs, batch_stats)

    (loss, (y, outputs, batch_stats)), grads = jax.value_and_grad(
        loss_of, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads).replace(
        batch_stats=batch_stats, dropout_key=dropout_key)
    metrics = spec.metrics.single_from_model_output(loss=loss, logits=outputs, labels=targets)
    return state, (None if aux_head is None else y), metrics

  return train_then_send


def predict(spec: StageSpec) -> Callable:
  """`(params, batch_stats, x) -> y` in inference mode."""
  def predict(params, batch_stats, x):
    return spec.module.apply({'params': params, 'batch_stats': batch_stats}, x,
                             **spec.mode(False))
  return predict


def rebuild(spec: StageSpec) -> Callable:
  """`inputs -> (y, residual leaves)`: a saved forward rebuilt from what determines it."""
  def rebuild(inputs):
    y, pullback, _ = stage_vjp(spec, inputs['params'], inputs['batch_stats'], inputs['x'],
                               inputs['key'])
    return y, jax.tree_util.tree_leaves(pullback)
  return rebuild
