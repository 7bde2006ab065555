"""The experiments, each run from the repository root as `python -m experiments.KIND.NAME`:

  grids/   the grid library: cells and flags, the trainer subprocess, running, reports;
  paper/   the paper's comparisons as grids (Tables 2-4, Fig. 4a, compensation) and its numbers;
  bench/   benchmarks of the engine on random data (speed-up, overhead, memory, ...);
  probes/  scripts that answer one open question each.

Everything they record goes to experiments/results/.
"""

import os
import shlex
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, 'experiments', 'results')


def command_argv() -> tuple[str, ...]:
  """This process's command line as typed from the repository root: `python -m MODULE ARGS`
  (sys.argv[0] of `-m` is the module's absolute path, which would not run and names the
  machine)."""
  spec = getattr(sys.modules['__main__'], '__spec__', None)
  program = ('python', '-m', spec.name) if spec else ('python', os.path.relpath(sys.argv[0]))
  return program + tuple(sys.argv[1:])


def command_line() -> str:
  return ' '.join(shlex.quote(a) for a in command_argv())
