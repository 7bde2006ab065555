"""The FDG pipeline engine: K stages, each with its own TrainState on its own device.

One iteration calls every stage's jitted `update_then_forward` once, with what arrived from its
neighbours in the previous iteration (docs/algorithm.md has the exact schedule):

* a non-last stage k scales the cotangent that arrived by beta, back-propagates it through the
  forward it saved 2(K-1-k) iterations ago, updates its parameters, and only then forwards the
  activation that arrived, with the updated parameters;
* the last stage forwards, takes the loss and its gradient at its current parameters, and updates.

Outputs move to the neighbours' devices with `jax.device_put`. The host loop never waits on a
device value: JAX's asynchronous dispatch lets all stages compute at once. With K = 1 the single
stage is the last stage, and one iteration is exactly an ordinary back-propagation step.
"""


import dataclasses
import inspect
from typing import Any, Callable, NamedTuple, Optional, Sequence

from clu import metrics as clu_metrics
import flax
import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import optax

STASH_MODES = ('vjp', 'recompute')
# Policies of jax.checkpoint_policies that a 'vjp' stash may use to keep fewer residuals: what a
# policy does not save is recomputed in the delayed backward from the saved stage input and old
# weights, so the gradient is the same; 'nothing_saveable' keeps only those inputs.
RESIDUAL_POLICIES = ('dots_saveable', 'dots_with_no_batch_dims_saveable', 'nothing_saveable')
PHASES = ('fill', 'steady', 'drain')


class TrainState(train_state.TrainState):
  """A stage's parameters, optimizer state, BatchNorm statistics and dropout key."""
  batch_stats: Any
  dropout_key: jax.Array


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output('loss')
  accuracy: clu_metrics.Accuracy


@flax.struct.dataclass
class EvalMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output('loss')
  accuracy: clu_metrics.Accuracy


@flax.struct.dataclass
class Activation:
  """A stage's output on its way to the next stage; the labels travel with their batch."""
  value: jax.Array
  labels: jax.Array   # already on the last stage's device
  batch: int = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class Cotangent:
  value: jax.Array
  batch: int = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class Saved:
  """What a stage keeps from a forward for its delayed backward.

  stash='vjp': the residuals of `jax.vjp` (old activations and old weights);
  stash='recompute': the stage input and dropout key, to redo the forward at backward time.
  """
  arrays: Any
  batch: int = flax.struct.field(pytree_node=False)
  structure: Any = flax.struct.field(pytree_node=False, default=None)  # of vjp residuals


@flax.struct.dataclass
class PipelineState:
  """Everything the pipeline holds between iterations.

  `activations[k]` and `cotangents[k]` are what arrives at stage k in the next iteration;
  `saved[k]` is stage k's queue of saved forwards, oldest first.
  """
  stages: tuple[TrainState, ...]
  saved: tuple[tuple[Saved, ...], ...]
  activations: tuple[Optional[Activation], ...]
  cotangents: tuple[Optional[Cotangent], ...]
  iteration: int = flax.struct.field(pytree_node=False, default=0)
  batches_fed: int = flax.struct.field(pytree_node=False, default=0)

  @property
  def in_flight(self) -> bool:
    """True while some batch has not yet reached every stage's update."""
    return (any(a is not None for a in self.activations)
            or any(c is not None for c in self.cotangents)
            or any(self.saved))


@dataclasses.dataclass(frozen=True)
class StepInfo:
  """What one iteration did: batch indices each stage forwarded and updated with (or None)."""
  iteration: int
  forwarded: tuple[Optional[int], ...]
  updated: tuple[Optional[int], ...]
  metrics: Optional[TrainMetrics]  # of the batch the last stage trained on, on its device


class _StageCall(NamedTuple):
  """What one stage call of an iteration produced (host-side bookkeeping only)."""
  stage: TrainState
  saved: tuple[Saved, ...]
  output: Optional[Activation] = None       # on the next stage's device
  cotangent: Optional[Cotangent] = None     # on the previous stage's device
  forwarded: Optional[int] = None
  updated: Optional[int] = None
  metrics: Optional[TrainMetrics] = None


class _Identity:
  """Hashable-by-identity box, to pass a residual tree structure as a static jit argument.

  `input_spec` is the (shape, dtype name) of the stage input the structure belongs to, so a
  restored checkpoint can look the structure up again.
  """

  def __init__(self, value, input_spec):
    self.value = value
    self.input_spec = input_spec


def delay(stage: int, num_stages: int) -> int:
  """Iterations between stage k's forward of a batch and its backward of that batch."""
  return 2 * (num_stages - 1 - stage)


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def takes_train_argument(module: nn.Module) -> bool:
  """Whether `module` is called as `module(x, train=...)`; a module without that argument (a
  plain Dense MLP, say) is called as `module(x)`, and then has no train/eval difference."""
  try:
    parameters = inspect.signature(module.__call__).parameters
  except (TypeError, ValueError):   # no signature to read: assume the library's convention
    return True
  return 'train' in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def as_sharding(placement) -> jax.sharding.Sharding:
  if isinstance(placement, jax.sharding.Sharding):
    return placement
  return jax.sharding.SingleDeviceSharding(placement)


class Pipeline:
  """FDG over a list of Flax modules, one stage per module.

  Args:
    stages: Flax modules called as `module.apply(variables, x, train=bool)`, or as
      `module.apply(variables, x)` if their `__call__` has no `train` argument; stage k's output
      is stage k+1's input and the last stage returns logits.
    optimizer: an optax transformation; every stage gets its own state of it.
    loss_fn: `(logits, labels) -> per-example losses`; training uses their mean.
    beta: gradient-shrinking factor in (0, 1]; each non-last stage multiplies the cotangent it
      receives by beta.
    stash: 'vjp' (default; the delayed gradient of the paper, from the residuals saved at forward
      time) or 'recompute' (keep only the input, recompute with the current weights).
    residual_policy: with stash='vjp', None (keep every residual of `jax.vjp`) or a name in
      RESIDUAL_POLICIES: keep only what that `jax.checkpoint` policy saves and recompute the
      rest in the delayed backward from the saved input and old weights. The same gradient,
      less memory, more compute.
    placements: one `jax.sharding.Sharding` or `jax.Device` per stage (default: device k).
  """

  def __init__(self, stages: Sequence[nn.Module], optimizer: optax.GradientTransformation,
               loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = cross_entropy_loss, *,
               beta: float = 1.0, stash: str = 'vjp', residual_policy: Optional[str] = None,
               placements: Optional[Sequence[Any]] = None):
    if not stages:
      raise ValueError('A pipeline needs at least one stage.')
    if not 0.0 < beta <= 1.0:
      raise ValueError(f'beta={beta} is outside (0, 1]; beta=1 disables gradient shrinking.')
    if stash not in STASH_MODES:
      raise ValueError(f'stash={stash!r} is not one of {STASH_MODES}.')
    if residual_policy is not None and residual_policy not in RESIDUAL_POLICIES:
      raise ValueError(f'residual_policy={residual_policy!r} is not one of {RESIDUAL_POLICIES} '
                       '(or None: keep every residual).')
    if residual_policy is not None and stash != 'vjp':
      raise ValueError(f"residual_policy={residual_policy!r} applies to stash='vjp' only; "
                       f"stash={stash!r} keeps no residuals.")
    if placements is None:
      if len(jax.devices()) < len(stages):
        raise ValueError(
            f'{len(stages)} stages need {len(stages)} devices but JAX sees {len(jax.devices())}; '
            'pass placements explicitly (e.g. all stages on one device) or use fewer stages.')
      placements = jax.devices()[:len(stages)]
    if len(placements) != len(stages):
      raise ValueError(f'{len(placements)} placements for {len(stages)} stages.')
    self.modules = tuple(stages)
    self._takes_train = tuple(takes_train_argument(m) for m in stages)
    self.optimizer = optimizer
    self.loss_fn = loss_fn
    self.beta = float(beta)
    self.stash = stash
    self.residual_policy = residual_policy
    self.shardings = tuple(as_sharding(p) for p in placements)
    self.num_stages = len(stages)
    self._residual_structures: dict[tuple, _Identity] = {}
    # Per non-last stage, one compiled function per phase: 'fill' (forward only, before the
    # first cotangent), 'steady' (update then forward) and 'drain' (update only, at the end).
    # Each is traced once; the fresh Python function per phase keeps their caches apart.
    self.stage_functions = tuple(
        {phase: jax.jit(self._make_stage_fn(k), donate_argnums=0, static_argnames='residuals')
         for phase in PHASES}
        if k < self.num_stages - 1 else
        {'steady': jax.jit(self._make_last_stage_fn(), donate_argnums=0)}
        for k in range(self.num_stages))
    self._predict = tuple(jax.jit(self._make_predict_fn(k)) for k in range(self.num_stages))

  # ---------------------------------------------------------------- the stage functions

  def _mode(self, k: int, train: bool) -> dict:
    """The `train=` keyword for stage k's module, if it takes one."""
    return {'train': train} if self._takes_train[k] else {}

  def _train_forward(self, k: int, params, batch_stats, x, key):
    """Stage k's forward in training mode: (output, updated BatchNorm statistics)."""
    y, mutated = self.modules[k].apply(
        {'params': params, 'batch_stats': batch_stats}, x, **self._mode(k, True),
        mutable=['batch_stats'], rngs={'dropout': key})
    return y, mutated.get('batch_stats', batch_stats)

  def _vjp(self, k: int, params, batch_stats, x, key):
    """jax.vjp of stage k's forward, w.r.t. params (and the input, except at stage 0)."""
    def forward(p, h):
      return self._train_forward(k, p, batch_stats, h, key)
    if self.residual_policy is not None:
      forward = jax.checkpoint(forward,
                               policy=getattr(jax.checkpoint_policies, self.residual_policy))
    if k == 0:
      return jax.vjp(lambda p: forward(p, x), params, has_aux=True)
    return jax.vjp(forward, params, x, has_aux=True)

  def _make_stage_fn(self, k: int):
    """update_then_forward of non-last stage k. Saved, cotangent or x may be None (fill, drain)."""

    def update_then_forward(state: TrainState, saved, cotangent, x, *, residuals=None):
      input_cotangent = None
      if cotangent is not None:
        cotangent = cotangent * jnp.asarray(self.beta, cotangent.dtype)
        if self.stash == 'vjp':
          pullback = jax.tree_util.tree_unflatten(residuals.value, saved)
        else:  # recompute the forward with the current weights; running stats are not touched
          saved_x, saved_key = saved
          _, pullback, _ = self._vjp(k, state.params, state.batch_stats, saved_x, saved_key)
        grads, *rest = pullback(cotangent)
        input_cotangent = rest[0] if rest else None
        state = state.apply_gradients(grads=grads)
      y = new_saved = None
      if x is not None:
        dropout_key, key = jax.random.split(state.dropout_key)
        if self.stash == 'vjp':
          y, pullback, batch_stats = self._vjp(k, state.params, state.batch_stats, x, key)
          new_saved = jax.tree_util.tree_leaves(pullback)
        else:
          y, batch_stats = self._train_forward(k, state.params, state.batch_stats, x, key)
          new_saved = (x, key)
        state = state.replace(batch_stats=batch_stats, dropout_key=dropout_key)
      return state, y, new_saved, input_cotangent

    return update_then_forward

  def _make_last_stage_fn(self):
    k = self.num_stages - 1

    def update_then_forward(state: TrainState, x, labels):
      dropout_key, key = jax.random.split(state.dropout_key)

      def loss_of(params, h):
        logits, batch_stats = self._train_forward(k, params, state.batch_stats, h, key)
        losses = self.loss_fn(logits, labels)
        return jnp.mean(losses), (logits, batch_stats)

      argnums = 0 if k == 0 else (0, 1)
      (loss, (logits, batch_stats)), grads = jax.value_and_grad(
          loss_of, argnums=argnums, has_aux=True)(state.params, x)
      grads, input_cotangent = (grads, None) if k == 0 else grads
      state = state.apply_gradients(grads=grads).replace(
          batch_stats=batch_stats, dropout_key=dropout_key)
      metrics = TrainMetrics.single_from_model_output(loss=loss, logits=logits, labels=labels)
      return state, input_cotangent, metrics

    return update_then_forward

  def _make_predict_fn(self, k: int):
    def predict(params, batch_stats, x):
      return self.modules[k].apply({'params': params, 'batch_stats': batch_stats}, x,
                                   **self._mode(k, False))
    return predict

  def _residual_structure(self, k: int, state: TrainState, x: jax.Array) -> _Identity:
    """The tree structure of stage k's vjp residuals for inputs like x (traced once, cached).

    `jax.vjp` returns a pytree whose structure holds the backward computation; a jitted
    function hands back only its leaves, and the backward rebuilds it from this one structure
    so that every call hits the same compiled function.
    """
    cache_key = (k, x.shape, x.dtype)
    if cache_key not in self._residual_structures:
      def residual_tree(state, x):
        return self._vjp(k, state.params, state.batch_stats, x, state.dropout_key)[1]
      shapes = jax.eval_shape(residual_tree, state, x)
      self._residual_structures[cache_key] = _Identity(
          jax.tree_util.tree_structure(shapes), (tuple(x.shape), jnp.dtype(x.dtype).name))
    return self._residual_structures[cache_key]

  # ---------------------------------------------------------------- the host loop

  def init(self, rng: jax.Array, sample_input: jax.Array,
           variables: Optional[Sequence[dict]] = None) -> PipelineState:
    """Initialise every stage (or take `variables`, one dict per stage) on its device."""
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
      rng = jax.random.key_data(rng)   # raw uint32 keys: plain arrays in every checkpoint
    params_key, dropout_key = jax.random.split(rng)
    if variables is None:
      variables, x = [], jnp.asarray(sample_input)
      for k, module in enumerate(self.modules):
        stage_variables = module.init(
            {'params': jax.random.fold_in(params_key, k),
             'dropout': jax.random.fold_in(dropout_key, k)}, x, **self._mode(k, False))
        x = module.apply(stage_variables, x, **self._mode(k, False))
        variables.append(stage_variables)
    if len(variables) != self.num_stages:
      raise ValueError(f'{len(variables)} variable dicts for {self.num_stages} stages.')
    stages = []
    for k, (stage_variables, sharding) in enumerate(zip(variables, self.shardings)):
      state = TrainState.create(
          apply_fn=self.modules[k].apply, params=stage_variables['params'], tx=self.optimizer,
          batch_stats=stage_variables.get('batch_stats', {}),
          dropout_key=jax.random.fold_in(dropout_key, k))
      # A copy: the stage state is donated at every step, and the caller's arrays must survive.
      stages.append(jax.device_put(state, sharding, may_alias=False))
    none = (None,) * self.num_stages
    return PipelineState(stages=tuple(stages), saved=((),) * self.num_stages,
                         activations=none, cotangents=none)

  def _entering(self, state: PipelineState, images, labels) -> Optional[Activation]:
    """The new batch as it enters stage 0; its labels go straight to the last stage."""
    if images is None:
      return None
    return Activation(value=jax.device_put(images, self.shardings[0]),
                      labels=jax.device_put(labels, self.shardings[-1]),
                      batch=state.batches_fed)

  def _run_stage(self, k: int, stage: TrainState, queue: tuple[Saved, ...],
                 activation: Optional[Activation], cotangent: Optional[Cotangent]
                 ) -> _StageCall:
    """Stage k's one call of an iteration, with what arrived; nothing happens if nothing did.

    Its output goes to stage k+1's device and its input cotangent to stage k-1's.
    """
    if k == self.num_stages - 1:
      if activation is None:
        return _StageCall(stage, queue)
      stage, input_cotangent, metrics = self.stage_functions[k]['steady'](
          stage, activation.value, activation.labels)
      batch = activation.batch
      return _StageCall(stage, queue, forwarded=batch, updated=batch, metrics=metrics,
                        cotangent=self._send_back(k, input_cotangent, batch))
    if activation is None and cotangent is None:
      return _StageCall(stage, queue)
    entry, residuals = None, None
    if cotangent is not None:
      entry, queue = queue[0], queue[1:]
      if entry.batch != cotangent.batch:  # a broken schedule must never train silently
        raise AssertionError(f'stage {k}: cotangent of batch {cotangent.batch} met the '
                             f'forward of batch {entry.batch}')
      residuals = entry.structure
    if activation is not None and self.stash == 'vjp':
      residuals_out = self._residual_structure(k, stage, activation.value)
      residuals = residuals or residuals_out
    phase = 'fill' if cotangent is None else 'drain' if activation is None else 'steady'
    stage, y, new_saved, input_cotangent = self.stage_functions[k][phase](
        stage, entry.arrays if entry else None, cotangent.value if cotangent else None,
        activation.value if activation else None, residuals=residuals)
    output = None
    if activation is not None:
      structure = residuals_out if self.stash == 'vjp' else None
      queue = queue + (Saved(arrays=new_saved, batch=activation.batch, structure=structure),)
      output = Activation(value=jax.device_put(y, self.shardings[k + 1]),
                          labels=activation.labels, batch=activation.batch)
    updated = cotangent.batch if cotangent is not None else None
    return _StageCall(stage, queue, output=output,
                      forwarded=activation.batch if activation else None, updated=updated,
                      cotangent=self._send_back(k, input_cotangent, updated))

  def _send_back(self, k: int, input_cotangent, batch: Optional[int]) -> Optional[Cotangent]:
    if k == 0 or input_cotangent is None:
      return None
    return Cotangent(value=jax.device_put(input_cotangent, self.shardings[k - 1]), batch=batch)

  def step(self, state: PipelineState, images=None, labels=None
           ) -> tuple[PipelineState, StepInfo]:
    """One iteration of every stage. `images=None` feeds no new batch (draining).

    The stage states are donated: `state` must not be used after this call.
    """
    K = self.num_stages
    arriving = list(state.activations)
    arriving[0] = self._entering(state, images, labels)
    calls = [self._run_stage(k, state.stages[k], state.saved[k], arriving[k],
                             state.cotangents[k]) for k in range(K)]
    # What each stage sent arrives at its neighbour in the next iteration.
    return self._next_state(state, calls, images is not None,
                            activations=(None,) + tuple(c.output for c in calls[:-1]))

  def _next_state(self, state: PipelineState, calls: Sequence[_StageCall], fed: bool,
                  activations: tuple[Optional[Activation], ...]
                  ) -> tuple[PipelineState, StepInfo]:
    cotangents = tuple(c.cotangent for c in calls[1:]) + (None,)
    new_state = PipelineState(
        stages=tuple(c.stage for c in calls), saved=tuple(c.saved for c in calls),
        activations=activations, cotangents=cotangents, iteration=state.iteration + 1,
        batches_fed=state.batches_fed + fed)
    info = StepInfo(iteration=state.iteration, forwarded=tuple(c.forwarded for c in calls),
                    updated=tuple(c.updated for c in calls), metrics=calls[-1].metrics)
    return new_state, info

  def drain(self, state: PipelineState) -> tuple[PipelineState, list[StepInfo]]:
    """Run iterations without new batches until every batch has updated every stage."""
    infos = []
    while state.in_flight:
      state, info = self.step(state)
      infos.append(info)
    return state, infos

  # ---------------------------------------------------------------- reading the pipeline

  def stage_function_names(self) -> frozenset[str]:
    """Names of the jitted stage functions (a profile names their XLA modules `jit_NAME`)."""
    return frozenset(function.__name__ for functions in self.stage_functions
                     for function in (functions.values() if isinstance(functions, dict)
                                      else (functions,)))

  def stage_variables(self, state: PipelineState) -> list[dict]:
    """Each stage's current {'params', 'batch_stats'} (on its device)."""
    return [{'params': s.params, 'batch_stats': s.batch_stats} for s in state.stages]

  def num_extra_params(self, state: PipelineState) -> int:
    """Trainable parameters outside the network (DGL's auxiliary heads): none for FDG."""
    del state
    return 0

  def predict(self, state: PipelineState, images) -> jax.Array:
    """Logits of the composed stages in inference mode; the pipeline in flight is untouched."""
    y = images
    for k, variables in enumerate(self.stage_variables(state)):
      y = self._predict[k](variables['params'], variables['batch_stats'],
                           jax.device_put(y, self.shardings[k]))
    return y

  def evaluate(self, state: PipelineState, batches) -> dict[str, float]:
    """Loss and accuracy over batches of (images, labels[, mask]); reads the device once."""
    total = None
    for batch in batches:
      images, labels, *mask = batch
      logits = self.predict(state, images)
      labels = jax.device_put(labels, self.shardings[-1])
      mask = jax.device_put(mask[0], self.shardings[-1]) if mask else None
      update = EvalMetrics.single_from_model_output(
          loss=self.loss_fn(logits, labels), logits=logits, labels=labels, mask=mask)
      total = update if total is None else total.merge(update)
    if total is None:
      raise ValueError('evaluate() got no batches.')
    return {name: float(value) for name, value in total.compute().items()}
