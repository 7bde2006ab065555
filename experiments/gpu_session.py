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

Models, optimizers and pipelines are built through the Python API (fdg_jax.models, gpt,
partition, optimizers, Pipeline) as train.build_stages builds them, not through the trainer's
configs: the lent machine has no ml_collections, TensorFlow or tfds, and this script imports
none of them. `--smoke` runs the same code on CPU (two simulated devices) at tiny sizes, two
engine checks and one model per throughput part, in about a minute; tests/test_gpu_session.py
runs it with those packages hidden.

Everything goes to --out as it is measured (rewritten after every part, engine check, model
timed and evaluation): results.json (every number, each part's status, seconds and any
traceback) and summary.md (the same as tables). A run cut short leaves what it did.

How to spend a lent GPU on it (the `device` tool)
-------------------------------------------------
Once, on this machine, in the repository root: a git-ignored folder `.gpu/` holding the text
and the one package fdg_jax imports that the machine lacks, clu (`fdg_jax.stage_functions`
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

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import traceback
import types
from typing import Any, Callable, Optional

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

import experiments
from fdg_jax import checkpoint
from fdg_jax import gpt
from fdg_jax import input_pipeline
from fdg_jax import models
from fdg_jax import optimizers
from fdg_jax import partition
from fdg_jax import pipeline
from fdg_jax import text_data

START = time.monotonic()   # --deadline_s counts from here

PARTS = ('environment', 'engine', 'throughput', 'shakespeare', 'two_gpus')
NANOGPT = {'best_val_loss': 1.4697, 'minutes': 3, 'device': 'one A100',
           'source': "nanoGPT's README, config/train_shakespeare_char.py"}

flags.DEFINE_string('out', None, 'Folder for results.json and summary.md (made if missing).')
flags.DEFINE_bool('smoke', False, 'CPU, two simulated devices, tiny sizes: the same code paths '
                  'in about a minute.')
flags.DEFINE_string('data', None, 'tinyshakespeare.txt (or any UTF-8 text) for the shakespeare '
                    'part; without it that part fails and the others run.')
flags.DEFINE_list('parts', list(PARTS), 'Parts to run, in the fixed order; environment always '
                  f'runs. Of {PARTS}.')
flags.DEFINE_float('deadline_s', 450, 'Wall seconds for the whole session; the shakespeare part '
                   'takes what the others leave.')
flags.DEFINE_float('engine_s', 60, 'Budget of the engine checks (seconds).')
flags.DEFINE_float('throughput_s', 150, 'Budget of the throughput part (seconds).')
flags.DEFINE_float('two_gpus_s', 60, 'Budget of the two-GPU part, kept free when it will run.')
flags.DEFINE_integer('lm_steps', 5000, 'Most steps of each shakespeare run.')
flags.DEFINE_integer('lm_decay_steps', 5000, "Where the learning rate's cosine ends (nanoGPT: "
                     '5000); lower it to finish a schedule in the time.')
flags.DEFINE_integer('lm_eval_every', 250, 'Steps between validation losses (nanoGPT: 250).')
flags.DEFINE_enum('lm_dtype', 'bfloat16', ['float32', 'bfloat16'], "The GPT's compute dtype in "
                  'the shakespeare part (parameters stay float32).')
FLAGS = flags.FLAGS
# --smoke's defaults where the command line gives none: a short run of every part.
# Budgets are wide: a loaded 2-core machine compiles slowly, and the test wants every check.
SMOKE_DEFAULTS = {'lm_steps': 24, 'lm_eval_every': 10, 'deadline_s': 1200, 'engine_s': 600,
                  'throughput_s': 600, 'two_gpus_s': 300}
# --smoke's engine checks: one of each kind (each compiles its own pipelines).
SMOKE_CHECKS = ('fdg_k2_vjp', 'checkpoint_k2_vjp_compact')


# ---------------------------------------------------------------- sizes


@dataclasses.dataclass(frozen=True)
class GPTSize:
  n_layer: int
  n_head: int
  n_embd: int
  block_size: int
  batch_size: int
  dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What the parts run: the real sizes on a GPU, tiny ones for --smoke."""
  resnet: str
  image_batch: int
  image_size: int
  gpt_gpu: GPTSize
  gpt_cpu: GPTSize
  window_s: float        # one timed window of steps
  repeats: int           # interleaved windows per configuration
  chunk: int             # steps dispatched between waits
  eval_batch: int
  eval_max_batches: Optional[int]


GPU_SIZES = Sizes('resnet56', 128, 32, GPTSize(6, 6, 384, 256, 64, 0.2),
                  GPTSize(4, 4, 128, 64, 12), window_s=1.5, repeats=3, chunk=20,
                  eval_batch=64, eval_max_batches=None)
SMOKE_SIZES = Sizes('resnet8', 8, 8, GPTSize(1, 2, 16, 16, 8, 0.2), GPTSize(1, 2, 16, 8, 4),
                    window_s=0.2, repeats=2, chunk=2, eval_batch=8,
                    eval_max_batches=2)
VOCAB_SIZE = 65   # tiny Shakespeare's characters, for the random-token benchmarks


def sizes() -> Sizes:
  return SMOKE_SIZES if FLAGS.smoke else GPU_SIZES


# ---------------------------------------------------------------- the record


class PartTimeout(BaseException):
  """A part over its hard limit (a BaseException, so that checks catching Exception let it by)."""


class Budget:
  def __init__(self, seconds: float):
    self.end = time.monotonic() + seconds

  def left(self) -> float:
    return self.end - time.monotonic()


@contextlib.contextmanager
def hard_limit(seconds: float):
  """Raises PartTimeout in the main thread after `seconds` (once a running compilation returns:
  a signal cannot stop XLA)."""
  def stop(signum, frame):
    del signum, frame
    raise PartTimeout(f'stopped at its hard limit of {seconds:.0f} s')
  previous = signal.signal(signal.SIGALRM, stop)
  signal.alarm(max(1, math.ceil(seconds)))
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


class Report:
  """results.json and summary.md under --out, rewritten whole (atomically) on every save."""

  def __init__(self, out: str, session: dict):
    os.makedirs(out, exist_ok=True)
    self.out = out
    self.data = {'session': session, 'parts': {}}

  def part(self, name: str) -> dict:
    self.data['parts'][name] = record = {'status': 'running'}
    return record

  def save(self) -> None:
    self.data['session']['seconds'] = round(time.monotonic() - START, 1)
    self._write('results.json', json.dumps(self.data, indent=1, default=str) + '\n')
    self._write('summary.md', markdown(self.data))

  def _write(self, name: str, text: str) -> None:
    path = os.path.join(self.out, name)
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
      f.write(text)
    os.replace(path + '.tmp', path)


def run_part(report: Report, name: str, function: Callable, seconds: float) -> None:
  """Runs one part within `seconds` (cooperatively, and hard at 1.25x + 30 s); records it."""
  record = report.part(name)
  record['budget_s'] = round(seconds, 1)
  report.save()
  print(f'== {name} (budget {seconds:.0f} s)', flush=True)
  start = time.monotonic()
  try:
    with hard_limit(seconds * 1.25 + 30):
      function(record, Budget(seconds), report)
    record['status'] = 'failed' if record.get('failed') else 'ok'
  except (Exception, PartTimeout) as e:  # pylint: disable=broad-except
    record['status'] = 'timeout' if isinstance(e, PartTimeout) else 'error'
    record['traceback'] = traceback.format_exc()
    print(record['traceback'], file=sys.stderr, flush=True)
  record['seconds'] = round(time.monotonic() - start, 1)
  report.save()
  print(f'== {name}: {record["status"]} in {record["seconds"]} s', flush=True)


# ---------------------------------------------------------------- 1. environment


def environment(record: dict, budget: Budget, report: Report) -> None:
  del budget, report
  versions = {}
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'chex', 'clu', 'numpy',
               'absl-py', 'pytest', 'ml_collections', 'tensorflow'):
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  record.update(
      versions=versions, python=sys.version.split()[0], platform=platform.platform(),
      cpu_count=os.cpu_count(), backend=jax.default_backend(), device_count=jax.device_count(),
      devices=[f'{d.platform}:{d.device_kind}' for d in jax.devices()],
      device_memory_gib=round(stats.get('bytes_limit', 0) / 2**30, 1),
      jax_environment=jax.print_environment_info(return_string=True))


# ---------------------------------------------------------------- 2. engine checks


def load_test_module(name: str) -> types.ModuleType:
  """tests/NAME.py as the top-level module NAME, as pytest imports it (test_engine.py imports
  `tiny` by that name); from its file, so no other `tests` package can stand in."""
  if name in sys.modules:
    return sys.modules[name]
  path = os.path.join(experiments.REPO, 'tests', f'{name}.py')
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def pytest_stand_in() -> None:
  """The tests decorate with `pytest.mark`; where pytest is missing, marks that do nothing."""
  try:
    import pytest  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    def parametrize(*args, **kwargs):
      del args, kwargs
      return lambda function: function
    sys.modules['pytest'] = types.SimpleNamespace(
        mark=types.SimpleNamespace(parametrize=parametrize, slow=lambda function: function))


def relative_difference(got, expected) -> float:
  """max |got - expected| / max |expected| over the leaves of two trees."""
  worst = 0.0
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    worst = max(worst, float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)))
  return worst


def on_one_device(num_stages: int) -> list:
  return [jax.devices()[0]] * num_stages


def check_naive(tests, num_stages: int, stash: str, policy: Optional[str] = None,
                precision: Optional[str] = 'float32', exact: bool = True) -> dict:
  """test_engine's engine-against-`naive_fdg` check with every stage on device 0."""
  with jax.default_matmul_precision(precision):
    batches = tests.tiny_batches(12)
    pipe, state, _ = tests.run_engine(num_stages, batches, stash=stash,
                                      placements=on_one_device(num_stages),
                                      residual_policy=policy)
    modules, variables = tests.initial_variables(num_stages)
    expected, expected_opt, _ = tests.naive_fdg(modules, variables, tests.make_optimizer(),
                                                batches, tests.BETA, stash)
  got = jax.device_get(pipe.stage_variables(state))
  detail = {'relative_difference': relative_difference(got, expected),
            'precision': precision or 'default'}
  if exact:
    tests.assert_matches(pipe, state, expected, expected_opt)
  else:
    detail['within_1e-5'] = detail['relative_difference'] <= 1e-5
  return detail


def check_policy_saves_less(tests, policy: str) -> dict:
  """test_engine's second half: stage 0's saved forward is smaller with the policy."""
  batches = tests.tiny_batches(2)

  def saved_bytes(residual_policy):
    modules, variables = tests.initial_variables(2)
    pipe = pipeline.Pipeline(modules, tests.make_optimizer(), beta=tests.BETA,
                             residual_policy=residual_policy, placements=on_one_device(2))
    state = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
    state, _ = pipe.step(state, *batches[0])
    [entry] = state.saved[0]
    return sum(a.nbytes for a in jax.tree_util.tree_leaves(entry.arrays))
  detail = {'saved_bytes': saved_bytes(policy), 'saved_bytes_without': saved_bytes(None)}
  assert detail['saved_bytes'] < detail['saved_bytes_without'], detail
  return detail


def check_checkpoint(tests, num_stages: int, stash: str) -> dict:
  """test_checkpoint's mid-stream resume, every stage on device 0: a checkpoint after 5 of 10
  batches, restored into a new pipeline, ends bit for bit where the uninterrupted run ends; with
  'vjp' (or 'vjp+dots_saveable') the saved forwards are stored compact (rebuilt on restore)."""
  stash, _, policy = stash.partition('+')

  def new_pipeline():
    modules, variables = tests.initial_variables(num_stages)
    pipe = pipeline.Pipeline(modules, tests.make_optimizer(), beta=tests.BETA, stash=stash,
                             residual_policy=policy or None,
                             placements=on_one_device(num_stages))
    return pipe, pipe.init(jax.random.key(1), None, variables=variables)

  def run(pipe, state, batches):
    for inputs, targets in batches:
      state, _ = pipe.step(state, inputs, targets)
    return state

  batches = tests.tiny_batches(10)
  pipe, state = new_pipeline()
  straight, _ = pipe.drain(run(pipe, state, batches))
  expected = jax.device_get(pipe.stage_variables(straight))
  pipe, state = new_pipeline()
  state = run(pipe, state, batches[:5])
  forms = sorted({entry['form'] for records in checkpoint.to_tree(pipe, state)[1]['saved'].values()
                  for entry in records})
  with tempfile.TemporaryDirectory() as directory:
    checkpoint.Checkpointer(directory).save(5, pipe, state, extra={'step': 5})
    del state
    pipe, fresh = new_pipeline()
    restored, _ = checkpoint.Checkpointer(directory).restore(pipe, fresh)
  resumed, _ = pipe.drain(run(pipe, restored, batches[5:]))
  got = jax.device_get(pipe.stage_variables(resumed))
  bit_exact = all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(got),
                                                       jax.tree_util.tree_leaves(expected)))
  detail = {'forms': forms, 'bit_exact': bit_exact}
  want = ['compact'] if stash == 'vjp' and policy in ('', 'dots_saveable') else ['full']
  assert bit_exact and forms == want, {**detail, 'expected_forms': want}
  return detail


def engine(record: dict, budget: Budget, report: Report) -> None:
  pytest_stand_in()
  load_test_module('tiny')
  tests = load_test_module('test_engine')
  # By priority, as the budget may not reach the end; counts=False: information, not a check.
  checks = [
      ('fdg_k2_vjp', True, lambda: check_naive(tests, 2, 'vjp')),
      ('fdg_k3_vjp', True, lambda: check_naive(tests, 3, 'vjp')),
      ('checkpoint_k2_vjp_compact', True, lambda: check_checkpoint(tests, 2, 'vjp')),
      ('policy_dots_saveable_k3', True, lambda: check_naive(tests, 3, 'vjp', 'dots_saveable')),
      ('policy_nothing_saveable_k3', True,
       lambda: check_naive(tests, 3, 'vjp', 'nothing_saveable')),
      ('fdg_k2_vjp_default_precision', False,
       lambda: check_naive(tests, 2, 'vjp', precision=None, exact=False)),
      ('fdg_k3_recompute', True, lambda: check_naive(tests, 3, 'recompute')),
      ('checkpoint_k3_vjp_compact', True, lambda: check_checkpoint(tests, 3, 'vjp')),
      ('checkpoint_k3_dots_saveable_compact', True,
       lambda: check_checkpoint(tests, 3, 'vjp+dots_saveable')),
      ('policy_nothing_saveable_saves_less', True,
       lambda: check_policy_saves_less(tests, 'nothing_saveable')),
      ('fdg_k2_recompute', True, lambda: check_naive(tests, 2, 'recompute')),
      ('checkpoint_k2_recompute_full', True, lambda: check_checkpoint(tests, 2, 'recompute')),
  ]
  if FLAGS.smoke:
    checks = [c for c in checks if c[0] in SMOKE_CHECKS]
  record['checks'] = results = []
  for name, counts, check in checks:
    result = {'name': name, 'counts': counts}
    results.append(result)
    if budget.left() <= 0:
      result['skipped'] = 'no time left in the budget'
      continue
    start = time.monotonic()
    try:
      result.update(check())
      result['passed'] = True
    except Exception:  # pylint: disable=broad-except
      result['passed'] = False
      result['error'] = traceback.format_exc(limit=-4)
    result['seconds'] = round(time.monotonic() - start, 2)
    print(f"  {name}: {'passed' if result['passed'] else 'FAILED'} in {result['seconds']} s",
          flush=True)
    report.save()
  counted = [r for r in results if r['counts']]
  record['passed'] = sum(r.get('passed', False) for r in counted)
  record['failed'] = sum(r.get('passed') is False for r in counted)
  record['skipped'] = sum('skipped' in r for r in counted)


# ---------------------------------------------------------------- models and pipelines


@dataclasses.dataclass
class Model:
  """A model to train: its blocks, one batch's inputs, its optimizer, random host batches."""
  label: str
  blocks: list
  inputs: jax.ShapeDtypeStruct
  optimizer: Any

  def host_batch(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    shape = self.inputs.shape
    if self.inputs.dtype == np.int32:   # token windows and their next tokens
      tokens = rng.integers(0, VOCAB_SIZE, size=(shape[0], shape[1] + 1)).astype(np.int32)
      return tokens[:, :-1], tokens[:, 1:]
    return (rng.normal(size=shape).astype(np.float32),
            rng.integers(0, 10, size=(shape[0],)).astype(np.int32))


def resnet(name: str, batch_size: int, image_size: int) -> Model:
  """The paper's CIFAR recipe: SGD momentum 0.9, weight decay 5e-4 (coupled), lr 0.1."""
  optimizer = optimizers.build(optimizers.Recipe('sgd', 0.1, momentum=0.9, weight_decay=5e-4))
  return Model(f'{name} b{batch_size}', models.create_blocks(name, 10),
               jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32),
               optimizer)


def nanogpt_adamw(decay_steps: int) -> Any:
  """configs/shakespeare_char*.py's optimizer: AdamW, nanoGPT's warm-up and cosine."""
  schedule = optimizers.warmup_cosine_schedule(1e-3, 1e-4, 100, decay_steps)
  return optimizers.build(optimizers.Recipe(
      'adamw', schedule, weight_decay=0.1, b1=0.9, b2=0.99, eps=1e-8,
      decay_mask=optimizers.weight_decay_mask, grad_clip=1.0))


def gpt_model(label: str, size: GPTSize, vocab_size: int, dtype: str,
              decay_steps: int = 5000) -> Model:
  blocks = gpt.create_blocks(size.n_layer, size.n_head, size.n_embd, size.block_size,
                             vocab_size, dropout_rate=size.dropout, dtype=dtype)
  return Model(f'{label} {size.n_layer}x{size.n_head}x{size.n_embd} T{size.block_size} '
               f'b{size.batch_size} {dtype}', blocks,
               jax.ShapeDtypeStruct((size.batch_size, size.block_size), jnp.int32),
               nanogpt_adamw(decay_steps))


def make_pipeline(model: Model, num_stages: int, placements: list):
  """Blocks split by forward FLOPs into stages, weights from one initialisation of the whole
  model (as train.build_stages); BP is the one-stage pipeline."""
  inputs = model.inputs
  split = partition.balanced_split(
      partition.block_flops(model.blocks, inputs.shape, inputs.dtype), num_stages)
  full = partition.StageModule(tuple(model.blocks))
  one = jnp.zeros((1,) + tuple(inputs.shape[1:]), inputs.dtype)
  variables = jax.jit(lambda key: full.init({'params': key, 'dropout': key}, one,
                                            train=False))(jax.random.key(0))
  pipe = pipeline.Pipeline(partition.build_stages(model.blocks, split), model.optimizer,
                           placements=placements)
  state = pipe.init(jax.random.key(1), inputs,
                    variables=partition.split_variables(variables, split, len(model.blocks)))
  return pipe, state, split


class Runner:
  """One pipeline on random batches already on its devices; steps and times it."""

  def __init__(self, model: Model, method: str, num_stages: int, placements: list):
    self.method, self.num_stages = method, num_stages
    self.devices = len({str(d) for d in placements})
    self.pipe, self.state, self.split = make_pipeline(model, num_stages, placements)
    rng = np.random.default_rng(0)
    self.batches = [(jax.device_put(x, self.pipe.shardings[0]),
                     jax.device_put(y, self.pipe.shardings[-1]))
                    for x, y in (model.host_batch(rng) for _ in range(4))]
    self.fed, self.rates, self.host_shares = 0, [], []

  def step(self) -> None:
    self.state, _ = self.pipe.step(self.state, *self.batches[self.fed % len(self.batches)])
    self.fed += 1

  def warm_up(self) -> float:
    """Compiles and fills: 2(K-1) iterations reach the steady state, two more run it."""
    start = time.perf_counter()
    for _ in range(2 * (self.num_stages - 1) + 2):
      self.step()
      jax.block_until_ready(self.state)
    return time.perf_counter() - start

  def timed(self, seconds: float, chunk: int) -> None:
    """Steps for about `seconds`, waiting for the devices every `chunk` steps; keeps steps/s and
    the share of the time the host spent dispatching."""
    steps, host, start = 0, 0.0, time.perf_counter()
    while True:
      for _ in range(chunk):
        begin = time.perf_counter()
        self.step()
        host += time.perf_counter() - begin
      steps += chunk
      jax.block_until_ready(self.state)
      elapsed = time.perf_counter() - start
      if elapsed >= seconds:
        break
    self.rates.append(steps / elapsed)
    self.host_shares.append(host / elapsed)


def compare(model: Model, configurations: list[tuple[str, int, list]]) -> list[dict]:
  """Each (method, K, placements) of `model`, compiled, then timed in interleaved windows; rows
  with the median steps/s and the ratio to the first configuration (BP)."""
  runners, compile_s = [], []
  for method, num_stages, placements in configurations:
    runners.append(Runner(model, method, num_stages, placements))
    compile_s.append(runners[-1].warm_up())
  for _ in range(sizes().repeats):
    for runner in runners:
      runner.timed(sizes().window_s, sizes().chunk)
  base = statistics.median(runners[0].rates)
  rows = []
  for runner, seconds in zip(runners, compile_s):
    rate = statistics.median(runner.rates)
    rows.append({'model': model.label, 'method': runner.method, 'stages': runner.num_stages,
                 'devices': runner.devices, 'split': list(runner.split),
                 'steps_per_sec': round(rate, 3), 'ratio_to_first': round(rate / base, 4),
                 'windows': [round(r, 3) for r in runner.rates],
                 'host_share': round(statistics.median(runner.host_shares), 3),
                 'compile_and_fill_s': round(seconds, 1)})
  return rows


def run_models(record: dict, budget: Budget, report: Report, plan: list) -> None:
  """`compare` for each (make_model, configurations, seconds it needs on a GPU) while the
  budget lasts (a compilation cannot be stopped: an entry starts only with its time left);
  saved after each."""
  record['rows'], record['errors'], record['not_run'] = [], {}, []
  for make, configurations, needs_s in plan:
    model = make()
    if not FLAGS.smoke and budget.left() < needs_s:
      record['not_run'].append(model.label)
      continue
    try:
      rows = compare(model, configurations)
      record['rows'].extend(rows)
      print('  ' + '; '.join(f"{r['model']} {r['method']} K={r['stages']}: "
                             f"{r['steps_per_sec']} steps/s" for r in rows), flush=True)
    except Exception:  # pylint: disable=broad-except
      record['errors'][model.label] = traceback.format_exc(limit=-4)
    report.save()
  record['failed'] = len(record['errors'])


# ---------------------------------------------------------------- 3. throughput


def throughput(record: dict, budget: Budget, report: Report) -> None:
  s = sizes()

  def one(k):
    return on_one_device(k)
  bp_fdg = [('bp', 1, one(1)), ('fdg', 2, one(2))]
  def image_model():
    return resnet(s.resnet, s.image_batch, s.image_size)
  # By priority: what the issue asks first, then K = 4 and float32 if time is left.
  plan = [
      (image_model, bp_fdg, 0),
      (lambda: gpt_model('gpt_gpu', s.gpt_gpu, VOCAB_SIZE, 'bfloat16'), bp_fdg, 30),
      (lambda: gpt_model('gpt_cpu', s.gpt_cpu, VOCAB_SIZE, 'float32'), bp_fdg, 20),
      (image_model, [('bp', 1, one(1)), ('fdg', 4, one(4))], 60),
      (lambda: gpt_model('gpt_gpu', s.gpt_gpu, VOCAB_SIZE, 'float32'), bp_fdg, 30),
  ]
  record['note'] = ('every stage on device 0: ratio_to_first = FDG steps/s over BP steps/s, '
                    'the pipeline overhead (1.0 is none)')
  # --smoke: the GPT only (two_gpus runs the ResNet).
  run_models(record, budget, report, plan[2:3] if FLAGS.smoke else plan)


# ---------------------------------------------------------------- 5. two GPUs


def two_gpus(record: dict, budget: Budget, report: Report) -> None:
  s = sizes()
  devices = jax.devices()
  configurations = [('bp', 1, devices[:1]), ('fdg', 2, devices[:2])]
  record['note'] = 'ratio_to_first = speed-up of FDG K=2 on devices 0 and 1 over BP on device 0'
  plan = [(lambda: resnet(s.resnet, s.image_batch, s.image_size), configurations, 0),
          (lambda: gpt_model('gpt_gpu', s.gpt_gpu, VOCAB_SIZE, 'bfloat16'), configurations, 30)]
  run_models(record, budget, report, plan[:1] if FLAGS.smoke else plan)


# ---------------------------------------------------------------- 4. shakespeare


def merge(total, metrics):
  return metrics if total is None else total if metrics is None else total.merge(metrics)


def train_lm(data, method: str, num_stages: int, seconds: float, max_steps: int,
             on_evaluation: Callable[[], None], run: dict) -> None:
  """nanoGPT's recipe for at most `max_steps` steps or about `seconds`; fills `run` as it goes
  (validation loss every --lm_eval_every steps and at the end, after draining the pipeline)."""
  start = time.monotonic()
  size = sizes().gpt_gpu
  model = gpt_model('shakespeare', size, data.vocabulary.size, FLAGS.lm_dtype,
                    FLAGS.lm_decay_steps)
  pipe, state, split = make_pipeline(model, num_stages, on_one_device(num_stages))
  run.update(model=model.label, split=list(split), curve=[])
  batches = input_pipeline.prefetch_to_device(
      text_data.train_batches(data, size.batch_size, size.block_size, seed=0), 2,
      (pipe.shardings[0], pipe.shardings[-1]))
  warm_steps = 2 * num_stages + 3   # compiles every phase; steps/s counts from here
  paused_s, last_pause_s, metrics, step = 0.0, 0.0, None, 0
  try:
    while step < max_steps:
      state, info = pipe.step(state, *next(batches))
      step += 1
      metrics = merge(metrics, info.metrics)
      if step == warm_steps:
        jax.block_until_ready(state)
        timed_from, paused_s = time.monotonic(), 0.0
      out_of_time = time.monotonic() - start + 2 * last_pause_s + 1 > seconds
      last = out_of_time or step == max_steps
      if step % FLAGS.lm_eval_every and not last:
        continue
      jax.block_until_ready(state)
      if step > warm_steps:   # training alone: no compilation, evaluation or drain
        run['steps_per_sec'] = round(
            (step - warm_steps) / (time.monotonic() - timed_from - paused_s), 2)
        run['tokens_per_sec'] = round(run['steps_per_sec'] * size.batch_size * size.block_size)
      begin = time.monotonic()
      if last:   # every batch fed reaches every stage's update
        state, drained = pipe.drain(state)
        for item in drained:
          metrics = merge(metrics, item.metrics)
      result = pipe.evaluate(state, text_data.eval_batches(
          data, sizes().eval_batch, size.block_size, sizes().eval_max_batches))
      last_pause_s = time.monotonic() - begin
      paused_s += last_pause_s
      train_loss = None if metrics is None else float(metrics.compute()['loss'])
      metrics = None
      run['curve'].append({'step': step, 'val_loss': round(result['loss'], 4),
                           'train_loss': None if train_loss is None else round(train_loss, 4),
                           'seconds': round(time.monotonic() - start, 1)})
      run['steps'] = step
      run['best_val_loss'] = min(point['val_loss'] for point in run['curve'])
      print(f"  {method} K={num_stages} step {step}: val loss {result['loss']:.4f}, "
            f"{run.get('steps_per_sec')} steps/s, {run['curve'][-1]['seconds']} s", flush=True)
      on_evaluation()
      if last:
        break
  finally:
    batches.close()
  run['seconds'] = round(time.monotonic() - start, 1)


def shakespeare(record: dict, budget: Budget, report: Report) -> None:
  size = sizes().gpt_gpu
  if not FLAGS.data:
    raise ValueError('The shakespeare part needs --data=PATH of tinyshakespeare.txt.')
  data = text_data.load_text('textfile', FLAGS.data, block_size=size.block_size)
  record.update(data=data.description, nanogpt=NANOGPT, dtype=FLAGS.lm_dtype,
                recipe=dict(dataclasses.asdict(size), lr='1e-3 -> 1e-4 cosine',
                            warmup_steps=100, decay_steps=FLAGS.lm_decay_steps, beta2=0.99,
                            weight_decay=0.1, grad_clip=1.0, eval_every=FLAGS.lm_eval_every),
                runs=[])
  max_steps = FLAGS.lm_steps
  methods = [('bp', 1), ('fdg', 2)]
  for i, (method, num_stages) in enumerate(methods):
    run = {'method': method, 'stages': num_stages}
    record['runs'].append(run)
    try:
      train_lm(data, method, num_stages, budget.left() / (len(methods) - i), max_steps,
               report.save, run)
    except Exception:  # pylint: disable=broad-except
      run['error'] = traceback.format_exc(limit=-4)
      record['failed'] = record.get('failed', 0) + 1
    report.save()
    max_steps = min(max_steps, run.get('steps') or max_steps)   # the same points of the curve


# ---------------------------------------------------------------- the summary


def markdown(data: dict) -> str:
  session = data['session']
  lines = [f"# GPU session ({'smoke, CPU' if session['smoke'] else 'device'})", '',
           f"`{session['command']}`, {session.get('seconds', 0)} s.", '']
  for name, part in data['parts'].items():
    if 'reason' in part:
      lines += [f"## {name}: {part['status']}", '', part['reason'], '']
      continue
    lines += [f"## {name}: {part['status']} ({part.get('seconds', '...')} s of "
              f"{part.get('budget_s')} s)", '']
    lines += PART_MARKDOWN[name](part)
    if part.get('traceback'):
      lines += ['```', *part['traceback'].strip().splitlines()[-25:], '```', '']
  return '\n'.join(lines) + '\n'


def table(header: list[str], rows: list[list]) -> list[str]:
  return (['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
          + ['| ' + ' | '.join('' if v is None else str(v) for v in row) + ' |' for row in rows]
          + [''])


def environment_markdown(part: dict) -> list[str]:
  versions = part.get('versions', {})
  return [f"{part.get('device_count')} x {', '.join(sorted(set(part.get('devices', []))))} "
          f"({part.get('device_memory_gib')} GiB), backend {part.get('backend')}, Python "
          f"{part.get('python')}, {part.get('cpu_count')} CPUs.", '',
          ', '.join(f'{k} {v}' for k, v in versions.items()), '']


def engine_markdown(part: dict) -> list[str]:
  rows = []
  for check in part.get('checks', []):
    detail = {k: v for k, v in check.items()
              if k not in ('name', 'counts', 'passed', 'seconds', 'error', 'skipped')}
    outcome = check.get('skipped') or {True: 'passed', False: 'FAILED'}.get(check.get('passed'))
    if not check['counts']:
      outcome = f'(information) {outcome}'
    error = (check.get('error') or '').strip().splitlines()[-1:]
    rows.append([check['name'], outcome, check.get('seconds'),
                 json.dumps(detail, default=str) + (f' {error[0]}' if error else '')])
  return [f"{part.get('passed')} passed, {part.get('failed')} failed, {part.get('skipped')} "
          'skipped.', ''] + table(['check', 'outcome', 's', 'detail'], rows)


def rows_markdown(part: dict) -> list[str]:
  lines = [part.get('note', ''), ''] + table(
      ['model', 'method', 'K', 'devices', 'steps/s', 'ratio', 'host share', 'compile+fill s'],
      [[r['model'], r['method'], r['stages'], r['devices'], r['steps_per_sec'],
        r['ratio_to_first'], r['host_share'], r['compile_and_fill_s']]
       for r in part.get('rows', [])])
  for label, error in part.get('errors', {}).items():
    lines += [f'{label}: ' + error.strip().splitlines()[-1], '']
  if part.get('not_run'):
    lines += ['Not run (no time left): ' + ', '.join(part['not_run']), '']
  return lines


def shakespeare_markdown(part: dict) -> list[str]:
  runs = part.get('runs', [])
  lines = [f"{part.get('data')}; nanoGPT: {NANOGPT['best_val_loss']} in about "
           f"{NANOGPT['minutes']} min on {NANOGPT['device']}.", ''] + table(
               ['method', 'K', 'steps', 'steps/s', 'tokens/s', 'best val loss', 'seconds'],
               [[r['method'], r['stages'], r.get('steps'), r.get('steps_per_sec'),
                 r.get('tokens_per_sec'), r.get('best_val_loss'), r.get('seconds')]
                for r in runs])
  curves = {r['method']: {p['step']: p['val_loss'] for p in r.get('curve', [])} for r in runs}
  steps = sorted({step for curve in curves.values() for step in curve})
  lines += table(['step'] + [f'{m} val loss' for m in curves],
                 [[step] + [curve.get(step) for curve in curves.values()] for step in steps])
  for r in runs:
    if r.get('error'):
      lines += [f"{r['method']}: " + r['error'].strip().splitlines()[-1], '']
  return lines


PART_MARKDOWN = {'environment': environment_markdown, 'engine': engine_markdown,
                 'throughput': rows_markdown, 'two_gpus': rows_markdown,
                 'shakespeare': shakespeare_markdown}


# ---------------------------------------------------------------- main


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
  report = Report(FLAGS.out, {'command': experiments.command_line(), 'smoke': FLAGS.smoke,
                              'started': time.strftime('%Y-%m-%d %H:%M:%S %Z')})
  deadline = START + FLAGS.deadline_s
  run_part(report, 'environment', environment, 60)
  wanted = set(FLAGS.parts)
  two = 'two_gpus' in wanted and jax.device_count() >= 2
  for name, function, seconds in (('engine', engine, FLAGS.engine_s),
                                  ('throughput', throughput, FLAGS.throughput_s),
                                  ('shakespeare', shakespeare, None),
                                  ('two_gpus', two_gpus, FLAGS.two_gpus_s)):
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
    run_part(report, name, function, seconds)
  report.save()
  print(f'Results in {FLAGS.out}: results.json, summary.md', flush=True)
  if any(part['status'] == 'timeout' for part in report.data['parts'].values()):
    # A part stopped inside JAX once made the interpreter's teardown crash (after every file
    # was written); skip the teardown.
    sys.stderr.flush()
    os._exit(0)  # pylint: disable=protected-access


if __name__ == '__main__':
  app.run(main)
