"""The profiler timeline: one event per stage call, on the right stage, and a PNG."""

import collections

import jax
import optax
import pytest

from fdg_jax.engine import pipeline
from fdg_jax.engine import timeline
from fdg_jax.models import partition
from tiny import tiny_batches, tiny_blocks


@pytest.mark.parametrize('shared_device', [False, True])
def test_timeline_has_one_event_per_stage_call(tmp_path, shared_device):
  num_stages = 3
  placements = ([jax.devices()[0]] * num_stages if shared_device
                else jax.devices()[:num_stages])
  pipe = pipeline.Pipeline(partition.build_stages(tiny_blocks(), (2, 4)), optax.sgd(0.1),
                           placements=placements)
  batches = tiny_batches(6)
  # Compile every phase outside the trace: a throwaway run through fill, steady and drain.
  state = pipe.init(jax.random.key(0), batches[0][0])
  for batch in batches:
    state, _ = pipe.step(state, *batch)
  pipe.drain(state)

  state = pipe.init(jax.random.key(0), batches[0][0])
  state, _ = pipe.step(state, *batches[0])
  # Fill, steady and drain calls, several of them on one device when shared_device.
  state, events = timeline.record_timeline(
      pipe, state, batches[1:] + [None] * 4, str(tmp_path / 'trace'))

  # Stage k works from iteration k (its first input) to N-1 + 2(K-1) - k (its last update);
  # the recorded iterations are 1 .. N-1 + 2(K-1).
  last = len(batches) - 1 + 2 * (num_stages - 1)
  calls = collections.Counter({k: sum(k <= t <= last - k for t in range(1, last + 1))
                               for k in range(num_stages)})
  assert collections.Counter(e.stage for e in events) == calls
  for e in events:
    assert e.start_ms <= e.end_ms, e
    # A call's device work cannot start before the host dispatched it: a mislabelled
    # event (another stage's execution) would break this sooner or later.
    assert e.dispatch_start_ms is not None and e.start_ms >= e.dispatch_start_ms, e
  for k in range(num_stages):   # calls of one stage run one after another (donated state)
    spans = sorted((e.iteration, e.start_ms, e.end_ms) for e in events if e.stage == k)
    assert all(a[2] <= b[1] for a, b in zip(spans, spans[1:])), spans
  assert {e.phase for e in events if e.stage == 0} == {'fill', 'steady', 'drain'}
  assert not state.in_flight

  png = tmp_path / 'timeline.png'
  timeline.draw_timeline(events, str(png))
  assert png.stat().st_size > 1000
