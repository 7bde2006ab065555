r"""Table 4 of the paper: ResNet-56 on CIFAR-10 with FDG at K = 2, 3, 4: test error, time, speed-up.

BP (the unsplit network on one device) is the reference; FDG runs at each K of `--num_stages`
with the row configs (configs/cifar10_resnet56.py for K = 2, _k3.py split by residual group,
_k4.py; other K: the K = 4 config with a FLOP-balanced split) and their beta. Every cell once per
seed. Times are the trainer's `train_time_s` (all training steps, compilation and the end-of-run
checkpoint write included) and `images_per_sec`; speed-up = BP's mean time / the method's.

So that the times are of training: the runs evaluate only at the end (no learning curve beyond
the final point) unless `--curves`, and at the cpu scale they checkpoint only at the end and when
interrupted (Ctrl-C or SIGTERM still saves one), instead of every 250 steps.

On a CPU the K stages are simulated devices sharing the same cores, so a CPU speed-up says
nothing about K accelerators; results.md records the devices of every run.

    python -m experiments.paper.table4 --scale=cpu --dataset=imagefolder \
        --data_dir=../shared/data/cifar10-jpeg.tar.gz --set cache_dir=/tmp/fdg_cache

Writes OUT_DIR/results.md, results.csv and curves.png. Common flags: see experiments/grids/cells.py.
"""

import math
import os
import sys

from experiments.grids import cells as cells_lib
from experiments.grids import grid
from experiments.grids import reports
from experiments.paper import published

NAME = 'table4'
CONFIGS = {2: 'configs/cifar10_resnet56.py', 3: 'configs/cifar10_resnet56_k3.py',
           4: 'configs/cifar10_resnet56_k4.py'}


def script_overrides(options: cells_lib.Options, curves: bool) -> dict:
  overrides = {} if curves else {'eval_every_epochs': 0}
  if options.scale == 'cpu':
    overrides['checkpoint_every_steps'] = 0
  return overrides


def build_cells(options: cells_lib.Options, num_stages=(2, 3, 4), beta=None,
                curves: bool = False) -> list:
  overrides = script_overrides(options, curves)
  bad = [k for k in num_stages if k < 2]
  if bad:
    raise cells_lib.GridError(f'--num_stages: {bad}: FDG needs K >= 2 (BP is always run).')
  cells = []
  for seed in options.seeds:
    cells.append(cells_lib.make_cell(options, CONFIGS[2], method='bp', seed=seed,
                                     script_overrides=overrides))
    cells += [cells_lib.make_cell(options, CONFIGS.get(k, CONFIGS[4]), method='fdg',
                                  num_stages=k, beta=beta, seed=seed, script_overrides=overrides)
              for k in num_stages]
  return cells


def report(results, options: cells_lib.Options) -> None:
  out_dir = options.output_dir
  os.makedirs(out_dir, exist_ok=True)
  groups = reports.aggregate(results)
  reports.write_csv(results, os.path.join(out_dir, 'results.csv'))
  reports.plot_curves(groups, os.path.join(out_dir, 'curves.png'), 'Table 4')
  bp = next((g for g in groups if g.key[1] == 'bp' and g.n), None)
  bp_time = bp.stat('train_time_s')[0] if bp else math.nan
  rows = []
  for g in groups:
    time_mean, time_std = g.stat('train_time_s')
    ips_mean, ips_std = g.stat('images_per_sec')
    speedup = '–' if math.isnan(bp_time) or math.isnan(time_mean) else (
        f'{bp_time / time_mean:.2f}x')
    devices = ' '.join(g.summaries[0]['devices']) if g.n else '–'
    rows.append([g.label, reports.fmt_pct(*g.stat('test_error')), reports.fmt_difference(g, bp),
                 g.n, reports.fmt_num(time_mean, time_std), reports.fmt_num(ips_mean, ips_std, 1),
                 speedup, devices, published.describe('Table 4', *g.key[:4]),
                 f'{1 / published.TABLE4_TIME_SHARE[g.key[2]]:.2f}x'
                 if g.key[2] in published.TABLE4_TIME_SHARE else '–'])
  body = reports.markdown_table(
      ['method', 'test error (%)', 'vs BP (points, ± s.e.)', 'n', 'train time (s)', 'images/s', 'speed-up vs BP',
       'stage devices', 'paper test error (%)', 'paper speed-up'], rows)
  body += ('\n\nvs BP: mean over seeds of the per-seed difference in test error, ± its standard '
           'error (a seed gives every run the same initial weights and batches).')
  body += ('\n\nTimes: `train_time_s` of the trainer (every training step, compilation and the '
           'end-of-run checkpoint write; evaluations too if the runs evaluated during training) '
           'and its `images_per_sec` (of the last resumed segment for a resumed run), mean ± std '
           'over seeds. Speed-up = mean BP time / mean time. Simulated CPU devices share the '
           'same cores: a CPU speed-up is no measure of K accelerators.\nPaper columns: '
           f'{published.SOURCE}; {published.SETTING}; its speed-up is 1 / (training time as a '
           "share of BP's) on K GPUs.\n")
  reports.write_results_md(os.path.join(out_dir, 'results.md'),
                           f'Table 4: ResNet-56 on CIFAR-10, FDG at K = 2, 3, 4 against BP, '
                           f'{options.scale} scale', results, options, body)


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  try:
    num_stages = tuple(int(k) for k in f.num_stages)
    beta = float(f.beta) if f.beta else None
  except ValueError as e:
    sys.exit(f'error: --num_stages / --beta: {e}')
  sys.exit(grid.main(NAME, lambda options: build_cells(options, num_stages, beta, f.curves),
                     report))


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  cells_lib.define_flags(NAME)
  flags.adopt_module_key_flags(cells_lib)   # listed by --help
  flags.DEFINE_list('num_stages', ['2', '3', '4'], 'K values of FDG (BP is always run).')
  flags.DEFINE_string('beta', '', "FDG's beta; '' = the config files' (0.5).")
  flags.DEFINE_bool('curves', False, 'Evaluate during training as the scale says (learning '
                    'curves; the times then include the evaluations).')
  app.run(main)
