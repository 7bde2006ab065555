r"""Deep pipelines (issue 38): FDG at K = 4 and 8 against BP on the deep character GPT, with AdamW
and with Muon.

configs/shakespeare_char_deep_cpu.py as it is (8 layers, 4 heads, 128 wide, context 64, batch
16, AdamW): BP; FDG at K = 4 and 8, plain and with each compensation (COMPENSATIONS: the
Nesterov look-ahead and basis rotation, AdamW only, as they rebuild AdamW; weight prediction;
error feedback), each also with microbatches (PipeDream-2BW's one-update delay, M = 8 at K = 4
and 16 at K = 8, both >= 2(K - 1)); then, for reference, DDG, DGL (its auxiliary head 'lm') and
1F1B over the same microbatches (BP's update, with a bubble: a check of the grid). Each
with AdamW and with Muon (config.optimizer='muon'; cells tagged 'muon'); and BP and FDG over
microbatches with Adam in a rotated basis on every stage (config.optimizer='rotated_adamw'; cells
tagged 'rotadam'), BP so the basis-rotation cells have a BP of their own. Each against BP with
the same optimizer (`optimizer_of`), as a paired difference (a seed gives every method the same initial weights
and batches). Writes OUT_DIR/results.md (validation loss and bits per character per cell, the
differences to BP, the seed-0 samples), results.csv and curves.png.

On a 2-core CPU, with the text as a file (from the repository root; the BP baselines first):

    python -m experiments.lm.depth_grid --dataset=textfile \
        --data_dir=PATH/TO/tinyshakespeare.txt --methods=bp,bp_muon --seeds=0,1,2

Run it again to resume; `--dry_run` lists the cells and their commands, `--report_only` reports
the runs finished so far, `--methods` picks a subset (names in METHODS). Common flags
(`--seeds`, `--set FIELD=VALUE`, `--out_dir`, `--processes`, ...): experiments/grids/cells.py.
"""

from experiments.grids import cells as cells_lib
from experiments.lm import shakespeare_grid

NAME = 'depth'
CONFIG_FILE = 'configs/shakespeare_char_deep_cpu.py'
SCALES = {'cpu': cells_lib.Scale({}, 'the deep CPU recipe, the config file as it is '
                                 f'({CONFIG_FILE}: 8 layers, 128 wide, context 64, batch 16, '
                                 '2000 steps)')}
# M per K: PipeDream-2BW's microbatches, at least 2(K - 1) and dividing the batch of 16.
MICROBATCHES = {4: 8, 8: 16}
# The compensations the grid screens: name in the table -> (variant tag, config.compensation).
COMPENSATIONS = {'nesterov': ('nag', 'nesterov'), 'wp': ('wp', 'weight_prediction'),
                 'ef': ('ef', 'error_feedback'), 'rot': ('rot', 'basis_rotation')}
# The ones that rebuild AdamW (or SGD) for the delayed stages, and so refuse Muon.
ADAMW_ONLY = ('nesterov', 'basis_rotation')
# The optimizers, as a tag in the cell's name and the config fields they set.
OPTIMIZERS = {'adamw': ('', {}), 'muon': ('muon', {'optimizer': 'muon'})}


def _methods() -> dict:
  """name -> (method, K, beta, variant tag, config fields): every method with each optimizer
  ('_muon' names the Muon one), in the order the grid runs them."""
  rows = {'bp': ('bp', 1, '', {})}
  for k in (4, 8):   # K = 4 first: the screening's most informative cells run first
    m = MICROBATCHES[k]
    rows[f'fdg_k{k}'] = ('fdg', k, '', {})
    # Each compensation alone (FDG's delay 2(K-1-k)) and with 2BW's microbatches (one update).
    for short, (variant, compensation) in COMPENSATIONS.items():
      rows[f'fdg_k{k}_{short}'] = ('fdg', k, variant, {'compensation': compensation})
    rows[f'fdg_k{k}_m{m}'] = ('fdg', k, '', {'microbatches': m})
    for short, (variant, compensation) in COMPENSATIONS.items():
      rows[f'fdg_k{k}_m{m}_{short}'] = ('fdg', k, variant, {'compensation': compensation,
                                                            'microbatches': m})
  for k in (4, 8):   # for reference: DDG, DGL, and 1F1B (BP's update: a check of the grid)
    rows.update({f'ddg_k{k}': ('ddg', k, '', {}), f'dgl_k{k}': ('dgl', k, '', {'aux_head': 'lm'}),
                 f'1f1b_k{k}_m{MICROBATCHES[k]}': ('1f1b', k, '', {'microbatches': MICROBATCHES[k]})})
  table = {}
  for optimizer, (tag, optimizer_fields) in OPTIMIZERS.items():
    for name, (method, k, variant, fields) in rows.items():
      if optimizer == 'muon' and fields.get('compensation') in ADAMW_ONLY:
        continue   # refused: they rebuild SGD or AdamW (trainer/optimizers.py)
      suffix = f'_{tag}' if tag else ''
      table[name + suffix] = (method, k, 1.0, '-'.join(p for p in (tag, variant) if p),
                              {**fields, **optimizer_fields})
  # Adam in a rotated basis on every stage (optimizer 'rotated_adamw', cells tagged rotadam):
  # BP, the reference of the basis-rotation cells, and FDG over microbatches.
  for name in ('bp', f'fdg_k4_m{MICROBATCHES[4]}', f'fdg_k8_m{MICROBATCHES[8]}'):
    method, k, beta, _, fields = table[name]
    table[name + '_rotadam'] = (method, k, beta, 'rotadam',
                                {**fields, 'optimizer': 'rotated_adamw'})
  return table


METHODS = _methods()


def build_cells(options: cells_lib.Options, methods=tuple(METHODS)) -> list:
  """One cell per method and seed (every stage on a device of its own, as the Shakespeare
  grid's); the seeds outermost."""
  return shakespeare_grid.build_cells(options, methods, METHODS, CONFIG_FILE)


def optimizer_of(group) -> str:
  """The optimizer a group's differences are taken against, from its tags (its setting, e.g.
  'M=8 muon-wp'): 'muon'; 'rotated_adamw' for Adam in a rotated basis, on every stage (rotadam)
  or on the delayed ones (rot, compensation basis_rotation); else 'adamw'."""
  tags = group.key[-1].replace(' ', '-').split('-')
  if 'muon' in tags:
    return 'muon'
  return 'rotated_adamw' if 'rotadam' in tags or 'rot' in tags else 'adamw'


def same_optimizer_bp(group, groups):
  """BP with the group's optimizer: the reference of its differences."""
  return next((g for g in groups if g.key[1] == 'bp' and optimizer_of(g) == optimizer_of(group)),
              None)


def report(results, options: cells_lib.Options) -> None:
  shakespeare_grid.report(
      results, options, title='Deep character GPT on tiny Shakespeare: FDG at K = 4 and 8 '
      f'against BP, AdamW and Muon, {options.scale} scale', reference=same_optimizer_bp,
      notes="Cells tagged muon train with config.optimizer='muon' and are compared with BP "
      "with Muon; cells tagged rotadam (config.optimizer='rotated_adamw': Adam in a rotated "
      'basis on every stage) and rot (compensation basis_rotation: on the delayed stages) with '
      'BP with rotated Adam; the others with BP with AdamW. M=: microbatches per batch; nag: '
      'the Nesterov look-ahead (AdamW only).')


if __name__ == '__main__':
  shakespeare_grid.run_script(NAME, SCALES, METHODS, build_cells, report)
