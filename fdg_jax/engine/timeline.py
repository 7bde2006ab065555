"""When each stage's device work ran: a profiler-based timeline of the FDG pipeline.

Whether the stages' device work overlaps is something to check in a profile, not to assume.
`record_timeline` steps a pipeline under `jax.profiler.trace` and reads the Chrome-format trace
(`*.trace.json.gz`) back; `draw_timeline` draws it as a Gantt chart, one row per stage.

How a trace event is tied to a stage call. The stage functions of a pipeline share one name
(`update_then_forward` for FDG, DDG and BP, `train_then_send` for DGL: the engine's
`stage_function_names()`), so the XLA module name (`jit_update_then_forward`) picks out the stage
calls but is the same for all stages and phases and cannot tell them apart. What does:

* every op event of an execution carries `run_id`, the launch id JAX gives each call of a
  compiled function: it starts at a per-executable value (derived from the executable's
  fingerprint) and grows by one per call. The op events of one call therefore share
  (device, run_id), and the calls of one executable have consecutive run_ids;
* the device (`device_ordinal` on CPU, or the device's track) tells stages on different
  devices apart.

So one stage call is one group of op events with the same (device, run_id); its start is the
first op's start and its end is the last op's end (device work only: neither the host's
dispatch nor waiting for inputs is included). The calls of one executable are the groups whose
run_ids are consecutive, in call order. When each executable is alone on its devices (the normal
case: stage k on device k, one phase in the window), that is unambiguous. When several share a
device (all stages on device 0), their run_id runs are told apart by their number of calls and,
where those are equal, by the order of their first execution, which follows the dispatch order
because `record_timeline` waits for all earlier work before tracing (the first calls have their
inputs ready and start in the order they were queued). A mismatch between the calls made and the
executions found raises an error rather than mislabel a bar.

On CPU, simulated devices (`--xla_force_host_platform_device_count`) are not separate
hardware: every device's programs run on one shared pool of threads (and the machine's cores),
so bars may overlap in time while still competing for the same cores.
"""

import dataclasses
import glob
import gzip
import json
import os
import time
from typing import Any, Iterable, Optional, Sequence

import jax

from fdg_jax.engine import distributed
from fdg_jax.engine import pipeline as pipeline_lib
from fdg_jax.engine import schedule as schedule_lib



@dataclasses.dataclass(frozen=True)
class StageEvent:
  """One call of one stage's jitted function, times in ms from the first recorded device op.

  `start_ms`/`end_ms`: first and last XLA op of the call on its device(s).
  `dispatch_start_ms`/`dispatch_end_ms`: the host's call of the jitted function (None if the
  trace has no host events).
  """
  stage: int
  iteration: int
  phase: str                 # 'fill', 'steady' or 'drain' (the last stage: always 'steady');
                             # over microbatches, the function ('forward', 'backward', ...)
  batch: Optional[int]       # the batch forwarded, or for a drain call the batch updated
  devices: tuple[int, ...]
  start_ms: float
  end_ms: float
  dispatch_start_ms: Optional[float] = None
  dispatch_end_ms: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class _Call:
  """A stage call as the host made it, in dispatch order."""
  stage: int
  iteration: int
  phase: str
  batch: Optional[int]


def _calls_of(info: pipeline_lib.StepInfo, num_stages: int) -> list[_Call]:
  """The stage calls one `Pipeline.step` made, in the order it made them, with the phase the
  engine's schedule gives each (a method over microbatches: its function, e.g. 'forward')."""
  if info.calls:   # each of its stage functions is an executable of its own
    return [_Call(k, info.iteration, function, batch) for k, function, batch in info.calls]
  calls = []
  for k in range(num_stages):
    call = schedule_lib.StageCall(k, info.forwarded[k], info.updated[k])
    if call.forward is None and call.update is None:
      continue
    calls.append(_Call(k, info.iteration, call.phase,
                       call.forward if call.forward is not None else call.update))
  return calls


def _device_ids(sharding: jax.sharding.Sharding) -> tuple[int, ...]:
  return tuple(sorted(d.id for d in sharding.device_set))


class TimelineRecorder:
  """Records the stage calls of the `Pipeline.step`s made between `start` and `stop`.

  The steps themselves are the caller's ordinary steps (the trainer keeps logging, evaluating
  and checkpointing as usual); only `add(info)` must be called with each step's StepInfo.
  The trace (viewable in TensorBoard or ui.perfetto.dev) stays under `out_dir`. Earlier work is
  waited for before the trace starts, so only these calls are in it; compile first (run the
  pipeline through its fill) or compilation will sit inside the first bars' dispatch.
  By default the Python tracer is off: it would slow the very host loop being recorded.
  """

  def __init__(self, pipe: pipeline_lib.Pipeline, out_dir: str,
               profiler_options: Optional[jax.profiler.ProfileOptions] = None):
    self.pipe = pipe
    self.out_dir = out_dir
    if pipe.num_processes > 1:   # each process profiles its own devices, into its own folder
      self.out_dir = os.path.join(out_dir, f'process_{jax.process_index()}')
    self._clock_start = 0.0
    if profiler_options is None:
      profiler_options = jax.profiler.ProfileOptions()
      profiler_options.python_tracer_level = 0
    self.profiler_options = profiler_options
    self._calls: list[_Call] = []
    self._before: set[str] = set()

  def start(self, state: pipeline_lib.PipelineState) -> None:
    jax.block_until_ready(state)
    self._before = set(glob.glob(os.path.join(self.out_dir, 'plugins', 'profile', '*')))
    self._calls = []
    if self.pipe.num_processes > 1:
      distributed.all_processes([0])   # every process starts tracing at once
    self._clock_start = time.time()    # the trace's time 0, on this host's clock
    jax.profiler.start_trace(self.out_dir, create_perfetto_trace=True,
                             profiler_options=self.profiler_options)

  def add(self, info: pipeline_lib.StepInfo) -> None:
    self._calls.extend(call for call in _calls_of(info, self.pipe.num_stages)
                       if self.pipe.is_local[call.stage])

  def stop(self, state: pipeline_lib.PipelineState) -> list[StageEvent]:
    """Waits for the recorded work (inside the trace), stops it, returns one event per call.

    In a multi-process run every process must call it: each reads its own trace, and every
    process gets the events of all, on one clock (each host's wall clock at the moment all
    started tracing together, so a few ms apart at most on one host).
    """
    if self.pipe.num_processes == 1:
      return self._local_events(state)
    try:
      local, error = self._local_events(state), None
    except Exception as e:  # pylint: disable=broad-except  (every process must reach the gather)
      local, error = [], f'{type(e).__name__}: {e}'
    shared = distributed.all_processes_json(
        {'clock_start': self._clock_start, 'error': error,
         'events': [dataclasses.asdict(e) for e in local]})
    errors = [f'process {i}: {s["error"]}' for i, s in enumerate(shared) if s['error']]
    if errors:
      raise RuntimeError('; '.join(errors))
    # On the earliest process's clock, from the first call's device work; the host dispatches
    # (one row per host) are left out.
    first = min(s['clock_start'] for s in shared)
    events = [StageEvent(**{**e, 'devices': tuple(e['devices']), 'dispatch_start_ms': None,
                            'dispatch_end_ms': None})
              for s in shared for e in s['events']]
    shifts = [1e3 * (s['clock_start'] - first) for s in shared for _ in s['events']]
    origin = min((e.start_ms + shift for e, shift in zip(events, shifts)), default=0.0)
    return sorted((dataclasses.replace(e, start_ms=e.start_ms + shift - origin,
                                       end_ms=e.end_ms + shift - origin)
                   for e, shift in zip(events, shifts)), key=lambda e: (e.start_ms, e.stage))

  def _local_events(self, state: pipeline_lib.PipelineState) -> list[StageEvent]:
    """This process's stage calls, in ms of its trace (from the first call's device work, or
    in a multi-process run from the start of tracing)."""
    try:
      jax.block_until_ready(state)
    finally:
      jax.profiler.stop_trace()
    runs = sorted(set(glob.glob(os.path.join(self.out_dir, 'plugins', 'profile', '*')))
                  - self._before)
    traces = glob.glob(os.path.join(runs[-1], '*.trace.json.gz')) if runs else []
    if not traces:
      raise RuntimeError(
          f'The profiler wrote no *.trace.json.gz under {self.out_dir}/plugins/profile.')
    with gzip.open(traces[0], 'rt') as f:
      trace = json.load(f)
    devices = [_device_ids(s) for s in self.pipe.shardings]   # the trace's device_ordinals
    return events_from_trace(trace, self._calls, devices, self.pipe.stage_function_names(),
                             origin_us=0.0 if self.pipe.num_processes > 1 else None)


def record_timeline(pipe: pipeline_lib.Pipeline, state: pipeline_lib.PipelineState,
                    batches: Iterable[Optional[tuple[Any, Any]]], out_dir: str,
                    profiler_options: Optional[jax.profiler.ProfileOptions] = None
                    ) -> tuple[pipeline_lib.PipelineState, list[StageEvent]]:
  """Steps `pipe` over `batches` ((images, labels), or None for a step without a new batch)
  under the profiler, and returns the new state and one StageEvent per stage call."""
  recorder = TimelineRecorder(pipe, out_dir, profiler_options)
  recorder.start(state)
  for batch in batches:
    images, labels = batch if batch is not None else (None, None)
    state, info = pipe.step(state, images, labels)
    recorder.add(info)
  return state, recorder.stop(state)


def _device_of(event: dict, process_names: dict) -> Optional[int]:
  """The device an op event ran on: its `device_ordinal` (CPU), else its track's device id."""
  args = event.get('args', {})
  if 'device_ordinal' in args:
    return int(args['device_ordinal'])
  name = process_names.get(event.get('pid'), '')   # e.g. '/device:GPU:1'
  if name.startswith('/device:') and name.rsplit(':', 1)[-1].isdigit():
    return int(name.rsplit(':', 1)[-1])
  return None


def _outermost(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
  """Drops spans nested inside an earlier one (the host event is recorded at two levels)."""
  kept = []
  for start, end in sorted(spans):
    if kept and start >= kept[-1][0] and end <= kept[-1][1]:
      continue
    kept.append((start, end))
  return kept


def events_from_trace(trace: dict, calls: Sequence[_Call],
                      stage_devices: Sequence[tuple[int, ...]],
                      function_names: Iterable[str] = ('update_then_forward',),
                      origin_us: Optional[float] = None) -> list[StageEvent]:
  """Ties the trace's executions of the stage functions (jitted functions named one of
  `function_names`) to the host's calls (see module doc). Times are in ms from `origin_us` of
  the trace's clock (default: the first matched device op)."""
  module_names = {f'jit_{name}' for name in function_names}
  dispatch_names = {f'PjitFunction({name})' for name in function_names}
  trace_events = trace['traceEvents'] if isinstance(trace, dict) else trace
  process_names = {e['pid']: e['args']['name'] for e in trace_events
                   if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  # (device, run_id) -> [start, end] of that call's device work, in µs.
  executions: dict[tuple[int, int], list[float]] = {}
  host_spans = []
  for e in trace_events:
    if e.get('ph') != 'X':
      continue
    start, end = float(e['ts']), float(e['ts']) + float(e.get('dur', 0.0))
    args = e.get('args', {})
    if e.get('name') in dispatch_names:
      host_spans.append((start, end))
      continue
    if args.get('hlo_module') not in module_names or 'run_id' not in args:
      continue
    device = _device_of(e, process_names)
    if device is None:
      continue
    run_id = int(args['run_id']) & 0xFFFFFFFF   # printed signed; consecutive modulo 2**32
    span = executions.setdefault((device, run_id), [start, end])
    span[0], span[1] = min(span[0], start), max(span[1], end)

  # Calls of one stage on several devices (a sharded stage) run once per device under one
  # run_id: merge them into one span per device group.
  groups = sorted(set(stage_devices))
  spans_by_group: dict[tuple[int, ...], dict[int, list[float]]] = {g: {} for g in groups}
  for (device, run_id), (start, end) in executions.items():
    for group in groups:
      if device in group:
        span = spans_by_group[group].setdefault(run_id, [start, end])
        span[0], span[1] = min(span[0], start), max(span[1], end)

  # Which executable (stage, phase) each call used, per device group, in call order.
  expected: dict[tuple[int, ...], dict[tuple[int, str], list[int]]] = {g: {} for g in groups}
  for index, call in enumerate(calls):
    expected[stage_devices[call.stage]].setdefault((call.stage, call.phase), []).append(index)

  matched: dict[int, tuple[float, float]] = {}
  for group in groups:
    runs = consecutive_runs(sorted(spans_by_group[group]))
    executables = list(expected[group].items())
    counts = sorted(len(v) for _, v in executables)
    if sorted(len(r) for r in runs) != counts:
      raise RuntimeError(
          f'Devices {group}: the host made calls {[(k, len(v)) for k, v in executables]} '
          f'(stage, phase) but the trace holds runs of {sorted(len(r) for r in runs)} '
          'executions. The trace is incomplete or another `update_then_forward` ran meanwhile.')
    # Equal counts: the first execution of each run follows the dispatch order (module doc).
    runs.sort(key=lambda r: (len(r), spans_by_group[group][r[0]][0]))
    executables.sort(key=lambda item: (len(item[1]), item[1][0]))
    for run_ids, (_, call_indices) in zip(runs, executables):
      for run_id, index in zip(run_ids, call_indices):
        matched[index] = tuple(spans_by_group[group][run_id])

  host_spans = _outermost(host_spans)
  if len(host_spans) != len(calls):   # host events are optional; only use them if they fit
    host_spans = [None] * len(calls)
  origin = (min((s for s, _ in matched.values()), default=0.0) if origin_us is None
            else origin_us)
  to_ms = lambda t: None if t is None else (t - origin) / 1e3
  events = []
  for index, call in enumerate(calls):
    start, end = matched[index]
    host = host_spans[index] or (None, None)
    events.append(StageEvent(
        stage=call.stage, iteration=call.iteration, phase=call.phase, batch=call.batch,
        devices=stage_devices[call.stage], start_ms=to_ms(start), end_ms=to_ms(end),
        dispatch_start_ms=to_ms(host[0]), dispatch_end_ms=to_ms(host[1])))
  return events


def consecutive_runs(run_ids: Sequence[int]) -> list[list[int]]:
  """Sorted run_ids split into runs of consecutive integers (one run per executable)."""
  runs: list[list[int]] = []
  for run_id in run_ids:
    if runs and run_id == runs[-1][-1] + 1:
      runs[-1].append(run_id)
    else:
      runs.append([run_id])
  return runs


def overlap_ms(events: Sequence[StageEvent]) -> float:
  """Total time during which at least two stages had device work running."""
  edges = sorted([(e.start_ms, 1) for e in events] + [(e.end_ms, -1) for e in events],
                 key=lambda edge: (edge[0], edge[1]))
  busy, total, last = 0, 0.0, None
  for time, change in edges:
    if busy >= 2:
      total += time - last
    busy, last = busy + change, time
  return total


def summarize(events: Sequence[StageEvent]) -> dict[str, float]:
  """Span, summed stage-busy time, time with >= 2 stages busy, and their ratios."""
  span = max(e.end_ms for e in events) - min(e.start_ms for e in events)
  busy = sum(e.end_ms - e.start_ms for e in events)
  overlap = overlap_ms(events)
  return {'span_ms': span, 'busy_ms': busy, 'overlap_ms': overlap,
          'overlap_fraction': overlap / span if span else 0.0,
          'parallelism': busy / span if span else 0.0}


def draw_timeline(events: Sequence[StageEvent], png_path: str, title: str = '') -> None:
  """Gantt chart: one row per stage (stage 0 on top) plus the host's dispatches; colour = batch."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  stages = sorted({e.stage for e in events})
  has_host = all(e.dispatch_start_ms is not None for e in events)
  rows = len(stages) + has_host
  batches = sorted({e.batch for e in events if e.batch is not None})
  colours = plt.get_cmap('tab10' if len(batches) <= 10 else 'tab20')
  colour_of = {b: colours(i % colours.N) for i, b in enumerate(batches)}
  fig, ax = plt.subplots(figsize=(12, 1.0 + 0.7 * rows))
  for e in events:
    row = stages.index(e.stage)
    colour = colour_of.get(e.batch, 'grey')
    ax.barh(row, e.end_ms - e.start_ms, left=e.start_ms, height=0.6, color=colour,
            edgecolor='black', linewidth=0.5, hatch='//' if e.phase in ('fill', 'drain') else None)
    ax.text((e.start_ms + e.end_ms) / 2, row, str(e.batch), ha='center', va='center',
            fontsize=7, clip_on=True)
    if has_host:
      ax.barh(rows - 1, e.dispatch_end_ms - e.dispatch_start_ms, left=e.dispatch_start_ms,
              height=0.6, color=colour, edgecolor='black', linewidth=0.3)
  devices = {e.stage: ','.join(map(str, e.devices)) for e in events}
  labels = [f'stage {k} (device {devices[k]})' for k in stages]
  labels += ['host dispatch'] if has_host else []
  ax.set_yticks(range(rows), labels)
  ax.invert_yaxis()
  ax.set_xlabel('time (ms)')
  ax.set_title(title or 'FDG stage calls (colour and label: batch forwarded; hatched: fill/drain)')
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
  fig.savefig(png_path, dpi=120)
  plt.close(fig)
