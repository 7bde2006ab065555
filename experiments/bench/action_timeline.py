"""When each stage's actions ran in a pipeline over microbatches: GPipe, 1F1B, FDG with M > 1.

`fdg_jax.engine.timeline` ties a trace to FDG's one call per stage and iteration; a method over
microbatches makes many calls per batch (a forward and a backward per microbatch, the last
stage's fused forward, loss and backward, the update: `Pipeline._act`), of several jitted
functions (`pipe.method.function_names()`). Here each execution in the profiler's trace is one
group of op events with the same (device, XLA module `jit_NAME`, run_id), as timeline.py
explains; a stage's busy time is the union of its executions' spans, which needs no labels.
The labels (which action: F3, B3, U0) come from the actions the executor took, in order
(`Pipeline._act` wrapped on the instance while recording, as experiments/probes/transfers.py
wraps `_transfer`): the calls of one compiled function have consecutive run_ids, so the n-th
execution of a run is its n-th call. The backward and the last stage's loss compile twice (the
first microbatch of a batch has no gradient sum yet), and so does FDG's forward (the first
microbatch of a batch returns the parameters its batch keeps); the runs are told apart by
their lengths, then by the order of their first calls. Where that does not fit, events keep
their kind only.

`draw_side_by_side` draws several recordings one above the other on one time scale (1F1B and FDG
at the same M, for the speed-up benchmark).
"""

import dataclasses
import glob
import gzip
import json
import os
import time
from typing import Optional, Sequence

import jax

from fdg_jax.engine import distributed
from fdg_jax.engine import timeline

# The method's function keys (methods.Microbatched.compile) as actions.
KIND_OF_KEY = {'forward': 'F', 'backward': 'B', 'loss': 'FB', 'norm': 'U', 'update': 'U'}


@dataclasses.dataclass(frozen=True)
class ActionEvent:
  """One execution of a stage's jitted function, ms from the first recorded op (all processes
  on one clock). `index`: the microbatch of F, B, FB (the last stage's fused forward, loss and
  backward), the batch of U; None where the execution could not be tied to an action."""
  stage: int
  kind: str
  index: Optional[int]
  batch: Optional[int]
  start_ms: float
  end_ms: float

  @property
  def label(self) -> str:
    return self.kind + ('' if self.index is None else str(self.index))


class ActionRecorder:
  """Records the device work of the `Pipeline.step`s made between `start` and `stop` (every
  process of a multi-process run calls both). Compile first: the trace holds what runs."""

  def __init__(self, pipe, out_dir: str):
    self.pipe = pipe
    self.out_dir = out_dir
    if pipe.num_processes > 1:   # each process profiles its own devices, into its own folder
      self.out_dir = os.path.join(out_dir, f'process_{jax.process_index()}')
    self.actions: list[tuple[int, object]] = []   # (stage, schedule.Action), local stages only
    self._clock_start = 0.0
    self._before: set[str] = set()
    self._shadowed = None

  def start(self, state) -> None:
    jax.block_until_ready(state.stages)
    self._before = set(glob.glob(os.path.join(self.out_dir, 'plugins', 'profile', '*')))
    self.actions = []
    # An instance attribute shadows the class's method: restored as it was by stop().
    self._shadowed = self.pipe.__dict__.get('_act')
    act = self.pipe._act  # pylint: disable=protected-access

    def recorded_act(flight, k, action, *rest):
      if self.pipe.is_local[k]:
        self.actions.append((k, action))
      return act(flight, k, action, *rest)

    self.pipe._act = recorded_act  # pylint: disable=protected-access
    if self.pipe.num_processes > 1:
      distributed.all_processes([0])   # every process starts tracing at once
    self._clock_start = time.time()
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0   # it would slow the host loop being recorded
    jax.profiler.start_trace(self.out_dir, create_perfetto_trace=True,
                             profiler_options=options)

  def stop(self, state) -> list[ActionEvent]:
    """Waits for the recorded work, stops tracing; every process gets every stage's events."""
    try:
      jax.block_until_ready(state.stages)
    finally:
      jax.profiler.stop_trace()
      if self._shadowed is None:
        del self.pipe._act  # pylint: disable=protected-access
      else:
        self.pipe._act = self._shadowed  # pylint: disable=protected-access
    try:
      local, error = self._local_events(), None
    except Exception as e:  # pylint: disable=broad-except  (every process must reach the gather)
      local, error = [], f'{type(e).__name__}: {e}'
    shared = ([{'clock_start': self._clock_start, 'error': error,
                'events': [dataclasses.asdict(e) for e in local]}]
              if self.pipe.num_processes == 1 else distributed.all_processes_json(
                  {'clock_start': self._clock_start, 'error': error,
                   'events': [dataclasses.asdict(e) for e in local]}))
    errors = [f'process {i}: {s["error"]}' for i, s in enumerate(shared) if s['error']]
    if errors:
      raise RuntimeError('; '.join(errors))
    first = min(s['clock_start'] for s in shared)
    events = [dataclasses.replace(ActionEvent(**e), start_ms=e['start_ms'] + shift,
                                  end_ms=e['end_ms'] + shift)
              for s in shared for e in s['events']
              for shift in [1e3 * (s['clock_start'] - first)]]
    origin = min((e.start_ms for e in events), default=0.0)
    return sorted((dataclasses.replace(e, start_ms=e.start_ms - origin, end_ms=e.end_ms - origin)
                   for e in events), key=lambda e: (e.start_ms, e.stage))

  def _local_events(self) -> list[ActionEvent]:
    runs = sorted(set(glob.glob(os.path.join(self.out_dir, 'plugins', 'profile', '*')))
                  - self._before)
    traces = glob.glob(os.path.join(runs[-1], '*.trace.json.gz')) if runs else []
    if not traces:
      raise RuntimeError(f'The profiler wrote no trace under {self.out_dir}/plugins/profile.')
    with gzip.open(traces[0], 'rt') as f:
      trace = json.load(f)
    local = [k for k in range(self.pipe.num_stages) if self.pipe.is_local[k]]
    devices = {k: tuple(sorted(d.id for d in self.pipe.shardings[k].device_set)) for k in local}
    return events_from_trace(trace, self.actions, self.pipe.method, self.pipe.num_stages,
                             devices)


def expected_calls(actions: Sequence[tuple[int, object]], method, num_stages: int
                   ) -> dict[tuple[int, str], dict[str, list[tuple[int, object]]]]:
  """The jitted calls the executor made for `actions` (in order): (stage, function name) ->
  {variant: [(call number, action)]}; variant 'first' for a backward or loss without a gradient
  sum yet (the first microbatch of its batch: every program runs a batch's B in order), and for
  the forward of a batch's first microbatch where it returns the parameters its batch keeps
  (`method.keeps_inputs`)."""
  calls: dict[tuple[int, str], dict[str, list[tuple[int, object]]]] = {}
  last = num_stages - 1
  for number, (k, action) in enumerate(actions):
    functions = method.functions[k]
    if action.kind == 'F':
      keys = ['loss' if k == last else 'forward']
    elif action.kind == 'B':
      keys = [] if k == last else ['backward']   # the last stage's B only sends what F made
    else:   # with clipping, the squared norm at U and the update after the batch's flush
      keys = ['norm', 'update'] if method.grad_clip > 0 else ['update']
    for key in keys:
      first = action.index % method.microbatches == 0 and (
          key in ('backward', 'loss') or key == 'forward' and method.keeps_inputs(k))
      calls.setdefault((k, functions[key].__name__), {}).setdefault(
          'first' if first else 'rest', []).append((number, action))
  return calls


def events_from_trace(trace, actions, method, num_stages: int,
                      devices: dict[int, tuple[int, ...]]) -> list[ActionEvent]:
  """One ActionEvent per execution of the method's jitted functions on the stages in `devices`
  (stage -> its device ids; with one local stage, every device of the trace is its), in ms of
  the trace's clock; labelled from `actions` where they fit (module doc)."""
  kinds = {}   # function name -> kind, per stage
  for k in devices:
    for key, function in method.functions[k].items():
      kinds[(k, function.__name__)] = KIND_OF_KEY[key]
  modules = {f'jit_{name}': name for _, name in kinds}
  executions: dict[tuple[int, str, int], list[float]] = {}   # (stage, name, run_id) -> span µs
  for e in trace['traceEvents'] if isinstance(trace, dict) else trace:
    args = e.get('args', {})
    if e.get('ph') != 'X' or args.get('hlo_module') not in modules or 'run_id' not in args:
      continue
    device = int(args.get('device_ordinal', -1))
    stage = (next(iter(devices)) if len(devices) == 1 else
             next((k for k, ids in devices.items() if device in ids), None))
    if stage is None:
      continue
    start, end = float(e['ts']), float(e['ts']) + float(e.get('dur', 0.0))
    key = (stage, modules[args['hlo_module']], int(args['run_id']) & 0xFFFFFFFF)
    span = executions.setdefault(key, [start, end])
    span[0], span[1] = min(span[0], start), max(span[1], end)

  labels = {}   # execution key -> action
  for (k, name), variants in expected_calls(actions, method, num_stages).items():
    run_ids = sorted(r for s, n, r in executions if (s, n) == (k, name))
    runs = timeline.consecutive_runs(run_ids)
    groups = list(variants.values())
    if sorted(map(len, runs)) != sorted(map(len, groups)):
      continue   # not what the executor called: leave these unlabelled
    runs.sort(key=lambda r: (len(r), executions[(k, name, r[0])][0]))
    groups.sort(key=lambda g: (len(g), g[0][0]))
    for run, group in zip(runs, groups):
      for run_id, (_, action) in zip(run, group):
        labels[(k, name, run_id)] = action

  events = []
  for key, (start, end) in executions.items():
    k, name, _ = key
    action = labels.get(key)
    index = None if action is None else action.index
    kind = kinds[(k, name)]
    batch = (None if index is None else index if kind == 'U'
             else index // method.microbatches)
    events.append(ActionEvent(stage=k, kind=kind, index=index, batch=batch,
                              start_ms=start / 1e3, end_ms=end / 1e3))
  return sorted(events, key=lambda e: (e.start_ms, e.stage))


def busy_ms(events: Sequence[ActionEvent], stage: int) -> float:
  """How long stage `stage` had device work running (overlapping executions counted once)."""
  total, end = 0.0, float('-inf')
  for e in sorted((e for e in events if e.stage == stage), key=lambda e: e.start_ms):
    if e.end_ms > end:
      total += e.end_ms - max(e.start_ms, end)
      end = e.end_ms
  return total


def span_ms(events: Sequence[ActionEvent]) -> float:
  return max(e.end_ms for e in events) - min(e.start_ms for e in events) if events else 0.0


def draw_side_by_side(panels: Sequence[tuple[str, Sequence[ActionEvent]]], png_path: str,
                      title: str = '') -> None:
  """One panel per (name, events), one above the other on one time scale, a row per stage;
  colour = batch, hatched = backward, F+B = the last stage's fused forward, loss and backward."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  stages = sorted({e.stage for _, events in panels for e in events})
  fig, axes = plt.subplots(len(panels), 1, sharex=True, squeeze=False,
                           figsize=(14, 0.8 + (0.55 * len(stages) + 0.5) * len(panels)))
  colours = plt.get_cmap('tab10')
  for ax, (name, events) in zip(axes[:, 0], panels):
    origin = min((e.start_ms for e in events), default=0.0)
    for e in events:
      row = stages.index(e.stage)
      colour = 'black' if e.kind == 'U' else (
          colours(e.batch % colours.N) if e.batch is not None else 'grey')
      ax.barh(row, e.end_ms - e.start_ms, left=e.start_ms - origin, height=0.6, color=colour,
              edgecolor='black', linewidth=0.4, hatch='//' if e.kind == 'B' else None)
      if e.kind != 'U':
        ax.text((e.start_ms + e.end_ms) / 2 - origin, row, e.label, ha='center', va='center',
                fontsize=5, clip_on=True)
    ax.set_yticks(range(len(stages)), [f'stage {k}' for k in stages])
    ax.invert_yaxis()
    ax.set_ylabel(name, rotation=0, ha='right', va='center')
  axes[-1, 0].set_xlabel('time (ms) from each recording\'s first action')
  fig.suptitle(title or 'Stage actions (colour: batch; hatched: backward; black: update)',
               fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
  fig.savefig(png_path, dpi=120)
  plt.close(fig)
