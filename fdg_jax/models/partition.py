"""Splitting a model, given as an ordered list of blocks, into K pipeline stages.

A split is the list of block indices where each stage after the first starts: for 11 blocks,
`split=(5,)` gives stages [0, 5) and [5, 11). The split is either given or chosen to balance the
stages' compute, measured with XLA's cost analysis of each block's training forward pass.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class StageModule(nn.Module):
  """A consecutive run of blocks; block i's variables live under `blocks_{i}`."""
  blocks: Sequence[nn.Module]

  @nn.compact
  def __call__(self, x, train: bool):
    for block in self.blocks:
      x = block(x, train=train)
    return x


def stage_ranges(split: Sequence[int], num_blocks: int) -> list[tuple[int, int]]:
  """[start, stop) block ranges of the stages; `split` must be strictly increasing in (0, n)."""
  bounds = [0, *split, num_blocks]
  if any(not 0 < s < num_blocks for s in split) or any(
      a >= b for a, b in zip(bounds, bounds[1:])):
    raise ValueError(
        f'split={tuple(split)} is not a strictly increasing list of block indices in '
        f'1..{num_blocks - 1}; each entry is the block where a stage after the first starts.')
  return list(zip(bounds, bounds[1:]))


def build_stages(blocks: Sequence[nn.Module], split: Sequence[int]) -> list[StageModule]:
  return [StageModule(tuple(blocks[a:b])) for a, b in stage_ranges(split, len(blocks))]


def split_variables(variables: dict, split: Sequence[int], num_blocks: int) -> list[dict]:
  """Variables of the unsplit model (a StageModule of all blocks) -> one dict per stage."""
  stages = []
  for start, stop in stage_ranges(split, num_blocks):
    stages.append({
        collection: {f'blocks_{i - start}': tree[f'blocks_{i}']
                     for i in range(start, stop) if f'blocks_{i}' in tree}
        for collection, tree in variables.items()})
  return stages


def merge_variables(stage_variables: Sequence[dict], split: Sequence[int],
                    num_blocks: int) -> dict:
  """Inverse of `split_variables`."""
  merged: dict[str, dict] = {}
  for (start, _), variables in zip(stage_ranges(split, num_blocks), stage_variables):
    for collection, tree in variables.items():
      for name, value in tree.items():
        merged.setdefault(collection, {})[f'blocks_{start + int(name.split("_")[1])}'] = value
  return merged


def block_flops(blocks: Sequence[nn.Module], input_shape: Sequence[int],
                dtype=jnp.float32) -> list[float]:
  """Forward FLOPs of each block in training mode (XLA cost analysis, nothing is run).

  Identical blocks at identical input shapes are analysed once.
  """
  x = jax.ShapeDtypeStruct(tuple(input_shape), dtype)
  flops = []
  for block in blocks:
    cost, x = _block_cost(block, x.shape, x.dtype)
    flops.append(cost)
  return flops


def block_times(blocks: Sequence[nn.Module], input_shape: Sequence[int], dtype=jnp.float32,
                repeats: int = 5) -> list[float]:
  """Measured seconds of each block's training work (forward and backward, with respect to its
  parameters and input, as a stage does it) on the default device: the median of `repeats`
  runs after one compiling run. Identical blocks at identical input shapes are timed once."""
  x = jax.ShapeDtypeStruct(tuple(input_shape), dtype)
  times = []
  for block in blocks:
    seconds, x = _block_time(block, x.shape, x.dtype, repeats)
    times.append(seconds)
  return times


@functools.lru_cache(maxsize=None)
def _block_time(block: nn.Module, shape, dtype, repeats: int):
  keys = {'params': jax.random.key(0), 'dropout': jax.random.key(0)}
  floating = jnp.issubdtype(dtype, jnp.inexact)   # else token ids: 0 is in every vocabulary
  x = jax.random.normal(jax.random.key(1), shape, dtype) if floating else jnp.zeros(shape, dtype)
  variables = jax.jit(functools.partial(block.init, train=False))(keys, x)

  def work(variables, x):
    def forward(params, h):
      y, _ = block.apply({**variables, 'params': params}, h if floating else x, train=True,
                         mutable=['batch_stats'], rngs={'dropout': jax.random.key(0)})
      return y
    y, pullback = jax.vjp(forward, variables['params'], x if floating else None)
    return y, pullback(jnp.ones_like(y))

  work = jax.jit(work)
  y, _ = jax.block_until_ready(work(variables, x))   # compiles
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(work(variables, x))
    samples.append(time.perf_counter() - start)
  return float(np.median(samples)), jax.ShapeDtypeStruct(y.shape, y.dtype)


@functools.lru_cache(maxsize=None)
def _block_cost(block: nn.Module, shape, dtype):
  x = jax.ShapeDtypeStruct(shape, dtype)
  keys = {'params': jax.random.key(0), 'dropout': jax.random.key(0)}
  variables = jax.eval_shape(functools.partial(block.init, train=False), keys, x)

  def forward(variables, x):
    return block.apply(variables, x, train=True, mutable=['batch_stats'],
                       rngs={'dropout': jax.random.key(0)})[0]

  lowered = jax.jit(forward).lower(variables, x)
  analysis = lowered.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX returned one dict per computation
    analysis = analysis[0]
  y = jax.eval_shape(forward, variables, x)
  return float(analysis.get('flops', 0.0)), y


def balanced_split(costs: Sequence[float], num_stages: int) -> tuple[int, ...]:
  """Contiguous split of `costs` into `num_stages` parts minimising the largest part's sum.

  Exact dynamic programme (n <= a few hundred blocks); ties go to the earliest boundary.
  """
  n = len(costs)
  if not 1 <= num_stages <= n:
    raise ValueError(f'cannot split {n} blocks into {num_stages} stages')
  prefix = np.concatenate([[0.0], np.cumsum(costs)])
  # best[k][i]: the smallest max-stage cost of splitting blocks [0, i) into k stages.
  best = np.full((num_stages + 1, n + 1), np.inf)
  cut = np.zeros((num_stages + 1, n + 1), dtype=int)
  best[0][0] = 0.0
  for k in range(1, num_stages + 1):
    for i in range(k, n + 1):
      for j in range(k - 1, i):
        candidate = max(best[k - 1][j], prefix[i] - prefix[j])
        if candidate < best[k][i]:
          best[k][i], cut[k][i] = candidate, j
  split, i = [], n
  for k in range(num_stages, 1, -1):
    i = cut[k][i]
    split.append(int(i))
  return tuple(reversed(split))


def count_params(tree: Any) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(tree)))


def stage_table(split: Sequence[int], block_names: Sequence[str], stage_params: Sequence[int],
                flops: Sequence[float], devices: Sequence[Any],
                times: Sequence[float] | None = None) -> str:
  """The table printed at start: stage, blocks, parameters, share of FLOPs (and of measured
  time, when `times` are given), devices."""
  ranges = stage_ranges(split, len(block_names))
  share = lambda values, start, stop: f'{sum(values[start:stop]) / (sum(values) or 1.0):.1%}'
  rows = [('stage', 'blocks', 'params', 'FLOPs share') + (('time share',) if times else ())
          + ('devices',)]
  for k, ((start, stop), params, device) in enumerate(zip(ranges, stage_params, devices)):
    blocks = f'{start}-{stop - 1} ({block_names[start]} .. {block_names[stop - 1]})'
    device = ', '.join(map(str, device)) if isinstance(device, (list, tuple)) else str(device)
    rows.append((str(k), blocks, f'{params:,}', share(flops, start, stop))
                + ((share(times, start, stop),) if times else ()) + (device,))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ['  '.join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
  lines.insert(1, '  '.join('-' * w for w in widths))
  return '\n'.join(lines)


def check_composition(full_model: nn.Module, full_variables: dict,
                      stages: Sequence[nn.Module], stage_variables: Sequence[dict],
                      sample: jax.Array, rtol: float = 1e-5, atol: float = 1e-5) -> None:
  """Raise if running the stages one after another differs from the unsplit model."""
  expected = full_model.apply(full_variables, sample, train=False)
  y = sample
  for stage, variables in zip(stages, stage_variables):
    y = stage.apply(variables, y, train=False)
  if not np.allclose(np.asarray(y), np.asarray(expected), rtol=rtol, atol=atol):
    worst = float(np.max(np.abs(np.asarray(y) - np.asarray(expected))))
    raise RuntimeError(
        f'The composed stages do not reproduce the unsplit model (max abs difference {worst:.3g}).'
        ' A block probably depends on state outside its own variables; fix the block list.')
