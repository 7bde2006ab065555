r"""FDG against BP on a character GPT: nanoGPT's CPU recipe for tiny Shakespeare.

configs/shakespeare_char_cpu.py as it is (4 layers, 4 heads, 128 wide, context 64, batch 12,
2000 steps of AdamW): BP; FDG at K = 2 with beta 1 and 0.5, and at K = 4; DDG and DGL (its
auxiliary head 'lm') at K = 2; FDG at K = 2 and 4 with weight prediction, the Nesterov
look-ahead, the delay momentum and both (fdg_jax/engine/compensation.py). Every cell once per
seed; each method against BP as a paired difference (a seed gives every method the same initial
weights and batches). Writes OUT_DIR/results.md (validation loss and bits per character per
method, the differences to BP, the seed-0 samples), results.csv and curves.png (validation loss
against step, mean over seeds).

On a 2-core CPU, with the text as a file (from the repository root):

    python -m experiments.lm.shakespeare_grid --dataset=textfile \
        --data_dir=PATH/TO/tinyshakespeare.txt --processes

Run it again to resume; `--dry_run` lists the cells and their commands, `--report_only` reports
the runs finished so far, `--methods` picks a subset (names in METHODS, e.g.
--methods=bp,fdg_k2). Common flags (`--seeds`, `--set FIELD=VALUE`, `--out_dir`,
`--processes`, ...): see experiments/grids/cells.py.
"""

import os
import sys

from experiments.grids import cells as cells_lib
from experiments.grids import grid
from experiments.grids import metrics
from experiments.grids import reports

NAME = 'shakespeare_char'
CONFIG_FILE = 'configs/shakespeare_char_cpu.py'
SCALES = {'cpu': cells_lib.Scale({}, "nanoGPT's CPU recipe, the config file as it is "
                                 f'({CONFIG_FILE}: 4 layers, 128 wide, context 64, batch 12, '
                                 '2000 steps of AdamW)')}
# name -> (method, K, beta, variant tag in the cell name, the config fields it sets).
METHODS = {
    'bp': ('bp', 1, 1.0, '', {}),
    'fdg_k2': ('fdg', 2, 1.0, '', {}),
    'fdg_k2_beta0.5': ('fdg', 2, 0.5, '', {}),
    'fdg_k4': ('fdg', 4, 1.0, '', {}),
    'ddg_k2': ('ddg', 2, 1.0, '', {}),
    'dgl_k2': ('dgl', 2, 1.0, '', {'aux_head': 'lm'}),
    'fdg_k2_wp': ('fdg', 2, 1.0, 'wp', {'compensation': 'weight_prediction'}),
    'fdg_k4_wp': ('fdg', 4, 1.0, 'wp', {'compensation': 'weight_prediction'}),
    # Ajanthan et al. 2025: NAdamW at b1 = 0.99 on the delayed stages, its delay momentum, both.
    'fdg_k2_nesterov': ('fdg', 2, 1.0, 'nag', {'compensation': 'nesterov'}),
    'fdg_k4_nesterov': ('fdg', 4, 1.0, 'nag', {'compensation': 'nesterov'}),
    'fdg_k2_delay_momentum': ('fdg', 2, 1.0, 'dm', {'compensation': 'delay_momentum'}),
    'fdg_k4_delay_momentum': ('fdg', 4, 1.0, 'dm', {'compensation': 'delay_momentum'}),
    'fdg_k2_nesterov_dm': ('fdg', 2, 1.0, 'nagdm', {'compensation': 'nesterov+delay_momentum'}),
    'fdg_k4_nesterov_dm': ('fdg', 4, 1.0, 'nagdm', {'compensation': 'nesterov+delay_momentum'}),
    # The stale stages learning less (PipeMare's lr / delay, annealed over a quarter of the run
    # or all of it): under Adam beta cannot do it (issue 28, the K = 4 goal).
    'fdg_k4_lr': ('fdg', 4, 1.0, 'lr', {'compensation': 'lr_reschedule'}),
    'fdg_k4_lr_whole': ('fdg', 4, 1.0, 'lr1', {'compensation': 'lr_reschedule',
                                                'lr_reschedule_fraction': 1.0}),
}
# Every stage on a device of its own, as in the image grids (the config file puts all on device
# 0): K simulated CPU devices in one process, or one process per stage with --processes.
PLACEMENT = {'stage_devices': ()}
BITS_PER_CHAR = 'val_bits_per_char'
CSV_FIELDS = ('cell', 'model', 'method', 'num_stages', 'beta', 'seed', 'compensation', 'status',
              'dataset', 'vocabulary_size', 'train_tokens', 'val_tokens', 'steps', 'batch_size',
              'val_loss', BITS_PER_CHAR, 'val_perplexity', 'val_token_accuracy', 'train_time_s',
              'tokens_per_sec', 'resumed_from_step', 'trainable_params', 'extra_params',
              'peak_host_memory_mib', 'stage_split', 'devices', 'params_digest', 'workdir')


def build_cells(options: cells_lib.Options, methods=tuple(METHODS), table=None,
                config_file: str = CONFIG_FILE) -> list:
  """One cell per method and seed of `config_file`; the seeds outermost, so every method's first
  seed is first. `table`: name -> (method, K, beta, variant, fields), METHODS by default."""
  table = METHODS if table is None else table
  unknown = [m for m in methods if m not in table]
  if unknown:
    raise cells_lib.GridError(f'--methods: unknown {unknown}; choose from {tuple(table)}.')
  cells = []
  for seed in options.seeds:
    for name in methods:
      method, num_stages, beta, variant, fields = table[name]
      cells.append(cells_lib.make_cell(options, config_file, method=method, seed=seed,
                                       num_stages=num_stages, beta=beta, variant=variant,
                                       script_overrides={**PLACEMENT, **fields}))
  return cells


def data_line(summary: dict) -> str:
  return (f'{summary["vocabulary"]} vocabulary of {summary["vocabulary_size"]} symbols, '
          f'{summary["train_tokens"]:,} training and {summary["val_tokens"]:,} validation '
          f'tokens, batch {summary["batch_size"]}, {summary["steps"]} steps '
          f'({summary["epochs"]:.2f} epochs of the training text).')


def samples(groups) -> str:
  """Each method's sample from its lowest seed (seed 0 by default), as the summary holds it."""
  parts = []
  for g in groups:
    if not g.n:
      continue
    seed, summary = min(zip(g.seeds, g.summaries), key=lambda pair: pair[0])
    if 'sample' in summary:
      parts.append(f'**{g.label}** (seed {seed}):\n\n```text\n{summary["sample"]}\n```')
  return '\n\n'.join(parts)


def first_bp(group, groups):
  """The reference of every group's differences: BP (this grid has one)."""
  del group
  return next((g for g in groups if g.key[1] == 'bp'), None)


NANOGPT_NOTE = ("nanoGPT's own CPU run of this recipe reaches a validation loss of about 1.88 "
                '(its README; tied embeddings, every matrix decayed, 20 random validation '
                'batches).')


def report(results, options: cells_lib.Options, title: str = '', reference=first_bp,
           notes: str = NANOGPT_NOTE) -> None:
  """results.md, results.csv and curves.png; each group's differences against
  `reference(group, groups)`; `notes` closes the table's explanation."""
  out_dir = options.output_dir
  os.makedirs(out_dir, exist_ok=True)
  metric = metrics.VAL_LOSS
  groups = reports.aggregate(results)
  reports.write_csv(results, os.path.join(out_dir, 'results.csv'), CSV_FIELDS)
  reports.plot_curves(groups, os.path.join(out_dir, 'curves.png'), 'Character GPT', metric,
                      x='step')
  rows = []
  for g in groups:
    accuracy = g.stat('val_token_accuracy') if g.n else (float('nan'),) * 2
    rows.append([g.label, metric.format(*g.stat(metric.field)),
                 reports.fmt_num(*g.stat(BITS_PER_CHAR), digits=3),
                 reports.fmt_difference(g, reference(g, groups), metric),
                 reports.fmt_pct(*accuracy), g.n,
                 reports.fmt_num(g.stat('train_time_s')[0]),
                 reports.fmt_num(g.stat('tokens_per_sec')[0])])
  body = reports.markdown_table(
      ['method', metric.label, 'bits per char', f'vs BP ({metric.difference}, ± s.e. paired)',
       'token accuracy (%)', 'n', 'train time (s, mean)', 'tokens/s (mean)'], rows)
  body += ('\n\nvs BP: the mean over seeds of (method - BP) validation loss, ± its standard '
           'error; a seed gives every method the same initial weights and batches, so a '
           'difference well beyond 2 standard errors is larger than the run-to-run spread. '
           'Bits per char: the validation loss / ln 2. Methods: FDG (stash vjp), β its gradient '
           'shrinking; DDG; DGL with the LM auxiliary head; wp = FDG with weight prediction '
           '(docs/algorithm.md). Time: the trainer\'s train_time_s (compilation and '
           'evaluations included); tokens/s: training tokens per second.\n'
           'Figure: `curves.png` (validation loss against step, mean over seeds, band ± std).'
           f'\n\n{notes}')
  text = samples(groups)
  if text:
    body += ('\n\n## Samples\n\nAfter training, from each method\'s lowest seed (0 by '
             f'default):\n\n{text}\n')
  title = title or f'Character GPT on tiny Shakespeare: FDG against BP, {options.scale} scale'
  reports.write_results_md(os.path.join(out_dir, 'results.md'), title, results, options, body,
                           metric, data_line)


def run_script(name: str, scales: dict, methods: dict, build_cells, report) -> None:
  """A language-model grid's command: the common flags and `--methods` (names in `methods`),
  then the grid of the chosen methods' cells, scored and reported by validation loss."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  cells_lib.define_flags(name, scales)
  flags.adopt_module_key_flags(cells_lib)   # listed by --help
  flags.DEFINE_list('methods', list(methods), f'Methods to run, from {list(methods)}.')

  def main(argv):
    del argv
    chosen = tuple(flags.FLAGS.methods)
    sys.exit(grid.main(name, lambda options: build_cells(options, chosen), report,
                       metrics.VAL_LOSS, scales))

  app.run(main)


if __name__ == '__main__':
  run_script(NAME, SCALES, METHODS, build_cells, report)
