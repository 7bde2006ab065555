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
# The microbatch schedules that flush every batch: no delay.
SYNCHRONOUS = ('gpipe', '1f1b')


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


def delay(stage: int, num_stages: int, method: str = 'fdg', microbatches: int = 1) -> int:
  """Stage k's delay D_k: the gradient of the batch it forwards reaches its weights D_k updates
  later, so the forward missed D_k - 1 of them (what the compensations act on). At M = 1,
  iterations between its forward of a batch and its update with that batch (FDG: 2(K-1-k),
  DDG: K-1-k, DGL: 0), from the lags below; FDG with microbatches: `weights_lag` (2 once
  M >= 2(K-1) - 1), the last stage's 0; a synchronous schedule (GPipe, 1F1B): 0. The one
  definition."""
  if method in SYNCHRONOUS:
    return 0
  if microbatches > 1:
    if method != 'fdg':
      raise ValueError(f'method={method!r} has no microbatch schedule.')
    return 0 if stage == num_stages - 1 else weights_lag(stage, num_stages, microbatches)
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


# ======================================================================= microbatch programs
#
# With M microbatches, batch b is the microbatches b*M .. b*M + M - 1 (global indices), and a
# schedule is each stage's *program*: the ordered list of its actions, as JaxPP and
# torch.distributed.pipelining write theirs. F(i) forwards microbatch i and keeps what its
# backward needs; B(i) back-propagates it (the last stage from the loss, the others from the
# cotangent stage k+1 sent) and adds its gradient to its batch's sum; U(b) applies the mean
# gradient of batch b's M microbatches (one optimizer update per batch, for every method).
#
# * 'gpipe': per batch, all M forwards, then all M backwards, then U (a flush per batch).
# * '1f1b' (PipeDream-flush, Megatron): per batch, min(K-1-k, M) warm-up forwards, then one
#   forward and one backward in turn, then the remaining backwards, then U.
# * 'fdg' with microbatches (PipeDream-2BW's semantics; M = 1 is FDG): in lockstep tick t,
#   stage k back-propagates microbatch t - (2(K-1) - k), then, if its next forward starts a
#   batch, applies every batch whose last backward is in, then forwards microbatch t - k (the
#   last stage forwards first and back-propagates the same microbatch). Its weights change only
#   between batches, so every microbatch of a batch forwards with the same weights, and the
#   gradient of batch b first reaches the weights that forward batch b + 1 + ceil((D_k - 1) / M),
#   D_k = 2(K-1-k) (`weights_lag`). No flush: after the last batch, the drain.
# * 'dgl' (local losses, M = 1 only): per batch, F (the stage's forward, its own head's loss and
#   the backward to its weights: no cotangent, so no B) then U; only F waits, for stage k-1's F
#   of the same batch. Stage k forwards and updates batch b at tick b + k, as `Schedule('dgl')`.
#
# `ticks` lays the programs out in time (unit-time actions, an update taking none), the table
# the tests compare with the literature's figures; `simulate` does the same with measured
# times, the cost model that compares schedules at K larger than this machine's cores.

PROGRAMS = ('gpipe', '1f1b', 'fdg', 'dgl')


@dataclasses.dataclass(frozen=True)
class Action:
  """One action of a stage's program: 'F' / 'B' of microbatch `index`, or 'U' of batch `index`."""
  kind: str
  index: int

  def __str__(self) -> str:
    return f'{self.kind}{self.index}'


def program(name: str, stage: int, num_stages: int, microbatches: int,
            num_batches: int) -> list[Action]:
  """Stage `stage`'s actions for `num_batches` batches of `microbatches` microbatches."""
  if name not in PROGRAMS:
    raise ValueError(f'schedule {name!r} is not one of {PROGRAMS}.')
  k, K, M = stage, num_stages, microbatches
  if name == 'fdg':
    return _fdg_program(k, K, M, num_batches)
  if name == 'dgl':
    if M != 1:
      raise ValueError(f'microbatches={M}: DGL has no microbatch schedule; use 1.')
    return [Action(kind, b) for b in range(num_batches) for kind in 'FU']
  actions = []
  for b in range(num_batches):
    first = b * M
    if name == 'gpipe':
      forwards, backwards = list(range(M)), list(range(M))
      order = [('F', m) for m in forwards] + [('B', m) for m in backwards]
    else:
      warmup = min(K - 1 - k, M)
      order = [('F', m) for m in range(warmup)]
      for m in range(M - warmup):
        order += [('F', warmup + m), ('B', m)]
      order += [('B', m) for m in range(M - warmup, M)]
    actions += [Action(kind, first + m) for kind, m in order] + [Action('U', b)]
  return actions


def _fdg_program(k: int, K: int, M: int, num_batches: int) -> list[Action]:
  total, progress, actions = num_batches * M, FdgProgress(), []
  for t in range(total + 2 * (K - 1) - k + 1):   # the last tick only applies what is left
    tick, progress = fdg_actions(k, K, M, t, total, progress)
    actions += tick
  return actions


@dataclasses.dataclass(frozen=True)
class FdgProgress:
  """What one stage of FDG with microbatches has back-propagated and applied: `done[b]`
  backwards of batch b are in; batches 0 .. applied - 1 are applied."""
  done: tuple[tuple[int, int], ...] = ()   # (batch, backwards in), batches not yet applied
  applied: int = 0


def fdg_actions(stage: int, num_stages: int, microbatches: int, t: int, total: int,
                progress: FdgProgress) -> tuple[list[Action], FdgProgress]:
  """Stage `stage`'s actions in lockstep tick t of FDG with microbatches (the rule above), when
  `total` microbatches have been fed (the final number in the drain), and its progress after."""
  k, last, M = stage, num_stages - 1, microbatches
  forward, backward = t - k, t - (2 * last - k)
  forward = forward if 0 <= forward < total else None
  backward = backward if 0 <= backward < total else None
  done, applied, actions = dict(progress.done), progress.applied, []

  def apply_completed():
    nonlocal applied
    while done.get(applied) == M:
      actions.append(Action('U', applied))
      del done[applied]
      applied += 1

  def back_propagate():
    actions.append(Action('B', backward))
    done[backward // M] = done.get(backward // M, 0) + 1

  if k < last and backward is not None:
    back_propagate()
  if forward is not None and forward % M == 0:
    apply_completed()                # a batch boundary: the weights change only here
  if forward is not None:
    actions.append(Action('F', forward))
  if k == last and backward is not None:
    back_propagate()
  if forward is None:
    apply_completed()                # the drain: no forward left to keep weights for
  return actions, FdgProgress(tuple(sorted(done.items())), applied)


def weights_lag(stage: int, num_stages: int, microbatches: int) -> int:
  """FDG with microbatches: the gradient of batch b first reaches the weights that forward batch
  b + weights_lag, which therefore miss weights_lag - 1 updates. The last stage's lag is 1 (no
  stale update); once M >= 2(K-1) - 1 every other stage's is 2: one update stale whatever K
  (PipeDream-2BW's W(t+1) = W(t) - lr * grad f(W(t-1))); at M = 1 it is FDG's delay 2(K-1-k)."""
  delay = 2 * (num_stages - 1 - stage)
  return 1 + max(0, -(-(delay - 1) // microbatches))


def simulate(programs: list[list[Action]], forward_time, backward_time, update_time=0.0,
             latency=0.0) -> list[list[tuple[Action, float, float]]]:
  """Each stage's actions with their (start, end) times when every stage runs its program in
  order, an F waiting for its input from stage k-1 and a B for its cotangent from stage k+1
  (each `latency` after the sender's end) and for its own F. Times may be numbers or
  per-stage sequences. The cost model of a schedule on K devices (an event simulation)."""
  K = len(programs)
  per_stage = lambda value: list(value) if isinstance(value, (list, tuple)) else [value] * K
  durations = {'F': per_stage(forward_time), 'B': per_stage(backward_time),
               'U': per_stage(update_time)}
  ends: dict[tuple[str, int, int], float] = {}
  position, free = [0] * K, [0.0] * K
  timeline = [[] for _ in range(K)]
  while any(position[k] < len(programs[k]) for k in range(K)):
    progressed = False
    for k in range(K):
      while position[k] < len(programs[k]):
        action = programs[k][position[k]]
        needs = []
        if action.kind == 'F' and k > 0:
          needs.append(('F', k - 1, action.index))
        if action.kind == 'B':
          needs.append(('F', k, action.index))
          if k < K - 1:
            needs.append(('B', k + 1, action.index))
        if any(need not in ends for need in needs):
          break
        ready = max([free[k]] + [ends[n] + (latency if n[1] != k else 0.0) for n in needs])
        end = ready + durations[action.kind][k]
        ends[(action.kind, k, action.index)] = end
        free[k] = end
        timeline[k].append((action, ready, end))
        position[k] += 1
        progressed = True
    if not progressed:
      raise ValueError('the programs deadlock: an action waits for one that never runs')
  return timeline


def ticks(name: str, num_stages: int, microbatches: int, num_batches: int
          ) -> list[dict[int, tuple[Action, ...]]]:
  """The programs laid out in ticks: tick -> {stage: its actions in that tick}. FDG's are its
  lockstep iterations; GPipe's and 1F1B's come from `simulate` with unit-time F and B (an
  update takes no time: it shares the tick of the backward before it)."""
  programs = [program(name, k, num_stages, microbatches, num_batches)
              for k in range(num_stages)]
  table: dict[int, dict[int, list[Action]]] = {}
  if name == 'fdg':
    for k, actions in enumerate(programs):
      backward_lag = 2 * (num_stages - 1) - k
      at = [a.index + (k if a.kind == 'F' else backward_lag) if a.kind in 'FB' else None
            for a in actions]
      for i, action in enumerate(actions):
        t = at[i]
        if t is None:   # an update: the tick of the forward it comes before, else (the drain)
          following = next((j for j in range(i, len(actions)) if at[j] is not None), None)
          t = (at[following] if following is not None and actions[following].kind == 'F'
               else next(x for x in reversed(at[:i]) if x is not None))   # of the backward
        table.setdefault(t, {}).setdefault(k, []).append(action)
  else:
    for k, timed in enumerate(simulate(programs, 1.0, 1.0)):
      for action, start, end in timed:
        t = int(start) if action.kind != 'U' else int(end) - 1
        table.setdefault(t, {}).setdefault(k, []).append(action)
  return [{k: tuple(v) for k, v in sorted(table.get(t, {}).items())}
          for t in range(max(table) + 1)]


def render(table: list[dict[int, tuple[Action, ...]]], num_stages: int,
           updates: bool = False) -> str:
  """A tick table as text, one row per stage ('.' where a stage idles), as the papers draw it
  (their figures leave the updates out; `updates=True` shows them)."""
  cells = [[' '.join(str(a) for a in tick.get(k, ()) if updates or a.kind != 'U') or '.'
            for tick in table] for k in range(num_stages)]
  widths = [max(len(row[t]) for row in cells) for t in range(len(table))]
  return '\n'.join(f'stage {k}: ' + ' '.join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                   for k, row in enumerate(cells))
