"""What the experiments share: a pipeline built exactly as the trainer builds it, on random data.

The experiments need no dataset: `train.initial_run` only needs the number of classes (or, for
the language model, the vocabulary's size: tiny Shakespeare's 65 characters).
"""

import collections
import glob
import gzip
import json
import os
import platform
import re
import tempfile
from typing import Optional, Sequence

import jax
import numpy as np

from configs import default as default_config
from configs import shakespeare_char_cpu
import experiments
from fdg_jax.engine import pipeline
from fdg_jax.trainer import configuration
from fdg_jax.trainer import train

NUM_CLASSES = 10
STEPS_PER_EPOCH = 50_000 // 128   # CIFAR-10 at batch 128: only the lr schedule's boundaries use it
VOCAB_SIZE = 65   # tiny Shakespeare's characters (configs/shakespeare_char*.py)
RESULTS_DIR = experiments.RESULTS_DIR


def make_config(model: str, method: str, num_stages: int, batch_size: int, image_size: int,
                stash: str = 'vjp', stage_devices: Sequence[int] = ()):
  """The trainer's config for a benchmark; stash 'vjp+POLICY' sets config.residual_policy."""
  config = default_config.get_config()
  config.model, config.method, config.num_stages = model, method, num_stages
  config.stash, _, config.residual_policy = stash.partition('+')
  config.batch_size, config.image_size = batch_size, image_size
  config.stage_devices = tuple(stage_devices)
  return config


def make_gpt_config(method: str, num_stages: int, batch_size: int, n_layer: int, n_embd: int,
                    n_head: int, block_size: int):
  """configs/shakespeare_char_cpu.py (nanoGPT's AdamW and schedule) with this GPT's sizes, and
  stage k on device k (as make_config) rather than every stage on device 0."""
  config = shakespeare_char_cpu.get_config()
  config.method, config.num_stages, config.batch_size = method, num_stages, batch_size
  config.n_layer, config.n_embd, config.n_head, config.block_size = (n_layer, n_embd, n_head,
                                                                     block_size)
  config.stage_devices = ()
  return config


def num_outputs(config) -> int:
  """The model's output size for a benchmark's config: classes, or the vocabulary's size."""
  return VOCAB_SIZE if config.task == 'language_model' else NUM_CLASSES


def random_host_batch(config, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """One random (inputs, targets) on the host: normal images and labels, or token windows and
  their next tokens (int32 in [0, VOCAB_SIZE))."""
  if config.task == 'language_model':
    tokens = rng.integers(0, VOCAB_SIZE, size=(config.batch_size, config.block_size + 1))
    tokens = tokens.astype(np.int32)
    return tokens[:, :-1], tokens[:, 1:]
  size = config.image_size
  return (rng.normal(size=(config.batch_size, size, size, 3)).astype(np.float32),
          rng.integers(0, NUM_CLASSES, size=(config.batch_size,)).astype(np.int32))


def initial_run(config) -> train.Run:
  """Stages, optimizer and initial state (from config.seed) as `train.train_and_evaluate` makes
  them, for the config's task and `num_outputs(config)`."""
  return train.initial_run(config, configuration.create_task(config), num_outputs(config),
                           STEPS_PER_EPOCH)


def build_pipeline(config) -> tuple[pipeline.Pipeline, pipeline.PipelineState]:
  """`initial_run`'s pipeline and initial state."""
  run = initial_run(config)
  return run.pipe, run.state


def random_batches(pipe: pipeline.Pipeline, batch_size: int, image_size: int, count: int,
                   seed: int = 0, num_classes: int = NUM_CLASSES):
  """`count` random (images, labels), already on the first / last stage's device, as the
  trainer's prefetch leaves them: the host-to-device copy is not part of a step."""
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(count):
    images = rng.normal(size=(batch_size, image_size, image_size, 3)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=(batch_size,)).astype(np.int32)
    batches.append((jax.device_put(images, pipe.shardings[0]),
                    jax.device_put(labels, pipe.shardings[-1])))
  return batches


def cpu_model() -> str:
  """The processor's name (XLA's CPU code, and so every CPU time, depends on it)."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def machine() -> dict:
  device = jax.devices()[0]
  return {'device': f'{device.platform}:{device.device_kind}', 'num_devices': jax.device_count(),
          'host': platform.node(), 'cpu_model': cpu_model(), 'cpu_count': os.cpu_count(),
          'jax_version': jax.__version__, 'load_average_1m': os.getloadavg()[0]}


def print_json(result: dict, path: Optional[str] = None) -> None:
  """The result as the last stdout line (and in `path`, if given)."""
  line = json.dumps(result, sort_keys=True)
  if path:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
      f.write(line + '\n')
  print(line, flush=True)


def op_category(op_name: str) -> str:
  """An XLA:CPU op's kind, by its name in a profile trace."""
  name = re.sub(r'\.\d+$', '', op_name)
  if name.startswith('ynn_fusion'):   # XLA:CPU's YNNPACK kernels: dots, convolutions, fusions
    return 'ynn_fusion'
  if name.startswith('dot') or 'gemm' in name:
    return 'dot'
  if 'conv' in name:
    return 'convolution'
  if 'copy' in name or 'transpose' in name:
    return 'copy/transpose'
  if 'fusion' in name:
    return 'other fusion'
  return 'other'


def traced_op_ms(run, hlo_module: str, iterations: int) -> collections.Counter:
  """ms per iteration of each XLA op of `hlo_module` (a jitted function's module, e.g.
  'jit_step'), summed over the op events of a `jax.profiler.trace` of `run()`, which runs
  `iterations` iterations and blocks until they are done."""
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0
  with tempfile.TemporaryDirectory(prefix='fdg_op_profile_') as trace_dir:
    with jax.profiler.trace(trace_dir, profiler_options=options):
      run()
    with gzip.open(glob.glob(os.path.join(trace_dir, 'plugins/profile/*/*.trace.json.gz'))[0],
                   'rt') as f:
      events = json.load(f)['traceEvents']
  by_op = collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and e.get('args', {}).get('hlo_module') == hlo_module:
      by_op[e['name']] += e['dur'] / 1e3 / iterations
  return by_op


def ops_by_kind(by_op: dict) -> collections.Counter:
  """`traced_op_ms`'s times summed by `op_category`."""
  by_kind = collections.Counter()
  for op, ms in by_op.items():
    by_kind[op_category(op)] += ms
  return by_kind
