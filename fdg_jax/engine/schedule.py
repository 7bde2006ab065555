"""The pipeline's schedule as data: what every stage does at every iteration, and what it sends.

Every method of the engine is a fixed pattern of lags (docs/algorithm.md): at iteration t, stage
k forwards batch t - forward_lag(k) and applies the gradient of batch t - update_lag(k), where
batch b entered stage 0 at iteration b (plus the stream's offset, below). The pattern is a pure
function of (method, K, t), so every process of a multi-process run computes the same schedule
and runs only its own stages' calls; a transfer between stages on two processes is one
cross-process `jax.device_put` that both sides issue at the same point of the same schedule.

| method | forward_lag(k) | update_lag(k) | an activation is used | cotangents |
| --- | --- | --- | --- | --- |
| FDG | k | 2(K-1) - k | the next iteration | yes |
| DDG | 0 | K-1-k | in the same iteration (forward locked) | yes |
| DGL | k | k (its own local loss) | the next iteration | none |

So stage k's delay update_lag - forward_lag is 2(K-1-k) for FDG, K-1-k for DDG and 0 for DGL,
and the last stage (or K = 1) always forwards and updates the same batch: plain SGD.

A stream is a run of batches fed at consecutive iterations. A pipeline that was drained
completely may be fed again: a new stream starts, with its batches numbered on from the last.
"""

import dataclasses
from typing import Optional

METHODS = ('fdg', 'ddg', 'dgl')


@dataclasses.dataclass(frozen=True)
class StageCall:
  """Stage `stage`'s one call of an iteration."""
  stage: int
  forward: Optional[int]   # the batch it forwards (None: none)
  update: Optional[int]    # the batch whose gradient it applies (None: none)

  @property
  def phase(self) -> str:
    """Which compiled function runs it: 'fill' (forward only), 'drain' (update only) or
    'steady' (both; the last stage's, DGL's and DDG's forwarding calls are always 'steady')."""
    if self.update is None:
      return 'fill'
    return 'drain' if self.forward is None else 'steady'


@dataclasses.dataclass(frozen=True)
class Transfer:
  """An array that leaves stage `source` after its call, for stage `target`."""
  kind: str     # 'activation' (to stage + 1) or 'cotangent' (to stage - 1)
  batch: int
  source: int
  target: int


@dataclasses.dataclass(frozen=True)
class Iteration:
  """One iteration: the stage calls in the order they run, each followed by what it sends."""
  t: int
  calls: tuple[StageCall, ...]
  sends: tuple[tuple[Transfer, ...], ...]   # sends[i]: the transfers after calls[i]


def delay(stage: int, num_stages: int, method: str = 'fdg') -> int:
  """Iterations between stage k's forward of a batch and its update with that batch (FDG:
  2(K-1-k), DDG: K-1-k, DGL: 0): the one definition, from the lags below."""
  return Schedule(method, num_stages).delay(stage)


class Schedule:
  """The lags of one method on K stages, and the iterations they give."""

  def __init__(self, method: str, num_stages: int):
    if method not in METHODS:
      raise ValueError(f'method={method!r} is not one of {METHODS}.')
    self.method = method
    self.num_stages = num_stages

  def forward_lag(self, k: int) -> int:
    return 0 if self.method == 'ddg' else k

  def update_lag(self, k: int) -> int:
    last = self.num_stages - 1
    return {'fdg': 2 * last - k, 'ddg': last - k, 'dgl': k}[self.method]

  def delay(self, k: int) -> int:
    """Iterations between stage k's forward of a batch and its update with that batch."""
    return self.update_lag(k) - self.forward_lag(k)

  @property
  def activation_latency(self) -> int:
    """Iterations between sending an activation and its use: 0 when forward locked (DDG)."""
    return 0 if self.method == 'ddg' else 1

  @property
  def has_cotangents(self) -> bool:
    return self.method != 'dgl'

  def needs_labels(self, k: int) -> bool:
    """Whether stage k computes a loss (the last stage; with DGL every stage)."""
    return self.method == 'dgl' or k == self.num_stages - 1

  def iteration_length(self, num_batches: int) -> int:
    """Iterations for `num_batches` batches to reach every stage's update, drain included."""
    return num_batches + max(self.update_lag(k) for k in range(self.num_stages))

  def iteration(self, t: int, first_batch: int, offset: int, batches_fed: int) -> Iteration:
    """Iteration t of a stream whose batch b entered at iteration b + offset, b >= first_batch;
    `batches_fed` batches (of all streams) have entered so far, this iteration's included."""
    def batch(lag):
      b = t - offset - lag
      return b if first_batch <= b < batches_fed else None

    calls, sends = [], []
    last = self.num_stages - 1
    for k in range(self.num_stages):
      call = StageCall(k, batch(self.forward_lag(k)), batch(self.update_lag(k)))
      if call.forward is None and call.update is None:
        continue
      out = []
      if call.forward is not None and k < last:
        out.append(Transfer('activation', call.forward, k, k + 1))
      if self.has_cotangents and call.update is not None and k > 0:
        out.append(Transfer('cotangent', call.update, k, k - 1))
      calls.append(call)
      sends.append(tuple(out))
    return Iteration(t, tuple(calls), tuple(sends))
