"""The comparison methods DDG and DGL (docs/algorithm.md), in the same engine as FDG.

Both are subclasses of `pipeline.Pipeline`: same stages, same optimizer, same placements, same
`PipelineState`, same executor (`step`, `drain`) walking their own schedule
(`schedule.Schedule`), same `evaluate`, so the trainer, the checkpoints and multi-process runs
handle them like FDG. DDG changes only the schedule and reuses FDG's stage functions; DGL has
its own stage function, keeps its auxiliary heads inside each stage's TrainState, and its
`stage_variables` and `predict` leave the heads out.

DDG (Huo et al. 2018, "Decoupled parallel backpropagation with convergence guarantee"): backward
unlocking only. Iteration t forwards batch t through all stages in order, within the iteration
(forward locked); stage k applies the gradient of batch t - (K-1-k).

DGL (Belilovsky et al. 2019, "Decoupled greedy learning of CNNs"): every non-last stage has an
auxiliary classifier head and trains on its own local loss; no gradient crosses a stage boundary;
stages forward in a pipeline like FDG. The heads are extra trainable parameters
(`DGLPipeline.num_extra_params`).

With K = 1 both are exactly back-propagation, like FDG.
"""

import dataclasses
import functools
import math
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fdg_jax import distributed
from fdg_jax import partition
from fdg_jax import pipeline
from fdg_jax.pipeline import PipelineState, StepInfo, TrainState


# ==================================================================================== DDG


def ddg_delay(stage: int, num_stages: int) -> int:
  """DDG: iterations between stage k's forward of a batch and its backward of that batch."""
  return num_stages - 1 - stage


class DDGPipeline(pipeline.Pipeline):
  """DDG: forward-locked, backward-unlocked pipeline with delayed gradients.

  Exact schedule (iteration t = 0, 1, ...; batch t is fed at iteration t; stages in order
  k = 0..K-1 within an iteration):

  * Non-last stage k, iteration t, in this order (FDG's update-before-forward):
    1. if a cotangent arrived: scale it by beta, run the VJP of the forward of batch
       t - (K-1-k) that this stage saved at iteration t - (K-1-k), update the parameters with
       the optimizer, and send the input cotangent to stage k-1 (it arrives for iteration t+1);
    2. if batch t was fed: forward it with the *updated* parameters (BatchNorm in training mode,
       running statistics updated once), save what the VJP needs, and hand the output to
       stage k+1 *in the same iteration* (forward locked).
  * Last stage, iteration t: forward batch t, take the loss against its labels, the gradient
    and the input cotangent at the current parameters, update, send the cotangent to stage K-2
    (arriving for iteration t+1). Ordinary SGD for that stage, no staleness.

  So the cotangent of batch b leaves the last stage at iteration b, reaches stage k at
  iteration b + (K-1-k), and stage k's delay is `ddg_delay(k, K) = K-1-k` (FDG: 2(K-1-k)).
  Stage k holds K-1-k saved forwards in steady state (the residuals of `jax.vjp`, or with
  stash='recompute' only the input and dropout key).

  beta, as in FDG: every non-last stage multiplies the cotangent it receives by beta before its
  VJP, and the cotangent it emits carries that factor, so stage k's gradients carry
  beta^(K-1-k). The DDG paper has no gradient shrinking: use beta=1 (the default) to compare
  with it; beta < 1 is offered to compare the methods on equal terms.

  Fill and drain as FDG: stage k skips backward and update at iterations t < K-1-k (no
  cotangent yet); after the last batch, `drain` runs K-1 iterations without new batches in
  which stages only back-propagate, so a run of N batches takes N + K - 1 iterations and
  applies exactly N updates per stage. The stage functions and the executor are the parent's;
  only the schedule differs (`schedule.Schedule` with method 'ddg').
  """

  METHOD = 'ddg'

  def delay(self, stage: int) -> int:
    return self.schedule.delay(stage)


# ==================================================================================== DGL


def adaptive_avg_pool(x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
  """PyTorch's adaptive_avg_pool2d on NHWC: bin i of n covers [floor(iH/n), ceil((i+1)H/n))."""
  n, height, width, channels = x.shape
  out_h, out_w = output_size
  if height % out_h == 0 and width % out_w == 0:
    return x.reshape(n, out_h, height // out_h, out_w, width // out_w, channels).mean((2, 4))
  rows = []
  for i in range(out_h):
    h0, h1 = i * height // out_h, -(-(i + 1) * height // out_h)
    rows.append(jnp.stack(
        [x[:, h0:h1, j * width // out_w:-(-(j + 1) * width // out_w)].mean((1, 2))
         for j in range(out_w)], axis=1))
  return jnp.stack(rows, axis=1)


def _batch_norm(train: bool):
  # PyTorch BatchNorm's defaults, like the model zoo.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)


class MLPSRAuxHead(nn.Module):
  """DGL's "MLP-SR-aux" auxiliary classifier (the default).

  As in the DGL authors' CIFAR code (`auxillary_classifier2` with n_lin=3, mlp_layers=3, used
  for their ResNet comparison with DDG): average-pool the C-channel input to ceil(H/4) x
  ceil(W/4); `num_convs` x [1x1 conv (C -> C, no bias), BatchNorm, ReLU]; average-pool to
  2 x 2; flatten (4C); `num_mlp_layers` x [Dense(4C), BatchNorm, ReLU]; Dense(num_classes).
  """
  num_classes: int
  num_convs: int = 3
  num_mlp_layers: int = 3

  @nn.compact
  def __call__(self, x, train: bool):
    channels = x.shape[-1]
    x = adaptive_avg_pool(x, (math.ceil(x.shape[1] / 4), math.ceil(x.shape[2] / 4)))
    for _ in range(self.num_convs):
      x = nn.relu(_batch_norm(train)(nn.Conv(channels, (1, 1), use_bias=False)(x)))
    x = adaptive_avg_pool(x, (2, 2)).reshape(x.shape[0], -1)
    for _ in range(self.num_mlp_layers):
      x = nn.relu(_batch_norm(train)(nn.Dense(4 * channels)(x)))
    return nn.Dense(self.num_classes)(x)


class ConvAuxHead(nn.Module):
  """A smaller head: 3x3 conv (same width, no bias), BatchNorm, ReLU, global average pool, Dense."""
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(x.shape[-1], (3, 3), use_bias=False)(x)
    x = nn.relu(_batch_norm(train)(x))
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def mlp_sr_aux_head(stage: int, num_classes: int) -> nn.Module:
  del stage
  return MLPSRAuxHead(num_classes)


def conv_aux_head(stage: int, num_classes: int) -> nn.Module:
  del stage
  return ConvAuxHead(num_classes)


# Names a config can use for `DGLPipeline(aux_head=...)`.
AUX_HEADS = {'mlp-sr': mlp_sr_aux_head, 'conv': conv_aux_head}


@dataclasses.dataclass(frozen=True)
class DGLStepInfo(StepInfo):
  """StepInfo plus each stage's local metrics (aux head loss/accuracy; the last stage's own),
  on the stage's device, or None for a stage that did not train in this iteration."""
  local_metrics: tuple[Optional[pipeline.TrainMetrics], ...] = ()


class DGLPipeline(pipeline.Pipeline):
  """DGL: every non-last stage trains greedily on its own auxiliary classifier's loss.

  Exact schedule (iteration t; batch t is fed at iteration t):

  * Stage k trains on batch t-k at iteration t (when 0 <= t-k < N), pipelined like FDG: its
    input is what stage k-1 produced at iteration t-1, and its output reaches stage k+1 for
    iteration t+1. Each stage gets the batch's labels on its own device when the batch enters.
  * Non-last stage k: one training-mode forward y = stage(x) (BatchNorm statistics updated
    once), logits = aux_head(y); local loss = mean(loss_fn(logits, labels)); gradient w.r.t.
    the stage's and the head's parameters only (x is a constant: no gradient crosses a stage
    boundary); one optimizer update. The output sent on is y of that same forward, i.e. from
    the weights *before* this update (the output the local loss was computed on, as in DGL's
    Algorithm 1). No delay, nothing saved.
  * Last stage: the same with its own output as the logits (no head): ordinary SGD.
  * Fill: stage k idles for t < k; drain: K-1 iterations without new batches. N batches take
    N + K - 1 iterations and apply N updates per stage.

  The stage's `TrainState` holds params = {'stage': network params, 'aux': head params} and
  batch_stats = {'stage': ..., 'aux': ...} (the last stage has only 'stage'), all on the
  stage's device; the optimizer (weight decay included) applies to both. `stage_variables`,
  `predict` and `evaluate` use the network only, without the heads.

  Args:
    stages, optimizer, loss_fn, placements: as `pipeline.Pipeline`.
    num_classes: the heads' output size (required when K > 1).
    aux_head: a name in `AUX_HEADS` ('mlp-sr', default: DGL's MLP-SR-aux; 'conv': a small conv
      head) or a factory `(stage_index, num_classes) -> nn.Module` of modules called as
      `head.apply(variables, y, train=bool)`.
  """

  METHOD = 'dgl'

  def __init__(self, stages: Sequence[nn.Module], optimizer: optax.GradientTransformation,
               loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = pipeline.cross_entropy_loss,
               *, num_classes: Optional[int] = None,
               aux_head: Union[str, Callable[[int, int], nn.Module]] = 'mlp-sr',
               placements: Optional[Sequence[Any]] = None):
    super().__init__(stages, optimizer, loss_fn, placements=placements)
    if isinstance(aux_head, str):
      if aux_head not in AUX_HEADS:
        raise ValueError(f'aux_head={aux_head!r} is not one of {tuple(AUX_HEADS)}; or pass a '
                         'factory (stage_index, num_classes) -> flax module.')
      aux_head = AUX_HEADS[aux_head]
    if self.num_stages > 1 and (num_classes is None or num_classes < 1):
      raise ValueError(f'num_classes={num_classes}: DGL needs the number of classes for the '
                       'auxiliary heads of the non-last stages; pass num_classes=.')
    self.num_classes = num_classes
    self.aux_heads = tuple(aux_head(k, num_classes) for k in range(self.num_stages - 1))
    self.stage_functions = tuple(jax.jit(self._make_local_fn(k), donate_argnums=0)
                                 for k in range(self.num_stages))
    self._aux_init = tuple(jax.jit(functools.partial(head.init, train=False))
                           for head in self.aux_heads)

  def _make_local_fn(self, k: int):
    """Stage k's `train_then_send(state, x, labels) -> (state, y, metrics)`; y is None at the
    last stage."""
    last = k == self.num_stages - 1

    def train_then_send(state: TrainState, x, labels):
      dropout_key, key = jax.random.split(state.dropout_key)

      def loss_of(params):
        y, stage_stats = self._train_forward(k, params['stage'], state.batch_stats['stage'], x,
                                             key)
        if last:
          logits, batch_stats = y, {'stage': stage_stats}
        else:
          logits, mutated = self.aux_heads[k].apply(
              {'params': params['aux'], 'batch_stats': state.batch_stats['aux']}, y, train=True,
              mutable=['batch_stats'], rngs={'dropout': jax.random.fold_in(key, 1)})
          batch_stats = {'stage': stage_stats,
                         'aux': mutated.get('batch_stats', state.batch_stats['aux'])}
        return jnp.mean(self.loss_fn(logits, labels)), (y, logits, batch_stats)

      (loss, (y, logits, batch_stats)), grads = jax.value_and_grad(
          loss_of, has_aux=True)(state.params)
      state = state.apply_gradients(grads=grads).replace(
          batch_stats=batch_stats, dropout_key=dropout_key)
      metrics = pipeline.TrainMetrics.single_from_model_output(
          loss=loss, logits=logits, labels=labels)
      return state, (None if last else y), metrics

    return train_then_send

  def init(self, rng: jax.Array, sample_input: jax.Array,
           variables: Optional[Sequence[dict]] = None) -> PipelineState:
    """`Pipeline.init` (the network: the same weights, keys and devices as FDG's, or the given
    `variables`, one dict per stage), plus the auxiliary heads, initialised here.

    `sample_input` (a batch of images, or anything with their shape and dtype) is required: the
    heads are shaped by the stages' outputs.
    """
    if sample_input is None:
      raise ValueError('DGLPipeline.init needs sample_input (e.g. jnp.zeros of one input batch) '
                       'to shape the auxiliary heads.')
    network = super().init(rng, sample_input, variables)
    aux_key = jax.random.fold_in(rng, 1)
    x = jax.ShapeDtypeStruct(sample_input.shape, sample_input.dtype)
    stages = []
    for k, (stage, sharding) in enumerate(zip(network.stages, self.state_shardings)):
      if k < self.num_stages - 1:
        x = jax.eval_shape(self._predict[k], *self._variable_specs[k], x)
      if stage is None:   # another process's stage
        stages.append(None)
        continue
      params, batch_stats = {'stage': stage.params}, {'stage': stage.batch_stats}
      if k < self.num_stages - 1:
        key = jax.random.fold_in(aux_key, k)
        aux = self._aux_init[k]({'params': key, 'dropout': key}, jnp.zeros(x.shape, x.dtype))
        params['aux'] = aux['params']
        batch_stats['aux'] = aux.get('batch_stats', {})
      state = TrainState.create(apply_fn=stage.apply_fn, params=params, tx=self.optimizer,
                                batch_stats=batch_stats, dropout_key=stage.dropout_key)
      stages.append(distributed.put(state, sharding))
    return network.replace(stages=tuple(stages))

  def _call_stage(self, k: int, call, stage: TrainState, queue, *, x, cotangent, entry,
                  labels) -> pipeline.StageOutput:
    """Stage k trains on its local loss and sends the output of its pre-update weights."""
    del call, cotangent, entry   # DGL has neither cotangents nor saved forwards
    stage, y, metrics = self.stage_functions[k](stage, x, labels)
    return pipeline.StageOutput(stage, queue, activation=y, metrics=metrics)

  def _step_info(self, iteration: int, forwarded, updated, metrics) -> DGLStepInfo:
    return DGLStepInfo(iteration=iteration, forwarded=tuple(forwarded),
                       updated=tuple(updated), metrics=metrics[-1],
                       local_metrics=tuple(metrics))

  # ---------------------------------------------------------------- reading the pipeline

  def stage_variables(self, state: PipelineState) -> list[Optional[dict]]:
    """Each stage's network {'params', 'batch_stats'}, without the auxiliary heads (None for a
    stage another process owns)."""
    return [None if s is None else {'params': s.params['stage'],
                                    'batch_stats': s.batch_stats['stage']}
            for s in state.stages]

  def aux_variables(self, state: PipelineState) -> list[dict]:
    """Each non-last stage's auxiliary head {'params', 'batch_stats'} (K-1 dicts)."""
    return [{'params': s.params['aux'], 'batch_stats': s.batch_stats['aux']}
            for s in state.stages[:-1]]

  def aux_param_counts(self, state: PipelineState) -> list[int]:
    """Parameters of each stage's auxiliary head (0 for the last stage, and for a stage that
    another process owns)."""
    return [0 if s is None else partition.count_params(s.params.get('aux', {}))
            for s in state.stages]

  def num_extra_params(self, state: PipelineState) -> int:
    """Trainable parameters DGL adds to the network: all auxiliary heads together (of every
    process; all must call it in a multi-process run)."""
    counts = distributed.all_processes(self.aux_param_counts(state))
    return int(counts.max(axis=0).sum())   # a stage on several processes counts once
