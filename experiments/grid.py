r"""A grid of training runs that resumes, and the tables and figures made from their summaries.

The paper's comparisons (`table2.py`, `table3.py`, `table4.py`, `fig4a_beta.py`) are each a list of
`Cell`s (method, model, K, beta, seed, config file, config overrides) handed to `run_grid`, and a
report made from the runs' `summary.json` files. Everything they share lives here:

- **Cells and their configs.** `make_cell` loads the row's config file, applies the scale, the
  data flags and `--set FIELD=VALUE` overrides and the cell's own fields, and checks every field
  (name and type) before anything runs.
- **Scales.** `paper`: the config files as they are (the paper's recipe: 300 epochs, lr / 10 at
  epochs 150, 225, 275, ...). `cpu`: `CPU_SCALE`, a reduced scale for a 2-core CPU (a fixed
  seeded subset of 10,000 training images, the full test split, 12 epochs); the learning-rate
  boundaries and the warm-up keep their share of the run (150/225/275 of 300 epochs become
  6/9/11 of 12). Whenever the run's `num_epochs` differs from the config file's (a scale, or
  `--set num_epochs=N`), boundaries and warm-up are rescaled the same way unless they are set
  explicitly with `--set`.
- **Running.** Each cell trains in its own workdir, `OUT_DIR/runs/<cell name>`, as a subprocess
  (`python -m fdg_jax.main ...`, output appended to `train.log`, the exact command in
  `command.sh`), so each run gets its own `XLA_FLAGS`: on CPU, a run with K > 1 stages gets
  `--xla_force_host_platform_device_count=K` simulated devices. On an accelerator with fewer than
  K devices, stages share them round-robin (`stage_devices`), with a warning.
- **Resuming.** A cell whose `summary.json` exists is read, not rerun; a cell with a checkpoint
  but no summary is started again and the trainer resumes it from the checkpoint. Each workdir
  records the cell's config file and overrides (`grid_cell.json`); a workdir made with different
  settings is refused (use another `--out_dir`) rather than mixed into the results. After a run
  finishes, its checkpoints are deleted (they hold the pipeline in flight: up to GiBs per run)
  unless `--keep_checkpoints`.
- **Reports.** `aggregate` (mean and sample standard deviation over seeds per cell group),
  `write_csv` (one row per run), `plot_curves` (test error against epoch, mean over seeds, one line
  per group), `markdown_table` and `write_results_md`.

A script is `build_cells(options) -> [Cell]` and `report(results, options)`, run by `main`.
"""

import csv
import dataclasses
import datetime
import importlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
from typing import Any, Callable, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, 'experiments', 'results')
SUMMARY_FILE = 'summary.json'      # written by fdg_jax.train at the end of a run
CHECKPOINT_DIR = 'checkpoints'     # fdg_jax.checkpoint.CHECKPOINT_DIR
CELL_FILE = 'grid_cell.json'       # what the grid asked this workdir to run
LOG_FILE = 'train.log'
COMMAND_FILE = 'command.sh'
LOCK_FILE = '.grid.lock'

SCALES = ('paper', 'cpu')
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
# Fields a cell's script sets itself; `--set` may not change them.
CELL_FIELDS = ('method', 'model', 'num_stages', 'beta', 'seed')
# Fields that change where files go or how often the trainer logs, never what a run computes:
# a finished cell made with other values of these is still the same cell.
IO_FIELDS = frozenset({'cache_dir', 'log_every_steps', 'checkpoint_every_steps'})
METHOD_LABELS = {'bp': 'BP', 'fdg': 'FDG', 'ddg': 'DDG', 'dgl': 'DGL'}


class GridError(ValueError):
  """A grid that cannot run as asked; the message names the problem and the fix."""


class RunFailed(RuntimeError):
  """One cell's training did not produce a summary."""


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
  argv: tuple = ()         # the command line, recorded in results.md

  @property
  def output_dir(self) -> str:
    return os.path.abspath(self.out_dir or os.path.join(RESULTS_DIR, f'{self.name}_{self.scale}'))


def define_flags(name: str) -> None:
  """The common absl flags (call once, from a script's `__main__`)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_enum('scale', 'cpu', list(SCALES),
                    "'paper': the config files' recipe (300 epochs, full data); 'cpu': the "
                    f'reduced scale {CPU_SCALE} with the lr schedule compressed to it.')
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


def options_from_flags(name: str) -> Options:
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  try:
    seeds = tuple(int(s) for s in f.seeds)
  except ValueError as e:
    raise GridError(f'--seeds={",".join(f.seeds)}: {e}. Give integers, e.g. --seeds=0,1,2.')
  return Options(name=name, scale=f.scale, seeds=seeds, dataset=f.dataset, data_dir=f.data_dir,
                 sets=tuple(f.set), out_dir=f.out_dir, dry_run=f.dry_run,
                 report_only=f.report_only, keep_checkpoints=f.keep_checkpoints,
                 argv=tuple(sys.argv))


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

  @property
  def group(self) -> tuple:
    """The cell without its seed: what results are averaged over."""
    return (self.model, self.method, self.num_stages, self.beta)

  @property
  def name(self) -> str:
    """A directory name: model_method[_kK][_betaB]_seedS (K and beta only where they matter)."""
    parts = [self.model, self.method]
    if self.method != 'bp':
      parts.append(f'k{self.num_stages}')
    if self.method == 'fdg':
      parts.append(f'beta{self.beta:g}')
    parts.append(f'seed{self.seed}')
    return '_'.join(parts)

  @property
  def label(self) -> str:
    return group_label(self.group)

  def override_dict(self) -> dict:
    return dict(self.overrides)


def group_label(group: tuple) -> str:
  _, method, num_stages, beta = group
  label = METHOD_LABELS.get(method, method)
  if method != 'bp':
    label += f' K={num_stages}'
  if method == 'fdg':
    label += f' β={beta:g}'
  return label


def load_config(config_file: str):
  """The ConfigDict of a config file (a path relative to the repository)."""
  path = os.path.join(REPO, config_file)
  if not os.path.exists(path):
    raise GridError(f'config file {config_file!r} does not exist in {REPO}.')
  if REPO not in sys.path:
    sys.path.insert(0, REPO)   # config files import `configs.default`
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

  The paper's 150/225/275 of 300 epochs become 6/9/11 of 12. warmup_epochs is an integer field:
  a warm-up is rounded to whole epochs but kept at least 1 (3 of 300 epochs -> 1 of 12).
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
              script_overrides: Optional[dict] = None) -> Cell:
  """A cell of `config_file` at the options' scale, with every override checked.

  Order: the scale, the data flags, the script's own defaults, `--set`, the rescaled schedule,
  then the cell's fields. num_stages / beta default to the config file's; methods other than
  FDG run with beta = 1 (DDG has no gradient shrinking, BP and DGL do not use it) and BP with
  K = 1.
  """
  if options.scale not in SCALES:
    raise GridError(f'--scale={options.scale!r}: choose one of {SCALES}.')
  if method not in METHOD_LABELS:
    raise GridError(f'unknown method {method!r}: choose one of {tuple(METHOD_LABELS)}.')
  base = load_config(config_file)
  overrides = dict(CPU_SCALE) if options.scale == 'cpu' else {}
  if options.dataset:
    overrides['dataset'] = options.dataset
  if options.data_dir:
    overrides['data_dir'] = options.data_dir
  overrides.update(script_overrides or {})
  explicit = parse_sets(options.sets)
  overrides.update(explicit)
  num_epochs = overrides.get('num_epochs', base.num_epochs)
  overrides.update(rescale_schedule(base, num_epochs, explicit))
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
              config_file=config_file, overrides=tuple(sorted(
                  (k, tuple(v) if isinstance(v, list) else v) for k, v in overrides.items())))


def format_value(value) -> str:
  """A config value as `--config.FIELD=` expects it."""
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, (tuple, list)):
    items = ','.join(format_value(v) if not isinstance(v, str) else repr(v) for v in value)
    return f'({items},)' if len(value) == 1 else f'({items})'
  return str(value) if isinstance(value, str) else repr(value)


# ------------------------------------------------------------------------------------ running


def _normalised(value):
  return json.loads(json.dumps(value))


def cell_record(cell: Cell) -> dict:
  return _normalised({'cell': cell.name, 'config_file': cell.config_file,
                      'overrides': cell.override_dict()})


def write_cell_record(cell: Cell, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, CELL_FILE), 'w') as f:
    json.dump(cell_record(cell), f, indent=2, sort_keys=True)


def check_cell_record(cell: Cell, workdir: str) -> None:
  """Raise GridError if `workdir` holds a run of other settings than `cell`'s."""
  path = os.path.join(workdir, CELL_FILE)
  has_run = os.path.exists(os.path.join(workdir, SUMMARY_FILE)) or os.path.exists(
      os.path.join(workdir, CHECKPOINT_DIR))
  if not os.path.exists(path):
    if has_run:
      raise GridError(f'{workdir} holds a run that this grid did not start (no {CELL_FILE}). '
                      'Move it away, or use another --out_dir.')
    return
  with open(path) as f:
    saved = json.load(f)
  wanted = cell_record(cell)
  differences = []
  if saved.get('config_file') != wanted['config_file']:
    differences.append(f"config_file: {saved.get('config_file')!r} there, "
                       f"{wanted['config_file']!r} here")
  there, here = saved.get('overrides', {}), wanted['overrides']
  for field in sorted(set(there) | set(here)):
    if field not in IO_FIELDS and there.get(field) != here.get(field):
      differences.append(f'{field}: {there.get(field)!r} there, {here.get(field)!r} here')
  if differences:
    raise GridError(
        f'{workdir} holds a run of cell {cell.name} with other settings ('
        + '; '.join(differences) + '). Nothing was run. Use another --out_dir for these '
        'settings, or delete that workdir to run the cell again.')


def has_checkpoint(workdir: str) -> bool:
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  return os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory))


def read_summary(workdir: str) -> Optional[dict]:
  path = os.path.join(workdir, SUMMARY_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


@dataclasses.dataclass
class Result:
  cell: Cell
  workdir: str
  status: str                 # 'read' (existing summary), 'trained', 'failed', 'missing'
  summary: Optional[dict] = None
  error: str = ''


Runner = Callable[[Cell, str], None]   # trains `cell` in `workdir`, leaving summary.json there


def cell_status(cell: Cell, workdir: str) -> str:
  if os.path.exists(os.path.join(workdir, SUMMARY_FILE)):
    return 'done (summary.json is read, not rerun)'
  if has_checkpoint(workdir):
    return 'resumes from its checkpoint'
  return 'to run'


def run_grid(cells: Sequence[Cell], out_dir: str, runner: Optional[Runner] = None,
             keep_checkpoints: bool = False, report_only: bool = False,
             log: Callable[[str], None] = print) -> list[Result]:
  """Run every cell without a summary (in order), read the others; one Result per cell.

  Every workdir is checked against its cell before anything runs. A cell whose run fails is
  reported as 'failed' and the grid goes on with the next one.
  """
  if not cells:
    raise GridError('the grid has no cells (no seeds, betas or K values?).')
  names = [c.name for c in cells]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise GridError(f'cells with the same name: {duplicates}. Remove repeated seeds or betas.')
  workdirs = [os.path.join(out_dir, 'runs', c.name) for c in cells]
  for cell, workdir in zip(cells, workdirs):
    check_cell_record(cell, workdir)
  runner = runner or SubprocessRunner(log=log)
  results = []
  for i, (cell, workdir) in enumerate(zip(cells, workdirs)):
    summary = read_summary(workdir)
    if summary is not None:
      results.append(Result(cell, workdir, 'read', summary))
      continue
    if report_only:
      results.append(Result(cell, workdir, 'missing'))
      continue
    resuming = ' (resuming from its checkpoint)' if has_checkpoint(workdir) else ''
    log(f'[{i + 1}/{len(cells)}] {cell.name}{resuming}: log in {os.path.join(workdir, LOG_FILE)}')
    write_cell_record(cell, workdir)
    try:
      runner(cell, workdir)
      summary = read_summary(workdir)
      if summary is None:
        raise RunFailed(f'the run ended without writing {SUMMARY_FILE}')
    except RunFailed as e:
      log(f'[{i + 1}/{len(cells)}] {cell.name} FAILED: {e}')
      results.append(Result(cell, workdir, 'failed', error=str(e)))
      continue
    if not keep_checkpoints:
      shutil.rmtree(os.path.join(workdir, CHECKPOINT_DIR), ignore_errors=True)
    log(f'[{i + 1}/{len(cells)}] {cell.name}: test error {100 * summary["test_error"]:.2f}% '
        f'in {summary["train_time_s"]:.0f} s')
    results.append(Result(cell, workdir, 'trained', summary))
  return results


_DEVICE_COUNT_FLAG = re.compile(r'--xla_force_host_platform_device_count=\S*')


def xla_flags(existing: str, platform_name: str, num_stages: int) -> str:
  """XLA_FLAGS for a run: on CPU, K simulated devices for K > 1 (any older count removed)."""
  flags = _DEVICE_COUNT_FLAG.sub('', existing).split()
  if platform_name == 'cpu' and num_stages > 1:
    flags.append(f'--xla_force_host_platform_device_count={num_stages}')
  return ' '.join(flags)


class SubprocessRunner:
  """Trains a cell with `python -m fdg_jax.main` in a subprocess of its own.

  The platform is probed once (in a subprocess too: this process never starts JAX, which on an
  accelerator would hold its memory). Output goes to WORKDIR/train.log (appended); the command
  to WORKDIR/command.sh. SIGINT/SIGTERM of the grid are passed to the run, whose trainer saves
  a checkpoint and exits; the grid then stops.
  """

  def __init__(self, python: str = sys.executable, platform_info: Optional[tuple] = None,
               log: Callable[[str], None] = print):
    self.python = python
    self._platform = platform_info
    self.log = log

  def platform(self) -> tuple[str, int]:
    if self._platform is None:
      env = dict(os.environ, XLA_FLAGS=xla_flags(os.environ.get('XLA_FLAGS', ''), 'cpu', 1))
      out = subprocess.run(
          [self.python, '-c', 'import jax; d = jax.devices(); print(d[0].platform, len(d))'],
          cwd=REPO, env=env, capture_output=True, text=True, check=False)
      if out.returncode:
        raise GridError(f'could not start JAX to find the platform:\n{out.stderr[-2000:]}')
      name, count = out.stdout.split()[-2:]
      self._platform = (name, int(count))
      self.log(f'Platform: {name}, {count} device(s).')
    return self._platform

  def command(self, cell: Cell, workdir: str) -> tuple[list[str], dict]:
    """(argv, environment changes) of the run."""
    platform_name, count = self.platform()
    overrides = cell.override_dict()
    if platform_name != 'cpu' and count < cell.num_stages and not overrides.get('stage_devices'):
      overrides['stage_devices'] = tuple(k % count for k in range(cell.num_stages))
      self.log(f'warning: {cell.name}: K={cell.num_stages} stages on {count} {platform_name} '
               f"device(s): stages share them, stage_devices={overrides['stage_devices']}. "
               'Accuracy is unaffected; times are not those of K devices.')
    argv = [self.python, '-m', 'fdg_jax.main', f'--config={cell.config_file}',
            f'--workdir={workdir}']
    argv += [f'--config.{k}={format_value(v)}' for k, v in sorted(overrides.items())]
    env = {'XLA_FLAGS': xla_flags(os.environ.get('XLA_FLAGS', ''), platform_name,
                                  cell.num_stages)}
    return argv, env

  def __call__(self, cell: Cell, workdir: str) -> None:
    argv, env_changes = self.command(cell, workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, COMMAND_FILE), 'w') as f:
      f.write(f'# {cell.name}, from {REPO}\ncd {shlex.quote(REPO)} && '
              + ' '.join(f'{k}={shlex.quote(v)}' for k, v in env_changes.items()) + ' '
              + ' '.join(shlex.quote(a) for a in argv) + '\n')
    log_path = os.path.join(workdir, LOG_FILE)
    env = dict(os.environ, **env_changes)
    env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    with open(log_path, 'a') as log_file:
      log_file.write(f'\n===== {datetime.datetime.now().isoformat(timespec="seconds")} '
                     f'{" ".join(shlex.quote(a) for a in argv)}\n')
      log_file.flush()
      process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log_file,
                                 stderr=subprocess.STDOUT)
      try:
        code = process.wait()
      except BaseException:   # KeyboardInterrupt, or SIGTERM turned into one by `main`
        if process.poll() is None:
          process.send_signal(signal.SIGINT)   # the trainer saves a checkpoint and exits
        process.wait()
        raise
    if code:
      with open(log_path, errors='replace') as f:
        tail = ''.join(f.readlines()[-15:])
      raise RunFailed(f'exit status {code}; the end of {log_path}:\n{tail}')


# ------------------------------------------------------------------------------------ reports


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
  key: tuple          # (model, method, num_stages, beta)
  label: str
  summaries: list
  seeds: list

  @property
  def n(self) -> int:
    return len(self.summaries)

  def stat(self, field: str) -> tuple[float, float]:
    return mean_std([s[field] for s in self.summaries])

  def curve(self) -> tuple[list, list, list]:
    """(epochs, mean test error, std) over the seeds, at the evaluations they share."""
    by_step = {}
    for summary in self.summaries:
      for point in summary.get('history', []):
        by_step.setdefault(point['step'], (point['epoch'], []))[1].append(point['test_error'])
    steps = sorted(s for s, (_, errors) in by_step.items() if len(errors) == self.n)
    stats = [mean_std(by_step[s][1]) for s in steps]
    return ([by_step[s][0] for s in steps], [m for m, _ in stats], [d for _, d in stats])


def aggregate(results: Sequence[Result]) -> list[Group]:
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


def fmt_difference(group: Group, reference: Optional[Group]) -> str:
  """`group` - `reference` in points as '+1.87 ± 0.52' (± one standard error, paired by seed);
  '–' for the reference itself or when they share no seed."""
  if reference is None or group is reference:
    return '–'
  mean, se, n = paired_difference(group, reference)
  if not n:
    return '–'
  return f'{100 * mean:+.2f}' + ('' if math.isnan(se) else f' ± {100 * se:.2f}')


def fmt_pct(mean: float, std: float) -> str:
  """An error as '7.12 ± 0.31' (percent); '7.12' for one seed; '–' for none."""
  if math.isnan(mean):
    return '–'
  return f'{100 * mean:.2f}' + ('' if math.isnan(std) else f' ± {100 * std:.2f}')


def fmt_num(mean: float, std: float = math.nan, digits: int = 0) -> str:
  if math.isnan(mean):
    return '–'
  return f'{mean:.{digits}f}' + ('' if math.isnan(std) else f' ± {std:.{digits}f}')


CSV_FIELDS = ('cell', 'model', 'method', 'num_stages', 'beta', 'seed', 'status', 'dataset',
              'train_images', 'test_images', 'epochs', 'steps', 'batch_size', 'test_error',
              'test_loss', 'train_time_s', 'images_per_sec', 'resumed_from_step',
              'trainable_params', 'extra_params', 'stage_split', 'devices', 'params_digest',
              'workdir')


def write_csv(results: Sequence[Result], path: str) -> None:
  """One row per run (failed or missing runs too, with their status and no numbers)."""
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for r in results:
      s = r.summary or {}
      row = {field: s.get(field, '') for field in CSV_FIELDS}
      row.update(cell=r.cell.name, model=r.cell.model, method=r.cell.method,
                 num_stages=r.cell.num_stages, beta=r.cell.beta, seed=r.cell.seed,
                 status=r.status, workdir=os.path.relpath(r.workdir, os.path.dirname(path)))
      for field in ('stage_split', 'devices'):
        if isinstance(row[field], list):
          row[field] = ' '.join(str(x) for x in row[field])
      writer.writerow(row)


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def plot_curves(groups: Sequence[Group], path: str, title: str) -> None:
  """Test error against epoch, mean over seeds (band: ± std), one panel per model."""
  plt = _pyplot()
  models = list(dict.fromkeys(g.key[0] for g in groups))
  fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
  for ax, model in zip(axes[0], models):
    for group in (g for g in groups if g.key[0] == model and g.n):
      epochs, mean, std = group.curve()
      if not epochs:
        continue
      line, = ax.plot(epochs, [100 * m for m in mean], marker='o', markersize=3,
                      label=f'{group.label} (n={group.n})')
      if group.n > 1:
        ax.fill_between(epochs, [100 * (m - s) for m, s in zip(mean, std)],
                        [100 * (m + s) for m, s in zip(mean, std)], color=line.get_color(),
                        alpha=0.15)
    ax.set_title(f'{title}: {model}')
    ax.set_xlabel('epoch')
    ax.set_ylabel('test error (%), mean over seeds')
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ['| ' + ' | '.join(headers) + ' |', '| ' + ' | '.join('---' for _ in headers) + ' |']
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


def describe_setup(results: Sequence[Result], options: Options) -> str:
  """The provenance lines of results.md: command, scale, data, machine, runs' state."""
  done = [r for r in results if r.summary is not None]
  first = results[0].cell if results else None
  lines = [f'Written {datetime.datetime.now().isoformat(timespec="seconds")} by:',
           '', '```bash', ' '.join(shlex.quote(a) for a in options.argv) or '(python API)',
           '```', '']
  lines.append("Scale `paper`: the config files' recipe (see configs/default.py)." if
               options.scale == 'paper' else "Scale `cpu` (reduced, not the paper's; see "
               'experiments/grid.py): lr boundaries and warm-up keep their share of the run.')
  if first is not None:
    shown = {k: v for k, v in first.override_dict().items() if k not in CELL_FIELDS}
    lines.append(f'Config overrides of the first cell (beyond method, model, K, beta, seed): '
                 f'`{shown}`; each run\'s full config is in its workdir (config.json).')
  if done:
    s = done[0].summary
    datasets = sorted({r.summary['dataset'] for r in done})
    lines.append(f'Data: {", ".join(datasets)}, {s["train_images"]} training images, '
                 f'{s["test_images"]} test images, batch {s["batch_size"]}, '
                 f'{s["epochs"]:g} epochs ({s["steps"]} steps).')
    devices = sorted({' '.join(r.summary['devices']) for r in done})
    lines.append(f'Machine: {platform.node()}, {os.cpu_count()} CPU cores; stage devices of the '
                 f'runs: {"; ".join(devices)}; jax {s.get("jax_version", "?")}.')
  missing = [r.cell.name for r in results if r.summary is None]
  lines.append(f'Runs: {len(done)} of {len(results)} finished' +
               (f'; not finished: {", ".join(missing)}.' if missing else '.'))
  lines.append('Test error of the composed network on the test split after the last epoch, in %, '
               'mean ± sample standard deviation over seeds (n = number of seeds). One row per '
               'run in results.csv.')
  return '\n'.join(lines)


def write_results_md(path: str, title: str, results: Sequence[Result], options: Options,
                     body: str) -> None:
  with open(path, 'w') as f:
    f.write(f'# {title}\n\n{describe_setup(results, options)}\n\n{body.strip()}\n')


# --------------------------------------------------------------------------------------- main


def acquire_lock(out_dir: str) -> str:
  """One grid process per out_dir: two would train the same cell at once."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, LOCK_FILE)
  if os.path.exists(path):
    try:
      with open(path) as f:
        pid = int(f.read().strip() or 0)
      os.kill(pid, 0)
      raise GridError(f'another grid (pid {pid}) is running in {out_dir}. Wait for it, or use '
                      '--report_only to write the results so far.')
    except (ValueError, ProcessLookupError):
      pass   # a stale lock
  with open(path, 'w') as f:
    f.write(str(os.getpid()))
  return path


def print_grid(cells: Sequence[Cell], out_dir: str) -> None:
  runner = SubprocessRunner(platform_info=('cpu', 1), log=lambda _: None)
  print(f'{len(cells)} cells in {out_dir}/runs (commands as on CPU):')
  for cell in cells:
    workdir = os.path.join(out_dir, 'runs', cell.name)
    argv, env = runner.command(cell, workdir)
    words = [f'{k}={shlex.quote(v)}' for k, v in env.items() if v] + ['python'] + [
        shlex.quote(a) for a in argv[1:]]
    print(f'- {cell.name}: {cell_status(cell, workdir)}\n    {" ".join(words)}')


def _raise_keyboard_interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt


def main(name: str, build_cells: Callable[[Options], list],
         report: Callable[[Sequence[Result], Options], None]) -> int:
  """What each script's `main` does: build, (dry-)run, report. Returns the exit status."""
  try:
    options = options_from_flags(name)
    cells = build_cells(options)
    if not cells:
      raise GridError('the grid has no cells (no seeds, betas or K values?).')
    out_dir = options.output_dir
    if options.dry_run:
      print_grid(cells, out_dir)
      return 0
    lock = None if options.report_only else acquire_lock(out_dir)
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
      results = run_grid(cells, out_dir, keep_checkpoints=options.keep_checkpoints,
                         report_only=options.report_only)
    finally:
      signal.signal(signal.SIGTERM, previous)
      if lock:
        os.remove(lock)
  except GridError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print('Stopped. Run the same command again to go on: an interrupted run resumes from the '
          'checkpoint its trainer saved on the signal.', file=sys.stderr)
    return 130
  report(results, options)
  print(f'Results: {os.path.join(out_dir, "results.md")}')
  failed = [r.cell.name for r in results if r.status == 'failed']
  if failed:
    print(f'{len(failed)} run(s) failed: {", ".join(failed)} (see their train.log); run the '
          'same command again to retry them.', file=sys.stderr)
    return 1
  return 0
