r"""Table 2 of the paper: test error of BP, DDG, DGL and FDG on CIFAR-10, K = 2.

For each model, every method on the same recipe and the same K = 2 stages: BP (the unsplit
network), DDG, DGL (test error of the network without its auxiliary heads; the heads' parameters
are reported), FDG at beta = 1 (no gradient shrinking) and FDG at the config file's beta (the
paper's best beta for the row, in configs/<dataset>_<model>.py) or at the betas of `--fdg_betas`.
The paper's values (experiments/paper/published.py) are printed beside ours. Every cell once per
seed. Models: ResNet-56, ResNet-110, ResNet-18 and WRN-28-10 at the paper scale, ResNet-20 at the
cpu scale (`--models`).
Writes OUT_DIR/results.md, results.csv and curves.png (test error against epoch per method, mean
over seeds, one panel per model).

On this 2-core CPU, with the CIFAR-10 JPEG copy and its decoded cache:

    python -m experiments.paper.table2 --scale=cpu --dataset=imagefolder \
        --data_dir=../shared/data/cifar10-jpeg.tar.gz --set cache_dir=/tmp/fdg_cache

Run it again to resume; `--dry_run` prints the grid; `--report_only` writes the results so far.
Common flags: see experiments/grids/cells.py.
"""

import os
import sys

from experiments.grids import cells as cells_lib
from experiments.grids import grid
from experiments.grids import reports
from experiments.paper import published

DEFAULT_MODELS = {'paper': ('resnet56', 'resnet110', 'resnet18', 'wrn28_10'),
                  'cpu': ('resnet20',)}
NUM_STAGES = 2


def build_cells(options: cells_lib.Options, dataset: str = 'cifar10', models=(),
                fdg_betas=()) -> list:
  """BP, DDG, DGL, FDG at each beta (default: 1 and the config file's), per model and seed."""
  models = tuple(models) or DEFAULT_MODELS[options.scale]
  betas = tuple(fdg_betas) or (1.0, None)    # None: the config file's beta
  cells = []
  for model in models:
    config_file = f'configs/{dataset}_{model}.py'
    for seed in options.seeds:
      cells.append(cells_lib.make_cell(options, config_file, method='bp', seed=seed))
      for method in ('ddg', 'dgl'):
        cells.append(cells_lib.make_cell(options, config_file, method=method,
                                         num_stages=NUM_STAGES, seed=seed))
      for beta in betas:
        cells.append(cells_lib.make_cell(options, config_file, method='fdg',
                                         num_stages=NUM_STAGES, beta=beta, seed=seed))
  unique = list({c.name: c for c in cells}.values())   # beta 1 twice if the config's is 1
  order = {m: i for i, m in enumerate(models)}
  methods = ('bp', 'ddg', 'dgl', 'fdg')
  return sorted(unique, key=lambda c: (c.seed, order[c.model], methods.index(c.method),
                                       -c.beta))


def report(results, options: cells_lib.Options, table: str = 'Table 2',
           dataset_title: str = 'CIFAR-10') -> None:
  out_dir = options.output_dir
  os.makedirs(out_dir, exist_ok=True)
  groups = reports.aggregate(results)
  reports.write_csv(results, os.path.join(out_dir, 'results.csv'))
  reports.plot_curves(groups, os.path.join(out_dir, 'curves.png'), f'{table} ({dataset_title})')
  rows, best = [], []
  bp = {g.key[0]: g for g in groups if g.key[1] == 'bp'}
  for g in groups:
    mean, std = g.stat('test_error')
    extra = g.summaries[0].get('extra_params', 0) if g.n else ''
    rows.append([g.key[0], g.label, reports.fmt_pct(mean, std),
                 reports.fmt_difference(g, bp.get(g.key[0])), g.n,
                 f'{extra:,}' if extra else ('0' if g.n else '–'),
                 published.describe(table, *g.key[:4])])
  for model in dict.fromkeys(g.key[0] for g in groups):
    fdg = [g for g in groups if g.key[0] == model and g.key[1] == 'fdg' and g.n]
    if len(fdg) > 1:
      g = min(fdg, key=lambda g: g.stat('test_error')[0])
      best.append(f'{model}: β = {g.key[3]:g} ({reports.fmt_pct(*g.stat("test_error"))}%)')
  body = reports.markdown_table(
      ['model', 'method', 'test error (%)', 'vs BP (points, ± s.e.)', 'n',
       'extra params (DGL heads)',
       f'paper {table} (%)'], rows)
  if best:
    body += ('\n\nFDG with the lowest mean test error among the β run (chosen on the test '
             'error itself, so optimistic): ' + '; '.join(best) + '.')
  body += ('\n\nvs BP: mean over seeds of the per-seed difference in test error from BP of the '
           'same model, ± its standard error (a seed gives every run the same initial weights '
           'and batches).')
  body += ('\n\nFigure: `curves.png` (test error against epoch, mean over seeds, band ± 1 '
           f'std).\nPaper column: {published.SOURCE}; {published.SETTING}. It is at the paper\'s '
           f'scale, so compare orderings and gaps, not error levels, with a reduced-scale run.\n')
  reports.write_results_md(os.path.join(out_dir, 'results.md'),
                           f'{table}: BP, DDG, DGL and FDG on {dataset_title}, K = {NUM_STAGES}, '
                           f'{options.scale} scale', results, options, body)


def define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_list('models', [], 'Models; default: resnet56, resnet110, resnet18, wrn28_10 at '
                    'the paper scale, resnet20 at the cpu scale.')
  flags.DEFINE_list('fdg_betas', [], "FDG's betas; default: 1 and the config file's beta.")


def run(name: str, dataset: str, table: str, dataset_title: str) -> None:
  """The `main` of table2.py and table3.py."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  try:
    betas = cells_lib.parse_floats(f.fdg_betas, 'fdg_betas')
  except cells_lib.GridError as e:
    sys.exit(f'error: {e}')
  sys.exit(grid.main(
      name, lambda options: build_cells(options, dataset, f.models, betas),
      lambda results, options: report(results, options, table, dataset_title)))


def main(argv):
  del argv
  run('table2', 'cifar10', 'Table 2', 'CIFAR-10')


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  cells_lib.define_flags('table2')
  define_flags()
  flags.adopt_module_key_flags(cells_lib)   # listed by --help
  app.run(main)
