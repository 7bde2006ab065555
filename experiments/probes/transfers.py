"""Where does a two-stage pipeline's time go inside its timed loop: each stage's compute and wait,
each transfer's latency? Measured without a profiler, for `python -m experiments.bench.speedup
--probe` (its `in_loop` record).

A profiler changes what it observes (it was never on during the speed-up's timed loops), so
this watches the loop itself: the pipeline's `_transfer` (every transfer of `Pipeline.step`
goes through it, to `distributed.move_tree`) is wrapped to note every value a stage sends, and a
thread polls `jax.Array.is_ready` (which never blocks) for the moment each is ready on its
stage's device and the moment it has arrived on the other process. Host wall-clock times, which
the processes of one host share. `in_loop_times` turns them into each stage's compute and wait
per iteration and each transfer's latency.
"""

import statistics
import threading
import time

import jax


class TransferProbe:
  """When each value a stage sends is ready on its device, and when it has arrived at the other
  process: the pipeline's `_transfer` wrapped (on this instance), and a thread that polls
  `jax.Array.is_ready` (never blocks the host loop). Host wall-clock times, which all processes
  of one host share. `transfers` lists every transfer seen, as the schedule's `Transfer`s."""

  def __init__(self, pipe, poll_s: float = 0.001):
    self._watched, self.ready = [], []     # (kind, index, 'sent' | 'arrived', arrays), times
    self.transfers = []
    self._counts = {'activation': 0, 'cotangent': 0}
    self._lock, self._stop = threading.Lock(), threading.Event()
    self._poll_s = poll_s
    self._pipe = pipe
    # An instance attribute shadows the class's method: restored as it was by stop().
    self._shadowed = pipe.__dict__.get('_transfer')
    transfer = pipe._transfer  # pylint: disable=protected-access

    def probed_transfer(value, send):
      index = self._counts[send.kind]
      self._counts[send.kind] += 1
      moved = transfer(value, send)
      with self._lock:
        self.transfers.append(send)
        for role, tree in (('sent', value), ('arrived', moved)):
          if tree is not None:   # None: another process's side of the transfer
            self._watched.append((send.kind, index, role, jax.tree_util.tree_leaves(tree)))
      return moved

    pipe._transfer = probed_transfer  # pylint: disable=protected-access
    self._thread = threading.Thread(target=self._poll, daemon=True)
    self._thread.start()

  def _poll(self):
    while not self._stop.is_set():
      now = time.time()
      with self._lock:
        pending = []
        for kind, index, role, arrays in self._watched:
          if all(array.is_ready() for array in arrays):
            self.ready.append((kind, index, role, now))
          else:
            pending.append((kind, index, role, arrays))
        self._watched = pending
      time.sleep(self._poll_s)

  def stop(self, timeout_s: float = 120) -> list:
    """Waits (at most `timeout_s`) until every watched value is ready, ends the thread, unwraps
    the pipeline's `_transfer`; every (kind, index, role, time) seen."""
    if self._shadowed is None:
      del self._pipe._transfer  # pylint: disable=protected-access
    else:
      self._pipe._transfer = self._shadowed  # pylint: disable=protected-access
    deadline = time.monotonic() + timeout_s
    while True:
      with self._lock:
        if not self._watched:
          break
        if time.monotonic() > deadline:
          self._stop.set()
          raise TimeoutError(f'{len(self._watched)} sent or arriving arrays not ready after '
                             f'{timeout_s} s: a transfer never completed.')
      time.sleep(self._poll_s)
    self._stop.set()
    self._thread.join()
    return self.ready


def in_loop_times(ready: list) -> dict:
  """What every process's `TransferProbe.ready` says of the timed loop (ms, medians over its
  iterations). Activation i leaves stage 0's call of loop iteration i and is stage 1's input at
  i + 1; cotangent i leaves stage 1's call at i and is stage 0's input at i + 1. So a stage's
  call at i + 1 starts when both its previous call and its input are there: `busy_ms` is from
  then to its output being ready (its compute in the running pipeline), `idle_ms` how long it
  had been waiting for the input (0 when the input came first), `latency_ms` each transfer's
  arrival minus the moment its array was ready, and `period_ms` stage 0's iteration."""
  times = {(kind, index, role): t for kind, index, role, t in ready}
  def series(kind, role):
    return [times.get((kind, i, role)) for i in range(1 + max(
        (i for k, i, _ in times if k == kind), default=-1))]
  own = {0: series('activation', 'sent'), 1: series('cotangent', 'sent')}
  arriving = {0: series('cotangent', 'arrived'), 1: series('activation', 'arrived')}
  busy, idle = {0: [], 1: []}, {0: [], 1: []}
  for k in (0, 1):
    for i in range(1, len(own[k])):
      previous, arrived, done = own[k][i - 1], arriving[k][i - 1], own[k][i]
      if None in (previous, arrived, done):
        continue
      busy[k].append(1e3 * (done - max(previous, arrived)))
      idle[k].append(1e3 * max(0.0, arrived - previous))
  latency = {kind: [1e3 * (times[(kind, i, 'arrived')] - t)
                    for (k, i, role), t in times.items()
                    if k == kind and role == 'sent' and (kind, i, 'arrived') in times]
             for kind in ('activation', 'cotangent')}
  period = [1e3 * (b - a) for a, b in zip(own[0], own[0][1:]) if None not in (a, b)]

  def median(values):
    return statistics.median(values) if values else None
  return {'period_ms': median(period), 'busy_ms': [median(busy[0]), median(busy[1])],
          'idle_ms': [median(idle[0]), median(idle[1])],
          'latency_ms': [median(latency['activation']), median(latency['cotangent'])],
          'per_iteration': {'period_ms': period, 'busy_ms': busy, 'idle_ms': idle,
                            'latency_ms': latency}}
