"""A grid's cells: the common flags, and one training run's config built and checked.

`make_cell` turns a row's config file, the scale (one of the grid's `Scale`s: the image grids'
`IMAGE_SCALES`, with `CPU_SCALE` and `rescale_schedule` for `--scale=cpu`), the data flags, the
script's defaults and `--set` overrides into a `Cell`, checking every field before anything runs.
How a grid uses its cells: experiments/grids/grid.py.
"""

import dataclasses
import importlib
import os
from typing import Optional, Sequence

import experiments
from fdg_jax.engine import methods

REPO = experiments.REPO
RESULTS_DIR = experiments.RESULTS_DIR


@dataclasses.dataclass(frozen=True)
class Scale:
  """What `--scale=NAME` makes of a grid's config files."""
  overrides: dict     # config fields set at this scale ({}: the config files as they are)
  description: str    # for --help and results.md


# The reduced scale `--scale=cpu`: a fixed seeded subset of the training images (the test split
# is complete), 12 epochs, the paper's schedule compressed to them (see rescale_schedule),
# evaluation every 2 epochs, a checkpoint every 250 steps (about 2 minutes of ResNet-20).
CPU_SCALE = {
    'train_subset': 10_000,
    'num_epochs': 12,
    'eval_every_epochs': 2,
    'log_every_steps': 50,
    'checkpoint_every_steps': 250,
}
# The image classification grids' scales (the default of every grid).
IMAGE_SCALES = {
    'paper': Scale({}, "the config files' recipe (300 epochs, full data; see "
                   'configs/default.py)'),
    'cpu': Scale(CPU_SCALE, f"reduced, not the paper's: {CPU_SCALE}, the lr boundaries and the "
                 'warm-up keeping their share of the run (see experiments/grids/grid.py)'),
}
SCALES = tuple(IMAGE_SCALES)
# Fields a cell's script sets itself; `--set` may not change them.
CELL_FIELDS = ('method', 'model', 'num_stages', 'beta', 'seed')
# A cell's method is a trainer method (config.method), labelled as the registry labels it; a
# grid's own settings of a method (compensations, stash) are its cells' `variant`, not methods.
METHOD_LABELS = {name: info.label for name, info in methods.REGISTRY.items()}


class GridError(ValueError):
  """A grid that cannot run as asked; the message names the problem and the fix."""


# ----------------------------------------------------------------------------------- options


@dataclasses.dataclass
class Options:
  """What every script takes (the common flags)."""
  name: str
  scale: str = 'cpu'
  seeds: tuple = (0, 1, 2)
  dataset: str = ''        # '' = the config files' (tfds cifar10 / cifar100)
  data_dir: str = ''
  sets: tuple = ()         # ('FIELD=VALUE', ...)
  out_dir: str = ''        # '' = experiments/results/<name>_<scale>
  dry_run: bool = False
  report_only: bool = False
  keep_checkpoints: bool = False
  processes: bool = False  # FDG/DDG/DGL cells: one process per stage (runner.py)
  argv: tuple = ()         # the command line, recorded in results.md
  scales: dict = dataclasses.field(default_factory=lambda: dict(IMAGE_SCALES))  # the grid's

  @property
  def output_dir(self) -> str:
    return os.path.abspath(self.out_dir or os.path.join(RESULTS_DIR, f'{self.name}_{self.scale}'))


def define_flags(name: str, scales: Optional[dict] = None) -> None:
  """The common absl flags (call once, from a script's `__main__`); `scales`: the grid's
  (name -> Scale; default IMAGE_SCALES), of which `--scale` picks one ('cpu' by default)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  scales = scales or IMAGE_SCALES
  flags.DEFINE_enum('scale', 'cpu', list(scales), '; '.join(
      f"'{n}': {s.description}" for n, s in scales.items()) + '.')
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds; every cell runs once per seed.')
  flags.DEFINE_string('dataset', '', "Override config.dataset (e.g. 'imagefolder'); '' = the "
                      "config files' tfds dataset.")
  flags.DEFINE_string('data_dir', '', 'Override config.data_dir (tfds directory, image folder '
                      'or .tar.gz archive).')
  flags.DEFINE_multi_string('set', [], 'FIELD=VALUE: override a config field in every cell '
                            '(e.g. --set cache_dir=/tmp/fdg_cache --set train_subset=512).')
  flags.DEFINE_string('out_dir', '', f"Where runs and results go; '' = "
                      f'experiments/results/{name}_<scale>.')
  flags.DEFINE_bool('dry_run', False, 'Print the grid (cells, status, commands); run nothing.')
  flags.DEFINE_bool('report_only', False, 'Run nothing; write the results from the runs that '
                    'have finished.')
  flags.DEFINE_bool('keep_checkpoints', False, "Keep a finished run's checkpoints (deleted by "
                    'default: they hold the pipeline in flight, up to GiBs per run).')
  flags.DEFINE_bool('processes', False, 'On CPU, train a cell of K > 1 stages in K processes, '
                    'stage k in process k pinned to its own cores (fdg_jax.launch), instead of '
                    'one process with K simulated devices: the same computation, faster when '
                    'the stages can run on separate cores. A cell resumes in the layout its '
                    'checkpoint was written in.')


def options_from_flags(name: str, scales: Optional[dict] = None) -> Options:
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  try:
    seeds = tuple(int(s) for s in f.seeds)
  except ValueError as e:
    raise GridError(f'--seeds={",".join(f.seeds)}: {e}. Give integers, e.g. --seeds=0,1,2.')
  return Options(name=name, scale=f.scale, seeds=seeds, dataset=f.dataset, data_dir=f.data_dir,
                 sets=tuple(f.set), out_dir=f.out_dir, dry_run=f.dry_run,
                 report_only=f.report_only, keep_checkpoints=f.keep_checkpoints,
                 processes=f.processes, argv=experiments.command_argv(),
                 scales=dict(scales or IMAGE_SCALES))


def parse_floats(values: Sequence[str], flag: str) -> tuple:
  try:
    return tuple(float(v) for v in values)
  except ValueError as e:
    raise GridError(f'--{flag}: {e}. Give numbers, e.g. --{flag}=0.5,1.0.')


# ------------------------------------------------------------------------------ cells, configs


@dataclasses.dataclass(frozen=True)
class Cell:
  """One training run of the grid."""
  method: str
  model: str
  num_stages: int      # K (1 for BP)
  beta: float
  seed: int
  config_file: str     # relative to the repository, e.g. 'configs/cifar10_resnet20.py'
  overrides: tuple = ()   # ((field, value), ...): everything set on top of config_file
  variant: str = ''       # a name for the script's own settings of the cell ('' = none)

  @property
  def microbatches(self) -> int:
    """M, the microbatches of a batch (config.microbatches; 1 unless the cell sets it)."""
    return int(self.override_dict().get('microbatches', 1))

  @property
  def group(self) -> tuple:
    """The cell without its seed: what results are averaged over. Its last item is the cell's
    setting: M = `microbatches` where it is over 1, then the variant."""
    setting = ' '.join(p for p in (f'M={self.microbatches}' if self.microbatches > 1 else '',
                                   self.variant) if p)
    return (self.model, self.method, self.num_stages, self.beta, setting)

  @property
  def name(self) -> str:
    """A directory name: model_method[_kK][_betaB][_mM]_seedS (K, beta and M only where they
    matter)."""
    parts = [self.model, self.method]
    if self.method != 'bp':
      parts.append(f'k{self.num_stages}')
    if self.method == 'fdg':
      parts.append(f'beta{self.beta:g}')
    if self.microbatches > 1:
      parts.append(f'm{self.microbatches}')
    if self.variant:
      parts.append(self.variant)
    parts.append(f'seed{self.seed}')
    return '_'.join(parts)

  @property
  def label(self) -> str:
    return group_label(self.group)

  def override_dict(self) -> dict:
    return dict(self.overrides)


def group_label(group: tuple) -> str:
  _, method, num_stages, beta, variant = group
  label = METHOD_LABELS.get(method, method)
  if method != 'bp':
    label += f' K={num_stages}'
  if method == 'fdg':
    label += f' β={beta:g}'
  return f'{label} {variant}' if variant else label


def load_config(config_file: str):
  """The ConfigDict of a config file (a path relative to the repository)."""
  path = os.path.join(REPO, config_file)
  if not os.path.exists(path):
    raise GridError(f'config file {config_file!r} does not exist in {REPO}.')
  # configs/ sits beside experiments/, so it imports from wherever `experiments` was imported.
  module_name = os.path.splitext(config_file)[0].replace(os.sep, '.')
  return importlib.import_module(module_name).get_config()


def parse_value(text: str):
  """A `--set` value: a Python literal (3, 0.5, (6, 9), True) or else the string itself."""
  import ast  # pylint: disable=g-import-not-at-top
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_sets(sets: Sequence[str]) -> dict:
  result = {}
  for item in sets:
    field, sep, value = item.partition('=')
    field = field.strip()
    if not sep or not field:
      raise GridError(f'--set {item!r}: expected FIELD=VALUE, e.g. --set train_subset=512.')
    if field in CELL_FIELDS:
      raise GridError(f'--set {item!r}: {field} is set by the grid itself; use the script\'s '
                      'flags (--betas, --models, --num_stages, --seeds, ...).')
    result[field] = parse_value(value)
  return result


def _epoch_value(x: float):
  """An epoch count for the config: an int where it is one (to float precision)."""
  return int(round(x)) if abs(x - round(x)) < 1e-9 else round(x, 4)


def rescale_schedule(base, num_epochs: int, explicit: dict) -> dict:
  """lr boundaries and warm-up of `base` keeping their share of a `num_epochs` run.

  The paper's 150/225/275 of 300 epochs become 6/9/11 of 12. A warm-up is rounded to whole
  epochs but kept at least 1 (3 of 300 epochs -> 1 of 12), as the recorded grids ran it.
  Fields in `explicit` (given with --set) are left as given.
  """
  if num_epochs == base.num_epochs:
    return {}
  factor = num_epochs / base.num_epochs
  out = {}
  if 'lr_boundaries_epochs' not in explicit:
    out['lr_boundaries_epochs'] = tuple(_epoch_value(b * factor)
                                        for b in base.lr_boundaries_epochs)
  if 'warmup_epochs' not in explicit and base.warmup_epochs:
    out['warmup_epochs'] = max(1, int(round(base.warmup_epochs * factor)))
  return out


def make_cell(options: Options, config_file: str, *, method: str, seed: int,
              num_stages: Optional[int] = None, beta: Optional[float] = None,
              script_overrides: Optional[dict] = None, variant: str = '') -> Cell:
  """A cell of `config_file` at the options' scale, with every override checked.

  Order: the scale, the data flags, the script's own defaults, `--set`, the rescaled schedule,
  then the cell's fields. `variant` names what `script_overrides` make of the cell (it goes
  into the cell's name and label). num_stages / beta default to the config file's; methods
  other than FDG run with beta = 1 (DDG has no gradient shrinking, BP and DGL do not use it)
  and BP with K = 1. A cell of a method over microbatches (the registry's takes_microbatches:
  GPipe, 1F1B, FDG, BP) sets `microbatches` in `script_overrides` or through `--set`; its name
  and label carry M (`_m4`, 'M=4'), and another method refuses one.
  """
  if options.scale not in options.scales:
    raise GridError(f'--scale={options.scale!r}: choose one of {tuple(options.scales)}.')
  if method not in METHOD_LABELS:
    raise GridError(f'unknown method {method!r}: choose one of {tuple(METHOD_LABELS)}.')
  base = load_config(config_file)
  overrides = dict(options.scales[options.scale].overrides)
  if options.dataset:
    overrides['dataset'] = options.dataset
  if options.data_dir:
    # The trainer runs with the repository as its working directory: a relative path means
    # the caller's directory, so it goes to the cells as an absolute one (what they record),
    # with '~' expanded as the datasets' own readers expand it.
    overrides['data_dir'] = (options.data_dir if '://' in options.data_dir
                             else os.path.abspath(os.path.expanduser(options.data_dir)))
  overrides.update(script_overrides or {})
  explicit = parse_sets(options.sets)
  overrides.update(explicit)
  num_epochs = overrides.get('num_epochs', base.num_epochs)
  overrides.update(rescale_schedule(base, num_epochs, explicit))
  microbatches = overrides.get('microbatches', base.get('microbatches', 1))
  if microbatches != 1 and not methods.get(method).takes_microbatches:
    takes = tuple(name for name, info in methods.REGISTRY.items() if info.takes_microbatches)
    raise GridError(f'microbatches={microbatches!r} (from --set or the script): method {method!r} '
                    f'does not take microbatches; the methods that do: {takes}.')
  num_stages = 1 if method == 'bp' else (num_stages or base.num_stages)
  beta = float(beta if beta is not None else base.beta) if method == 'fdg' else 1.0
  overrides.update(method=method, model=base.model, num_stages=num_stages, beta=beta, seed=seed)
  config = base
  for field, value in overrides.items():   # the checks config_flags will make in the run
    if field not in config:
      raise GridError(f'config field {field!r} (from --set or the scale) does not exist in '
                      f'{config_file}. See configs/default.py for the fields.')
    try:
      config[field] = value
    except (TypeError, ValueError) as e:
      raise GridError(f'config field {field!r} = {value!r}: {e}') from None
  return Cell(method=method, model=base.model, num_stages=num_stages, beta=beta, seed=seed,
              config_file=config_file, variant=variant, overrides=tuple(sorted(
                  (k, tuple(v) if isinstance(v, list) else v) for k, v in overrides.items())))
