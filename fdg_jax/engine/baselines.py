"""The comparison methods DDG and DGL (docs/algorithm.md), in the same engine as FDG.

Both are `pipeline.Pipeline`s with another method object (`methods.py`): same stages, same
optimizer, same placements, same `PipelineState`, same executor (`step`, `drain`) walking their
own schedule (`schedule.Schedule`), same `evaluate`, so the trainer, the checkpoints and
multi-process runs handle them like FDG. DDG changes only the schedule and reuses FDG's stage
functions; DGL has its own stage function, keeps its auxiliary heads inside each stage's
TrainState, and its `stage_variables` and `predict` leave the heads out. The classes here are
the constructors users call.

DDG (Huo et al. 2018, "Decoupled parallel backpropagation with convergence guarantee"): backward
unlocking only. Iteration t forwards batch t through all stages in order, within the iteration
(forward locked); stage k applies the gradient of batch t - (K-1-k).

DGL (Belilovsky et al. 2019, "Decoupled greedy learning of CNNs"): every non-last stage has an
auxiliary classifier head and trains on its own local loss; no gradient crosses a stage boundary;
stages forward in a pipeline like FDG. The heads are extra trainable parameters
(`DGLPipeline.num_extra_params`).

With K = 1 both are exactly back-propagation, like FDG.
"""

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import optax

from fdg_jax.engine import methods
from fdg_jax.engine import pipeline
from fdg_jax.engine.pipeline import PipelineState
from fdg_jax.engine import schedule


def ddg_delay(stage: int, num_stages: int) -> int:
  """DDG: iterations between stage k's forward of a batch and its backward of that batch."""
  return schedule.delay(stage, num_stages, 'ddg')


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

  def __init__(self, stages: Sequence[nn.Module], optimizer: optax.GradientTransformation,
               loss_fn: Callable[[Any, Any], jax.Array] = pipeline.cross_entropy_loss,
               **options):
    super().__init__(stages, optimizer, loss_fn, method='ddg', **options)


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
    aux_head: a factory `(stage_index, num_classes) -> nn.Module` of modules called as
      `head.apply(variables, y, train=bool)` (required when K > 1); the zoo's are in
      `fdg_jax.models.aux_heads.AUX_HEADS` ('mlp-sr': DGL's MLP-SR-aux, 'conv': a small conv
      head, 'vit', 'lm'), e.g. `aux_head=aux_heads.get('mlp-sr')`.
  """

  def __init__(self, stages: Sequence[nn.Module], optimizer: optax.GradientTransformation,
               loss_fn: Callable[[Any, Any], jax.Array] = pipeline.cross_entropy_loss,
               *, num_classes: Optional[int] = None,
               aux_head: Optional[Callable[[int, int], nn.Module]] = None,
               placements: Optional[Sequence[Any]] = None, metrics: type = pipeline.LossAndAccuracy):
    super().__init__(stages, optimizer, loss_fn, placements=placements, metrics=metrics,
                     method=methods.create('dgl', len(stages), num_classes=num_classes,
                                           aux_head=aux_head))
    self.num_classes = num_classes
    self.aux_heads = self.method.aux_heads

  def aux_variables(self, state: PipelineState) -> list[dict]:
    """Each non-last stage's auxiliary head {'params', 'batch_stats'} (K-1 dicts)."""
    return [{'params': s.params['aux'], 'batch_stats': s.batch_stats['aux']}
            for s in state.stages[:-1]]

  def aux_param_counts(self, state: PipelineState) -> list[int]:
    """Parameters of each stage's auxiliary head (0 for the last stage, and for a stage that
    another process owns)."""
    return self.method.extra_param_counts(state.stages)
