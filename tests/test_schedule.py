"""fdg_jax/engine/schedule.py as tables: every stage's calls and transfers, written out by hand for small
cases, and the properties every method's schedule must have for K = 1..4 (as JaxPP tests its
pipeline schedules). Pure Python: no JAX, so the whole file runs in well under a second."""

import itertools

import pytest

from fdg_jax.engine import schedule as schedule_lib

METHODS = schedule_lib.METHODS
NUM_STAGES = (1, 2, 3, 4)


def stream(schedule, num_batches, start=0, first_batch=0, extra=3):
  """The iterations of one stream of `num_batches` batches fed at iterations start, start + 1,
  ..., numbered from `first_batch`, and `extra` iterations after its drain; as the pipeline asks
  for them (`Pipeline.plan`): batch b entered at iteration b + offset."""
  offset = start - first_batch
  iterations = []
  for t in range(start, start + schedule.iteration_length(num_batches) + extra):
    batches_fed = first_batch + min(t - start + 1, num_batches)
    iterations.append(schedule.iteration(t, first_batch, offset, batches_fed))
  return iterations


def table(iterations):
  """Each iteration's calls as (stage, forward batch, update batch) tuples."""
  return [[(c.stage, c.forward, c.update) for c in it.calls] for it in iterations]


def when(iterations):
  """{(stage, batch): iteration} of every forward and of every update, and the counts of each."""
  forwards, updates, counts = {}, {}, {'forward': 0, 'update': 0}
  for it in iterations:
    for call in it.calls:
      if call.forward is not None:
        forwards[call.stage, call.forward] = it.t
        counts['forward'] += 1
      if call.update is not None:
        updates[call.stage, call.update] = it.t
        counts['update'] += 1
  return forwards, updates, counts


# ------------------------------------------------------------------------- literal tables

def test_fdg_three_stages_four_batches():
  # Stage k forwards batch t - k and updates with batch t - (4 - k): the fill, two full
  # iterations, and the drain of 2(K - 1) = 4 iterations.
  assert table(stream(schedule_lib.Schedule('fdg', 3), 4)) == [
      [(0, 0, None)],
      [(0, 1, None), (1, 0, None)],
      [(0, 2, None), (1, 1, None), (2, 0, 0)],
      [(0, 3, None), (1, 2, 0), (2, 1, 1)],
      [(0, None, 0), (1, 3, 1), (2, 2, 2)],
      [(0, None, 1), (1, None, 2), (2, 3, 3)],
      [(0, None, 2), (1, None, 3)],
      [(0, None, 3)],
      [], [], [],
  ]


def test_ddg_three_stages_four_batches():
  # Forward locked: every stage forwards the newest batch; stage k updates with batch
  # t - (2 - k).
  assert table(stream(schedule_lib.Schedule('ddg', 3), 4)) == [
      [(0, 0, None), (1, 0, None), (2, 0, 0)],
      [(0, 1, None), (1, 1, 0), (2, 1, 1)],
      [(0, 2, 0), (1, 2, 1), (2, 2, 2)],
      [(0, 3, 1), (1, 3, 2), (2, 3, 3)],
      [(0, None, 2), (1, None, 3)],
      [(0, None, 3)],
      [], [], [],
  ]


def test_dgl_three_stages_four_batches():
  # Every stage updates with the batch it forwards (its own local loss), one stage later each.
  assert table(stream(schedule_lib.Schedule('dgl', 3), 4)) == [
      [(0, 0, 0)],
      [(0, 1, 1), (1, 0, 0)],
      [(0, 2, 2), (1, 1, 1), (2, 0, 0)],
      [(0, 3, 3), (1, 2, 2), (2, 1, 1)],
      [(1, 3, 3), (2, 2, 2)],
      [(2, 3, 3)],
      [], [], [],
  ]


def test_fdg_two_stages_transfers_after_each_call():
  def act(b):
    return schedule_lib.Transfer('activation', b, 0, 1)

  def cot(b):
    return schedule_lib.Transfer('cotangent', b, 1, 0)

  iterations = stream(schedule_lib.Schedule('fdg', 2), 3, extra=1)
  assert [list(zip(table([it])[0], it.sends)) for it in iterations] == [
      [((0, 0, None), (act(0),))],
      [((0, 1, None), (act(1),)), ((1, 0, 0), (cot(0),))],
      [((0, 2, 0), (act(2),)), ((1, 1, 1), (cot(1),))],
      [((0, None, 1), ()), ((1, 2, 2), (cot(2),))],
      [((0, None, 2), ())],
      [],
  ]
  assert [call.phase for it in iterations for call in it.calls] == [
      'fill', 'fill', 'steady', 'steady', 'steady', 'drain', 'steady', 'drain']


def test_dgl_sends_no_cotangents_and_ddg_uses_activations_in_the_same_iteration():
  dgl = stream(schedule_lib.Schedule('dgl', 3), 2)
  assert {t.kind for it in dgl for sends in it.sends for t in sends} == {'activation'}
  ddg = schedule_lib.Schedule('ddg', 3).iteration(0, 0, 0, 1)
  assert ddg.sends == ((schedule_lib.Transfer('activation', 0, 0, 1),),
                       (schedule_lib.Transfer('activation', 0, 1, 2),),
                       (schedule_lib.Transfer('cotangent', 0, 2, 1),))


# ------------------------------------------------------------------------- properties

def expected_delay(method, num_stages, k):
  return {'fdg': 2 * (num_stages - 1 - k), 'ddg': num_stages - 1 - k, 'dgl': 0}[method]


def expected_length(method, num_stages, num_batches):
  drain = {'fdg': 2 * (num_stages - 1), 'ddg': num_stages - 1, 'dgl': num_stages - 1}[method]
  return num_batches + drain


METHOD_STAGES = list(itertools.product(METHODS, NUM_STAGES))
CASES = list(itertools.product(METHODS, NUM_STAGES, (1, 2, 5)))


@pytest.mark.parametrize('method, num_stages, num_batches', CASES)
def test_every_stage_forwards_and_updates_every_batch_once(method, num_stages, num_batches):
  forwards, updates, counts = when(stream(schedule_lib.Schedule(method, num_stages), num_batches))
  every = {(k, b) for k in range(num_stages) for b in range(num_batches)}
  assert set(forwards) == set(updates) == every
  assert counts == {'forward': len(every), 'update': len(every)}   # no call twice
  for key in every:
    assert forwards[key] <= updates[key], f'stage {key[0]} updates with batch {key[1]} first'


@pytest.mark.parametrize('method, num_stages, num_batches', CASES)
def test_iterations_are_the_fill_and_the_drain(method, num_stages, num_batches):
  schedule = schedule_lib.Schedule(method, num_stages)
  length = schedule.iteration_length(num_batches)
  assert length == expected_length(method, num_stages, num_batches)
  iterations = stream(schedule, num_batches)
  assert all(it.calls for it in iterations[:length]), 'an empty iteration inside the stream'
  assert not any(it.calls for it in iterations[length:]), 'calls after the drain'
  for it in iterations:
    assert [c.stage for c in it.calls] == sorted({c.stage for c in it.calls})   # stage order


@pytest.mark.parametrize('method, num_stages', METHOD_STAGES)
def test_delays_and_activation_latency(method, num_stages):
  schedule = schedule_lib.Schedule(method, num_stages)
  forwards, updates, _ = when(stream(schedule, 5))
  latency = 0 if method == 'ddg' else 1
  assert schedule.activation_latency == latency
  assert schedule.has_cotangents == (method != 'dgl')
  for k in range(num_stages):
    assert schedule.delay(k) == expected_delay(method, num_stages, k)
    assert schedule.needs_labels(k) == (method == 'dgl' or k == num_stages - 1)
    for b in range(5):
      assert updates[k, b] - forwards[k, b] == expected_delay(method, num_stages, k)
      if k > 0:
        assert forwards[k, b] - forwards[k - 1, b] == latency


@pytest.mark.parametrize('method, num_stages', METHOD_STAGES)
def test_every_transfer_reaches_the_call_that_uses_it(method, num_stages):
  """An activation of batch b reaches stage k + 1's forward of b after the activation latency
  (later in the same iteration when 0); a cotangent of b reaches stage k - 1's update with b at
  the next iteration."""
  schedule = schedule_lib.Schedule(method, num_stages)
  iterations = stream(schedule, 5)
  position = {}   # (stage, forward or update, batch) -> (iteration, place in it)
  for it in iterations:
    for i, call in enumerate(it.calls):
      position[call.stage, 'forward', call.forward] = (it.t, i)
      position[call.stage, 'update', call.update] = (it.t, i)
  sent = 0
  for it in iterations:
    for i, (call, sends) in enumerate(zip(it.calls, it.sends)):
      for transfer in sends:
        sent += 1
        assert transfer.source == call.stage
        if transfer.kind == 'activation':
          assert (transfer.target, transfer.batch) == (call.stage + 1, call.forward)
          t, j = position[transfer.target, 'forward', transfer.batch]
          assert t == it.t + schedule.activation_latency and (t > it.t or j > i)
        else:
          assert schedule.has_cotangents and transfer.kind == 'cotangent'
          assert (transfer.target, transfer.batch) == (call.stage - 1, call.update)
          assert position[transfer.target, 'update', transfer.batch][0] == it.t + 1
  activations = (num_stages - 1) * 5
  assert sent == activations * (2 if schedule.has_cotangents else 1)


@pytest.mark.parametrize('method', METHODS)
def test_the_last_stage_and_a_single_stage_are_plain_sgd(method):
  for num_stages in NUM_STAGES:
    for it in stream(schedule_lib.Schedule(method, num_stages), 4):
      for call in it.calls:
        if call.stage == num_stages - 1:
          assert call.forward == call.update and call.phase == 'steady'


@pytest.mark.parametrize('method, num_stages', METHOD_STAGES)
def test_a_second_stream_after_a_drain_numbers_its_batches_on(method, num_stages):
  """After a full drain (and a few empty iterations) the pipeline may be fed again: the new
  stream's batches are numbered from the last stream's count, and its calls are the first
  stream's, shifted in iteration and batch; no call of the old stream comes back."""
  schedule = schedule_lib.Schedule(method, num_stages)
  first = stream(schedule, 3)   # ends with `extra` empty iterations
  start = first[-1].t + 1
  second = stream(schedule, 4, start=start, first_batch=3)
  alone = stream(schedule, 4)

  def shifted(calls):
    return [[(k, None if f is None else f + 3, None if u is None else u + 3) for k, f, u in it]
            for it in calls]

  assert table(second) == shifted(table(alone))
  assert [it.t for it in second] == [it.t + start for it in alone]
  _, updates, _ = when(second)
  assert {b for _, b in updates} == {3, 4, 5, 6}


@pytest.mark.parametrize('method, num_stages', METHOD_STAGES)
def test_the_module_s_delay_is_the_schedule_s(method, num_stages):
  for k in range(num_stages):
    assert schedule_lib.delay(k, num_stages, method) == expected_delay(method, num_stages, k)
    assert schedule_lib.delay(k, num_stages, method) == (
        schedule_lib.Schedule(method, num_stages).delay(k))


def test_an_unknown_method_is_refused():
  with pytest.raises(ValueError, match="method='gpipe' is not one of"):
    schedule_lib.Schedule('gpipe', 2)


def test_every_registered_method_runs_on_a_schedule_row():
  """The registry of methods (engine/methods.py) names rows of this table, and each method's
  object runs the row it names."""
  from fdg_jax.engine import methods   # pylint: disable=import-outside-toplevel
  from fdg_jax.models import aux_heads   # pylint: disable=import-outside-toplevel
  assert {info.schedule for info in methods.REGISTRY.values()} == (
      set(schedule_lib.METHODS) | {'gpipe', '1f1b'})
  for name, info in methods.REGISTRY.items():
    assert info.name == name and info.label
    method = info.create(2, num_classes=3, aux_head=aux_heads.get('conv'))
    assert method.name == info.schedule, name
  assert [name for name, info in methods.REGISTRY.items() if info.whole_model] == ['bp']
  with pytest.raises(ValueError, match="method='zero_bubble' is not one of"):
    methods.get('zero_bubble')
  with pytest.raises(ValueError, match='does not take microbatches'):
    methods.create('ddg', 2, microbatches=2)


# ------------------------------------------------------------------ microbatch programs

def test_1f1b_three_stages_four_microbatches_is_the_papers_figure():
  # PipeDream-flush / Megatron (Narayanan et al. 2021, Fig. 4 top, with K = 3, M = 4 and unit
  # forward and backward times): stage k forwards K - k microbatches before its first backward,
  # then alternates; the last stage alternates from the start; one update per stage at the end.
  assert schedule_lib.render(schedule_lib.ticks('1f1b', 3, 4, 1), 3) == '\n'.join([
      'stage 0: F0 F1 F2 .  .  B0 F3 B1 .  B2 .  B3',
      'stage 1: .  F0 F1 .  B0 F2 B1 F3 B2 .  B3 .',
      'stage 2: .  .  F0 B0 F1 B1 F2 B2 F3 B3 .  .',
  ])


def test_gpipe_three_stages_four_microbatches():
  assert [[' '.join(map(str, tick.get(k, ()))) for tick in schedule_lib.ticks('gpipe', 3, 4, 1)]
          for k in range(3)] == [
      ['F0', 'F1', 'F2', 'F3', '', '', '', '', 'B0', 'B1', 'B2', 'B3 U0'],
      ['', 'F0', 'F1', 'F2', 'F3', '', '', 'B0', 'B1', 'B2', 'B3 U0', ''],
      ['', '', 'F0', 'F1', 'F2', 'F3', 'B0', 'B1', 'B2', 'B3 U0', '', ''],
  ]


def test_fdg_with_two_microbatches_updates_only_between_batches():
  # K = 2, M = 2, three batches: stage 1 (the last) applies batch b at the start of batch b + 1;
  # stage 0 gets batch b's last cotangent while it forwards batch b + 1 and applies it at the
  # start of batch b + 2 (weights_lag 2 = 1 + ceil((D - 1) / M), D = 2).
  assert [[' '.join(map(str, tick.get(k, ()))) for tick in schedule_lib.ticks('fdg', 2, 2, 3)]
          for k in range(2)] == [
      ['F0', 'F1', 'B0 F2', 'B1 F3', 'B2 U0 F4', 'B3 F5', 'B4 U1', 'B5 U2'],
      ['', 'F0 B0', 'F1 B1', 'U0 F2 B2', 'F3 B3', 'U1 F4 B4', 'F5 B5 U2', ''],
  ]


@pytest.mark.parametrize('name', ['gpipe', '1f1b'])
@pytest.mark.parametrize('num_stages, microbatches', [(1, 1), (2, 1), (2, 4), (3, 4), (4, 8)])
def test_synchronous_schedules_flush_with_the_known_bubble(name, num_stages, microbatches):
  K, M = num_stages, microbatches
  table = schedule_lib.ticks(name, K, M, 2)
  assert len(table) == 2 * 2 * (M + K - 1)          # two batches, each a full flush
  for k in range(K):
    busy = sum(any(a.kind in 'FB' for a in tick.get(k, ())) for tick in table)
    assert busy == 2 * 2 * M                           # idle share (K-1) / (M+K-1)
    assert 1 - busy / len(table) == pytest.approx((K - 1) / (M + K - 1))
    updates = [t for t, tick in enumerate(table) for a in tick.get(k, ()) if a.kind == 'U']
    assert len(updates) == 2 and updates[0] < len(table) // 2   # one per batch, in its flush


@pytest.mark.parametrize('num_stages, microbatches', [(2, 4), (3, 4), (4, 8), (4, 3)])
def test_1f1b_keeps_at_most_k_minus_k_microbatches_and_gpipe_m(num_stages, microbatches):
  K, M = num_stages, microbatches
  for name, bound in (('1f1b', lambda k: min(K - k, M)), ('gpipe', lambda k: M)):
    for k in range(K):
      in_flight, most = set(), 0
      for tick in schedule_lib.ticks(name, K, M, 2):
        for action in tick.get(k, ()):
          if action.kind == 'F':
            in_flight.add(action.index)
          elif action.kind == 'B':
            in_flight.remove(action.index)
          most = max(most, len(in_flight))
      assert most == bound(k), (name, k)


@pytest.mark.parametrize('name', [p for p in schedule_lib.PROGRAMS if p != 'dgl'])
@pytest.mark.parametrize('num_stages', [1, 2, 3, 4])
@pytest.mark.parametrize('microbatches', [1, 2, 3, 8])
def test_every_program_is_complete_and_ordered(name, num_stages, microbatches):
  """Every microbatch is forwarded and back-propagated once per stage, F before B, every
  batch applied once after its M backwards, in batch order; the ticks respect the transfers."""
  K, M, N = num_stages, microbatches, 3
  table = schedule_lib.ticks(name, K, M, N)
  tick_of = {}
  for t, tick in enumerate(table):
    for k, actions in tick.items():
      for action in actions:
        assert (action.kind, k, action.index) not in tick_of
        tick_of[action.kind, k, action.index] = t
  for k in range(K):
    assert [a for a in schedule_lib.program(name, k, K, M, N) if a.kind == 'U'] == [
        schedule_lib.Action('U', b) for b in range(N)]
    for i in range(N * M):
      assert tick_of['F', k, i] <= tick_of['B', k, i]
      assert tick_of['B', k, i] <= tick_of['U', k, i // M]
      if k > 0:
        assert tick_of['F', k - 1, i] < tick_of['F', k, i]      # sent, used a tick later
      if k < K - 1:
        assert tick_of['B', k + 1, i] < tick_of['B', k, i]


@pytest.mark.parametrize('num_stages', [1, 2, 3, 4])
@pytest.mark.parametrize('microbatches', [1, 2, 3, 4, 6, 8])
def test_fdg_with_microbatches_delays_by_weights_lag(num_stages, microbatches):
  """In each stage's program, batch b's update comes just before the first forward of batch
  b + weights_lag (or in the drain); every microbatch of a batch forwards with one set of
  weights; M = 1 is FDG (lag 2(K-1-k)), M >= 2(K-1) - 1 leaves one update stale
  (PipeDream-2BW)."""
  K, M, N = num_stages, microbatches, 12
  for k in range(K):
    lag = schedule_lib.weights_lag(k, K, M)
    if M == 1:
      assert lag == max(1, 2 * (K - 1 - k))
    if M >= 2 * (K - 1) - 1:
      assert lag == (1 if k == K - 1 else 2)   # one update stale, whatever K
    applied = 0
    for action in schedule_lib.program('fdg', k, K, M, N):
      if action.kind == 'U':
        applied += 1
      elif action.kind == 'F':
        batch, m = divmod(action.index, M)
        assert applied == max(0, batch - lag + 1), (k, action)   # batches 0 .. batch - lag
    assert applied == N


def test_simulate_is_the_cost_model_of_a_program():
  """Measured times in, each action's start and end out: the last stage's forward waits for the
  activation (plus the latency), and a 1F1B step takes (M + K - 1) (F + B) with equal stages."""
  K, M, f, b = 2, 4, 1.0, 2.0
  programs = [schedule_lib.program('1f1b', k, K, M, 1) for k in range(K)]
  timed = schedule_lib.simulate(programs, f, b)
  assert max(end for stage in timed for _, _, end in stage) == (M + K - 1) * (f + b)
  delayed = schedule_lib.simulate(programs, f, b, latency=0.5)
  first_forward_of_last = next(start for a, start, _ in delayed[1] if a.kind == 'F')
  assert first_forward_of_last == f + 0.5
  with pytest.raises(ValueError, match='deadlock'):
    schedule_lib.simulate([[schedule_lib.Action('B', 0)], [schedule_lib.Action('F', 0)]], 1, 1)


@pytest.mark.parametrize('num_stages', [1, 2, 3, 4])
def test_fdg_program_with_one_microbatch_is_fdgs_schedule(num_stages):
  """M = 1: each stage forwards and back-propagates batch b at the iterations FDG's schedule
  forwards and updates it, and applies it before its next forward."""
  K, N = num_stages, 5
  forwards, updates, _ = when(stream(schedule_lib.Schedule('fdg', K), N, extra=0))
  table = schedule_lib.ticks('fdg', K, 1, N)
  for t, tick in enumerate(table):
    for k, actions in tick.items():
      for action in actions:
        if action.kind == 'F':
          assert forwards[k, action.index] == t
        elif action.kind == 'B':
          assert updates[k, action.index] == t
  for k in range(K):
    kinds = [a.kind for a in schedule_lib.program('fdg', k, K, 1, N)]
    assert ''.join(kinds) == ('FBU' * N if k == K - 1 else 'F' * min(N, 2 * (K - 1 - k))
                              + 'BUF' * max(0, N - 2 * (K - 1 - k))
                              + 'BU' * min(N, 2 * (K - 1 - k)))


@pytest.mark.parametrize('num_stages', [1, 2, 3, 4])
def test_dgl_program_is_dgls_schedule(num_stages):
  """DGL's program (the cost model's): stage k forwards and updates batch b in tick b + k, where
  `Schedule('dgl')` forwards and updates it; no backward waits for a cotangent; no microbatches."""
  K, N = num_stages, 5
  forwards, updates, _ = when(stream(schedule_lib.Schedule('dgl', K), N, extra=0))
  table = schedule_lib.ticks('dgl', K, 1, N)
  placed = {(a.kind, k, a.index): t for t, tick in enumerate(table) for k, actions in tick.items()
            for a in actions}
  assert placed == {**{('F', k, b): t for (k, b), t in forwards.items()},
                    **{('U', k, b): t for (k, b), t in updates.items()}}
  assert schedule_lib.render(schedule_lib.ticks('dgl', 3, 1, 2), 3) == '\n'.join([
      'stage 0: F0 F1 .  .',
      'stage 1: .  F0 F1 .',
      'stage 2: .  .  F0 F1',
  ])
  with pytest.raises(ValueError, match='DGL has no microbatch schedule'):
    schedule_lib.program('dgl', 0, K, 2, N)
