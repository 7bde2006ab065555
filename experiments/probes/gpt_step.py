r"""Where does the character GPT's training step spend its time on XLA:CPU?

Times, with plain `jax.jit` and no pipeline, the GPT of configs/shakespeare_char_cpu.py (or the
sizes given): the forward, the forward and backward, and the whole step with the trainer's
optimizer (AdamW, its schedule and clipping); then each block kind alone (embedding, attention,
MLP, a whole transformer block, head), forward and the gradient of the output's sum with respect
to the block's parameters (a whole block's also back-propagates through the MLP's input to reach
the attention's parameters). Wall-clock milliseconds, the median of `--repeats` windows of
`--iterations` calls each, compilation excluded. Set against the
trainer's tokens per second, it says how much of a step is XLA's compute and how much the
trainer around it; nanoGPT's CPU recipe takes about 40 ms per iteration on a machine like this
one (issue 27). Run it on an otherwise idle machine:

    python -m experiments.probes.gpt_step   # nanoGPT's CPU sizes: 4 layers, 128 wide, batch 12

The last stdout line is one JSON object.
"""

import statistics
import time

from absl import app
from absl import flags
import jax
import numpy as np
import optax

from configs import shakespeare_char_cpu
from experiments.bench import common
from fdg_jax.engine import optimizers
from fdg_jax.models import gpt
from fdg_jax.models import partition
from fdg_jax.trainer import optimizers as optimizer_config

flags.DEFINE_integer('n_layer', 4, 'Transformer blocks.')
flags.DEFINE_integer('n_head', 4, 'Attention heads.')
flags.DEFINE_integer('n_embd', 128, 'Width.')
flags.DEFINE_integer('block_size', 64, 'Context length.')
flags.DEFINE_integer('batch_size', 12, 'Sequences per batch.')
flags.DEFINE_integer('iterations', 30, 'Calls per timed window.')
flags.DEFINE_integer('repeats', 3, 'Timed windows per function (the median is reported).')
FLAGS = flags.FLAGS
VOCAB_SIZE = 65   # tiny Shakespeare's characters


def window_ms(call) -> float:
  """Wall time of one call, averaged over a window of `--iterations` calls (the window ends
  when the last call's result is ready)."""
  start = time.perf_counter()
  for _ in range(FLAGS.iterations):
    out = call()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / FLAGS.iterations * 1e3


def milliseconds(call) -> float:
  """Median wall time of one call over the timed windows, after one untimed call (compile)."""
  jax.block_until_ready(call())
  return round(statistics.median(window_ms(call) for _ in range(FLAGS.repeats)), 2)


def training_step(tokens, targets):
  """The GPT's loss, its parameters, and one training step (`jax.jit`, the trainer's AdamW with
  its schedule and clipping) as a call that advances its own parameters and optimizer state and
  returns the loss."""
  config = shakespeare_char_cpu.get_config()
  blocks = gpt.create_blocks(FLAGS.n_layer, FLAGS.n_head, FLAGS.n_embd, FLAGS.block_size,
                             VOCAB_SIZE)
  net = partition.StageModule(blocks)
  params = net.init(jax.random.key(0), tokens, train=False)['params']
  optimizer = optimizers.build(optimizer_config.recipe(config, steps_per_epoch=1000))

  def loss(p):
    logits = net.apply({'params': p}, tokens, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  @jax.jit
  def step(p, state):
    value, grads = jax.value_and_grad(loss)(p)
    updates, state = optimizer.update(grads, state, p)
    return optax.apply_updates(p, updates), state, value

  carry = [params, optimizer.init(params)]

  def one_step():
    carry[0], carry[1], value = step(*carry)
    return value
  return loss, params, one_step


def whole_model(tokens, targets) -> dict:
  loss, params, one_step = training_step(tokens, targets)
  forward, forward_backward = jax.jit(loss), jax.jit(jax.value_and_grad(loss))
  return {'forward': milliseconds(lambda: forward(params)),
          'forward_backward': milliseconds(lambda: forward_backward(params)),
          'step_with_optimizer': milliseconds(one_step)}


def block_kinds(tokens) -> dict:
  hidden = np.random.default_rng(1).normal(
      size=(FLAGS.batch_size, FLAGS.block_size, FLAGS.n_embd)).astype(np.float32)
  kinds = {
      'embedding': (gpt.Embedding(VOCAB_SIZE, FLAGS.block_size, FLAGS.n_embd), tokens),
      'attention': (gpt.SelfAttention(FLAGS.n_head, FLAGS.n_embd, FLAGS.n_layer), hidden),
      'mlp': (gpt.MLP(FLAGS.n_embd, FLAGS.n_layer), hidden),
      'block': (gpt.Block(FLAGS.n_head, FLAGS.n_embd, FLAGS.n_layer), hidden),
      'head': (gpt.Head(VOCAB_SIZE), hidden),
  }
  times = {}
  for name, (module, x) in kinds.items():
    variables = module.init(jax.random.key(0), x, train=False)

    def total(v, module=module, x=x):
      return module.apply(v, x, train=True).sum()
    forward, gradient = jax.jit(total), jax.jit(jax.grad(total))
    times[name] = {'forward': milliseconds(lambda: forward(variables)),
                   'gradient': milliseconds(lambda: gradient(variables))}
  return times


def main(argv):
  del argv
  windows = np.random.default_rng(0).integers(
      0, VOCAB_SIZE, size=(FLAGS.batch_size, FLAGS.block_size + 1)).astype(np.int32)
  tokens, targets = windows[:, :-1], windows[:, 1:]
  result = {'sizes': {k: getattr(FLAGS, k) for k in ('n_layer', 'n_head', 'n_embd',
                                                      'block_size', 'batch_size')},
            'model_ms': whole_model(tokens, targets), 'block_ms': block_kinds(tokens),
            'machine': common.machine()}
  common.print_json(result)


if __name__ == '__main__':
  app.run(main)
