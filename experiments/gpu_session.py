r"""One prepared session on a lent GPU (issue 29): what a CPU cannot show, in one command.

Parts, in order, each with its own time budget; a part that fails is recorded (its traceback
in the JSON) and the next one still runs:

  environment   versions (jax, jaxlib, flax, optax, orbax, chex, clu), devices, platform.
  engine        the exactness checks of tests/test_engine.py and test_checkpoint.py with the
                GPU's JAX, every stage on GPU 0 (by priority, while the budget lasts): FDG K = 2,
                3 ('vjp', 'recompute') against the tests' `naive_fdg` to rel 1e-5 at float32
                matmul precision; the residual policies (the same gradient, fewer saved bytes);
                a checkpoint taken mid-stream and restored into a fresh pipeline resumes bit for
                bit, stored compact (residuals rebuilt, checked bit for bit at save) where the
                tests expect it. Not a check, information: K = 2 at the GPU's default precision
                (TF32 matmuls), how far it lands from the reference.
  throughput    steps per second, BP against FDG with every stage on GPU 0 (the engine's
                overhead; the ideal ratio is 1.0), compilation and pipeline fill excluded, timed
                windows interleaved; by priority: ResNet-56 at batch 128 (random 32x32 images),
                nanoGPT's GPU character GPT (6 layers, 6 heads, 384 wide, context 256, batch 64;
                bfloat16 compute), configs/shakespeare_char_cpu.py's GPT (4 x 4 x 128, context
                64, batch 12), then ResNet-56 with K = 4 and the GPU GPT in float32.
  shakespeare   nanoGPT's shakespeare_char recipe (configs/shakespeare_char.py: the GPU GPT,
                dropout 0.2, AdamW lr 1e-3 -> 1e-4 cosine over 5000 steps after 100 of warm-up,
                beta2 0.99, weight decay 0.1, clipping 1.0; nanoGPT reports best validation loss
                1.4697 in about 3 minutes on one A100) with BP, then FDG K = 2, on GPU 0, each
                for as many steps as fit in its half of the time left (FDG stops at BP's step
                count, so the curves line up); validation loss over the whole validation text
                every 250 steps and at the end.
  two_gpus      only with two or more devices: FDG K = 2 on devices 0 and 1 against BP on 0.

The parts live in experiments/gpu/, one module each (environment.py, engine_checks.py,
throughput.py, shakespeare.py, two_gpus.py), on what they share: record.py (results.json and
summary.md, budgets, hard limits) and workloads.py (the sizes, models, pipelines and their
timing). This module is the driver: the session's flags, the order of the parts and their time.
Models, optimizers and pipelines are built through the Python API (fdg_jax.models, gpt,
partition, optimizers, Pipeline) as train.build_stages builds them, not through the trainer's
configs: the lent machine has no ml_collections, TensorFlow or tfds, and the session imports
none of them. `--smoke` runs the same code on CPU (two simulated devices) at tiny sizes, two
engine checks and one model per throughput part, in about a minute; tests/test_gpu_session.py
runs it with those packages hidden.

Everything goes to --out as it is measured (rewritten after every part, engine check, model
timed and evaluation): results.json (every number, each part's status, seconds and any
traceback) and summary.md (the same as tables). A run cut short leaves what it did.

How to spend a lent GPU on it (the `device` tool)
-------------------------------------------------
Once, on this machine, in the repository root: a git-ignored folder `.gpu/` holding the text
and the one package fdg_jax imports that the machine lacks, clu (`fdg_jax.engine.stage_functions`
uses `clu.metrics`, which needs only absl, flax, jax, numpy and wrapt, all there, so the wheel
installs without its dependencies):

    echo /.gpu/ >> .git/info/exclude
    mkdir -p .gpu && cp ../shared/data/tinyshakespeare.txt .gpu/
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .gpu \
        clu==0.0.12

Then, if `status` says can_start_another, one `run` call with kind left out (an H100 or an
H200; results.json names the device), carry [".gpu"], timeout_s 540, and this command (one
line):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/*.whl
    && export PYTHONPATH=/tmp/site || exit; set -o pipefail; PYTHONUNBUFFERED=1 python3 -m
    experiments.gpu_session --out=$OUT --data=.gpu/tinyshakespeare.txt 2>&1 | tee $OUT/log.txt

The session stops itself at --deadline_s=450 (a compilation in flight can overrun a little;
timeout_s leaves 90 s for that): with the machine's start, about 10 of the 15 minutes of
device time. To redo a part, call again at once (the machine stays warm only 30 s) with e.g.
`--parts=engine --deadline_s=150` and timeout_s 200; otherwise give the machine back. The
files come back under the reply's files_at: results.json, summary.md and log.txt (the
console). Record what they show in docs/record/ and WORKSPACE.

    python -m experiments.gpu_session --out=/tmp/gpu_smoke --smoke --data=PATH/TO/TEXT
"""

import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax

import experiments
from experiments.gpu import engine_checks
from experiments.gpu import environment
from experiments.gpu import record
from experiments.gpu import shakespeare
from experiments.gpu import throughput
from experiments.gpu import two_gpus
from experiments.gpu import workloads

# Each part: its function (record, budget, report) and its section of summary.md.
PART_FUNCTIONS = {
    'environment': (environment.environment, environment.markdown),
    'engine': (engine_checks.engine, engine_checks.markdown),
    'throughput': (throughput.throughput, throughput.markdown),
    'shakespeare': (shakespeare.shakespeare, shakespeare.markdown),
    'two_gpus': (two_gpus.two_gpus, two_gpus.markdown),
}
PARTS = tuple(PART_FUNCTIONS)

flags.DEFINE_string('out', None, 'Folder for results.json and summary.md (made if missing).')
flags.DEFINE_list('parts', list(PARTS), 'Parts to run, in the fixed order; environment always '
                  f'runs. Of {PARTS}.')
flags.DEFINE_float('deadline_s', 450, 'Wall seconds for the whole session; the shakespeare part '
                   'takes what the others leave.')
flags.DEFINE_float('engine_s', 60, 'Budget of the engine checks (seconds).')
flags.DEFINE_float('throughput_s', 150, 'Budget of the throughput part (seconds).')
flags.DEFINE_float('two_gpus_s', 60, 'Budget of the two-GPU part, kept free when it will run.')
# --smoke (workloads.py) and the shakespeare part's flags (--data, --lm_*): listed by --help too.
flags.adopt_module_key_flags(workloads)
flags.adopt_module_key_flags(shakespeare)
FLAGS = flags.FLAGS
# --smoke's defaults where the command line gives none: a short run of every part.
# Budgets are wide: a loaded 2-core machine compiles slowly, and the test wants every check.
SMOKE_DEFAULTS = {'lm_steps': 24, 'lm_eval_every': 10, 'deadline_s': 1200, 'engine_s': 600,
                  'throughput_s': 600, 'two_gpus_s': 300}


def use_cpu_devices(count: int) -> None:
  """--smoke: `count` simulated CPU devices (before JAX starts its backends)."""
  kept = [f for f in os.environ.get('XLA_FLAGS', '').split()
          if not f.startswith('--xla_force_host_platform_device_count')]
  os.environ['XLA_FLAGS'] = ' '.join(kept + [f'--xla_force_host_platform_device_count={count}'])
  jax.config.update('jax_platforms', 'cpu')


def main(argv):
  del argv
  if not FLAGS.out:
    raise app.UsageError('--out is required.')
  unknown = set(FLAGS.parts) - set(PARTS)
  if unknown:
    raise app.UsageError(f'Unknown parts {sorted(unknown)}; choose from {PARTS}.')
  logging.set_verbosity(logging.WARNING)   # orbax logs each checkpoint in ~40 INFO lines
  if FLAGS.smoke:
    use_cpu_devices(2)
    for name, value in SMOKE_DEFAULTS.items():
      if not FLAGS[name].present:
        FLAGS[name].value = value
  report = record.Report(
      FLAGS.out, {'command': experiments.command_line(), 'smoke': FLAGS.smoke,
                  'started': time.strftime('%Y-%m-%d %H:%M:%S %Z')},
      {name: part_markdown for name, (_, part_markdown) in PART_FUNCTIONS.items()})
  deadline = record.START + FLAGS.deadline_s
  record.run_part(report, 'environment', environment.environment, 60)
  wanted = set(FLAGS.parts)
  two = 'two_gpus' in wanted and jax.device_count() >= 2
  budgets = {'engine': FLAGS.engine_s, 'throughput': FLAGS.throughput_s, 'shakespeare': None,
             'two_gpus': FLAGS.two_gpus_s}
  for name, seconds in budgets.items():
    if name not in wanted:
      continue
    if name == 'two_gpus' and not two:
      report.data['parts'][name] = {'status': 'skipped', 'reason': 'one device'}
      continue
    left = deadline - time.monotonic() - 5
    if name == 'shakespeare':   # what the others leave
      seconds = left - (FLAGS.two_gpus_s if two else 0)
    seconds = min(seconds, left)
    if seconds < 5:
      report.data['parts'][name] = {'status': 'skipped', 'reason': 'no time left'}
      continue
    record.run_part(report, name, PART_FUNCTIONS[name][0], seconds)
  report.save()
  print(f'Results in {FLAGS.out}: results.json, summary.md', flush=True)
  if any(part['status'] == 'timeout' for part in report.data['parts'].values()):
    # A part stopped inside JAX once made the interpreter's teardown crash (after every file
    # was written); skip the teardown.
    sys.stderr.flush()
    os._exit(0)  # pylint: disable=protected-access


if __name__ == '__main__':
  app.run(main)
