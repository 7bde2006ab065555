r"""Stale-gradient compensation: which option closes FDG's gap to BP (issue 15).

ResNet-20 on CIFAR-10: BP, and at each K of `--num_stages` FDG as in the paper (stash 'vjp'),
FDG with stash 'recompute' (the delayed gradient taken at the current weights, close to what the
authors' code did inside a stage) and FDG with each compensation of fdg_jax/engine/compensation.py;
every cell once per seed, each method against BP as a paired difference (same seed: same
initial weights and batches). Writes OUT_DIR/results.md, results.csv, bars.png (mean test error
per method and K, error bars one standard error of the paired difference to BP) and curves.png.

The small scale of the recorded Fig. 4a grid (docs/record/paper_grids.md), on the CIFAR-10 JPEG
copy:

    python -m experiments.paper.compensation_grid --scale=cpu --dataset=imagefolder \
        --data_dir=../shared/data/cifar10-jpeg.tar.gz --set cache_dir=/tmp/fdg_cache \
        --set train_subset=5000 --set num_epochs=4 --seeds=0,1,2,3,4,5 \
        --out_dir=experiments/results/compensation_cpu_small

BP's and plain FDG's cells are named and configured as fig4a_beta.py's, so finished runs of
that grid (same settings) can be copied into OUT_DIR/runs and are read, not rerun. Run it again
to resume; `--dry_run` lists the cells, `--report_only` reports the runs finished so far;
`--methods` picks a subset (e.g. the best compensation at `--scale=cpu`). Common flags: see
experiments/grids/cells.py.
"""

import math
import os
import sys

from experiments.grids import cells as cells_lib
from experiments.grids import grid
from experiments.grids import reports

NAME = 'compensation'
# method name -> (variant tag in the cell name, the config fields it sets). 'fdg' is the paper's
# FDG with the config's defaults, so its cells are fig4a_beta.py's.
METHODS = {
    'bp': ('', {}),
    'fdg': ('', {}),
    'recompute': ('recompute', {'stash': 'recompute'}),
    'weight_prediction': ('wp', {'compensation': 'weight_prediction'}),
    'delay_compensation': ('dc', {'compensation': 'delay_compensation'}),
    'lr_reschedule': ('lr', {'compensation': 'lr_reschedule'}),
    # Ajanthan et al. 2025 (issue 28): Nesterov SGD at the paper's 0.99 (ten times the step of
    # momentum 0.9), the look-ahead alone at the recipe's 0.9, momentum from the delay, both.
    'nesterov': ('nag', {'compensation': 'nesterov'}),
    'nesterov_0.9': ('nag0.9', {'compensation': 'nesterov', 'nesterov_momentum': 0.9}),
    'delay_momentum': ('dm', {'compensation': 'delay_momentum'}),
    'nesterov+delay_momentum': ('nagdm', {'compensation': 'nesterov+delay_momentum'}),
    # beta applied once to every delayed stage's gradient, not compounded per hop (issue 28).
    'beta_once': ('once', {'beta_compounds': False}),
    # Issue 38: the deep GPT grid's best at K = 4, on ResNet-20: PipeDream-2BW's microbatches
    # (M = 8 >= 2(K - 1): every delayed stage's delay 2 updates instead of 6, 4, 2) alone, with
    # the look-ahead at 0.9 and with the error feedback of Zmushko et al.; error feedback alone
    # (FDG's delays).
    'error_feedback': ('ef', {'compensation': 'error_feedback'}),
    # (The cell's name and setting say M=8 themselves.)
    'm8': ('', {'microbatches': 8}),
    'm8+nesterov_0.9': ('nag0.9', {'microbatches': 8, 'compensation': 'nesterov',
                                   'nesterov_momentum': 0.9}),
    'm8+error_feedback': ('ef', {'microbatches': 8, 'compensation': 'error_feedback'}),
}


def build_cells(options: cells_lib.Options, methods=tuple(METHODS), num_stages=(2, 4),
                betas=(0.25, 0.5), model: str = 'resnet20') -> list:
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise cells_lib.GridError(f'--methods: unknown {unknown}; choose from {tuple(METHODS)}.')
  if len(betas) != len(num_stages):
    raise cells_lib.GridError(f'--betas has {len(betas)} values for {len(num_stages)} values '
                              'of --num_stages: give one beta per K.')
  if any(k < 2 for k in num_stages):
    raise cells_lib.GridError('--num_stages: FDG needs K >= 2 (BP is its own method).')
  config_file = f'configs/cifar10_{model}.py'
  cells = []
  for k, beta in zip(num_stages, betas):
    for seed in options.seeds:
      for method in methods:
        if method == 'bp':
          if k == num_stages[0]:
            cells.append(cells_lib.make_cell(options, config_file, method='bp', seed=seed))
          continue
        if method == 'beta_once' and k == 2:
          continue   # one delayed stage: the same computation as plain FDG
        variant, fields = METHODS[method]
        cells.append(cells_lib.make_cell(options, config_file, method='fdg', num_stages=k,
                                         beta=beta, seed=seed, script_overrides=fields,
                                         variant=variant))
  return cells


def plot_bars(groups, path: str, title: str) -> None:
  """Mean test error per method, one panel per K, with BP as a line (its band: ± 1 std)."""
  plt = reports.pyplot()
  bp = next((g for g in groups if g.key[1] == 'bp' and g.n), None)
  ks = sorted({g.key[2] for g in groups if g.key[1] != 'bp'})
  fig, axes = plt.subplots(1, len(ks), figsize=(5 * len(ks), 4.5), squeeze=False)
  for ax, k in zip(axes[0], ks):
    fdg = [g for g in groups if g.key[1] != 'bp' and g.key[2] == k and g.n]
    means = [100 * g.stat('test_error')[0] for g in fdg]
    errors = []
    for g in fdg:
      _, se, n = reports.paired_difference(g, bp) if bp else (math.nan, math.nan, 0)
      errors.append(0 if math.isnan(se) else 100 * se)
    ax.bar(range(len(fdg)), means, yerr=errors, capsize=4, color='tab:blue', alpha=0.8)
    for x, m, g in zip(range(len(fdg)), means, fdg):
      ax.annotate(f'{m:.2f}\n(n={g.n})', (x, m), ha='center', va='bottom', fontsize=7,
                  xytext=(0, 4), textcoords='offset points')
    values = list(means)
    if bp:
      mean, std = (100 * v for v in bp.stat('test_error'))
      ax.axhline(mean, color='tab:red', label=f'BP {mean:.2f}% (n={bp.n})')
      if not math.isnan(std):
        ax.axhspan(mean - std, mean + std, color='tab:red', alpha=0.12)
      values.append(mean)
      ax.legend(fontsize=8, loc='lower right')
    ax.set_xticks(range(len(fdg)), [g.key[4] or 'FDG' for g in fdg], fontsize=8)
    reports.zoom_to(ax, values)
    ax.set_title(f'K = {k}, β = {fdg[0].key[3]:g}' if fdg else f'K = {k}', fontsize=10)
    ax.set_ylabel('test error (%), mean over seeds')
    ax.grid(axis='y', alpha=0.3)
  fig.suptitle(title + ' (error bars: ± 1 s.e. of the paired difference to BP; y axis does '
               'not start at 0)', fontsize=9)
  reports.save_figure(fig, path)


def report(results, options: cells_lib.Options) -> None:
  out_dir = options.output_dir
  os.makedirs(out_dir, exist_ok=True)
  groups = reports.aggregate(results)
  title = f'{results[0].cell.model}, stale-gradient compensation' if results else NAME
  reports.write_csv(results, os.path.join(out_dir, 'results.csv'))
  plot_bars(groups, os.path.join(out_dir, 'bars.png'), title)
  reports.plot_curves(groups, os.path.join(out_dir, 'curves.png'), 'Compensation')
  bp = next((g for g in groups if g.key[1] == 'bp'), None)
  plain = {g.key[2]: g for g in groups if g.key[1] == 'fdg' and not g.key[4]}
  rows = []
  for g in groups:
    time_s = g.stat('train_time_s')[0] if g.n else math.nan
    memory = [s['peak_host_memory_mib'] for s in g.summaries if 'peak_host_memory_mib' in s]
    rows.append([g.label, reports.fmt_pct(*g.stat('test_error')), reports.fmt_difference(g, bp),
                 reports.fmt_difference(g, plain.get(g.key[2])) if g.key[4] else '–', g.n,
                 f'{time_s:.0f}', f'{max(memory):.0f}' if memory else '–'])
  body = reports.markdown_table(
      ['method', 'test error (%)', 'vs BP (points, ± s.e. paired)',
       'vs plain FDG of its K (points, ± s.e. paired)', 'n', 'train time (s, mean)',
       'peak host memory (MiB, max)'], rows)
  body += ('\n\nPaired differences: the mean over seeds of (method - reference) test error, ± '
           'its standard error; a seed gives every method the same initial weights and batches. '
           'Methods: FDG = the paper (stash vjp); recompute = stash recompute; wp = weight '
           'prediction; dc = delay compensation (DC-ASGD-a); lr = learning-rate rescheduling '
           '(PipeMare); nag = Nesterov SGD at momentum 0.99, nag0.9 at 0.9; dm = momentum from '
           'the delay; nagdm = both (Ajanthan et al. 2025); once = beta applied once per stage, '
           'not compounded; ef = error feedback (Zmushko et al. 2026); M=8: PipeDream-2BW\'s 8 '
           'microbatches a batch; formulas in docs/algorithm.md. Time: the trainer\'s train_time_s '
           '(compilation included); memory: the trainer process\'s peak resident set.\n'
           'Figures: `bars.png` (test error per method and K), `curves.png` (test error '
           'against epoch, mean over seeds).\n')
  reports.write_results_md(os.path.join(out_dir, 'results.md'),
                           f'Stale-gradient compensation, {title}, {options.scale} scale',
                           results, options, body)


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  try:
    betas = cells_lib.parse_floats(f.betas, 'betas')
    num_stages = tuple(int(k) for k in f.num_stages)
  except (cells_lib.GridError, ValueError) as e:
    sys.exit(f'error: {e}')
  sys.exit(grid.main(NAME, lambda options: build_cells(options, tuple(f.methods), num_stages,
                                                       betas, f.model), report))


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  cells_lib.define_flags(NAME)
  flags.adopt_module_key_flags(cells_lib)   # listed by --help
  flags.DEFINE_list('methods', list(METHODS), f'Methods to run, from {list(METHODS)}.')
  flags.DEFINE_list('num_stages', ['2', '4'], 'K values of the FDG methods.')
  flags.DEFINE_list('betas', ['0.25', '0.5'], 'beta of FDG at each K of --num_stages (0.25: the '
                    "best of the small Fig. 4a grid at K = 2; 0.5 at K = 4, as the small Table 4 "
                    'grid: beta compounds per stage, 0.25 ** 3 would all but stop stage 0).')
  flags.DEFINE_string('model', 'resnet20', 'Model (configs/cifar10_<model>.py).')
  app.run(main)
