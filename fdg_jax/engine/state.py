"""What a pipeline holds between iterations, and what one iteration reports.

Every array in flight is tagged with the batch it belongs to, so the executor can check each
stage's inputs against the schedule. What travels between stages (`Activation.value`,
`Cotangent.value`) and a batch's targets may be any pytree of arrays.
"""

import dataclasses
from typing import Any, NamedTuple, Optional

import flax

from fdg_jax.engine.stage_functions import TrainState


@flax.struct.dataclass
class Activation:
  """A stage's output on its way to the next stage (or a batch's inputs entering stage 0)."""
  value: Any
  batch: int = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class Targets:
  """A batch's targets (labels), waiting on the device of a stage that computes a loss on it."""
  value: Any
  batch: int = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class Cotangent:
  """The gradient of the loss w.r.t. a stage's input, on its way to the previous stage."""
  value: Any
  batch: int = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class Saved:
  """What a stage keeps from a forward for its delayed backward.

  stash='vjp': the residuals of `jax.vjp` (old activations and old weights), and in `inputs`
  what determines them: {'x': the stage input, 'params' and 'batch_stats' that forward used,
  'key': its dropout key} (`StageSpec.keeps_inputs`); a checkpoint stores only those and rebuilds
  the residuals (`checkpoint.rebuild_forward`).
  stash='recompute': the stage input and dropout key, to redo the forward at backward time.
  """
  arrays: Any
  batch: int = flax.struct.field(pytree_node=False)
  structure: Any = flax.struct.field(pytree_node=False, default=None)  # stage_functions.Residuals
  inputs: Any = None


@flax.struct.dataclass
class Microbatches:
  """What FDG with microbatches holds between batches (a synchronous schedule holds nothing):
  per stage, the activations and cotangents that arrived, keyed ('F' or 'B', microbatch), its
  saved forwards by microbatch and its gradient sums by batch; the last stage's input
  cotangents waiting for their B; the inputs and targets of microbatches fed and not yet used;
  per stage, by batch, the parameters each batch in flight forwarded with (where its saved
  forwards keep their inputs, `StageSpec.keeps_inputs`: one copy per batch, from its first
  forward to its update, which the entries' `inputs['params']` share and delay compensation's
  update reads); and each stage's `schedule.FdgProgress` (host values)."""
  arrived: tuple[dict, ...]
  saved: tuple[dict, ...]
  sums: tuple[dict, ...]
  held: dict
  inputs: dict
  targets: dict
  forward_params: tuple[dict, ...]
  progress: tuple = flax.struct.field(pytree_node=False)

  @property
  def in_flight(self) -> bool:
    return any(self.arrived) or any(self.saved) or any(self.sums) or any(
        self.forward_params) or bool(self.held or self.inputs or self.targets)


@flax.struct.dataclass
class PipelineState:
  """Everything the pipeline holds between iterations.

  `activations[k]` and `cotangents[k]` are what arrives at stage k in the next iteration;
  `saved[k]` is stage k's queue of saved forwards and `targets[k]` of targets it will compute a
  loss with, oldest first. In a multi-process run a process holds only its own stages: the
  others' entries are None or empty. The current stream's batch b entered at iteration
  b + stream_offset (b >= stream_first_batch); see `schedule.Schedule.iteration`.
  """
  stages: tuple[Optional[TrainState], ...]
  saved: tuple[tuple[Saved, ...], ...]
  activations: tuple[Optional[Activation], ...]
  cotangents: tuple[Optional[Cotangent], ...]
  targets: tuple[tuple[Targets, ...], ...]
  iteration: int = flax.struct.field(pytree_node=False, default=0)
  batches_fed: int = flax.struct.field(pytree_node=False, default=0)
  stream_first_batch: int = flax.struct.field(pytree_node=False, default=0)
  stream_offset: int = flax.struct.field(pytree_node=False, default=0)
  microbatches: Optional[Microbatches] = None   # FDG with microbatches, between batches

  @property
  def labels(self) -> tuple[tuple[Targets, ...], ...]:
    """`targets`, by its name before language models (kept for existing code)."""
    return self.targets

  @property
  def in_flight(self) -> bool:
    """True while some batch this process holds has not yet reached every stage's update."""
    return (any(a is not None for a in self.activations)
            or any(c is not None for c in self.cotangents)
            or any(self.saved) or any(self.targets)
            or (self.microbatches is not None and self.microbatches.in_flight))


@dataclasses.dataclass(frozen=True)
class StepInfo:
  """What one iteration did: batch indices each stage forwarded and updated with (or None), and
  the metrics of each loss computed (on its stage's device; None where none was)."""
  iteration: int
  forwarded: tuple[Optional[int], ...]
  updated: tuple[Optional[int], ...]
  local_metrics: tuple[Any, ...]   # per stage: the last stage's loss, DGL's local losses
  # A method over microbatches: (stage, function, batch) of each jitted call this process made,
  # in dispatch order; `function` is the key in `method.functions[stage]` ('forward',
  # 'backward', 'loss', 'norm', 'update'), with ' first' where the call starts its batch's
  # gradient sum (no sum yet), or for a forward, returns the parameters its batch keeps
  # (`Microbatched.keeps_inputs`): a program compiled apart. The timeline ties them to the trace.
  calls: tuple[tuple[int, str, int], ...] = ()

  @property
  def metrics(self):
    """The metrics of the batch the last stage trained on (None if it did not train)."""
    return self.local_metrics[-1]


class StageOutput(NamedTuple):
  """What one stage call produced, on the stage's device (host-side bookkeeping only)."""
  stage: TrainState
  saved: tuple[Saved, ...]
  activation: Any = None     # the output for the next stage
  cotangent: Any = None      # the input cotangent for the previous stage
  metrics: Any = None        # of the loss this stage computed, if any
