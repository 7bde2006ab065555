r"""BP's training step on the character GPT against nanoGPT's, side by side in one process (issue 37
item 8).

Times one training step of configs/shakespeare_char_cpu.py's GPT (nanoGPT's CPU recipe: 4 layers,
4 heads, 128 wide, context 64, batch 12; other sizes by flag) in two implementations on the same
random tokens:
- JAX: `experiments.probes.gpt_step.training_step` (plain `jax.jit`, no pipeline; the trainer's
  AdamW with its schedule and clipping), and each variant named by `--variants` (below);
- nanoGPT: `model.py` of a checkout of karpathy/nanoGPT (`--nanogpt_dir`) with PyTorch, the
  step of its `train.py` on a CPU: forward and loss in float32, backward, gradient clipping at
  1.0, `configure_optimizers`' AdamW (weight decay 0.1, betas (0.9, 0.99)), `zero_grad`.
The timed windows go round the implementations in turn (nanoGPT, JAX, each variant, nanoGPT,
...), so a drift of the machine's speed reaches them alike; each JAX figure is also given as a
ratio to the nanoGPT window next to it. XLA:CPU's flags are the process's: set `XLA_FLAGS` to
compare them (the output records it). PyTorch is not a dependency of fdg_jax; this probe needs it
installed beside JAX.

    python -m experiments.probes.step_against_nanogpt --nanogpt_dir=PATH/TO/nanoGPT \
        --variants=fast_variance,precision_highest

Variants (each a JAX step built after the change, the baseline unchanged):
- `fast_variance`: LayerNorm's variance as E[x^2] - E[x]^2 in one pass over x (flax's
  `use_fast_variance=True`) instead of E[(x - mean)^2]; changes the numbers slightly.
- `precision_highest`: `jax.default_matmul_precision('highest')` (float32 products everywhere).
- `precision_bfloat16`: `jax.default_matmul_precision('bfloat16')`: products from bfloat16
  inputs where the backend honours it; changes the numbers.

The last stdout line is one JSON object.
"""

import contextlib
import importlib.util
import os
import statistics
import sys

from absl import app
from absl import flags
import flax.linen
import jax
import numpy as np

from experiments.bench import common
from experiments.probes import gpt_step
from fdg_jax.models import gpt

flags.DEFINE_string('nanogpt_dir', None, 'A checkout of karpathy/nanoGPT (its model.py).')
flags.DEFINE_list('variants', [], 'JAX variants to time beside the baseline: '
                  'fast_variance, precision_highest, precision_bfloat16.')
flags.DEFINE_integer('torch_threads', 0, "PyTorch's intra-op threads (0: the cores this "
                     'process may run on, as nanoGPT leaves it).')
flags.DEFINE_integer('profile_steps', 10, 'Steps of the JAX baseline and of nanoGPT recorded '
                     'by their profilers after the timing, summed per op (0: none).')
flags.mark_flag_as_required('nanogpt_dir')
FLAGS = flags.FLAGS

VARIANTS = ('fast_variance', 'precision_highest', 'precision_bfloat16')


def nanogpt_step(tokens, targets):
  """nanoGPT's step (its train.py on a CPU, float32, no gradient accumulation) as a call."""
  import torch  # pylint: disable=g-import-not-at-top
  path = os.path.join(FLAGS.nanogpt_dir, 'model.py')
  if not os.path.isfile(path):
    sys.exit(f'error: --nanogpt_dir={FLAGS.nanogpt_dir} has no model.py; give a checkout of '
             'https://github.com/karpathy/nanoGPT.')
  spec = importlib.util.spec_from_file_location('nanogpt_model', path)
  model_lib = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(model_lib)
  torch.manual_seed(0)
  torch.set_num_threads(FLAGS.torch_threads or len(os.sched_getaffinity(0)))
  config = model_lib.GPTConfig(block_size=FLAGS.block_size, vocab_size=gpt_step.VOCAB_SIZE,
                               n_layer=FLAGS.n_layer, n_head=FLAGS.n_head, n_embd=FLAGS.n_embd,
                               dropout=0.0, bias=False)
  model = model_lib.GPT(config)
  model.train()
  optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), 'cpu')
  x, y = torch.from_numpy(tokens).long(), torch.from_numpy(targets).long()

  def step():
    _, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()
  return step, sum(p.numel() for p in model.parameters())


def jax_step(tokens, targets, variant: str):
  """The JAX step, built under `variant` ('' for the baseline)."""
  layer_norm = gpt.layer_norm
  if variant == 'fast_variance':
    def fast_layer_norm(bias, dtype, name):
      return flax.linen.LayerNorm(epsilon=gpt.LAYER_NORM_EPSILON, use_bias=bias,
                                  use_fast_variance=True, dtype=dtype,
                                  param_dtype=jax.numpy.float32, name=name)
    gpt.layer_norm = fast_layer_norm
  precision = {'precision_highest': 'highest', 'precision_bfloat16': 'bfloat16'}.get(variant)
  context = jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()
  try:
    with context:
      _, params, one_step = gpt_step.training_step(tokens, targets)
      jax.block_until_ready(one_step())   # compiles under the variant
  finally:
    gpt.layer_norm = layer_norm

  def call():
    with context:
      return jax.block_until_ready(one_step())
  return call, sum(x.size for x in jax.tree.leaves(params))


def jax_profile(call) -> dict:
  """The JAX step's op time per step: by kind (`common.op_category`) and its longest ops."""
  def run():
    for _ in range(FLAGS.profile_steps):
      call()
  by_op = common.traced_op_ms(run, 'jit_step', FLAGS.profile_steps)
  by_kind = common.ops_by_kind(by_op)
  return {'total_ms': round(sum(by_op.values()), 2),
          'by_kind_ms': {k: round(ms, 2) for k, ms in by_kind.most_common()},
          'longest_ms': [(op, round(ms, 2)) for op, ms in by_op.most_common(12)]}


def torch_profile(call) -> dict:
  """nanoGPT's step under torch.profiler: its longest operators by their own CPU time."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(FLAGS.profile_steps):
      call()
  ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
  per_step = lambda us: round(us / 1e3 / FLAGS.profile_steps, 2)
  return {'total_self_ms': per_step(sum(e.self_cpu_time_total for e in ops)),
          'longest_ms': [(e.key, per_step(e.self_cpu_time_total)) for e in ops[:12]]}


def main(argv):
  del argv
  unknown = sorted(set(FLAGS.variants) - set(VARIANTS))
  if unknown:
    sys.exit(f'error: unknown --variants {unknown}; choose from {list(VARIANTS)}.')
  windows = np.random.default_rng(0).integers(
      0, gpt_step.VOCAB_SIZE, size=(FLAGS.batch_size, FLAGS.block_size + 1)).astype(np.int32)
  tokens, targets = windows[:, :-1], windows[:, 1:]
  import torch  # pylint: disable=g-import-not-at-top
  steps, parameters = {}, {}
  steps['nanogpt'], parameters['nanogpt'] = nanogpt_step(tokens, targets)
  for variant in ['', *FLAGS.variants]:
    steps[variant or 'jax'], parameters[variant or 'jax'] = jax_step(tokens, targets, variant)
  for call in steps.values():   # warm-up: one untimed window each
    gpt_step.window_ms(call)
  times = {name: [] for name in steps}
  for _ in range(FLAGS.repeats):
    for name, call in steps.items():
      times[name].append(gpt_step.window_ms(call))
  median = {name: round(statistics.median(ms), 2) for name, ms in times.items()}
  ratios = {name: round(statistics.median(a / b for a, b in zip(ms, times['nanogpt'])), 3)
            for name, ms in times.items() if name != 'nanogpt'}
  for name in steps:
    print(f'{name:>20}: {median[name]:7.2f} ms per step' +
          (f'  ({ratios[name]:.3f} of nanoGPT, median of paired windows)' if name in ratios
           else ''))
  profiles = {}
  if FLAGS.profile_steps:
    profiles = {'jax': jax_profile(steps['jax']), 'nanogpt': torch_profile(steps['nanogpt'])}
    for name, profile in profiles.items():
      print(f'{name} profile, ms per step: ' + ', '.join(
          f'{op} {ms}' for op, ms in profile['longest_ms']))
    print('jax by op kind, ms per step: ' + str(profiles['jax']['by_kind_ms']))
  common.print_json({
      'sizes': {k: getattr(FLAGS, k) for k in ('n_layer', 'n_head', 'n_embd', 'block_size',
                                                'batch_size')},
      'iterations_per_window': FLAGS.iterations, 'windows': FLAGS.repeats,
      'median_ms': median, 'ratio_to_nanogpt': ratios, 'window_ms': times,
      'parameters': parameters, 'profiles': profiles, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'torch': torch.__version__, 'torch_threads': torch.get_num_threads(),
      'jax': jax.__version__, 'machine': common.machine()})


if __name__ == '__main__':
  app.run(main)
