"""Can a checkpoint rebuild a saved forward's residuals instead of storing them (issue 16)?

Steps FDG (K = 2, all stages on one device, random data) and, after every iteration, recomputes
stage 0's newest saved forward with a standalone jitted `jax.vjp` of the same stage from what a
compact checkpoint would keep (the stage input, the parameters and BatchNorm statistics that
forward used, its dropout key), then reports whether every residual leaf is bit-equal to the
one the stage function saved.

    python experiments/residual_rebuild.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after the path set-up above)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import common  # noqa: E402

BATCH = 32
LAYOUTS = (('resnet20', 'vjp'), ('resnet20', 'vjp+dots_saveable'), ('resnet56', 'vjp'))


def check(model: str, stash: str, iterations: int = 4) -> list[bool]:
  config = common.make_config(model, 'fdg', 2, BATCH, 32, stash=stash, stage_devices=(0,))
  pipe, state = common.build_pipeline(config)
  rng = np.random.default_rng(0)

  @jax.jit
  def rebuild(params, batch_stats, x, key):
    _, pullback, _ = pipe._vjp(0, params, batch_stats, x, key)  # pylint: disable=protected-access
    return jax.tree_util.tree_leaves(pullback)

  equal = []
  for _ in range(iterations):
    images = rng.normal(size=(BATCH, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 10, BATCH).astype(np.int32)
    before = jax.device_get(state.stages[0])
    state, _ = pipe.step(state, images, labels)
    # The forward ran after this call's update (the new parameters), with the statistics from
    # before it and the second half of the stage's key split.
    leaves = rebuild(state.stages[0].params, before.batch_stats, jnp.asarray(images),
                     jax.random.split(before.dropout_key)[1])
    equal.append(all(np.array_equal(a, b)
                     for a, b in zip(jax.device_get(leaves), jax.device_get(
                         state.saved[0][-1].arrays))))
  return equal


def main():
  for model, stash in LAYOUTS:
    print(f'{model} stash={stash}: bit-equal per iteration {check(model, stash)}', flush=True)


if __name__ == '__main__':
  main()
