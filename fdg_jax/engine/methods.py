"""The training methods the one executor runs, and the registry that names them.

* `DelayedGradients('fdg')`: FDG (Zhuang et al. 2019), the paper's method: every stage forwards
  and back-propagates at once; stage k applies the gradient of the batch it forwarded 2(K-1-k)
  iterations earlier. BP is FDG on one stage.
* `DelayedGradients('ddg')`: DDG (Huo et al. 2018), backward unlocking only: forward locked,
  stage k's delay K-1-k. The same stage functions as FDG; only the schedule differs.
* `LocalLosses`: DGL (Belilovsky et al. 2019): each non-last stage trains on an auxiliary head's
  local loss; no gradient crosses a stage boundary. The heads live in the stage's TrainState.

`REGISTRY` is the one list of methods by name: the trainer's config check, its pipeline, the
schedule row each runs on, the grids and their labels all read it. A new method is one object
with `name` (its row in `schedule.py`), `compile`, `call` and the three state hooks
(`extend_states`, `network_variables`, `extra_param_counts`), its lags in `schedule.Schedule`,
and its entry here; docs/algorithm.md has each method's exact schedule.

What the executor hands a method is explicit: `compile(specs)` once (the method keeps its
compiled functions), then per call the stage's state, its queue of saved forwards and what
arrived (`x`, `cotangent`, the saved `entry`, `targets`); `extend_states` gets the stages' input
and output shapes and their state shardings. A method never reads the pipeline back.
"""

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fdg_jax.engine import distributed
from fdg_jax.engine import stage_functions as fns
from fdg_jax.engine.state import Saved, StageOutput

# The compiled functions of a stage with a delayed gradient, one per phase: 'fill' (forward
# only, before the first cotangent), 'steady' (update then forward) and 'drain' (update only).
# Each is traced once; a fresh Python function per phase keeps their jit caches apart.
PHASES = ('fill', 'steady', 'drain')


def spec_key(tree) -> tuple:
  """A hashable key of a pytree of arrays or specs: its structure, each leaf's shape and dtype."""
  leaves, structure = jax.tree_util.tree_flatten(tree)
  return structure, tuple((tuple(a.shape), jnp.dtype(a.dtype).name) for a in leaves)


def _names(functions: Sequence[dict[str, Callable]]) -> frozenset[str]:
  return frozenset(f.__name__ for by_phase in functions for f in by_phase.values())


def _residual_structure(cache: dict, spec: fns.StageSpec, k: int, stage: fns.TrainState,
                        x) -> fns.Residuals:
  """The tree structure of stage k's vjp residuals for inputs like x, traced once into `cache`."""
  cache_key = (k, spec_key(x))
  if cache_key not in cache:
    shapes = jax.eval_shape(lambda s, h: fns.residual_tree(spec, s, h), stage, x)
    leaves, structure = jax.tree_util.tree_flatten(x)
    input_spec = ((tuple(x.shape), jnp.dtype(x.dtype).name)   # one array, as before pytrees
                  if jax.tree_util.treedef_is_leaf(structure) else
                  [[list(a.shape), jnp.dtype(a.dtype).name] for a in leaves])
    cache[cache_key] = fns.Residuals(jax.tree_util.tree_structure(shapes), input_spec)
  return cache[cache_key]


def count_params(tree) -> int:
  """Number of scalars in a pytree of arrays."""
  return int(sum(leaf.size for leaf in jax.tree_util.tree_leaves(tree)))


class _NetworkOnly:
  """The state hooks of a method whose stages hold only their network (not DGL)."""
  functions: tuple[dict[str, Callable], ...] = ()

  def extend_states(self, states, rng, io_specs, state_shardings):
    """No state beyond the network's."""
    del rng, io_specs, state_shardings
    return states

  def network_variables(self, stage: fns.TrainState) -> dict:
    """A stage state's network variables."""
    return {'params': stage.params, 'batch_stats': stage.batch_stats}

  def extra_param_counts(self, states) -> list[int]:
    """Trainable parameters outside the network, per stage: none."""
    return [0] * len(states)

  def function_names(self) -> frozenset[str]:
    """Names of the jitted stage functions (a profile names their XLA modules `jit_NAME`)."""
    return _names(self.functions)


class DelayedGradients(_NetworkOnly):
  """FDG or DDG: non-last stages update with a delayed cotangent, then forward."""

  def __init__(self, name: str = 'fdg'):
    if name not in ('fdg', 'ddg'):
      raise ValueError(f'DelayedGradients is FDG or DDG; got {name!r}.')
    self.name = name
    self.specs: tuple[fns.StageSpec, ...] = ()
    self.functions: tuple[dict[str, Callable], ...] = ()
    self._residual_structures: dict[tuple, fns.Residuals] = {}

  def compile(self, specs: Sequence[fns.StageSpec]) -> None:
    """Each stage's jitted functions by phase (the last stage: 'steady' only)."""
    self.specs = tuple(specs)
    self.functions = tuple(
        {'steady': jax.jit(fns.last_update(spec), donate_argnums=0)} if k == len(specs) - 1 else
        {phase: jax.jit(fns.update_then_forward(spec), donate_argnums=0,
                        static_argnames='residuals') for phase in PHASES}
        for k, spec in enumerate(specs))

  def residual_structure(self, k: int, stage: fns.TrainState, x) -> fns.Residuals:
    """The tree structure of stage k's vjp residuals for inputs like x (traced once, cached)."""
    return _residual_structure(self._residual_structures, self.specs[k], k, stage, x)

  def call(self, call, stage, queue, *, x, cotangent, entry, targets) -> StageOutput:
    """Stage `call.stage`'s call; its new forward is saved at the end of `queue`."""
    k, spec = call.stage, self.specs[call.stage]
    if k == len(self.specs) - 1:
      stage, input_cotangent, metrics = self.functions[k]['steady'](stage, x, targets)
      return StageOutput(stage, queue, cotangent=input_cotangent, metrics=metrics)
    residuals = entry.structure if entry is not None else None
    if x is not None and spec.stash == 'vjp':
      residuals_out = self.residual_structure(k, stage, x)
      residuals = residuals or residuals_out
    forward_params = (entry.inputs['params'] if entry is not None and entry.inputs is not None
                      and spec.compensation.name == 'delay_compensation' else None)
    stage, y, new_saved, inputs, input_cotangent = self.functions[k][call.phase](
        stage, entry.arrays if entry else None, forward_params, cotangent, x,
        residuals=residuals)
    if x is not None:
      queue = queue + (Saved(arrays=new_saved, batch=call.forward,
                             structure=residuals_out if spec.stash == 'vjp' else None,
                             inputs=None if inputs is None else {**inputs, 'x': x}),)
    return StageOutput(stage, queue, activation=y, cotangent=input_cotangent)


class LocalLosses:
  """DGL: every non-last stage trains greedily on its own auxiliary head's loss.

  The stage's TrainState holds params = {'stage': network, 'aux': head} and batch_stats likewise
  (the last stage: 'stage' only); the optimizer (weight decay included) applies to both.
  """

  name = 'dgl'

  def __init__(self, num_stages: int, num_classes: Optional[int],
               aux_head: Optional[Callable[[int, int], nn.Module]] = None):
    if num_stages > 1 and not callable(aux_head):
      raise ValueError(f'aux_head={aux_head!r}: DGL needs a factory (stage_index, num_classes) '
                       '-> flax module for the heads of the non-last stages, e.g. one of '
                       'fdg_jax.models.aux_heads.AUX_HEADS.')
    if num_stages > 1 and (num_classes is None or num_classes < 1):
      raise ValueError(f'num_classes={num_classes}: DGL needs the number of classes for the '
                       'auxiliary heads of the non-last stages; pass num_classes=.')
    self.num_classes = num_classes
    self.aux_heads = tuple(aux_head(k, num_classes) for k in range(num_stages - 1))
    self._aux_init = tuple(jax.jit(functools.partial(head.init, train=False))
                           for head in self.aux_heads)
    self.functions: tuple[dict[str, Callable], ...] = ()

  def compile(self, specs: Sequence[fns.StageSpec]) -> None:
    self.functions = tuple(
        {'steady': jax.jit(fns.local_update(spec, (self.aux_heads + (None,))[k]),
                           donate_argnums=0)}
        for k, spec in enumerate(specs))

  def call(self, call, stage, queue, *, x, cotangent, entry, targets) -> StageOutput:
    """Stage k trains on its local loss and sends the output of its pre-update weights."""
    del cotangent, entry   # DGL has neither cotangents nor saved forwards
    stage, y, metrics = self.functions[call.stage]['steady'](stage, x, targets)
    return StageOutput(stage, queue, activation=y, metrics=metrics)

  def extend_states(self, states, rng, io_specs, state_shardings):
    """The network's states (the same weights, keys and devices as FDG's) with the auxiliary
    heads, initialised from `rng` and shaped by the stages' outputs (`io_specs[k + 1]`)."""
    if io_specs is None:
      raise ValueError('DGL needs sample_input at init (e.g. jnp.zeros of one input batch) '
                       'to shape the auxiliary heads.')
    aux_key = jax.random.fold_in(rng, 1)
    specs = io_specs
    extended = []
    for k, stage in enumerate(states):
      if stage is None:   # another process's stage
        extended.append(None)
        continue
      params, batch_stats = {'stage': stage.params}, {'stage': stage.batch_stats}
      if k < len(states) - 1:
        key = jax.random.fold_in(aux_key, k)
        y = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), specs[k + 1])
        aux = self._aux_init[k]({'params': key, 'dropout': key}, y)
        params['aux'] = aux['params']
        batch_stats['aux'] = aux.get('batch_stats', {})
      extended.append(distributed.put(
          fns.TrainState.create(apply_fn=stage.apply_fn, params=params, tx=stage.tx,
                                batch_stats=batch_stats, dropout_key=stage.dropout_key),
          state_shardings[k]))
    return tuple(extended)

  def network_variables(self, stage: fns.TrainState) -> dict:
    """The network's variables, without the auxiliary head."""
    return {'params': stage.params['stage'], 'batch_stats': stage.batch_stats['stage']}

  def extra_param_counts(self, states) -> list[int]:
    """Parameters of each stage's auxiliary head (0 for the last stage and another process's)."""
    return [0 if s is None else count_params(s.params.get('aux', {})) for s in states]

  def function_names(self) -> frozenset[str]:
    return _names(self.functions)


# =========================================================== GPipe, 1F1B and FDG over microbatches


class Microbatched(_NetworkOnly):
  """A batch as M microbatches through every stage's program (`schedule.program`): F, B of a
  microbatch, U of a batch (the mean of its microbatches' gradients).

  * 'gpipe', '1f1b' (PipeDream-flush): synchronous, BP's update for every batch (BatchNorm per
    microbatch, as GPipe), at the price of the bubble; nothing stays in flight between batches.
    `grad_clip` > 0 clips by the whole model's norm: each stage contributes the squared norm of
    its gradient, one scalar moved to every other stage (as Megatron does), so the optimizer
    given to the pipeline must not clip again. The incoming cotangent is not scaled (beta is
    FDG's).
  * 'fdg': FDG with microbatches (PipeDream-2BW's semantics, `schedule.fdg_actions`): no flush;
    a stage's weights change only between batches; each non-last stage scales the cotangent it
    receives by its beta; clipping, if any, is the optimizer's, per stage. A compensation acts
    on the delay in updates (`schedule.delay`): weight prediction in `forward`, delay
    compensation in `update` (with the parameters the batch forwarded with, kept from its
    first forward), the others in the stage's optimizer.
  """

  def __init__(self, name: str, microbatches: int, grad_clip: float = 0.0):
    if name not in ('gpipe', '1f1b', 'fdg'):
      raise ValueError(f"Microbatched is 'gpipe', '1f1b' or 'fdg'; got {name!r}.")
    if microbatches < 1:
      raise ValueError(f'microbatches={microbatches}: use 1 or more.')
    if name == 'fdg' and grad_clip:
      raise ValueError('FDG clips per stage, in its optimizer: pass grad_clip=0.')
    self.name = name
    self.synchronous = name != 'fdg'
    self.microbatches = microbatches
    self.grad_clip = grad_clip
    self.specs: tuple[fns.StageSpec, ...] = ()
    self.functions: tuple[dict[str, Callable], ...] = ()
    self._residual_structures: dict[tuple, fns.Residuals] = {}

  def compile(self, specs: Sequence[fns.StageSpec]) -> None:
    if self.synchronous:   # exact: no shrinking
      specs = [dataclasses.replace(spec, beta=1.0) for spec in specs]
    self.specs = tuple(specs)
    last = len(specs) - 1
    self.functions = tuple(
        {**({'loss': jax.jit(fns.microbatch_loss(spec), donate_argnums=(0, 1))} if k == last
            else {'forward': jax.jit(fns.microbatch_forward(spec, self.keeps_inputs(k)),
                                     donate_argnums=0, static_argnames='with_params'),
                  'backward': jax.jit(fns.microbatch_backward(spec), donate_argnums=0,
                                      static_argnames='residuals')}),
         'norm': jax.jit(fns.squared_norm),
         'update': jax.jit(fns.apply_mean(spec, self.microbatches, self.grad_clip),
                           donate_argnums=0)}
        for k, spec in enumerate(specs))

  def residual_structure(self, k: int, stage: fns.TrainState, x) -> fns.Residuals:
    return _residual_structure(self._residual_structures, self.specs[k], k, stage, x)

  def keeps_inputs(self, k: int) -> bool:
    """Whether stage k's saved forwards keep what determines their residuals (FDG's, where
    `StageSpec.keeps_inputs`: a checkpoint between batches stores those; a synchronous schedule
    holds nothing between batches), the parameters once per batch."""
    return not self.synchronous and k < len(self.specs) - 1 and self.specs[k].keeps_inputs

  def forward(self, k: int, stage, x, batch_params=None):
    """A non-last stage's F: (stage, output, Saved entry of its residuals). Where the stage
    keeps its forwards' inputs, the entry's parameters are `batch_params`, its batch's, or where
    None (the batch's first forward), its own, returned by a program of its own."""
    structure = self.residual_structure(k, stage, x)
    stage, y, leaves, inputs = self.functions[k]['forward'](
        stage, x, with_params=batch_params is None and self.keeps_inputs(k))
    return stage, y, Saved(arrays=leaves, batch=None, structure=structure, inputs=(
        None if inputs is None else {'params': batch_params, **inputs, 'x': x}))

  def backward(self, k: int, total, entry: Saved, cotangent):
    """A non-last stage's B: (gradient sum, input cotangent)."""
    return self.functions[k]['backward'](total, entry.arrays, cotangent,
                                         residuals=entry.structure)

  def loss(self, k: int, stage, total, x, targets):
    """The last stage's F and B: (stage, gradient sum, input cotangent, metrics)."""
    return self.functions[k]['loss'](stage, total, x, targets)

  def squared_norm(self, k: int, total):
    return self.functions[k]['norm'](total)

  def update(self, k: int, stage, total, squared_norms, forward_params=None):
    """U: the update with the batch's gradient sum; `forward_params`, the parameters the batch
    forwarded with, reach it only where it needs them (delay compensation)."""
    if not self.specs[k].keeps_forward_parameters:
      forward_params = None
    return self.functions[k]['update'](stage, total, squared_norms, forward_params)


# ================================================================================ the registry


@dataclasses.dataclass(frozen=True)
class MethodInfo:
  """A method as the trainer, the config check, the grids and the figures know it."""
  name: str                  # config.method
  label: str                 # in tables and figures
  schedule: str              # its row of schedule.py
  description: str           # one line, for --help
  whole_model: bool = False  # trains the unsplit model as one stage (K = 1)
  delayed_gradients: bool = False   # non-last stages apply stale gradients: compensations apply
  local_losses: bool = False        # non-last stages train on auxiliary heads (extra parameters)
  takes_microbatches: bool = False  # splits a batch into config.microbatches
  synchronous: bool = False         # flushes every batch: BP's update (GPipe, 1F1B)
  # (num_stages, num_classes, aux_head, microbatches, grad_clip) -> the method object the
  # executor runs.
  factory: Callable[..., Any] = None

  def create(self, num_stages: int, *, num_classes: Optional[int] = None,
             aux_head: Optional[Callable[[int, int], nn.Module]] = None,
             microbatches: int = 1, grad_clip: float = 0.0):
    """The method object; a synchronous one (GPipe, 1F1B, BP over microbatches) clips by the
    whole model's norm itself (`grad_clip`), so its optimizer must not clip."""
    if microbatches > 1 and not self.takes_microbatches:
      raise ValueError(f'method={self.name!r} does not take microbatches (got {microbatches}).')
    return self.factory(num_stages, num_classes, aux_head, microbatches, grad_clip)


REGISTRY: dict[str, MethodInfo] = {info.name: info for info in (
    MethodInfo('bp', 'BP', 'fdg', 'back-propagation of the unsplit model on one stage (with '
               'microbatches: their mean gradient, as GPipe on one stage)', whole_model=True,
               takes_microbatches=True,
               factory=lambda _, __, ___, microbatches, grad_clip: (
                   DelayedGradients('fdg') if microbatches == 1 else
                   Microbatched('gpipe', microbatches, grad_clip))),
    MethodInfo('fdg', 'FDG', 'fdg', 'fully decoupled training with delayed gradients (Zhuang '
               'et al. 2019); with microbatches, weights change only between batches '
               '(PipeDream-2BW: one update stale once M >= 2(K-1) - 1)', delayed_gradients=True,
               takes_microbatches=True,
               factory=lambda _, __, ___, microbatches, ____: (
                   DelayedGradients('fdg') if microbatches == 1 else
                   Microbatched('fdg', microbatches))),
    MethodInfo('ddg', 'DDG', 'ddg', 'decoupled parallel back-propagation: forward locked, '
               'delayed gradients (Huo et al. 2018)', delayed_gradients=True,
               factory=lambda *_: DelayedGradients('ddg')),
    MethodInfo('dgl', 'DGL', 'dgl', 'decoupled greedy learning: each stage trains on an '
               "auxiliary head's local loss (Belilovsky et al. 2019)", local_losses=True,
               factory=lambda num_stages, num_classes, aux_head, *_: LocalLosses(
                   num_stages, num_classes, aux_head)),
    MethodInfo('gpipe', 'GPipe', 'gpipe', 'synchronous pipeline: all microbatches forward, then '
               "all backward, one update: BP's (Huang et al. 2019)", takes_microbatches=True,
               synchronous=True,
               factory=lambda _, __, ___, microbatches, grad_clip: Microbatched(
                   'gpipe', microbatches, grad_clip)),
    MethodInfo('1f1b', '1F1B', '1f1b', 'synchronous pipeline, one forward one backward '
               "(PipeDream-flush, Megatron): BP's update, fewer microbatches in flight",
               takes_microbatches=True, synchronous=True,
               factory=lambda _, __, ___, microbatches, grad_clip: Microbatched(
                   '1f1b', microbatches, grad_clip)),
)}


def get(name: str) -> MethodInfo:
  """The registry's entry of a method name."""
  if name not in REGISTRY:
    raise ValueError(f'method={name!r} is not one of {tuple(REGISTRY)}.')
  return REGISTRY[name]


def create(name: str, num_stages: int, **options):
  """The method object of a name in REGISTRY ('dgl' takes num_classes and aux_head)."""
  return get(name).create(num_stages, **options)
