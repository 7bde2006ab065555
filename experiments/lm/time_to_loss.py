r"""Time to a target loss (issue 38 item 5): which schedule reaches BP's loss soonest, per K.

A user chooses a schedule by the wall-clock time it takes to reach a loss, which weighs FDG's
missing bubble against its staleness and 1F1B's exactness against its bubble. Two sources:

* Predicted, any K: a grid's learning curves (validation loss against step, mean over seeds,
  from the runs' `summary.json`; e.g. experiments/lm/depth_grid.py's) times each schedule's time
  per batch from the cost model (`experiments.bench.schedule_cost --output=COSTS.json`, its
  `tables`: K equal stages of measured stage times, on K devices), timed with the optimizer of
  the run's BP reference (`cost_key`: Muon's and rotated Adam's updates cost more than AdamW's;
  basis_rotation, rotated on all stages but the last, is priced as rotated on all). 1F1B and GPipe compute BP's
  update (tests/test_microbatches.py), so they follow BP's curve at their own time per batch;
  BP runs on one device: the model's whole work per batch. DGL is priced by its program (no
  cotangent to wait for; every non-last stage pays its auxiliary head); DDG has none in the
  cost model and is left out.
* Measured: runs whose history has `train_s` (each evaluation's seconds so far without the
  evaluations, fdg_jax/trainer/train.py), e.g. K = 2 in two pinned processes, given as
  `--measured=LABEL=WORKDIR,...`: their own clock.

The target is BP's final validation loss (mean over its seeds, BP with the same optimizer:
`reference_optimizer`), and that plus `--margin`; with `--common_target`, also one loss for
every optimizer (which optimizer and schedule reaches it soonest). A curve reaches a target
between two evaluations by linear interpolation; a schedule that never does says so. Writes
OUT_DIR/time_to_loss.md (one table per K: seconds per batch, steps and seconds to each target,
each against the fastest 1F1B) and time_to_loss.png (validation loss against seconds, one panel
per K).

    python -m experiments.bench.schedule_cost --measure=gpt:16 --n_layer=8 --n_embd=128 \
        --n_head=4 --block_size=64 --microbatches=8,16   # and with --optimizer=muon, ...
    python -m experiments.bench.schedule_cost --stages=4,8 --microbatches=1,8,16 \
        --output=COSTS.json
    python -m experiments.lm.time_to_loss --grid_dir=experiments/results/depth_cpu \
        --costs=COSTS.json --model=gpt8x128_h4_t64_b16
"""

import dataclasses
import glob
import json
import math
import os
from typing import Optional, Sequence

from absl import app
from absl import flags

from experiments.grids import reports

FLAGS = flags.FLAGS
# Methods whose update is BP's: they train along BP's curve.
SYNCHRONOUS = ('gpipe', '1f1b')


@dataclasses.dataclass
class Curve:
  """One setting's validation loss (mean over its runs) against step, or against seconds."""
  label: str
  method: str
  num_stages: int
  microbatches: int
  optimizer: str     # the optimizer whose BP is its target (`reference_optimizer`)
  steps: list
  losses: list
  seconds: Optional[list] = None   # measured: each evaluation's train_s (mean over runs)


def read_runs(grid_dir: str) -> list[tuple[dict, dict]]:
  """(summary, config) of every finished run under grid_dir/runs/ (or grid_dir itself)."""
  runs = []
  for path in sorted(glob.glob(os.path.join(grid_dir, 'runs', '*', 'summary.json'))
                     + glob.glob(os.path.join(grid_dir, 'summary.json'))):
    with open(path) as f:
      summary = json.load(f)
    with open(os.path.join(os.path.dirname(path), 'config.json')) as f:
      config = json.load(f)
    runs.append((summary, config))
  return runs


def label_of(summary: dict) -> str:
  """e.g. 'fdg K=4 M=8 weight_prediction muon'."""
  parts = [summary['method']]
  if summary['num_stages'] > 1:
    parts.append(f'K={summary["num_stages"]}')
  if summary.get('microbatches', 1) > 1:
    parts.append(f'M={summary["microbatches"]}')
  if summary.get('compensation', 'none') != 'none':
    parts.append(summary['compensation'])
  if summary.get('optimizer', 'adamw') != 'adamw':
    parts.append(summary['optimizer'])
  return ' '.join(parts)


def reference_optimizer(summary: dict) -> str:
  """The optimizer of the BP a run is measured against: its own, but 'rotated_adamw' for
  compensation basis_rotation (its delayed stages run that optimizer)."""
  if summary.get('compensation') == 'basis_rotation':
    return 'rotated_adamw'
  return summary.get('optimizer', 'adamw')


def curves(runs: Sequence[tuple[dict, dict]], label=None) -> list[Curve]:
  """One Curve per setting (the runs' seeds averaged at the evaluations they share)."""
  groups: dict[str, list[dict]] = {}
  for summary, _ in runs:
    groups.setdefault(label or label_of(summary), []).append(summary)
  result = []
  for name, summaries in groups.items():
    by_step: dict[int, list[dict]] = {}
    for summary in summaries:
      for point in summary.get('history', []):
        by_step.setdefault(point['step'], []).append(point)
    steps = sorted(s for s, points in by_step.items() if len(points) == len(summaries) and s > 0)
    mean = lambda field, s: reports.mean_std([p[field] for p in by_step[s]])[0]
    first = summaries[0]
    timed = all('train_s' in p for s in steps for p in by_step[s])
    result.append(Curve(name, first['method'], first['num_stages'], first.get('microbatches', 1),
                        reference_optimizer(first), steps,
                        [mean('val_loss', s) for s in steps],
                        [mean('train_s', s) for s in steps] if timed else None))
  return result


def first_reach(xs: Sequence[float], losses: Sequence[float], target: float) -> Optional[float]:
  """The x at which the curve first reaches `target` (linear between evaluations), or None."""
  for i, loss in enumerate(losses):
    if loss <= target:
      if i == 0:
        return xs[0]
      x0, x1, l0 = xs[i - 1], xs[i], losses[i - 1]
      return x0 + (x1 - x0) * (l0 - target) / (l0 - loss)
  return None


def batch_seconds(rows: Sequence[dict], method: str, num_stages: int, microbatches: int
                  ) -> Optional[float]:
  """Seconds per batch of a setting from the cost model's rows (one model's table): BP is one
  device doing all the work; GPipe and 1F1B, FDG at any M and DGL, their predicted time."""
  if method == 'bp':   # the work of whole batches (M = 1), whatever K the row splits it in
    row = next((r for r in rows if r['schedule'] == 'fdg' and r['microbatches'] == 1), None)
    return None if row is None else row['ms_per_batch'] * row['speedup'] / 1e3
  row = next((r for r in rows if (r['schedule'], r['num_stages'], r['microbatches'])
              == (method, num_stages, microbatches)), None)
  return None if row is None else row['ms_per_batch'] / 1e3


def predicted_rows(grid: Sequence[Curve], tables: dict, num_stages: int,
                   targets: dict) -> list[dict]:
  """Every setting at K (and BP, and each synchronous schedule on BP's curve) with its seconds
  per batch and its steps and seconds to each target (targets: optimizer -> [loss, ...];
  tables: optimizer -> the cost model's rows at K, timed with that optimizer's update)."""
  table = []
  bp = {c.optimizer: c for c in grid if c.method == 'bp'}
  sync = sorted({(r['schedule'], r['microbatches']) for rows in tables.values() for r in rows
                 if r['schedule'] in SYNCHRONOUS and r['num_stages'] == num_stages})
  entries = [(c, c.method, c.num_stages, c.microbatches) for c in grid
             if c.method == 'bp' or (c.num_stages == num_stages and c.method in ('fdg', 'dgl'))]
  entries += [(curve, name, num_stages, m) for curve in bp.values() for name, m in sync]
  for curve, method, K, M in entries:
    seconds = batch_seconds(tables.get(curve.optimizer, []), method, K, M)
    if seconds is None or curve.optimizer not in targets:
      continue
    label = curve.label if method not in SYNCHRONOUS else (
        f'{method} K={K} M={M}' + ('' if curve.optimizer == 'adamw' else f' {curve.optimizer}'))
    steps = [first_reach(curve.steps, curve.losses, t) for t in targets[curve.optimizer]]
    table.append({'label': label, 'optimizer': curve.optimizer, 'seconds_per_batch': seconds,
                  'steps': steps, 'seconds': [None if s is None else s * seconds for s in steps],
                  'curve': curve})
  return table


def cost_key(model: str, optimizer: str) -> str:
  """The cost table of `model` (e.g. gpt8x128_h4_t64_b16, timed with AdamW) timed with
  `optimizer` instead, as `schedule_cost --measure --optimizer` names it
  (gpt8x128_h4_t64_muon_b16)."""
  if optimizer == 'adamw':
    return model
  name, _, batch = model.rpartition('_b')
  return f'{name}_{optimizer}_b{batch}'


def measured_rows(measured: Sequence[Curve], targets: dict) -> list[dict]:
  return [{'label': c.label + ' (measured)', 'optimizer': c.optimizer,
           'seconds_per_batch': (c.seconds[-1] / c.steps[-1]), 'curve': c,
           'steps': [first_reach(c.steps, c.losses, t) for t in targets[c.optimizer]],
           'seconds': [first_reach(c.seconds, c.losses, t) for t in targets[c.optimizer]]}
          for c in measured if c.optimizer in targets]


def markdown(rows: Sequence[dict], names: Sequence[str], per_optimizer: bool = True) -> str:
  """One row per setting, with its steps and seconds to each target (`names`: the targets'
  column names); the last columns: the fastest synchronous schedule's seconds over the row's,
  to each target (above 1: the row reaches it sooner), that schedule with the row's optimizer,
  or with any optimizer where not `per_optimizer` (one absolute target for all)."""
  fmt = lambda v, digits=0: 'never' if v is None else f'{v:,.{digits}f}'
  group = (lambda row: row['optimizer']) if per_optimizer else (lambda row: None)
  best_sync = {}   # (group, target index) -> the fastest 1F1B / GPipe's seconds
  for row in rows:
    for i, seconds in enumerate(row['seconds']):
      if row['label'].split()[0] in SYNCHRONOUS and seconds is not None:
        key = (group(row), i)
        best_sync[key] = min(seconds, best_sync.get(key, math.inf))
  header = ['setting', 's per batch'] + [f'{kind} to {name}' for name in names
                                         for kind in ('steps', 's')]
  header += [f'fastest 1F1B / GPipe over it, to {names[0]}'] + [f'to {n}' for n in names[1:]]
  lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
  for row in sorted(rows, key=lambda r: (group(r) or '', r['seconds'][0] or math.inf)):
    ratios = [best_sync[(group(row), i)] / seconds
              if seconds and (group(row), i) in best_sync else None
              for i, seconds in enumerate(row['seconds'])]
    cells = [row['label'], f'{row["seconds_per_batch"]:.3f}']
    cells += [fmt(v) for pair in zip(row['steps'], row['seconds']) for v in pair]
    cells += [fmt(r, 2) for r in ratios]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def fastest_synchronous_only(rows: Sequence[dict]) -> list[dict]:
  """The rows without the synchronous schedules' slower M: of each schedule and optimizer only
  the fastest per batch (they all follow BP's curve), so that a figure stays readable."""
  fastest = {}
  for row in rows:
    key = (row['label'].split()[0], row['optimizer'])
    if key[0] in SYNCHRONOUS and (key not in fastest or row['seconds_per_batch']
                                  < fastest[key]['seconds_per_batch']):
      fastest[key] = row
  return [row for row in rows if row['label'].split()[0] not in SYNCHRONOUS
          or fastest[(row['label'].split()[0], row['optimizer'])] is row]


def plot(panels: dict, path: str) -> None:
  """Validation loss against seconds, one panel per K."""
  plt = reports.pyplot()
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
  for ax, (title, rows) in zip(axes[0], panels.items()):
    for row in rows:
      curve = row['curve']
      xs = curve.seconds if 'measured' in row['label'] else [
          s * row['seconds_per_batch'] for s in curve.steps]
      ax.plot(xs, curve.losses, marker='o', markersize=3, label=row['label'],
              **reports.line_style(len(ax.lines)))
    ax.set_title(title)
    ax.set_xlabel('seconds of training')
    ax.set_ylabel('validation loss, mean over seeds')
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=7)
  reports.save_figure(fig, path)


def report(grid_dir: str, costs: dict, model: str, stages: Sequence[int], margin: float,
           measured: dict, out_dir: str, common_target: Optional[float] = None) -> str:
  """Writes time_to_loss.md and .png under out_dir; returns the markdown. `common_target`: one
  loss more, the same for every optimizer, each setting against the fastest synchronous
  schedule with any optimizer (which optimizer and schedule reaches it soonest)."""
  grid = curves(read_runs(grid_dir))
  targets = {c.optimizer: [c.losses[-1], c.losses[-1] + margin] for c in grid if c.method == 'bp'}
  names = ['BP', f'BP + {margin}']
  targets_line = 'Targets (BP\'s final validation loss, mean over seeds): ' + '; '.join(
      f'{o}: BP {t[0]:.4f}' for o, t in targets.items()) + '.\n\n'

  if not targets:
    raise app.UsageError(f'{grid_dir} has no finished BP run: its final loss is the target.')
  missing = sorted({cost_key(model, o) for o in targets} - set(costs['tables']))
  if missing:
    raise app.UsageError(
        f'The cost table has no {missing} (the model timed with each optimizer its runs use); '
        f'it has {sorted(costs["tables"])}. Measure them with experiments.bench.schedule_cost '
        '--measure=... --optimizer=OPTIMIZER, then write the table again.')
  sections, panels = [], {}
  for K in stages:
    tables = {o: [r for r in costs['tables'][cost_key(model, o)] if r['num_stages'] == K]
              for o in targets}
    table = predicted_rows(grid, tables, K, targets)
    panels[f'K = {K} (predicted)'] = fastest_synchronous_only(table)
    sections.append(f'## K = {K}, predicted (the cost model, {model})\n\n' + targets_line
                    + markdown(table, names))
    if common_target is not None:
      common = predicted_rows(grid, tables, K, {o: [common_target] for o in targets})
      sections.append(f'### K = {K}: to {common_target} with any optimizer\n\n'
                      + markdown(common, [str(common_target)], per_optimizer=False))
  if measured:
    runs = [c for label, workdir in measured.items() for c in curves(read_runs(workdir), label)]
    table = measured_rows([c for c in runs if c.seconds], targets)
    panels['measured'] = table
    sections.append('## Measured (each run\'s own clock, train_s)\n\n' + targets_line
                    + markdown(table, names))
  text = '# Time to a target loss\n\n' + '\n\n'.join(sections) + '\n'
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'time_to_loss.md'), 'w') as f:
    f.write(text)
  plot(panels, os.path.join(out_dir, 'time_to_loss.png'))
  return text


def parse_measured(items: Sequence[str]) -> dict:
  """--measured's LABEL=WORKDIR items as {label: workdir}; the last '=' ends the label, so a
  label may say 'K=2'."""
  bad = [item for item in items if '=' not in item]
  if bad:
    raise app.UsageError(f'--measured items {bad} are not LABEL=WORKDIR.')
  return dict(item.rsplit('=', 1) for item in items)


def main(argv):
  del argv
  with open(FLAGS.costs) as f:
    costs = json.load(f)
  measured = parse_measured(FLAGS.measured)
  print(report(FLAGS.grid_dir, costs, FLAGS.model, [int(k) for k in FLAGS.stages], FLAGS.margin,
               measured, FLAGS.out_dir or FLAGS.grid_dir, FLAGS.common_target))


if __name__ == '__main__':
  flags.DEFINE_string('grid_dir', 'experiments/results/depth_cpu', 'A grid\'s out_dir: its '
                      'runs/*/summary.json and config.json.')
  flags.DEFINE_string('costs', '', 'experiments.bench.schedule_cost\'s --output (its tables).')
  flags.DEFINE_string('model', 'gpt8x128_h4_t64_b16', 'The cost table\'s model key.')
  flags.DEFINE_list('stages', ['4', '8'], 'K values to predict.')
  flags.DEFINE_float('margin', 0.05, 'The second target: BP\'s final loss plus this.')
  flags.DEFINE_float('common_target', None, 'One loss more, the same for every optimizer: '
                     'which optimizer and schedule reaches it soonest.')
  flags.DEFINE_list('measured', [], 'LABEL=WORKDIR of runs timed by their own clock (train_s); '
                    "the last '=' ends the label (e.g. '1f1b K=2 M=8=runs/1f1b').")
  flags.DEFINE_string('out_dir', '', 'Where to write (default: --grid_dir).')
  flags.mark_flag_as_required('costs')
  app.run(main)
