"""The pipeline's executor: K stages, each with its own TrainState on its own device(s).

One iteration (`Pipeline.step`) walks the method's schedule (`schedule.py`, a pure function of
the method, K and the iteration), calls each local stage's jitted function once with what
arrived from its neighbours, checks every input against the schedule, and moves what each call
sends to the neighbour's devices (`distributed.move`). For FDG (docs/algorithm.md):

* a non-last stage k scales the cotangent that arrived by beta, back-propagates it through the
  forward it saved 2(K-1-k) iterations ago, updates its parameters, and only then forwards the
  activation that arrived, with the updated parameters;
* the last stage forwards, takes the loss and its gradient at its current parameters, and updates.

What a stage computes lives in `stage_functions.py`; which function a call uses, in the method
object (`methods.py`: FDG, DDG, DGL). The host loop never waits on a device value: JAX's
asynchronous dispatch lets all stages compute at once. With K = 1 the single stage is the last
stage, and one iteration is exactly an ordinary back-propagation step.
"""

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fdg_jax.engine import compensation as compensation_lib
from fdg_jax.engine import distributed
from fdg_jax.engine import methods as methods_lib
from fdg_jax.engine import schedule as schedule_lib
from fdg_jax.engine import stage_functions as fns
# Re-exported: the engine's names as users and the other modules import them.
from fdg_jax.engine.distributed import DATA_AXIS, stage_shardings  # pylint: disable=unused-import
from fdg_jax.engine.schedule import delay  # pylint: disable=unused-import
from fdg_jax.engine.stage_functions import (  # pylint: disable=unused-import
    RESIDUAL_POLICIES, STASH_MODES, LossAndAccuracy, TrainState, apply_gradients,
    cross_entropy_loss, takes_train_argument)
from fdg_jax.engine.state import (  # pylint: disable=unused-import
    Activation, Cotangent, Microbatches, PipelineState, Saved, StageOutput, StepInfo, Targets)
from fdg_jax.engine.methods import PHASES, spec_key  # pylint: disable=unused-import


def stage_betas(beta: float, num_stages: int, compounded: bool = True) -> tuple[float, ...]:
  """Each stage's factor on the cotangent it receives. Compounded (the paper): beta at every
  stage, so stage k's gradient carries beta ** (K - 1 - k). Not compounded: beta at stage K - 2
  only; the stages below receive a cotangent already scaled once, so every delayed stage's
  gradient carries beta exactly once."""
  if compounded:
    return (beta,) * num_stages
  return tuple(beta if k == num_stages - 2 else 1.0 for k in range(num_stages))


class _Flight:
  """The host's working copy of what a method over microbatches holds, for one step."""

  def __init__(self, stages):
    num_stages = len(stages)
    self.stages = list(stages)
    self.arrived = [{} for _ in range(num_stages)]
    self.saved = [{} for _ in range(num_stages)]
    self.sums = [{} for _ in range(num_stages)]
    self.held, self.inputs, self.targets = {}, {}, {}
    self.forward_params = [{} for _ in range(num_stages)]
    self.progress = [schedule_lib.FdgProgress()] * num_stages
    self.norms = [None] * num_stages
    self.forwarded, self.updated = [None] * num_stages, [None] * num_stages
    self.metrics = None
    self.calls = []   # (stage, function, batch) of each jitted call, in dispatch order
    self.outbox = []  # (value, schedule.Transfer) made in this tick, moved at its end

  @classmethod
  def of(cls, stages, kept: Optional[Microbatches]) -> '_Flight':
    flight = cls(stages)
    if kept is not None:
      flight.arrived = [dict(d) for d in kept.arrived]
      flight.saved = [dict(d) for d in kept.saved]
      flight.sums = [dict(d) for d in kept.sums]
      flight.held, flight.inputs, flight.targets = (dict(kept.held), dict(kept.inputs),
                                                    dict(kept.targets))
      flight.forward_params = [dict(d) for d in kept.forward_params]
      flight.progress = list(kept.progress)
    return flight

  def freeze(self) -> Microbatches:
    return Microbatches(arrived=tuple(self.arrived), saved=tuple(self.saved),
                        sums=tuple(self.sums), held=self.held, inputs=self.inputs,
                        targets=self.targets, forward_params=tuple(self.forward_params),
                        progress=tuple(self.progress))


def microbatch_spec(pipe: 'Pipeline'):
  """The shapes and dtypes of one microbatch of the pipeline's batches."""
  if pipe.batch_spec is None:
    raise ValueError('The pipeline has no batch shape yet: call init(rng, sample_input).')
  return split_batch(pipe.batch_spec, pipe.microbatches)[0]


def split_batch(tree, parts: int) -> list:
  """A batch (a pytree of arrays, or of specs where another process holds it) as `parts`
  microbatches along the leading axis."""
  def piece(leaf, m):
    size = leaf.shape[0] // parts
    if leaf.shape[0] % parts:
      raise ValueError(f'A batch of {leaf.shape[0]} does not split into {parts} microbatches: '
                       'use a batch size that the number of microbatches divides.')
    if isinstance(leaf, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct((size, *leaf.shape[1:]), leaf.dtype)
    return leaf[m * size:(m + 1) * size]
  return [jax.tree_util.tree_map(lambda leaf: piece(leaf, m), tree) for m in range(parts)]


def _spec_of(tree):
  """The `jax.ShapeDtypeStruct` tree of a pytree of arrays (or of specs)."""
  return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(tuple(a.shape), a.dtype), tree)


class Pipeline:
  """A decoupled training method over a list of Flax modules, one stage per module.

  Args:
    stages: Flax modules called as `module.apply(variables, x, train=bool)`, or as
      `module.apply(variables, x)` if their `__call__` has no `train` argument; stage k's output
      (any pytree of arrays) is stage k+1's input and the last stage returns what `loss_fn`
      scores.
    optimizer: an optax transformation; every stage gets its own state of it.
    loss_fn: `(outputs, targets) -> per-example (or per-token) losses`; training uses their mean.
    beta: gradient-shrinking factor in (0, 1]; each non-last stage multiplies the cotangent it
      receives by beta, so stage k's gradient carries beta ** (K - 1 - k) (the paper's
      compounding). A sequence gives each stage its own factor (the last stage's is unused:
      it receives no cotangent); `stage_betas(beta, K, compounded=False)` scales once, so
      every delayed stage's gradient carries beta exactly once.
    stash: 'vjp' (default; the delayed gradient of the paper, from the residuals saved at forward
      time) or 'recompute' (keep only the input, recompute with the current weights).
    residual_policy: with stash='vjp', None (keep every residual of `jax.vjp`) or a name in
      RESIDUAL_POLICIES: keep only what that `jax.checkpoint` policy saves and recompute the
      rest in the delayed backward from the saved input and old weights. The same gradient,
      less memory, more compute.
    placements: where each stage runs (default: device k): a `jax.Device`, a list of devices
      or a sharding (see `distributed.stage_shardings`). A stage on several devices splits its
      batch over them and keeps its state replicated (data parallelism inside the stage).
    compensation: a name in `compensation.NAMES` or a `compensation.Compensation`: what a
      stage with a delayed gradient does about its staleness (default 'none': the paper).
    metrics: a clu `metrics.Collection` made by `single_from_model_output(loss=, logits=,
      labels=[, mask=])`, for training and evaluation (default: loss and accuracy).
    method: a name in `methods.REGISTRY` that needs no options ('fdg', the default; 'ddg';
      'bp' on one stage), or a method object (`methods.create('dgl', K, num_classes=,
      aux_head=)` for DGL, whose heads it takes).
  """

  def __init__(self, stages: Sequence[nn.Module], optimizer: optax.GradientTransformation,
               loss_fn: Callable[[Any, Any], jax.Array] = cross_entropy_loss, *,
               beta: float = 1.0, stash: str = 'vjp', residual_policy: Optional[str] = None,
               placements: Optional[Sequence[Any]] = None, compensation: Any = 'none',
               metrics: type = LossAndAccuracy, method: Any = 'fdg'):
    if not stages:
      raise ValueError('A pipeline needs at least one stage.')
    betas = (beta,) * len(stages) if np.ndim(beta) == 0 else tuple(beta)
    if len(betas) != len(stages):
      raise ValueError(f'beta has {len(betas)} factors for {len(stages)} stages: give one float, '
                       'or one factor per stage (see stage_betas).')
    if not all(0.0 < b <= 1.0 for b in betas):
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
    self.num_stages = len(stages)
    self.method = methods_lib.create(method, self.num_stages) if isinstance(method, str) else method
    # A method over microbatches (GPipe, 1F1B, FDG with M > 1) runs its stages' programs of
    # actions (schedule.program); the others walk their iteration schedule.
    self.microbatches = getattr(self.method, 'microbatches', None)
    self.schedule = (schedule_lib.Schedule(self.method.name, self.num_stages)
                     if self.microbatches is None else None)
    self.ticks = (schedule_lib.ticks(self.method.name, self.num_stages, self.microbatches, 1)
                  if self.microbatches is not None and self.method.synchronous else None)
    self.modules = tuple(stages)
    self.optimizer = optimizer
    self.loss_fn = loss_fn
    self.metrics = metrics
    self.betas = tuple(float(b) for b in betas)   # each stage's factor
    self.beta = float(beta) if np.ndim(beta) == 0 else self.betas   # as given
    self.stash = stash
    self.residual_policy = residual_policy
    self.compensation = compensation
    self.specs = tuple(
        fns.StageSpec(module=module, loss_fn=loss_fn, metrics=metrics, first=k == 0,
                      delay=self.delay(k), beta=self.betas[k], stash=stash,
                      residual_policy=residual_policy, compensation=compensation)
        for k, module in enumerate(stages))
    self.keeps_inputs = self.specs[0].keeps_inputs
    # Each stage's optimizer: the user's, with the stage's compensation chained in.
    self.stage_optimizers = tuple(compensation.stage_optimizer(optimizer, spec.delay)
                                  for spec in self.specs)
    # shardings[k]: of stage k's batch-shaped arrays; state_shardings[k]: of its state.
    self.shardings, self.state_shardings = zip(*(stage_shardings(p) for p in placements))
    # A multi-process run: each process runs only the stages on its devices.
    self.is_local = tuple(bool(s.addressable_devices) for s in self.shardings)
    self.num_processes = jax.process_count()
    self.method.compile(self.specs)
    self._predict = tuple(jax.jit(fns.predict(spec)) for spec in self.specs)
    self.batch_spec = None        # of the inputs: from init(sample_input) or the first batch
    self._variable_specs: Optional[list] = None
    self._io_specs: dict[tuple, tuple] = {}

  def delay(self, stage: int) -> int:
    """This stage's delay (`schedule.delay`): iterations between its forward of a batch and its
    update with that batch; with microbatches, in updates (none in a synchronous schedule)."""
    if self.schedule is not None:
      return self.schedule.delay(stage)
    return schedule_lib.delay(stage, self.num_stages, self.method.name, self.microbatches)

  # ---------------------------------------------------------------- the initial state

  def init(self, rng: jax.Array, sample_input: Any,
           variables: Optional[Sequence[dict]] = None) -> PipelineState:
    """Initialise every stage (or take `variables`, one dict per stage) on its device.

    `sample_input` is one batch of inputs, or anything with their shapes and dtypes (it may be
    None when `variables` are given, except for DGL). In a multi-process run every process
    computes every stage's initial variables (the same numbers everywhere) and keeps only its
    own stages.
    """
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
      rng = jax.random.key_data(rng)   # raw uint32 keys: plain arrays in every checkpoint
    params_key, dropout_key = jax.random.split(rng)
    if variables is None and sample_input is None:
      raise ValueError('init needs sample_input (one batch of inputs, or their shapes and '
                       'dtypes) to initialise the stages, or their variables.')
    if variables is None:
      variables, x = [], jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype),
                                                sample_input)
      for k, spec in enumerate(self.specs):
        stage_variables = spec.module.init(
            {'params': jax.random.fold_in(params_key, k),
             'dropout': jax.random.fold_in(dropout_key, k)}, x, **spec.mode(False))
        fns.check_collections(stage_variables, k)
        x = spec.module.apply(stage_variables, x, **spec.mode(False))
        variables.append(stage_variables)
    if len(variables) != self.num_stages:
      raise ValueError(f'{len(variables)} variable dicts for {self.num_stages} stages.')
    for k, stage_variables in enumerate(variables):
      fns.check_collections(stage_variables, k)
    self._variable_specs = [_spec_of((v['params'], v.get('batch_stats', {}))) for v in variables]
    if sample_input is not None:
      self.batch_spec = _spec_of(sample_input)
    stages = []
    for k, (stage_variables, sharding) in enumerate(zip(variables, self.state_shardings)):
      if not self.is_local[k]:
        stages.append(None)
        continue
      state = TrainState.create(
          apply_fn=self.modules[k].apply, params=stage_variables['params'],
          tx=self.stage_optimizers[k], batch_stats=stage_variables.get('batch_stats', {}),
          dropout_key=jax.random.fold_in(dropout_key, k))
      # A copy: the stage state is donated at every step, and the caller's arrays must survive
      # (a replicated device_put may alias them whatever may_alias says: copy through the host).
      stages.append(jax.device_put(state, sharding, may_alias=False) if sharding.num_devices == 1
                    else distributed.put(jax.device_get(state), sharding))
    stages = self.method.extend_states(
        tuple(stages), rng, None if self.batch_spec is None else self.io_specs(self.batch_spec),
        self.state_shardings)
    none, empty = (None,) * self.num_stages, ((),) * self.num_stages
    return PipelineState(stages=tuple(stages), saved=empty, activations=none, cotangents=none,
                         targets=empty)

  # ---------------------------------------------------------------- the executor

  def plan(self, state: PipelineState, feeding: bool) -> schedule_lib.Iteration:
    """The calls and transfers of the next iteration (the same on every process)."""
    return self.schedule.iteration(state.iteration, state.stream_first_batch,
                                   state.stream_offset, state.batches_fed + feeding)

  def step(self, state: PipelineState, inputs=None, targets=None
           ) -> tuple[PipelineState, StepInfo]:
    """One iteration of every stage, as the schedule says. `inputs=None` feeds no new batch
    (draining).

    In a multi-process run every process calls this with the same batch: a process that does
    not own stage 0 may pass anything with the inputs' shapes and dtypes instead of the inputs
    (e.g. `jax.ShapeDtypeStruct`s), and the targets are used only where a stage computes a loss.
    The stage states are donated: `state` must not be used after this call. Never waits on a
    device value.
    """
    if self.schedule is None:
      return self._step_microbatches(state, inputs, targets)
    feeding = inputs is not None
    if feeding:
      state = self._feed(state, inputs, targets)
    plan = self.plan(state, feeding)
    stages, saved = list(state.stages), list(state.saved)
    waiting_targets = list(state.targets)
    arriving_now = list(state.activations)   # what each stage uses in this iteration
    activations = [None] * self.num_stages   # what arrives for the next iteration
    cotangents = [None] * self.num_stages
    metrics = [None] * self.num_stages
    for call, sends in zip(plan.calls, plan.sends):
      k, output = call.stage, None
      if self.is_local[k]:
        used = self._take_inputs(call, arriving_now[k], state.cotangents[k], saved[k],
                                 waiting_targets[k])
        saved[k], waiting_targets[k] = used.pop('queue'), used.pop('targets_queue')
        output = self.method.call(call, stages[k], saved[k], **used)
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
        cotangents=tuple(cotangents), targets=tuple(waiting_targets),
        iteration=state.iteration + 1, batches_fed=state.batches_fed + feeding)
    return new_state, StepInfo(iteration=state.iteration, forwarded=tuple(forwarded),
                               updated=tuple(updated), local_metrics=tuple(metrics))

  def drain(self, state: PipelineState) -> tuple[PipelineState, list[StepInfo]]:
    """Run iterations without new batches until every batch has updated every stage."""
    if self.schedule is None:   # a synchronous schedule flushes every batch
      if not state.in_flight:
        return state, []
      state, info = self._step_microbatches(state, None, None)
      return state, [info]
    infos = []
    while self.plan(state, feeding=False).calls:
      state, info = self.step(state)
      infos.append(info)
    return state, infos

  def _feed(self, state: PipelineState, inputs, targets) -> PipelineState:
    """The batch entering now: its inputs for stage 0, its targets for the stages that compute a
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
      spec = _spec_of(inputs)
      if self.batch_spec not in (None, spec):
        raise ValueError(f'Batch {batch} is {spec}; earlier batches were {self.batch_spec}. '
                         'A multi-process pipeline needs one batch shape.')
      self.batch_spec = spec
    activations = list(state.activations)
    if self.is_local[0]:
      activations[0] = Activation(value=distributed.put(inputs, self.shardings[0]), batch=batch)
    waiting = tuple(
        queue + (Targets(value=distributed.put(targets, self.shardings[k]), batch=batch),)
        if self.is_local[k] and self.schedule.needs_labels(k) else queue
        for k, queue in enumerate(state.targets))
    return state.replace(activations=tuple(activations), targets=waiting)

  def _take_inputs(self, call: schedule_lib.StageCall, activation: Optional[Activation],
                   cotangent: Optional[Cotangent], queue: tuple[Saved, ...],
                   targets_queue: tuple[Targets, ...]) -> dict:
    """What stage `call.stage` uses in this call, checked against the schedule: a broken
    schedule must never train silently."""
    def check(kind, have, want):
      if have != want:
        raise AssertionError(f'iteration schedule broken at stage {call.stage}: {kind} of batch '
                             f'{have} where the schedule has batch {want}')
    used = {'x': None, 'cotangent': None, 'entry': None, 'targets': None}
    if call.forward is not None:
      check('activation', activation and activation.batch, call.forward)
      used['x'] = activation.value
    loss_batch = call.forward if self.schedule.delay(call.stage) == 0 else None
    if self.schedule.needs_labels(call.stage) and loss_batch is not None:
      check('targets', targets_queue[0].batch if targets_queue else None, loss_batch)
      used['targets'], targets_queue = targets_queue[0].value, targets_queue[1:]
    if call.update is not None and self.schedule.delay(call.stage) > 0:
      check('cotangent', cotangent and cotangent.batch, call.update)
      check('saved forward', queue[0].batch if queue else None, call.update)
      used['cotangent'], used['entry'], queue = cotangent.value, queue[0], queue[1:]
    return {**used, 'queue': queue, 'targets_queue': targets_queue}

  def _transfer(self, value, send: schedule_lib.Transfer, batch_spec=None):
    """Moves what stage `send.source` sends to stage `send.target`'s devices (`batch_spec`: of
    the inputs it came from, if not the batch's: a microbatch's)."""
    spec = None
    if not self.is_local[send.source]:   # an activation is its source stage's output; a
      batch_spec = batch_spec or self.batch_spec   # cotangent has the shape of its source
      if batch_spec is None:                       # stage's input
        raise ValueError('A multi-process pipeline takes its batch shape from init(sample_input) '
                         'or the first batch fed; it has neither.')
      spec = self.io_specs(batch_spec)[send.source + (send.kind == 'activation')]
      if send.kind == 'cotangent':
        spec = fns.differentiable_part(spec)
    return distributed.move_tree(value, self.shardings[send.source],
                                 self.shardings[send.target], spec)

  def _step_microbatches(self, state: PipelineState, inputs, targets
                         ) -> tuple[PipelineState, StepInfo]:
    """One batch as M microbatches through the stages' programs, each action on its stage's
    devices and each output moved as soon as it is made. A synchronous schedule runs its whole
    flush (`self.ticks`, the same every batch) and keeps nothing; FDG with microbatches runs the
    M lockstep ticks in which this batch enters stage 0 (`schedule.fdg_actions`), or, with no
    batch, the drain, and keeps what is in flight (`state.microbatches`)."""
    method, num_stages, M = self.method, self.num_stages, self.microbatches
    batch = state.batches_fed
    if inputs is None and method.synchronous:
      raise ValueError('A synchronous schedule (GPipe, 1F1B) flushes every batch: there is '
                       'nothing to drain; step() needs a batch.')
    flight = _Flight.of(state.stages, state.microbatches)
    micro_spec = None
    if inputs is not None:
      if self.batch_spec is None or self.num_processes > 1:
        self.batch_spec = _spec_of(inputs)
      pieces = zip(split_batch(inputs, M), split_batch(targets, M))
      for m, (x, y) in enumerate(pieces):
        micro_spec = _spec_of(x)
        if self.is_local[0]:
          flight.inputs[batch * M + m] = distributed.put(x, self.shardings[0])
        if self.is_local[-1]:
          flight.targets[batch * M + m] = distributed.put(y, self.shardings[-1])
    micro_spec = micro_spec or microbatch_spec(self)
    if method.synchronous:
      for tick in self.ticks:
        for k, actions in tick.items():
          for action in actions:
            offset = batch if action.kind == 'U' else batch * M
            self._act(flight, k, schedule_lib.Action(action.kind, action.index + offset))
        self._deliver(flight, micro_spec)
      if method.grad_clip > 0:   # the whole model's norm: every stage's share on every stage
        scalar = jax.ShapeDtypeStruct((), jnp.float32)   # replicated, as the stage's state
        gathered = [[distributed.move_tree(flight.norms[j], self.state_shardings[j],
                                           self.state_shardings[k], scalar)
                     for j in range(num_stages)] for k in range(num_stages)]
        for k in range(num_stages):
          if self.is_local[k]:
            flight.stages[k] = method.update(k, flight.stages[k], flight.sums[k].pop(batch),
                                             gathered[k])
            flight.calls.append((k, 'update', batch))
      flight.forwarded = flight.updated = [batch] * num_stages
    else:
      fed = batch + (inputs is not None)
      ticks = (range(batch * M, fed * M) if inputs is not None else
               range(fed * M, fed * M + 2 * (num_stages - 1) + 1))   # the drain
      for t in ticks:
        for k in range(num_stages):
          actions, flight.progress[k] = schedule_lib.fdg_actions(
              k, num_stages, M, t, fed * M, flight.progress[k])
          for action in actions:
            self._act(flight, k, action)
        self._deliver(flight, micro_spec)
    new_state = state.replace(
        stages=tuple(flight.stages), iteration=state.iteration + 1,
        batches_fed=batch + (inputs is not None),
        microbatches=None if method.synchronous else flight.freeze())
    return new_state, StepInfo(iteration=state.iteration, forwarded=tuple(flight.forwarded),
                               updated=tuple(flight.updated),
                               local_metrics=(None,) * (num_stages - 1) + (flight.metrics,),
                               calls=tuple(flight.calls))

  def _act(self, flight: '_Flight', k: int, action: schedule_lib.Action) -> None:
    """One action of stage k's program (where this process owns the stage); what it sends goes
    to the tick's outbox."""
    method, last, local = self.method, self.num_stages - 1, self.is_local[k]
    i, out = action.index, None
    if action.kind == 'U':
      flight.updated[k] = i
      if local and method.grad_clip > 0:
        flight.norms[k] = method.squared_norm(k, flight.sums[k][i])
        flight.calls.append((k, 'norm', i))
      elif local:
        flight.stages[k] = method.update(k, flight.stages[k], flight.sums[k].pop(i), None,
                                         flight.forward_params[k].pop(i, None))
        flight.calls.append((k, 'update', i))
      return
    batch = i // self.microbatches
    first = ' first' if flight.sums[k].get(batch) is None else ''   # of the batch's sum
    if action.kind == 'F':
      flight.forwarded[k] = batch
      if local:
        x = flight.inputs.pop(i) if k == 0 else flight.arrived[k].pop(('F', i))
        if k == last:
          flight.stages[k], flight.sums[k][batch], flight.held[i], metrics = method.loss(
              k, flight.stages[k], flight.sums[k].get(batch), x, flight.targets.pop(i))
          flight.metrics = metrics if flight.metrics is None else flight.metrics.merge(metrics)
          name = 'loss' + first
        else:
          # Every microbatch of a batch forwards with the same parameters: the batch keeps one
          # copy (its first forward returns it; the updates donate the stage's buffers), which
          # its saved forwards share and delay compensation's update reads.
          params = flight.forward_params[k].get(batch)
          flight.stages[k], out, flight.saved[k][i] = method.forward(k, flight.stages[k], x,
                                                                     params)
          name = 'forward'
          if params is None and method.keeps_inputs(k):
            flight.forward_params[k][batch] = flight.saved[k][i].inputs['params']
            name = 'forward first'
        flight.calls.append((k, name, batch))
      if k < last:
        flight.outbox.append((out, schedule_lib.Transfer('activation', i, k, k + 1)))
    else:
      if local and k == last:
        out = flight.held.pop(i)
      elif local:
        flight.sums[k][batch], out = method.backward(
            k, flight.sums[k].get(batch), flight.saved[k].pop(i), flight.arrived[k].pop(('B', i)))
        flight.calls.append((k, 'backward' + first, batch))
      if k > 0:
        flight.outbox.append((out, schedule_lib.Transfer('cotangent', i, k, k - 1)))

  def _deliver(self, flight: '_Flight', micro_spec) -> None:
    """The tick's transfers, after all its actions were dispatched (every action of a tick
    uses only what earlier ticks sent), in the order they were made on every process: a host
    never waits for a peer's transfer before dispatching its own stage's work of the tick."""
    for value, send in flight.outbox:
      value = self._transfer(value, send, micro_spec)
      if value is not None:
        kind = 'F' if send.kind == 'activation' else 'B'
        flight.arrived[send.target][kind, send.batch] = value
    flight.outbox.clear()

  # ---------------------------------------------------------------- shapes

  def io_specs(self, batch_spec) -> tuple:
    """Shapes and dtypes of each stage's input for a batch like `batch_spec`, then the output's."""
    key = spec_key(batch_spec)
    if key not in self._io_specs:
      specs, x = [_spec_of(batch_spec)], _spec_of(batch_spec)
      for k in range(self.num_stages):
        x = _spec_of(jax.eval_shape(self._predict[k], *self._variable_specs[k], x))
        specs.append(x)
      self._io_specs[key] = tuple(specs)
    return self._io_specs[key]

  # ---------------------------------------------------------------- reading the pipeline

  def stage_function_names(self) -> frozenset[str]:
    """Names of the jitted stage functions (a profile names their XLA modules `jit_NAME`)."""
    return self.method.function_names()

  def stage_variables(self, state: PipelineState) -> list[Optional[dict]]:
    """Each stage's current network {'params', 'batch_stats'} (on its devices; None for a stage
    that another process owns)."""
    return [None if s is None else self.method.network_variables(s) for s in state.stages]

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
      gathered.append(distributed.move_tree(
          variables, self.state_shardings[k], target,
          {'params': params, 'batch_stats': batch_stats}))
    return jax.device_get(gathered) if jax.process_index() == process else None

  def num_extra_params(self, state: PipelineState) -> int:
    """Trainable parameters outside the network (DGL's auxiliary heads; none for FDG), of every
    process (all must call it in a multi-process run)."""
    counts = self.method.extra_param_counts(state.stages)
    if self.num_processes > 1:
      return int(distributed.all_processes(counts).max(axis=0).sum())  # a stage spread counts once
    return int(sum(counts))

  def predict(self, state: PipelineState, inputs) -> Optional[Any]:
    """Outputs of the composed stages in inference mode; the pipeline in flight is untouched.

    In a multi-process run every process calls it with the same inputs (anything with their
    shapes and dtypes where it does not own stage 0); the outputs come back on the process of
    the last stage, None elsewhere.
    """
    specs = self.io_specs(_spec_of(inputs))
    y = distributed.put(inputs, self.shardings[0]) if self.is_local[0] else None
    for k, variables in enumerate(self.stage_variables(state)):
      if k > 0:
        y = distributed.move_tree(y, self.shardings[k - 1], self.shardings[k], specs[k])
      if variables is not None:
        y = self._predict[k](variables['params'], variables['batch_stats'], y)
    return y

  def evaluate(self, state: PipelineState, batches) -> dict[str, float]:
    """The metrics over batches of (inputs, targets[, mask]); reads the device once.

    In a multi-process run every process calls it with the same batches and gets the result
    of the last stage's process.
    """
    total, count = None, 0
    for batch in batches:
      inputs, targets, *mask = batch
      outputs = self.predict(state, inputs)
      count += 1
      if outputs is None:   # another process computes the loss
        continue
      targets = distributed.put(targets, self.shardings[-1])
      mask = distributed.put(mask[0], self.shardings[-1]) if mask else None
      update = self.metrics.single_from_model_output(
          loss=self.loss_fn(outputs, targets), logits=outputs, labels=targets, mask=mask)
      total = update if total is None else total.merge(update)
    if not count:
      raise ValueError('evaluate() got no batches.')
    result = (None if total is None else {
        name: float(value) for name, value in distributed.fetch(total).compute().items()})
    return distributed.broadcast_values(result, fns.metric_names(self.metrics),
                                        distributed.process_of(self.shardings[-1]))
