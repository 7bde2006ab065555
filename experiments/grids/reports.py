"""The reports of a grid: statistics over seeds, table formatting, CSV, plots and results.md.

`aggregate` groups the runs' summaries by cell group (mean and sample standard deviation over
seeds), `paired_difference` compares two groups seed by seed; `write_csv` writes one row per run,
`plot_curves` the grid's metric against epoch (or step), `markdown_table` and `write_results_md`
the results.md. The metric is the image grids' test error unless a script names another
(experiments/grids/metrics.py).
"""

import csv
import dataclasses
import datetime
import math
import os
import platform
import shlex
from typing import Any, Callable, Optional, Sequence

from experiments.grids import cells as cells_lib
from experiments.grids import grid
from experiments.grids import metrics
from fdg_jax.trainer import workdir as workdir_lib


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (n - 1; nan for one value)."""
  values = [float(v) for v in values]
  if not values:
    return math.nan, math.nan
  mean = sum(values) / len(values)
  if len(values) < 2:
    return mean, math.nan
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@dataclasses.dataclass
class Group:
  """The runs of one cell group (all seeds) that have a summary."""
  key: tuple          # (model, method, num_stages, beta, variant)
  label: str
  summaries: list
  seeds: list

  @property
  def n(self) -> int:
    return len(self.summaries)

  def stat(self, field: str) -> tuple[float, float]:
    return mean_std([s[field] for s in self.summaries])

  def curve(self, field: str = 'test_error', x: str = 'epoch') -> tuple[list, list, list]:
    """(x values, mean of `field`, std) over the seeds, at the evaluations they share; x is a
    history key, 'epoch' or 'step'."""
    by_step = {}
    for summary in self.summaries:
      for point in summary.get('history', []):
        by_step.setdefault(point['step'], (point[x], []))[1].append(point[field])
    steps = sorted(s for s, (_, errors) in by_step.items() if len(errors) == self.n)
    stats = [mean_std(by_step[s][1]) for s in steps]
    return ([by_step[s][0] for s in steps], [m for m, _ in stats], [d for _, d in stats])


def aggregate(results: Sequence[grid.Result]) -> list[Group]:
  """One Group per cell group, in the order of the cells (groups with no summary included)."""
  groups = {}
  for result in results:
    group = groups.setdefault(result.cell.group, Group(result.cell.group, result.cell.label,
                                                       [], []))
    if result.summary is not None:
      group.summaries.append(result.summary)
      group.seeds.append(result.cell.seed)
  return list(groups.values())


def paired_difference(group: Group, reference: Group,
                      field: str = 'test_error') -> tuple[float, float, int]:
  """Mean over their shared seeds of `group` minus `reference`, its standard error, and n.

  A seed gives every cell the same initial weights, data subset and batch order (train.py), so
  runs pair by seed and the spread of the per-seed differences is what a difference must beat.
  Standard error = sample std of the differences / sqrt(n); nan for one pair.
  """
  by_seed = dict(zip(reference.seeds, reference.summaries))
  diffs = [s[field] - by_seed[seed][field] for seed, s in zip(group.seeds, group.summaries)
           if seed in by_seed]
  mean, std = mean_std(diffs)
  return mean, std / math.sqrt(len(diffs)) if diffs else math.nan, len(diffs)


def fmt_difference(group: Group, reference: Optional[Group],
                   metric: metrics.Metric = metrics.TEST_ERROR) -> str:
  """`group` - `reference` of `metric` as '+1.87 ± 0.52' (points of test error; ± one standard
  error, paired by seed); '–' for the reference itself or when they share no seed."""
  if reference is None or group is reference:
    return '–'
  mean, se, n = paired_difference(group, reference, metric.field)
  if not n:
    return '–'
  return metric.format_difference(mean, se)


def fmt_pct(mean: float, std: float) -> str:
  """An error as '7.12 ± 0.31' (percent); '7.12' for one seed; '–' for none."""
  return metrics.TEST_ERROR.format(mean, std)


def fmt_num(mean: float, std: float = math.nan, digits: int = 0) -> str:
  if math.isnan(mean):
    return '–'
  return f'{mean:.{digits}f}' + ('' if math.isnan(std) else f' ± {std:.{digits}f}')


CSV_FIELDS = ('cell', 'model', 'method', 'num_stages', 'beta', 'seed', 'status', 'dataset',
              'train_images', 'test_images', 'epochs', 'steps', 'batch_size', 'test_error',
              'test_loss', 'train_time_s', 'images_per_sec', 'resumed_from_step',
              'trainable_params', 'extra_params', 'stage_split', 'devices', 'params_digest',
              'workdir')


def write_csv(results: Sequence[grid.Result], path: str,
              fields: Sequence[str] = CSV_FIELDS) -> None:
  """One row per run (failed or missing runs too, with their status and no numbers); `fields`:
  the summary's fields to write, besides the cell's (cell .. seed, status, workdir)."""
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    for r in results:
      s = r.summary or {}
      row = {field: s.get(field, '') for field in fields}
      row.update(cell=r.cell.name, model=r.cell.model, method=r.cell.method,
                 num_stages=r.cell.num_stages, beta=r.cell.beta, seed=r.cell.seed,
                 status=r.status, workdir=os.path.relpath(r.workdir, os.path.dirname(path)))
      for field in ('stage_split', 'devices'):
        if isinstance(row.get(field), list):
          row[field] = ' '.join(str(x) for x in row[field])
      writer.writerow(row)


def pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def zoom_to(ax, values: Sequence[float]) -> None:
  """A y range around `values` (bar tops, reference lines): the differences are a few points of
  a large error, so the axis does not start at 0."""
  if values:
    low, high = min(values), max(values)
    ax.set_ylim(max(0.0, low - max(1.0, high - low)), high + max(1.0, 0.5 * (high - low)))


def save_figure(fig, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  pyplot().close(fig)


def line_style(index: int) -> dict:
  """The index-th line's colour and dash: matplotlib's ten colours, then the same colours dashed,
  dotted, ..., so that every line of a crowded plot can be told apart."""
  return {'color': f'C{index % 10}', 'linestyle': ('-', '--', ':', '-.')[index // 10 % 4]}


def plot_curves(groups: Sequence[Group], path: str, title: str,
                metric: metrics.Metric = metrics.TEST_ERROR, x: str = 'epoch') -> None:
  """`metric` against `x` (a history key: 'epoch' or 'step'), mean over seeds (band: ± std),
  one panel per model."""
  plt = pyplot()
  models = list(dict.fromkeys(g.key[0] for g in groups))
  fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
  for ax, model in zip(axes[0], models):
    for group in (g for g in groups if g.key[0] == model and g.n):
      xs, mean, std = group.curve(metric.field, x)
      if not xs:
        continue
      line, = ax.plot(xs, [metric.shown(m) for m in mean], marker='o', markersize=3,
                      label=f'{group.label} (n={group.n})', **line_style(len(ax.lines)))
      if group.n > 1:
        ax.fill_between(xs, [metric.shown(m - s) for m, s in zip(mean, std)],
                        [metric.shown(m + s) for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.15)
    ax.set_title(f'{title}: {model}')
    ax.set_xlabel(x)
    ax.set_ylabel(f'{metric.label}, mean over seeds')
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=8)
  save_figure(fig, path)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ['| ' + ' | '.join(headers) + ' |', '| ' + ' | '.join('---' for _ in headers) + ' |']
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


def image_data_line(summary: dict) -> str:
  """results.md's line on the data of an image classification run."""
  return (f'{summary["train_images"]} training images, {summary["test_images"]} test images, '
          f'batch {summary["batch_size"]}, {summary["epochs"]:g} epochs '
          f'({summary["steps"]} steps).')


def describe_setup(results: Sequence[grid.Result], options: cells_lib.Options,
                   metric: metrics.Metric = metrics.TEST_ERROR,
                   data_line: Callable[[dict], str] = image_data_line) -> str:
  """The provenance lines of results.md: command, scale, data (`data_line` of the first
  finished run's summary), machine, runs' state, what `metric` is."""
  done = [r for r in results if r.summary is not None]
  first = results[0].cell if results else None
  lines = [f'Written {datetime.datetime.now().isoformat(timespec="seconds")} by:',
           '', '```bash', ' '.join(shlex.quote(a) for a in options.argv) or '(python API)',
           '```', '']
  scale = options.scales.get(options.scale)
  lines.append(f'Scale `{options.scale}`' + (f': {scale.description}.' if scale else '.'))
  if first is not None:
    shown = {k: v for k, v in first.override_dict().items() if k not in cells_lib.CELL_FIELDS}
    lines.append(f'Config overrides of the first cell (beyond method, model, K, beta, seed): '
                 f'`{shown}`; each run\'s full config is in its workdir '
                 f'({workdir_lib.CONFIG_FILE}).')
  if done:
    s = done[0].summary
    datasets = sorted({r.summary['dataset'] for r in done})
    lines.append(f'Data: {", ".join(datasets)}, {data_line(s)}')
    devices = sorted({' '.join(r.summary['devices']) for r in done})
    lines.append(f'Machine: {platform.node()}, {os.cpu_count()} CPU cores; stage devices of the '
                 f'runs: {"; ".join(devices)}; jax {s.get("jax_version", "?")}.')
  missing = [r.cell.name for r in results if r.summary is None]
  lines.append(f'Runs: {len(done)} of {len(results)} finished' +
               (f'; not finished: {", ".join(missing)}.' if missing else '.'))
  lines.append(f'{metric.description} One row per run in results.csv.')
  return '\n'.join(lines)


def write_results_md(path: str, title: str, results: Sequence[grid.Result],
                     options: cells_lib.Options, body: str,
                     metric: metrics.Metric = metrics.TEST_ERROR,
                     data_line: Callable[[dict], str] = image_data_line) -> None:
  with open(path, 'w') as f:
    f.write(f'# {title}\n\n{describe_setup(results, options, metric, data_line)}\n\n'
            f'{body.strip()}\n')
