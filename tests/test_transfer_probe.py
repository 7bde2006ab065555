"""experiments/probes/transfers.py (`bench.speedup --probe`) watches the executor's real
transfers: one record per transfer the schedule has, each value seen sent and arrived."""

import jax
import optax

from experiments.probes import transfers
from fdg_jax.engine import pipeline
from tiny import initial_variables, tiny_batches


def test_the_probe_sees_every_transfer_of_the_schedule_and_unwraps_on_stop():
  modules, variables = initial_variables(2)
  pipe = pipeline.Pipeline(modules, optax.sgd(0.1), placements=jax.devices()[:2])
  batches = tiny_batches(6)
  state = pipe.init(jax.random.key(1), None, variables=variables)
  state, _ = pipe.step(state, *batches[0])   # the fill's first iteration, not watched
  probe = transfers.TransferProbe(pipe)
  expected = []
  for inputs, targets in batches[1:5]:
    plan = pipe.plan(state, feeding=True)
    expected += [send for sends in plan.sends for send in sends]
    state, _ = pipe.step(state, inputs, targets)
  ready = probe.stop()
  # K = 2 from iteration 1: an activation 0 -> 1 and a cotangent 1 -> 0 every iteration.
  assert [(s.kind, s.source, s.target) for s in expected] == [
      ('activation', 0, 1), ('cotangent', 1, 0)] * 4
  assert probe.transfers == expected
  # In one process every value is seen leaving and arriving, numbered per kind from 0.
  assert sorted((kind, index, role) for kind, index, role, _ in ready) == sorted(
      (kind, i, role) for kind in ('activation', 'cotangent') for i in range(4)
      for role in ('sent', 'arrived'))
  assert transfers.in_loop_times(ready)['period_ms'] is not None
  # Unwrapped: the class's method again, and later steps go unseen.
  assert '_transfer' not in vars(pipe)
  pipe.step(state, *batches[5])
  assert len(probe.transfers) == len(expected)
