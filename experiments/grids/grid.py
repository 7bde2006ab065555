r"""A grid of training runs that resumes, and the tables and figures made from their summaries.

The paper's comparisons (`experiments/paper/`: table2, table3, table4, fig4a_beta,
compensation_grid) are each a list of `Cell`s (method, model, K, beta, seed, config file, config
overrides) handed to `run_grid`, and a report made from the runs' `summary.json` files. This
module runs a grid and resumes it (`run_grid`, `main`); the parts the scripts share besides live
in three modules beside it:

- **Cells and their configs** (`cells.py`). `make_cell` loads the row's config file, applies the
  scale, the data flags and `--set FIELD=VALUE` overrides and the cell's own fields, and checks
  every field (name and type) before anything runs. The common flags (`define_flags`, `Options`)
  are there too.
- **Scales** (`cells.py`). A grid names its scales (`Scale`: config overrides and a
  description). The image grids' (`IMAGE_SCALES`, the default): `paper`, the config files as
  they are (the paper's recipe: 300 epochs, lr / 10 at epochs 150, 225, 275, ...); `cpu`,
  `CPU_SCALE`, a reduced scale for a 2-core CPU (a fixed seeded subset of 10,000 training
  images, the full test split, 12 epochs); the learning-rate boundaries and the warm-up keep
  their share of the run (150/225/275 of 300 epochs become 6/9/11 of 12). Whenever the run's `num_epochs` differs from the config file's (a scale,
  or `--set num_epochs=N`), boundaries and warm-up are rescaled the same way unless they are set
  explicitly with `--set`.
- **Running** (`runner.py`). Each cell trains in its own workdir, `OUT_DIR/runs/<cell name>`, as a
  subprocess (`python -m fdg_jax.main ...`, output appended to `train.log`, the exact command in
  `command.sh`), so each run gets its own `XLA_FLAGS`: on CPU, a run with K > 1 stages gets
  `--xla_force_host_platform_device_count=K` simulated devices. On an accelerator with fewer than
  K devices, stages share them round-robin (`stage_devices`), with a warning. With `--processes`
  (CPU) a cell of K > 1 stages trains in K processes instead, one stage each on its own cores
  (`python -m fdg_jax.launch --num_processes=K -- ...`): the same computation up to float
  rounding, with the stages really in parallel.
- **Resuming** (here). A cell whose `summary.json` exists is read, not rerun; a cell with a
  checkpoint but no summary is started again and the trainer resumes it from the checkpoint. Each
  workdir records the cell's config file and overrides (`grid_cell.json`); a workdir made with
  different settings is refused (use another `--out_dir`) rather than mixed into the results.
  After a run finishes, its checkpoints are deleted (they hold the pipeline in flight: up to GiBs
  per run) unless `--keep_checkpoints`.
- **Reports** (`reports.py`). `aggregate` (mean and sample standard deviation over seeds per cell
  group), `write_csv` (one row per run), `plot_curves` (the metric against epoch or step, mean
  over seeds, one line per group), `markdown_table` and `write_results_md`.
- **Metrics** (`metrics.py`). The summary field a grid compares and how it is shown: the image
  grids' `TEST_ERROR` (the default everywhere), the language-model grids' `VAL_LOSS`.

A script is `build_cells(options) -> [Cell]` and `report(results, options)`, run by `main`.
"""

import dataclasses
import json
import os
import shlex
import shutil
import signal
import sys
from typing import Callable, Optional, Sequence

from experiments.grids import cells as cells_lib
from experiments.grids import metrics
from experiments.grids import runner as runner_lib
from fdg_jax.engine import checkpoint as checkpoint_lib
from fdg_jax.trainer import workdir as workdir_lib

CELL_FILE = 'grid_cell.json'       # what the grid asked this workdir to run
# Fields that change where files go or how often the trainer logs, never what a run computes:
# a finished cell made with other values of these is still the same cell.
IO_FIELDS = frozenset({'cache_dir', 'log_every_steps', 'checkpoint_every_steps'})


def _normalised(value):
  return json.loads(json.dumps(value))


def _same_setting(field: str, there, here) -> bool:
  """Equal settings; a local data_dir recorded relative to the repository root (the trainer's
  working directory, as committed records write it) is the absolute path it names."""
  if field == 'data_dir' and isinstance(there, str) and isinstance(here, str) and (
      '://' not in there + here):
    return (os.path.normpath(os.path.join(cells_lib.REPO, there))
            == os.path.normpath(os.path.join(cells_lib.REPO, here)))
  return there == here


def cell_record(cell: cells_lib.Cell) -> dict:
  return _normalised({'cell': cell.name, 'config_file': cell.config_file,
                      'overrides': cell.override_dict()})


def write_cell_record(cell: cells_lib.Cell, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, CELL_FILE), 'w') as f:
    json.dump(cell_record(cell), f, indent=2, sort_keys=True)


def check_cell_record(cell: cells_lib.Cell, workdir: str) -> None:
  """Raise GridError if `workdir` holds a run of other settings than `cell`'s."""
  path = os.path.join(workdir, CELL_FILE)
  has_run = os.path.exists(os.path.join(workdir, workdir_lib.SUMMARY_FILE)) or os.path.exists(
      os.path.join(workdir, checkpoint_lib.CHECKPOINT_DIR))
  if not os.path.exists(path):
    if has_run:
      raise cells_lib.GridError(f'{workdir} holds a run that this grid did not start (no '
                                f'{CELL_FILE}). Move it away, or use another --out_dir.')
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
    if field not in IO_FIELDS and not _same_setting(field, there.get(field), here.get(field)):
      differences.append(f'{field}: {there.get(field)!r} there, {here.get(field)!r} here')
  if differences:
    raise cells_lib.GridError(
        f'{workdir} holds a run of cell {cell.name} with other settings ('
        + '; '.join(differences) + '). Nothing was run. Use another --out_dir for these '
        'settings, or delete that workdir to run the cell again.')


def has_checkpoint(workdir: str) -> bool:
  return checkpoint_lib.written_by(workdir) is not None


def read_summary(workdir: str) -> Optional[dict]:
  path = os.path.join(workdir, workdir_lib.SUMMARY_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


@dataclasses.dataclass
class Result:
  cell: cells_lib.Cell
  workdir: str
  status: str                 # 'read' (existing summary), 'trained', 'failed', 'missing'
  summary: Optional[dict] = None
  error: str = ''


def cell_status(cell: cells_lib.Cell, workdir: str) -> str:
  if os.path.exists(os.path.join(workdir, workdir_lib.SUMMARY_FILE)):
    return f'done ({workdir_lib.SUMMARY_FILE} is read, not rerun)'
  if has_checkpoint(workdir):
    return 'resumes from its checkpoint'
  return 'to run'


def run_grid(cells: Sequence[cells_lib.Cell], out_dir: str,
             runner: Optional[runner_lib.Runner] = None, keep_checkpoints: bool = False,
             report_only: bool = False, log: Callable[[str], None] = print,
             processes: bool = False,
             metric: metrics.Metric = metrics.TEST_ERROR) -> list[Result]:
  """Run every cell without a summary (in order), read the others; one Result per cell.

  Every workdir is checked against its cell before anything runs. A cell whose run fails is
  reported as 'failed' and the grid goes on with the next one. `metric` is what the log shows
  of each finished run.
  """
  if not cells:
    raise cells_lib.GridError('the grid has no cells (no seeds, betas or K values?).')
  names = [c.name for c in cells]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise cells_lib.GridError(f'cells with the same name: {duplicates}. Remove repeated seeds '
                              'or betas.')
  workdirs = [os.path.join(out_dir, 'runs', c.name) for c in cells]
  for cell, workdir in zip(cells, workdirs):
    check_cell_record(cell, workdir)
  runner = runner or runner_lib.SubprocessRunner(log=log, processes=processes)
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
    log(f'[{i + 1}/{len(cells)}] {cell.name}{resuming}: log in '
        f'{os.path.join(workdir, runner_lib.OUTPUT_FILE)}')
    write_cell_record(cell, workdir)
    try:
      runner(cell, workdir)
      summary = read_summary(workdir)
      if summary is None:
        raise runner_lib.RunFailed(f'the run ended without writing {workdir_lib.SUMMARY_FILE}')
    except runner_lib.RunFailed as e:
      log(f'[{i + 1}/{len(cells)}] {cell.name} FAILED: {e}')
      results.append(Result(cell, workdir, 'failed', error=str(e)))
      continue
    if not keep_checkpoints:
      shutil.rmtree(os.path.join(workdir, checkpoint_lib.CHECKPOINT_DIR), ignore_errors=True)
    log(f'[{i + 1}/{len(cells)}] {cell.name}: {metric.log_line(summary)} '
        f'in {summary["train_time_s"]:.0f} s')
    results.append(Result(cell, workdir, 'trained', summary))
  return results


def print_grid(cells: Sequence[cells_lib.Cell], out_dir: str, processes: bool = False) -> None:
  runner = runner_lib.SubprocessRunner(platform_info=('cpu', 1), log=lambda _: None,
                                       processes=processes)
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


def main(name: str, build_cells: Callable[[cells_lib.Options], list],
         report: Callable[[Sequence[Result], cells_lib.Options], None],
         metric: metrics.Metric = metrics.TEST_ERROR, scales: Optional[dict] = None) -> int:
  """What each script's `main` does: build, (dry-)run, report. Returns the exit status.
  `metric`: what the log shows of each run; `scales`: the grid's (default: the image grids')."""
  try:
    options = cells_lib.options_from_flags(name, scales)
    cells = build_cells(options)
    if not cells:
      raise cells_lib.GridError('the grid has no cells (no seeds, betas or K values?).')
    out_dir = options.output_dir
    if options.dry_run:
      print_grid(cells, out_dir, options.processes)
      return 0
    lock = None if options.report_only else runner_lib.acquire_lock(out_dir)
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
      results = run_grid(cells, out_dir, keep_checkpoints=options.keep_checkpoints,
                         report_only=options.report_only, processes=options.processes,
                         metric=metric)
    finally:
      signal.signal(signal.SIGTERM, previous)
      if lock:
        os.remove(lock)
  except cells_lib.GridError as e:
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
    print(f'{len(failed)} run(s) failed: {", ".join(failed)} (see their '
          f'{runner_lib.OUTPUT_FILE}); run the same command again to retry them.', file=sys.stderr)
    return 1
  return 0
