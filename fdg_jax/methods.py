"""The training methods the one executor runs: each is its schedule and the stage functions a
call uses.

* `DelayedGradients('fdg')`: FDG (Zhuang et al. 2019), the paper's method: every stage forwards
  and back-propagates at once; stage k applies the gradient of the batch it forwarded 2(K-1-k)
  iterations earlier.
* `DelayedGradients('ddg')`: DDG (Huo et al. 2018), backward unlocking only: forward locked,
  stage k's delay K-1-k. The same stage functions as FDG; only the schedule differs.
* `LocalLosses`: DGL (Belilovsky et al. 2019): each non-last stage trains on an auxiliary head's
  local loss; no gradient crosses a stage boundary. The heads live in the stage's TrainState.

A new method is one object with `name` (its row in `schedule.py`), `compile`, `call` and the
three state hooks (`extend_states`, `network_variables`, `extra_param_counts`), plus its lags in
`schedule.Schedule`; docs/algorithm.md has each method's exact schedule.
"""

import functools
import math
from typing import Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from fdg_jax import distributed
from fdg_jax import gpt
from fdg_jax import models
from fdg_jax import partition
from fdg_jax import stage_functions as fns
from fdg_jax import vit
from fdg_jax.state import Saved, StageOutput

# The compiled functions of a stage with a delayed gradient, one per phase: 'fill' (forward
# only, before the first cotangent), 'steady' (update then forward) and 'drain' (update only).
# Each is traced once; a fresh Python function per phase keeps their jit caches apart.
PHASES = ('fill', 'steady', 'drain')


class DelayedGradients:
  """FDG or DDG: non-last stages update with a delayed cotangent, then forward."""

  def __init__(self, name: str = 'fdg'):
    if name not in ('fdg', 'ddg'):
      raise ValueError(f'DelayedGradients is FDG or DDG; got {name!r}.')
    self.name = name

  def compile(self, specs: Sequence[fns.StageSpec]) -> tuple[dict[str, Callable], ...]:
    """Each stage's jitted functions by phase (the last stage: 'steady' only)."""
    return tuple(
        {'steady': jax.jit(fns.last_update(spec), donate_argnums=0)} if k == len(specs) - 1 else
        {phase: jax.jit(fns.update_then_forward(spec), donate_argnums=0,
                        static_argnames='residuals') for phase in PHASES}
        for k, spec in enumerate(specs))

  def call(self, pipe, call, stage, queue, *, x, cotangent, entry, targets) -> StageOutput:
    """Stage `call.stage`'s call; its new forward is saved at the end of `queue`."""
    k, spec = call.stage, pipe.specs[call.stage]
    if k == pipe.num_stages - 1:
      stage, input_cotangent, metrics = pipe.stage_functions[k]['steady'](stage, x, targets)
      return StageOutput(stage, queue, cotangent=input_cotangent, metrics=metrics)
    residuals = entry.structure if entry is not None else None
    if x is not None and spec.stash == 'vjp':
      residuals_out = pipe.residual_structure(k, stage, x)
      residuals = residuals or residuals_out
    forward_params = (entry.inputs['params'] if entry is not None and entry.inputs is not None
                      and spec.compensation.name == 'delay_compensation' else None)
    stage, y, new_saved, inputs, input_cotangent = pipe.stage_functions[k][call.phase](
        stage, entry.arrays if entry else None, forward_params, cotangent, x,
        residuals=residuals)
    if x is not None:
      queue = queue + (Saved(arrays=new_saved, batch=call.forward,
                             structure=residuals_out if spec.stash == 'vjp' else None,
                             inputs=None if inputs is None else {**inputs, 'x': x}),)
    return StageOutput(stage, queue, activation=y, cotangent=input_cotangent)

  def extend_states(self, pipe, states, rng, sample_spec):
    del pipe, rng, sample_spec
    return states

  def network_variables(self, stage: fns.TrainState) -> dict:
    """A stage state's network variables."""
    return {'params': stage.params, 'batch_stats': stage.batch_stats}

  def extra_param_counts(self, states) -> list[int]:
    """Trainable parameters outside the network, per stage: none."""
    return [0] * len(states)


# ==================================================================================== DGL


def adaptive_avg_pool(x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
  """PyTorch's adaptive_avg_pool2d on NHWC: bin i of n covers [floor(iH/n), ceil((i+1)H/n))."""
  n, height, width, channels = x.shape
  out_h, out_w = output_size
  if height % out_h == 0 and width % out_w == 0:
    return x.reshape(n, out_h, height // out_h, out_w, width // out_w, channels).mean((2, 4))
  rows = []
  for i in range(out_h):
    h0, h1 = i * height // out_h, -(-(i + 1) * height // out_h)
    rows.append(jnp.stack(
        [x[:, h0:h1, j * width // out_w:-(-(j + 1) * width // out_w)].mean((1, 2))
         for j in range(out_w)], axis=1))
  return jnp.stack(rows, axis=1)


class MLPSRAuxHead(nn.Module):
  """DGL's "MLP-SR-aux" auxiliary classifier (the default).

  As in the DGL authors' CIFAR code (`auxillary_classifier2` with n_lin=3, mlp_layers=3, used
  for their ResNet comparison with DDG): average-pool the C-channel input to ceil(H/4) x
  ceil(W/4); `num_convs` x [1x1 conv (C -> C, no bias), BatchNorm, ReLU]; average-pool to
  2 x 2; flatten (4C); `num_mlp_layers` x [Dense(4C), BatchNorm, ReLU]; Dense(num_classes).
  """
  num_classes: int
  num_convs: int = 3
  num_mlp_layers: int = 3

  @nn.compact
  def __call__(self, x, train: bool):
    channels = x.shape[-1]
    x = adaptive_avg_pool(x, (math.ceil(x.shape[1] / 4), math.ceil(x.shape[2] / 4)))
    for _ in range(self.num_convs):
      x = nn.relu(models.batch_norm(train)(nn.Conv(channels, (1, 1), use_bias=False)(x)))
    x = adaptive_avg_pool(x, (2, 2)).reshape(x.shape[0], -1)
    for _ in range(self.num_mlp_layers):
      x = nn.relu(models.batch_norm(train)(nn.Dense(4 * channels)(x)))
    return nn.Dense(self.num_classes)(x)


class ConvAuxHead(nn.Module):
  """A smaller head: 3x3 conv (same width, no bias), BatchNorm, ReLU, global average pool, Dense."""
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(x.shape[-1], (3, 3), use_bias=False)(x)
    x = nn.relu(models.batch_norm(train)(x))
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def mlp_sr_aux_head(stage: int, num_classes: int) -> nn.Module:
  del stage
  return MLPSRAuxHead(num_classes)


def conv_aux_head(stage: int, num_classes: int) -> nn.Module:
  del stage
  return ConvAuxHead(num_classes)


def vit_aux_head(stage: int, num_classes: int) -> nn.Module:
  del stage
  return vit.Head(num_classes)


# Names a config can use for `DGLPipeline(aux_head=...)`: the CNN heads (on NHWC features), the
# ViT's (LayerNorm, mean over tokens, Dense) and the language model's (LayerNorm and a linear
# LM head over the vocabulary).
AUX_HEADS = {'mlp-sr': mlp_sr_aux_head, 'conv': conv_aux_head, 'vit': vit_aux_head,
             'lm': gpt.aux_head}


class LocalLosses:
  """DGL: every non-last stage trains greedily on its own auxiliary head's loss.

  The stage's TrainState holds params = {'stage': network, 'aux': head} and batch_stats likewise
  (the last stage: 'stage' only); the optimizer (weight decay included) applies to both.
  """

  name = 'dgl'

  def __init__(self, num_stages: int, num_classes: Optional[int],
               aux_head: Union[str, Callable[[int, int], nn.Module]] = 'mlp-sr'):
    if isinstance(aux_head, str):
      if aux_head not in AUX_HEADS:
        raise ValueError(f'aux_head={aux_head!r} is not one of {tuple(AUX_HEADS)}; or pass a '
                         'factory (stage_index, num_classes) -> flax module.')
      aux_head = AUX_HEADS[aux_head]
    if num_stages > 1 and (num_classes is None or num_classes < 1):
      raise ValueError(f'num_classes={num_classes}: DGL needs the number of classes for the '
                       'auxiliary heads of the non-last stages; pass num_classes=.')
    self.num_classes = num_classes
    self.aux_heads = tuple(aux_head(k, num_classes) for k in range(num_stages - 1))
    self._aux_init = tuple(jax.jit(functools.partial(head.init, train=False))
                           for head in self.aux_heads)

  def compile(self, specs: Sequence[fns.StageSpec]) -> tuple[dict[str, Callable], ...]:
    return tuple({'steady': jax.jit(fns.local_update(spec, (self.aux_heads + (None,))[k]),
                                    donate_argnums=0)}
                 for k, spec in enumerate(specs))

  def call(self, pipe, call, stage, queue, *, x, cotangent, entry, targets) -> StageOutput:
    """Stage k trains on its local loss and sends the output of its pre-update weights."""
    del cotangent, entry   # DGL has neither cotangents nor saved forwards
    stage, y, metrics = pipe.stage_functions[call.stage]['steady'](stage, x, targets)
    return StageOutput(stage, queue, activation=y, metrics=metrics)

  def extend_states(self, pipe, states, rng, sample_spec):
    """The network's states (the same weights, keys and devices as FDG's) with the auxiliary
    heads, initialised from `rng` and shaped by the stages' outputs."""
    if sample_spec is None:
      raise ValueError('DGL needs sample_input at init (e.g. jnp.zeros of one input batch) '
                       'to shape the auxiliary heads.')
    aux_key = jax.random.fold_in(rng, 1)
    specs = pipe.io_specs(sample_spec)
    extended = []
    for k, stage in enumerate(states):
      if stage is None:   # another process's stage
        extended.append(None)
        continue
      params, batch_stats = {'stage': stage.params}, {'stage': stage.batch_stats}
      if k < pipe.num_stages - 1:
        key = jax.random.fold_in(aux_key, k)
        y = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), specs[k + 1])
        aux = self._aux_init[k]({'params': key, 'dropout': key}, y)
        params['aux'] = aux['params']
        batch_stats['aux'] = aux.get('batch_stats', {})
      extended.append(distributed.put(
          fns.TrainState.create(apply_fn=stage.apply_fn, params=params, tx=stage.tx,
                                batch_stats=batch_stats, dropout_key=stage.dropout_key),
          pipe.state_shardings[k]))
    return tuple(extended)

  def network_variables(self, stage: fns.TrainState) -> dict:
    """The network's variables, without the auxiliary head."""
    return {'params': stage.params['stage'], 'batch_stats': stage.batch_stats['stage']}

  def extra_param_counts(self, states) -> list[int]:
    """Parameters of each stage's auxiliary head (0 for the last stage and another process's)."""
    return [0 if s is None else partition.count_params(s.params.get('aux', {})) for s in states]


def create(name: str, num_stages: int, **dgl_options):
  """The method object of a name: 'fdg', 'ddg' or 'dgl' (which takes num_classes, aux_head)."""
  if name == 'dgl':
    return LocalLosses(num_stages, **dgl_options)
  return DelayedGradients(name)
