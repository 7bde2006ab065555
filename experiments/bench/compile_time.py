"""XLA CPU compile time, and the compiled code's run time, at each LLVM optimisation level.

Each level runs in a fresh process (XLA reads `XLA_FLAGS` once, when it starts), without the
persistent compilation cache: the full model's jitted `init` as the trainer compiles it
(`train.build_stages`: one image), and a jitted loss-and-gradient of the full model on a batch,
compiled and then run `--repeats` times. 'default' sets no level (XLA's CPU default is -O3).
tests/conftest.py sets level 2 for the tests; docs/record/suite_time.md ("The suite's time,
part 2") records what this showed.

  python -m experiments.bench.compile_time --model=resnet8 --image_size=16 --batch_size=8 \
      --levels=default,2,1,0 --out=/tmp/bench_compile.json
"""

import argparse
import json
import os
import subprocess
import sys
import time

from experiments import REPO

MODULE = 'experiments.bench.compile_time'


def child(args) -> dict:
  """Compile and run times at the level this process was started with."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from fdg_jax import models  # pylint: disable=g-import-not-at-top
  from fdg_jax.models import partition  # pylint: disable=g-import-not-at-top
  blocks = models.create_blocks(args.model, 10)
  model = partition.StageModule(tuple(blocks))
  image_shape = (args.image_size, args.image_size, 3)
  key = jax.random.key(0)

  started = time.perf_counter()
  init = jax.jit(lambda k: model.init({'params': k, 'dropout': k}, jnp.zeros(image_shape)[None],
                                      train=False)).lower(key).compile()
  init_compile_s = time.perf_counter() - started
  variables = init(key)

  def loss(params, images, labels):
    logits, _ = model.apply({**variables, 'params': params}, images, train=True,
                            mutable=['batch_stats'], rngs={'dropout': key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  images = jax.random.normal(key, (args.batch_size, *image_shape))
  labels = jnp.arange(args.batch_size) % 10
  started = time.perf_counter()
  step = jax.jit(jax.value_and_grad(loss)).lower(variables['params'], images, labels).compile()
  step_compile_s = time.perf_counter() - started
  jax.block_until_ready(step(variables['params'], images, labels))   # first call: allocation
  started = time.perf_counter()
  for _ in range(args.repeats):
    jax.block_until_ready(step(variables['params'], images, labels))
  return {'init_compile_s': init_compile_s, 'step_compile_s': step_compile_s,
          'step_run_ms': 1000 * (time.perf_counter() - started) / args.repeats}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model', default='resnet8', help='A name in fdg_jax.models.')
  parser.add_argument('--image_size', type=int, default=16)
  parser.add_argument('--batch_size', type=int, default=8, help="The gradient step's batch.")
  parser.add_argument('--repeats', type=int, default=20, help='Timed calls of the step.')
  parser.add_argument('--levels', default='default,2,1,0',
                      help="Comma-separated --xla_backend_optimization_level values; 'default' "
                           'sets none.')
  parser.add_argument('--out', help='JSON file for the results (default: print only).')
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(child(args)))
    return
  if args.out and os.path.exists(args.out):
    sys.exit(f'error: {args.out} exists; give another --out (nothing is overwritten).')
  results = {}
  for level in args.levels.split(','):
    flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
             if not f.startswith('--xla_backend_optimization_level')]
    if level != 'default':
      flags.append(f'--xla_backend_optimization_level={int(level)}')
    env = dict(os.environ, XLA_FLAGS=' '.join(flags), JAX_COMPILATION_CACHE_DIR='',
               JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu'))
    command = [sys.executable, '-m', MODULE, '--child', f'--model={args.model}',
               f'--image_size={args.image_size}', f'--batch_size={args.batch_size}',
               f'--repeats={args.repeats}']
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
      sys.exit(f'error: level {level} failed:\n{done.stderr[-3000:]}')
    results[level] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f'level {level:>7}: init compile {results[level]["init_compile_s"]:.2f} s, step '
          f'compile {results[level]["step_compile_s"]:.2f} s, step run '
          f'{results[level]["step_run_ms"]:.1f} ms', flush=True)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'settings': vars(args), 'levels': results}, f, indent=1)


if __name__ == '__main__':
  main()
