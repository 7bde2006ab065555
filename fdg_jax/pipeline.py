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
import numpy as np
import optax

from fdg_jax import compensation as compensation_lib
from fdg_jax import distributed
from fdg_jax import schedule as schedule_lib

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
  """A stage's output on its way to the next stage (or a batch entering stage 0)."""
  value: jax.Array
  batch: int = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class Labels:
  """A batch's labels, waiting on the device of a stage that computes a loss on that batch."""
  value: jax.Array
  batch: int = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class Cotangent:
  value: jax.Array
  batch: int = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class Saved:
  """What a stage keeps from a forward for its delayed backward.

  stash='vjp': the residuals of `jax.vjp` (old activations and old weights), and in `inputs`
  what determines them: {'x': the stage input, 'params' and 'batch_stats' that forward used,
  'key': its dropout key} (`Pipeline.keeps_inputs`); a checkpoint stores only those and rebuilds
  the residuals (`Pipeline.rebuild_forward`).
  stash='recompute': the stage input and dropout key, to redo the forward at backward time.
  """
  arrays: Any
  batch: int = flax.struct.field(pytree_node=False)
  structure: Any = flax.struct.field(pytree_node=False, default=None)  # of vjp residuals
  inputs: Any = None


@flax.struct.dataclass
class PipelineState:
  """Everything the pipeline holds between iterations.

  `activations[k]` and `cotangents[k]` are what arrives at stage k in the next iteration;
  `saved[k]` is stage k's queue of saved forwards and `labels[k]` of labels it will compute a
  loss with, oldest first. In a multi-process run a process holds only its own stages: the
  others' entries are None or empty. The current stream's batch b entered at iteration
  b + stream_offset (b >= stream_first_batch); see `schedule.Schedule.iteration`.
  """
  stages: tuple[Optional[TrainState], ...]
  saved: tuple[tuple[Saved, ...], ...]
  activations: tuple[Optional[Activation], ...]
  cotangents: tuple[Optional[Cotangent], ...]
  labels: tuple[tuple[Labels, ...], ...]
  iteration: int = flax.struct.field(pytree_node=False, default=0)
  batches_fed: int = flax.struct.field(pytree_node=False, default=0)
  stream_first_batch: int = flax.struct.field(pytree_node=False, default=0)
  stream_offset: int = flax.struct.field(pytree_node=False, default=0)

  @property
  def in_flight(self) -> bool:
    """True while some batch this process holds has not yet reached every stage's update."""
    return (any(a is not None for a in self.activations)
            or any(c is not None for c in self.cotangents)
            or any(self.saved) or any(self.labels))


@dataclasses.dataclass(frozen=True)
class StepInfo:
  """What one iteration did: batch indices each stage forwarded and updated with (or None)."""
  iteration: int
  forwarded: tuple[Optional[int], ...]
  updated: tuple[Optional[int], ...]
  metrics: Optional[TrainMetrics]  # of the batch the last stage trained on, on its device


class StageOutput(NamedTuple):
  """What one stage call produced, on the stage's device (host-side bookkeeping only)."""
  stage: TrainState
  saved: tuple[Saved, ...]
  activation: Optional[jax.Array] = None       # the output for the next stage
  cotangent: Optional[jax.Array] = None        # the input cotangent for the previous stage
  metrics: Optional[TrainMetrics] = None       # of the loss this stage computed, if any


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


def apply_gradients(state: TrainState, grads, **extra_args) -> TrainState:
  """`state.apply_gradients`, passing extra arguments to an optimizer that takes them."""
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params, **extra_args)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       opt_state=opt_state)


@jax.jit
def _bits_equal(a: list[jax.Array], b: list[jax.Array]) -> jax.Array:
  def bits(x):
    if jnp.issubdtype(x.dtype, jnp.floating):
      return jax.lax.bitcast_convert_type(x, jnp.dtype(f'uint{8 * x.dtype.itemsize}'))
    return x
  return jnp.all(jnp.stack([jnp.all(bits(x) == bits(y)) for x, y in zip(a, b)]))


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


DATA_AXIS = 'data'


def stage_shardings(placement) -> tuple[jax.sharding.Sharding, jax.sharding.Sharding]:
  """(batch, state) shardings of a stage placed on `placement`.

  `placement` is a `jax.Device`, a sequence of devices (a one-axis mesh named DATA_AXIS), or a
  sharding: a `SingleDeviceSharding`, or a `NamedSharding` whose spec splits the leading (batch)
  axis over mesh axes, like `PartitionSpec('data')`. Arrays with a batch axis (stage inputs,
  outputs, cotangents, labels) take the batch sharding; the stage's parameters, optimizer state
  and statistics are replicated on all its devices. A jitted function of a split batch then
  computes what it computes on one device (BatchNorm normalises over the whole batch, the
  gradients are summed over it): the stage is data parallel.
  """
  if isinstance(placement, jax.Device):
    placement = jax.sharding.SingleDeviceSharding(placement)
  elif not isinstance(placement, jax.sharding.Sharding):
    devices = list(placement)
    if not devices or not all(isinstance(d, jax.Device) for d in devices):
      raise ValueError(f'A stage placement must be a device, a list of devices or a sharding; '
                       f'got {placement!r}.')
    if len(devices) == 1:
      placement = jax.sharding.SingleDeviceSharding(devices[0])
    else:
      mesh = jax.sharding.Mesh(np.array(devices), (DATA_AXIS,))
      placement = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))
  if isinstance(placement, jax.sharding.SingleDeviceSharding):
    return placement, placement
  if not isinstance(placement, jax.sharding.NamedSharding) or len(placement.spec) > 1:
    raise ValueError(
        f'A stage placement {placement} must split at most the batch axis: give a device, a list '
        'of devices, or NamedSharding(mesh, PartitionSpec(axis)) with the batch axis on mesh '
        'axis (or axes) `axis`.')
  return placement, _replicated(placement)


def _replicated(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  return sharding


def _same_layout(a: jax.sharding.Sharding, b: jax.sharding.Sharding) -> bool:
  """Whether shard i of an array on `a` is shard i on `b` (what JAX moves across processes)."""
  if a.num_devices != b.num_devices:
    return False
  if a.num_devices == 1:
    return True
  return (isinstance(a, jax.sharding.NamedSharding) and isinstance(b, jax.sharding.NamedSharding)
          and a.mesh.axis_names == b.mesh.axis_names and a.mesh.axis_sizes == b.mesh.axis_sizes
          and a.spec == b.spec)


class Pipeline:
  """FDG over a list of Flax modules, one stage per module.

  One executor (`step`) runs every method: it walks `self.schedule` (fdg_jax/schedule.py),
  calls each local stage's jitted function with what arrived, and moves what it sends to the
  neighbour's device. Subclasses change the method's schedule (`METHOD`) and, for DGL, the
  stage call.

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
    placements: where each stage runs (default: device k): a `jax.Device`, a list of devices
      or a sharding (see `stage_shardings`). A stage on several devices splits its batch over
      them and keeps its state replicated (data parallelism inside the stage).
    compensation: a name in `compensation.NAMES` or a `compensation.Compensation`: what a
      stage with a delayed gradient does about its staleness (default 'none': the paper).
  """

  METHOD = 'fdg'

  def __init__(self, stages: Sequence[nn.Module], optimizer: optax.GradientTransformation,
               loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = cross_entropy_loss, *,
               beta: float = 1.0, stash: str = 'vjp', residual_policy: Optional[str] = None,
               placements: Optional[Sequence[Any]] = None,
               compensation: Any = 'none'):
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
    if isinstance(compensation, str):
      compensation = compensation_lib.Compensation(compensation)
    if compensation.name in compensation_lib.NEEDS_FORWARD_PARAMETERS and stash != 'vjp':
      raise ValueError(
          f"compensation={compensation.name!r} needs stash='vjp': it acts on the parameters "
          f"of the forward, and stash={stash!r} redoes the forward at the current ones.")
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
    # shardings[k]: of stage k's batch-shaped arrays; state_shardings[k]: of its state.
    self.shardings, self.state_shardings = zip(*(stage_shardings(p) for p in placements))
    self.num_stages = len(stages)
    self.schedule = schedule_lib.Schedule(self.METHOD, self.num_stages)
    self.compensation = compensation
    # With stash='vjp' each saved forward also keeps what determines its residuals (a few
    # percent of them), so that a checkpoint can store that instead; 'nothing_saveable' keeps
    # little else, so its residuals are stored as they are, unless delay compensation needs the
    # forward's parameters.
    self.keeps_inputs = stash == 'vjp' and (residual_policy != 'nothing_saveable'
                                            or compensation.name == 'delay_compensation')
    # Each stage's optimizer: the user's, with the stage's compensation chained in.
    self.stage_optimizers = tuple(
        compensation.stage_optimizer(optimizer, self.schedule.delay(k))
        for k in range(self.num_stages))
    # A multi-process run: each process runs only the stages on its devices (section "the
    # executor" below); with one process every stage is local.
    self.is_local = tuple(bool(s.addressable_devices) for s in self.shardings)
    self.num_processes = jax.process_count()
    self._batch_spec: Optional[jax.ShapeDtypeStruct] = None
    self._variable_specs: Optional[list] = None
    self._io_specs: dict[tuple, tuple[jax.ShapeDtypeStruct, ...]] = {}
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
    self._rebuild = tuple(jax.jit(self._make_rebuild_fn(k)) for k in range(self.num_stages))

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
    compensating = self.compensation.active(self.schedule.delay(k))
    predicting = compensating and self.compensation.name == 'weight_prediction'
    # Delay compensation corrects with each forward's parameters (its saved inputs).
    keeps_parameters = compensating and self.compensation.name == 'delay_compensation'

    def update_then_forward(state: TrainState, saved, forward_params, cotangent, x, *,
                            residuals=None):
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
        if keeps_parameters:
          state = apply_gradients(state, grads, stale_params=forward_params)
        else:
          state = state.apply_gradients(grads=grads)
      y = new_saved = inputs = None
      if x is not None:
        dropout_key, key = jax.random.split(state.dropout_key)
        params = state.params
        if predicting:
          params = compensation_lib.predicted_parameters(
              params, state.opt_state, compensation_lib.staleness(self.schedule.delay(k)))
        if self.stash == 'vjp':
          y, pullback, batch_stats = self._vjp(k, params, state.batch_stats, x, key)
          new_saved = jax.tree_util.tree_leaves(pullback)
          if self.keeps_inputs:   # the stage input is kept by the caller
            inputs = {'params': params, 'batch_stats': state.batch_stats, 'key': key}
        else:
          y, batch_stats = self._train_forward(k, params, state.batch_stats, x, key)
          new_saved = (x, key)
        state = state.replace(batch_stats=batch_stats, dropout_key=dropout_key)
      return state, y, new_saved, inputs, input_cotangent

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

  def _make_rebuild_fn(self, k: int):
    def rebuild(inputs):
      y, pullback, _ = self._vjp(k, inputs['params'], inputs['batch_stats'], inputs['x'],
                                 inputs['key'])
      return y, jax.tree_util.tree_leaves(pullback)
    return rebuild

  def rebuild_forward(self, k: int, inputs: dict) -> tuple[jax.Array, list[jax.Array]]:
    """Stage k's forward from a saved entry's `inputs` (see `Saved`): (output, residual leaves)."""
    return self._rebuild[k](inputs)

  @staticmethod
  def bits_equal(a: Sequence[jax.Array], b: Sequence[jax.Array]) -> bool:
    """Whether two lists of arrays (pairwise on the same devices) are equal bit for bit."""
    a, b = list(a), list(b)
    return (len(a) == len(b) and all(x.shape == y.shape and x.dtype == y.dtype
                                     for x, y in zip(a, b))
            and bool(distributed.fetch(_bits_equal(a, b))))

  def rebuilt_output(self, k: int, entry: Saved) -> Optional[jax.Array]:
    """The output of `entry`'s forward rebuilt from its inputs, if the rebuild gives its
    residuals bit for bit; None if not (or if it has no inputs).

    The rebuild is exact where XLA compiles the standalone forward like the forward inside the
    stage function (so far everywhere on this CPU); a checkpoint asks before relying on it.
    """
    if entry.inputs is None:
      return None
    y, leaves = self.rebuild_forward(k, entry.inputs)
    return y if self.bits_equal(leaves, entry.arrays) else None

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
    """Initialise every stage (or take `variables`, one dict per stage) on its device.

    In a multi-process run every process computes every stage's initial variables (the same
    numbers everywhere) and keeps only its own stages.
    """
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
    self._variable_specs = [jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
        (v['params'], v.get('batch_stats', {}))) for v in variables]
    if sample_input is not None:
      self._batch_spec = jax.ShapeDtypeStruct(tuple(sample_input.shape), sample_input.dtype)
    stages = []
    for k, (stage_variables, sharding) in enumerate(zip(variables, self.state_shardings)):
      if not self.is_local[k]:
        stages.append(None)
        continue
      state = TrainState.create(
          apply_fn=self.modules[k].apply, params=stage_variables['params'],
          tx=self.stage_optimizers[k],
          batch_stats=stage_variables.get('batch_stats', {}),
          dropout_key=jax.random.fold_in(dropout_key, k))
      # A copy: the stage state is donated at every step, and the caller's arrays must survive
      # (a replicated device_put may alias them whatever may_alias says: copy through the host).
      stages.append(jax.device_put(state, sharding, may_alias=False) if sharding.num_devices == 1
                    else distributed.put(jax.device_get(state), sharding))
    none, empty = (None,) * self.num_stages, ((),) * self.num_stages
    return PipelineState(stages=tuple(stages), saved=empty, activations=none, cotangents=none,
                         labels=empty)

  # ---------------------------------------------------------------- the executor

  def plan(self, state: PipelineState, feeding: bool) -> schedule_lib.Iteration:
    """The calls and transfers of the next iteration (the same on every process)."""
    return self.schedule.iteration(state.iteration, state.stream_first_batch,
                                   state.stream_offset, state.batches_fed + feeding)

  def _feed(self, state: PipelineState, images, labels) -> PipelineState:
    """The batch entering now: its images for stage 0, its labels for the stages that compute a
    loss on it, each on its own device and only where this process owns the stage."""
    batch = state.batches_fed
    if state.iteration != batch + state.stream_offset:   # fed again after empty iterations
      if self.plan(state, feeding=False).calls:
        raise ValueError(
            f'Iteration {state.iteration}: a batch fed while the pipeline drains. Feed every '
            'batch at consecutive iterations, or call drain() before feeding again.')
      state = state.replace(stream_first_batch=batch,
                            stream_offset=state.iteration - batch)   # a new stream
    if self.num_processes > 1:
      spec = jax.ShapeDtypeStruct(tuple(images.shape), images.dtype)
      if self._batch_spec not in (None, spec):
        raise ValueError(f'Batch {batch} is {spec}; earlier batches were {self._batch_spec}. '
                         'A multi-process pipeline needs one batch shape.')
      self._batch_spec = spec
    activations = list(state.activations)
    if self.is_local[0]:
      activations[0] = Activation(value=distributed.put(images, self.shardings[0]), batch=batch)
    waiting = tuple(
        queue + (Labels(value=distributed.put(labels, self.shardings[k]), batch=batch),)
        if self.is_local[k] and self.schedule.needs_labels(k) else queue
        for k, queue in enumerate(state.labels))
    return state.replace(activations=tuple(activations), labels=waiting)

  def step(self, state: PipelineState, images=None, labels=None
           ) -> tuple[PipelineState, StepInfo]:
    """One iteration of every stage, as the schedule says. `images=None` feeds no new batch
    (draining).

    In a multi-process run every process calls this with the same batch: a process that does
    not own stage 0 may pass anything with the images' shape and dtype instead of the images
    (e.g. a `jax.ShapeDtypeStruct`), and the labels are used only where a stage computes a loss.
    The stage states are donated: `state` must not be used after this call. Never waits on a
    device value.
    """
    feeding = images is not None
    if feeding:
      state = self._feed(state, images, labels)
    plan = self.plan(state, feeding)
    stages, saved = list(state.stages), list(state.saved)
    waiting_labels = list(state.labels)
    arriving_now = list(state.activations)   # what each stage uses in this iteration
    activations = [None] * self.num_stages   # what arrives for the next iteration
    cotangents = [None] * self.num_stages
    metrics = [None] * self.num_stages
    for call, sends in zip(plan.calls, plan.sends):
      k, output = call.stage, None
      if self.is_local[k]:
        inputs = self._take_inputs(call, arriving_now[k], state.cotangents[k], saved[k],
                                   waiting_labels[k])
        saved[k], waiting_labels[k] = inputs.pop('queue'), inputs.pop('labels_queue')
        output = self._call_stage(k, call, stages[k], saved[k], **inputs)
        stages[k], saved[k], metrics[k] = output.stage, output.saved, output.metrics
      for send in sends:
        value = None if output is None else (
            output.activation if send.kind == 'activation' else output.cotangent)
        value = self._transfer(value, send)
        if value is None:
          continue
        if send.kind == 'cotangent':
          cotangents[send.target] = Cotangent(value=value, batch=send.batch)
        elif self.schedule.activation_latency == 0:
          arriving_now[send.target] = Activation(value=value, batch=send.batch)
        else:
          activations[send.target] = Activation(value=value, batch=send.batch)
    forwarded, updated = [None] * self.num_stages, [None] * self.num_stages
    for call in plan.calls:
      forwarded[call.stage], updated[call.stage] = call.forward, call.update
    new_state = state.replace(
        stages=tuple(stages), saved=tuple(saved), activations=tuple(activations),
        cotangents=tuple(cotangents), labels=tuple(waiting_labels),
        iteration=state.iteration + 1, batches_fed=state.batches_fed + feeding)
    return new_state, self._step_info(state.iteration, forwarded, updated, metrics)

  def _step_info(self, iteration: int, forwarded, updated, metrics) -> StepInfo:
    return StepInfo(iteration=iteration, forwarded=tuple(forwarded), updated=tuple(updated),
                    metrics=metrics[-1])

  def _take_inputs(self, call: schedule_lib.StageCall, activation: Optional[Activation],
                   cotangent: Optional[Cotangent], queue: tuple[Saved, ...],
                   labels_queue: tuple[Labels, ...]) -> dict:
    """What stage `call.stage` uses in this call, checked against the schedule: a broken
    schedule must never train silently."""
    def check(kind, have, want):
      if have != want:
        raise AssertionError(f'iteration schedule broken at stage {call.stage}: {kind} of batch '
                             f'{have} where the schedule has batch {want}')
    inputs = {'x': None, 'cotangent': None, 'entry': None, 'labels': None}
    if call.forward is not None:
      check('activation', activation and activation.batch, call.forward)
      inputs['x'] = activation.value
    loss_batch = call.forward if self.schedule.delay(call.stage) == 0 else None
    if self.schedule.needs_labels(call.stage) and loss_batch is not None:
      check('labels', labels_queue[0].batch if labels_queue else None, loss_batch)
      inputs['labels'], labels_queue = labels_queue[0].value, labels_queue[1:]
    if call.update is not None and self.schedule.delay(call.stage) > 0:
      check('cotangent', cotangent and cotangent.batch, call.update)
      check('saved forward', queue[0].batch if queue else None, call.update)
      inputs['cotangent'], inputs['entry'], queue = cotangent.value, queue[0], queue[1:]
    return {**inputs, 'queue': queue, 'labels_queue': labels_queue}

  def _call_stage(self, k: int, call: schedule_lib.StageCall, stage: TrainState,
                  queue: tuple[Saved, ...], *, x, cotangent, entry, labels) -> StageOutput:
    """Stage k's jitted function for this call; its forward is saved at the end of `queue`."""
    if k == self.num_stages - 1:
      stage, input_cotangent, metrics = self.stage_functions[k]['steady'](stage, x, labels)
      return StageOutput(stage, queue, cotangent=input_cotangent, metrics=metrics)
    residuals = entry.structure if entry is not None else None
    if x is not None and self.stash == 'vjp':
      residuals_out = self._residual_structure(k, stage, x)
      residuals = residuals or residuals_out
    forward_params = (entry.inputs['params'] if entry is not None and entry.inputs is not None
                      and self.compensation.name == 'delay_compensation' else None)
    stage, y, new_saved, inputs, input_cotangent = self.stage_functions[k][call.phase](
        stage, entry.arrays if entry else None, forward_params, cotangent, x,
        residuals=residuals)
    if x is not None:
      structure = residuals_out if self.stash == 'vjp' else None
      queue = queue + (Saved(arrays=new_saved, batch=call.forward, structure=structure,
                             inputs=None if inputs is None else {**inputs, 'x': x}),)
    return StageOutput(stage, queue, activation=y, cotangent=input_cotangent)

  def _transfer(self, value: Optional[jax.Array], send: schedule_lib.Transfer
                ) -> Optional[jax.Array]:
    """Moves what stage `send.source` sends to stage `send.target`'s device (see `move`)."""
    spec = None
    if not self.is_local[send.source]:   # an activation is its source stage's output; a
      if self._batch_spec is None:       # cotangent has the shape of its source stage's input
        raise ValueError('A multi-process pipeline takes its batch shape from init(sample_input) '
                         'or the first batch fed; it has neither.')
      spec = self.io_specs(self._batch_spec)[send.source + (send.kind == 'activation')]
    return self.move(value, self.shardings[send.source], self.shardings[send.target], spec)

  @staticmethod
  def move(value: Optional[jax.Array], source: jax.sharding.Sharding,
           target: jax.sharding.Sharding, spec: Optional[jax.ShapeDtypeStruct]
           ) -> Optional[jax.Array]:
    """An array from `source`'s devices to `target`'s: returns it on `target`, or None where
    this process owns no device of `target`. Every process calls it at the same point of the
    schedule; `value` is None where this process owns no device of `source`, and `spec` (the
    array's shape and dtype) is needed there.

    Within one process, or between shardings of the same devices, this is a `jax.device_put`
    by the processes that own them. Across processes it is JAX's cross-process transfer, which
    every process makes (JAX numbers the transfers by counting them in every process): the
    owners of `source` with the array, the others with a stand-in of its shape and dtype that
    holds no data. JAX moves arrays across processes only between equal layouts (shard i to
    shard i); between different ones, each shard of `target` is sent from one source device.
    """
    target_local = bool(target.addressable_devices)
    source_processes = distributed.processes_of(source)
    if source.device_set == target.device_set or (
        len(source_processes) == 1 and source_processes == distributed.processes_of(target)):
      return jax.device_put(value, target) if target_local else None   # no process boundary
    if value is None:
      value = jax.make_array_from_single_device_arrays(spec.shape, source, [], dtype=spec.dtype)
    if _same_layout(source, target):
      moved = jax.device_put(value, target)
      return moved if target_local else None
    # The owners of `source` replicate the array on its devices; the first of them sends.
    shape, dtype = value.shape, value.dtype
    first = next(iter(source.devices_indices_map(shape)))
    replicated = (jax.device_put(value, _replicated(source)) if source.addressable_devices
                  else None)
    whole = (next(shard.data for shard in replicated.addressable_shards if shard.device == first)
             if first.process_index == jax.process_index() else None)
    pieces = []
    for device, index in target.devices_indices_map(shape).items():
      piece_shape = tuple(len(range(*i.indices(n))) for i, n in zip(index, shape))
      piece = Pipeline.move(
          None if whole is None else whole[index], jax.sharding.SingleDeviceSharding(first),
          jax.sharding.SingleDeviceSharding(device), jax.ShapeDtypeStruct(piece_shape, dtype))
      if piece is not None:
        pieces.append(piece)
    return (jax.make_array_from_single_device_arrays(shape, target, pieces) if target_local
            else None)

  def io_specs(self, batch_spec: jax.ShapeDtypeStruct) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Shape and dtype of each stage's input for a batch like `batch_spec`, then the logits'."""
    key = (tuple(batch_spec.shape), jnp.dtype(batch_spec.dtype).name)
    if key not in self._io_specs:
      specs, x = [batch_spec], batch_spec
      for k in range(self.num_stages):
        x = jax.eval_shape(self._predict[k], *self._variable_specs[k], x)
        specs.append(x)
      self._io_specs[key] = tuple(jax.ShapeDtypeStruct(s.shape, s.dtype) for s in specs)
    return self._io_specs[key]

  def drain(self, state: PipelineState) -> tuple[PipelineState, list[StepInfo]]:
    """Run iterations without new batches until every batch has updated every stage."""
    infos = []
    while self.plan(state, feeding=False).calls:
      state, info = self.step(state)
      infos.append(info)
    return state, infos

  # ---------------------------------------------------------------- reading the pipeline

  def stage_function_names(self) -> frozenset[str]:
    """Names of the jitted stage functions (a profile names their XLA modules `jit_NAME`)."""
    return frozenset(function.__name__ for functions in self.stage_functions
                     for function in (functions.values() if isinstance(functions, dict)
                                      else (functions,)))

  def stage_variables(self, state: PipelineState) -> list[Optional[dict]]:
    """Each stage's current {'params', 'batch_stats'} (on its device; None for a stage that
    another process owns)."""
    return [None if s is None else {'params': s.params, 'batch_stats': s.batch_stats}
            for s in state.stages]

  def gathered_variables(self, state: PipelineState, process: int = 0
                         ) -> Optional[list[dict]]:
    """Every stage's {'params', 'batch_stats'} as numpy arrays on process `process` (None on
    the others, which send theirs). Every process must call it."""
    if self.num_processes == 1:
      return jax.device_get(self.stage_variables(state))
    target = jax.sharding.SingleDeviceSharding(jax.local_devices(process_index=process)[0])
    gathered = []
    for k, variables in enumerate(self.stage_variables(state)):
      params, batch_stats = self._variable_specs[k]
      specs = {'params': params, 'batch_stats': batch_stats}
      leaves, structure = jax.tree_util.tree_flatten(specs)
      values = (jax.tree_util.tree_leaves(variables) if variables is not None
                else [None] * len(leaves))
      moved = [self.move(v, self.state_shardings[k], target, spec)
               for v, spec in zip(values, leaves)]
      gathered.append(jax.tree_util.tree_unflatten(structure, moved))
    return jax.device_get(gathered) if jax.process_index() == process else None

  def num_extra_params(self, state: PipelineState) -> int:
    """Trainable parameters outside the network (DGL's auxiliary heads): none for FDG."""
    del state
    return 0

  def predict(self, state: PipelineState, images) -> Optional[jax.Array]:
    """Logits of the composed stages in inference mode; the pipeline in flight is untouched.

    In a multi-process run every process calls it with the same images (anything with their
    shape and dtype where it does not own stage 0); the logits come back on the process of the
    last stage, None elsewhere.
    """
    specs = self.io_specs(jax.ShapeDtypeStruct(tuple(images.shape), images.dtype))
    y = distributed.put(images, self.shardings[0]) if self.is_local[0] else None
    for k, variables in enumerate(self.stage_variables(state)):
      if k > 0:
        y = self.move(y, self.shardings[k - 1], self.shardings[k], specs[k])
      if variables is not None:
        y = self._predict[k](variables['params'], variables['batch_stats'], y)
    return y

  def evaluate(self, state: PipelineState, batches) -> dict[str, float]:
    """Loss and accuracy over batches of (images, labels[, mask]); reads the device once.

    In a multi-process run every process calls it with the same batches and gets the result
    of the last stage's process.
    """
    total, count = None, 0
    for batch in batches:
      images, labels, *mask = batch
      logits = self.predict(state, images)
      count += 1
      if logits is None:   # another process computes the loss
        continue
      labels = distributed.put(labels, self.shardings[-1])
      mask = distributed.put(mask[0], self.shardings[-1]) if mask else None
      update = EvalMetrics.single_from_model_output(
          loss=self.loss_fn(logits, labels), logits=logits, labels=labels, mask=mask)
      total = update if total is None else total.merge(update)
    if not count:
      raise ValueError('evaluate() got no batches.')
    result = (None if total is None else {
        name: float(value) for name, value in distributed.fetch(total).compute().items()})
    return distributed.broadcast_values(result, ('loss', 'accuracy'),
                                        distributed.process_of(self.shardings[-1]))
