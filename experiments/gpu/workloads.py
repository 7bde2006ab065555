"""What the timing parts (throughput, two_gpus) and the shakespeare part train: the sizes (the real
ones on a GPU, tiny ones for --smoke), models with their optimizers, pipelines built as
train.build_stages builds them (through the Python API: the lent machine has no ml_collections),
and a runner that times them in interleaved windows."""

import dataclasses
import statistics
import time
import traceback
from typing import Any, Optional

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments.gpu import record as record_lib
from fdg_jax.engine import optimizers
from fdg_jax.engine import pipeline
from fdg_jax import models
from fdg_jax.models import gpt
from fdg_jax.models import partition

flags.DEFINE_bool('smoke', False, 'CPU, two simulated devices, tiny sizes: the same code paths '
                  'in about a minute.')
FLAGS = flags.FLAGS


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


def on_one_device(num_stages: int) -> list:
  return [jax.devices()[0]] * num_stages


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


def run_models(record: dict, budget: record_lib.Budget, report: record_lib.Report,
               plan: list) -> None:
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


def rows_markdown(part: dict) -> list[str]:
  lines = [part.get('note', ''), ''] + record_lib.table(
      ['model', 'method', 'K', 'devices', 'steps/s', 'ratio', 'host share', 'compile+fill s'],
      [[r['model'], r['method'], r['stages'], r['devices'], r['steps_per_sec'],
        r['ratio_to_first'], r['host_share'], r['compile_and_fill_s']]
       for r in part.get('rows', [])])
  for label, error in part.get('errors', {}).items():
    lines += [f'{label}: ' + error.strip().splitlines()[-1], '']
  if part.get('not_run'):
    lines += ['Not run (no time left): ' + ', '.join(part['not_run']), '']
  return lines

