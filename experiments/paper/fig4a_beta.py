r"""Fig. 4a of the paper: test error of FDG against the gradient-shrinking factor beta.

ResNet-20 on CIFAR-10, K = 2, FDG at each beta of `--betas`, and BP as the reference line; every
cell once per seed. Writes OUT_DIR/results.md, results.csv, beta.png (bars: mean test error per
beta with error bars of one standard deviation over seeds; BP as a horizontal line with its band)
and curves.png (test error against epoch per beta, mean over seeds).

On this 2-core CPU, with the CIFAR-10 JPEG copy and its decoded cache:

    python -m experiments.paper.fig4a_beta --scale=cpu --dataset=imagefolder \
        --data_dir=../shared/data/cifar10-jpeg.tar.gz --set cache_dir=/tmp/fdg_cache

Run it again to resume (finished cells are read, an interrupted one resumes from its checkpoint);
`--dry_run` prints the grid, `--report_only` writes the results of the runs finished so far.
Common flags: see experiments/grids/cells.py (`--scale`, `--seeds`, `--dataset`, `--data_dir`,
`--set`, `--out_dir`, `--keep_checkpoints`).
"""

import math
import os
import sys

from experiments.grids import cells as cells_lib
from experiments.grids import grid
from experiments.grids import reports
from experiments.paper import published

NAME = 'fig4a_beta'
# The sweep: the paper's scale sweeps 0.1 .. 1.0; the CPU scale takes 5 of those values.
DEFAULT_BETAS = {'paper': (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
                 'cpu': (0.1, 0.25, 0.5, 0.75, 1.0)}


def build_cells(options: cells_lib.Options, betas=(), model: str = 'resnet20',
                num_stages: int = 2) -> list:
  betas = tuple(betas) or DEFAULT_BETAS[options.scale]
  bad = [b for b in betas if not 0 < b <= 1]
  if bad:
    raise cells_lib.GridError(f'--betas: {bad} outside (0, 1]. Use 0 < beta <= 1.')
  config_file = f'configs/cifar10_{model}.py'
  cells = []
  for seed in options.seeds:
    cells.append(cells_lib.make_cell(options, config_file, method='bp', seed=seed))
    cells += [cells_lib.make_cell(options, config_file, method='fdg', num_stages=num_stages,
                                  beta=beta, seed=seed) for beta in betas]
  # Order: BP, then the betas ascending; seeds inside each (the first seed of every cell first).
  return sorted(cells, key=lambda c: (c.seed, c.method != 'bp', c.beta))


def plot_betas(groups, path: str, title: str) -> None:
  """Bars of mean test error per beta (error bars: std over seeds), BP as a line with its band."""
  plt = reports.pyplot()
  fdg = sorted((g for g in groups if g.key[1] == 'fdg' and g.n), key=lambda g: g.key[3])
  bp = [g for g in groups if g.key[1] == 'bp' and g.n]
  fig, ax = plt.subplots(figsize=(7, 4.5))
  means = [100 * g.stat('test_error')[0] for g in fdg]
  stds = [100 * g.stat('test_error')[1] for g in fdg]
  positions = range(len(fdg))
  ax.bar(positions, means, yerr=[0 if math.isnan(s) else s for s in stds], capsize=4,
         color='tab:blue', alpha=0.8, label='FDG (mean ± std over seeds)')
  for x, m, s, g in zip(positions, means, stds, fdg):   # the value above its error bar
    ax.annotate(f'{m:.2f} (n={g.n})', (x, m + (0 if math.isnan(s) else s)), ha='center',
                va='bottom', fontsize=7, xytext=(0, 2), textcoords='offset points')
  values = list(means) + [m + s for m, s in zip(means, stds) if not math.isnan(s)]   # bar tops
  if bp:
    mean, std = (100 * v for v in bp[0].stat('test_error'))
    ax.axhline(mean, color='tab:red', label=f'BP {mean:.2f}% (n={bp[0].n})')
    if not math.isnan(std):
      ax.axhspan(mean - std, mean + std, color='tab:red', alpha=0.12)
    values.append(mean)
  ax.set_xticks(list(positions), [f'{g.key[3]:g}' for g in fdg])
  ax.set_xlabel('gradient-shrinking factor β')
  ax.set_ylabel('test error (%)')
  reports.zoom_to(ax, values)
  ax.set_title(title + ' (y axis does not start at 0)', fontsize=10)
  ax.grid(axis='y', alpha=0.3)
  ax.legend(fontsize=8, loc='lower right')
  reports.save_figure(fig, path)


def report(results, options: cells_lib.Options) -> None:
  out_dir = options.output_dir
  os.makedirs(out_dir, exist_ok=True)
  groups = reports.aggregate(results)
  title = f'{results[0].cell.model} K={max(g.key[2] for g in groups)}' if results else NAME
  reports.write_csv(results, os.path.join(out_dir, 'results.csv'))
  plot_betas(groups, os.path.join(out_dir, 'beta.png'), f'Fig. 4a: FDG β sweep, {title}')
  reports.plot_curves(groups, os.path.join(out_dir, 'curves.png'), 'Fig. 4a')
  bp = next((g for g in groups if g.key[1] == 'bp'), None)
  rows = [[g.label, reports.fmt_pct(*g.stat('test_error')), reports.fmt_difference(g, bp),
           g.n, published.describe('Table 2', *g.key[:4])] for g in groups]
  body = reports.markdown_table(
      ['method', 'test error (%)', 'vs BP (points, ± s.e. paired by seed)', 'n',
       'paper Table 2 row (%)'], rows)
  body += ('\n\nvs BP: the mean over seeds of (FDG - BP) test error, ± its standard error; a seed '
           'gives both the same initial weights and batches, so a difference well beyond 2 '
           'standard errors is larger than the run-to-run spread.')
  body += ('\n\nFigures: `beta.png` (bars: FDG per β, error bars ± 1 std over seeds; line and '
           'band: BP mean ± std), `curves.png` (test error against epoch, mean over seeds).\n'
           "Paper column: Fig. 4a's bars are not available as numbers, so it holds the paper's "
           f'Table 2 row of the same model (BP, β = 1 and the tuned β): {published.SOURCE}; '
           f'{published.SETTING}. It is at the paper\'s scale, so compare the direction of the '
           'β effect, not error levels, with a reduced-scale run.\n')
  reports.write_results_md(os.path.join(out_dir, 'results.md'),
                           f'Fig. 4a: FDG against β, {title}, {options.scale} scale', results,
                           options, body)


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  try:
    betas = cells_lib.parse_floats(f.betas, 'betas')
  except cells_lib.GridError as e:
    sys.exit(f'error: {e}')
  sys.exit(grid.main(NAME, lambda options: build_cells(options, betas, f.model, f.num_stages),
                     report))


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  cells_lib.define_flags(NAME)
  flags.adopt_module_key_flags(cells_lib)   # listed by --help
  flags.DEFINE_list('betas', [], 'Betas of the sweep; default: 0.1, 0.2, .., 1.0 at the paper '
                    'scale, 0.1, 0.25, 0.5, 0.75, 1.0 at the cpu scale.')
  flags.DEFINE_string('model', 'resnet20', 'Model (configs/cifar10_<model>.py).')
  flags.DEFINE_integer('num_stages', 2, 'K of FDG.')
  app.run(main)
