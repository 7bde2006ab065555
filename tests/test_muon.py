"""config.optimizer='muon': the routing (a table, alike for every K), one optimizer step against a
numpy reference of Muon's and AdamW's formulas, the checks, FDG K = 2 with Muon against the naive
reference, and training from the CLI in both tasks (resumed bit for bit)."""

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import default as default_config
from fdg_jax.engine import compensation
from fdg_jax.engine import optimizers
from fdg_jax.engine import pipeline
from fdg_jax.models import gpt
from fdg_jax.models import partition
from fdg_jax.models import zoo
from fdg_jax.trainer import optimizers as optimizer_config
from fdg_jax.trainer import train
from test_engine import naive_fdg
from test_language_model import tiny_config, write_text
from test_train import TEST_MODEL, write_image_folder
from tiny import initial_variables, tiny_batches

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MUON, ADAMW = 'muon', 'adamw'


def routes(params) -> dict:
  """'module/leaf' -> 'muon' with Muon's (reduction, output) axes, or 'adamw'."""
  table = {}
  numbers = optimizers.muon_dimension_numbers(params)
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    spec = numbers
    for key in path:
      spec = spec[key.key]
    names = [key.key for key in path]
    name = '/'.join(names[-2:]) if names[0] != 'aux' else 'aux/' + '/'.join(names[-2:])
    route = ADAMW if spec is None else (MUON, tuple(spec.reduction_axis), spec.output_axis)
    assert table.setdefault(name, route) == route, name   # a name routes one way everywhere
  return table


def model_params(blocks, sample):
  return partition.StageModule(tuple(blocks)).init(jax.random.key(0), sample, train=False)


GPT_ROUTES = {
    'wte/embedding': ADAMW, 'wpe/embedding': ADAMW,                    # the embeddings
    'c_attn/kernel': (MUON, (0,), 1),
    'c_proj/kernel': (MUON, (0,), 1),                                  # attention's and MLP's
    'c_fc/kernel': (MUON, (0,), 1),
    'ln_1/scale': ADAMW, 'ln_2/scale': ADAMW, 'ln_f/scale': ADAMW,
    'lm_head/kernel': ADAMW,                                           # the head
}
RESNET_ROUTES = {
    'conv/kernel': ADAMW,                                              # the stem
    'conv1/kernel': (MUON, (0, 1, 2), 3), 'conv2/kernel': (MUON, (0, 1, 2), 3),
    'shortcut_conv/kernel': (MUON, (0, 1, 2), 3),
    'bn/scale': ADAMW, 'bn/bias': ADAMW, 'bn1/scale': ADAMW, 'bn1/bias': ADAMW,
    'bn2/scale': ADAMW, 'bn2/bias': ADAMW, 'shortcut_bn/scale': ADAMW, 'shortcut_bn/bias': ADAMW,
    'fc/kernel': ADAMW, 'fc/bias': ADAMW,                              # the classifier
}
VIT_ROUTES = {
    'blocks_0/position_embedding': ADAMW, 'projection/kernel': ADAMW,  # the patch embedding
    'projection/bias': ADAMW,
    'c_attn/kernel': (MUON, (0,), 1), 'c_proj/kernel': (MUON, (0,), 1),
    'c_fc/kernel': (MUON, (0,), 1),
    'c_attn/bias': ADAMW, 'c_proj/bias': ADAMW, 'c_fc/bias': ADAMW,
    'ln_1/scale': ADAMW, 'ln_1/bias': ADAMW, 'ln_2/scale': ADAMW, 'ln_2/bias': ADAMW,
    'ln_f/scale': ADAMW, 'ln_f/bias': ADAMW, 'fc/kernel': ADAMW, 'fc/bias': ADAMW,
}


@pytest.mark.parametrize('model, expected', [('gpt', GPT_ROUTES), ('resnet8', RESNET_ROUTES),
                                             ('vit_tiny', VIT_ROUTES)])
def test_routing_by_name_is_a_table_and_alike_for_every_split(model, expected):
  if model == 'gpt':
    blocks = gpt.create_blocks(n_layer=2, n_head=2, n_embd=8, block_size=8, vocab_size=11)
    sample = jnp.zeros((1, 8), jnp.int32)
  else:
    blocks = zoo.create_blocks(model, 10)
    if model == 'vit_tiny':   # two encoder blocks of its twelve are enough
      blocks = blocks[:3] + blocks[-1:]
    sample = jnp.zeros((1, 32, 32, 3))
  variables = model_params(blocks, sample)
  assert routes(variables['params']) == expected
  for num_stages in range(2, len(blocks) + 1):
    split = partition.balanced_split([1.0] * len(blocks), num_stages)
    for stage in partition.split_variables(variables, split, len(blocks)):
      table = routes(stage['params'])
      assert table == {name: expected[name] for name in table}


def test_dgl_auxiliary_heads_go_to_adamw():
  """DGL's stage state holds {'stage': network, 'aux': head}: the head's layers are AdamW's."""
  params = {'stage': {'blocks_0': {'conv1': {'kernel': jnp.ones((3, 3, 4, 4))}}},
            'aux': {'Dense_0': {'kernel': jnp.ones((4, 8)), 'bias': jnp.ones(8)},
                    'Conv_0': {'kernel': jnp.ones((3, 3, 4, 4))}}}
  assert routes(params) == {'conv1/kernel': (MUON, (0, 1, 2), 3), 'aux/Dense_0/kernel': ADAMW,
                            'aux/Dense_0/bias': ADAMW, 'aux/Conv_0/kernel': ADAMW}


# ------------------------------------------------------------------ one step, against numpy

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)   # Keller Jordan's quintic, optax's default


def newton_schulz(matrix, steps=5, eps=1e-8):
  """Muon's orthogonalisation, written out (Keller Jordan's zeropower_via_newtonschulz5 in
  float64; optax's Frobenius-normalised form): transposed so that rows <= columns."""
  a, b, c = NS_COEFFICIENTS
  transposed = matrix.shape[0] > matrix.shape[1]
  x = matrix.T if transposed else matrix
  x = x / (np.linalg.norm(x) + eps)
  for _ in range(steps):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x.T if transposed else x


def reference_updates(params, grads_per_step, is_muon, decays, lr, muon_lr, beta, b1, b2, eps,
                      wd, muon_wd):
  """Numpy, float64: Muon (optax's bias-corrected Nesterov momentum, Newton-Schulz on the
  (prod(leading dims), last dim) matrix, scaled by sqrt(max(1, fan_out / fan_in)), decay
  lr * muon_wd * p) where `is_muon`, AdamW (decay lr * wd * p where `decays`) elsewhere.
  `lr`, `muon_lr`: functions of the step count (0 first). Returns the final parameters."""
  params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  first = {k: np.zeros_like(v) for k, v in params.items()}
  second = {k: np.zeros_like(v) for k, v in params.items()}
  for count, grads in enumerate(grads_per_step):
    t = count + 1
    for k, p in params.items():
      g = np.asarray(grads[k], np.float64)
      if is_muon[k]:
        first[k] = beta * first[k] + (1 - beta) * g
        nesterov = (beta * first[k] / (1 - beta ** (t + 1)) + (1 - beta) * g / (1 - beta ** t))
        matrix = nesterov.reshape(-1, p.shape[-1])
        fan_in, fan_out = matrix.shape
        direction = newton_schulz(matrix).reshape(p.shape) * np.sqrt(max(1, fan_out / fan_in))
        params[k] = p - muon_lr(count) * (direction + muon_wd * p)
      else:
        first[k] = b1 * first[k] + (1 - b1) * g
        second[k] = b2 * second[k] + (1 - b2) * g * g
        step = (first[k] / (1 - b1 ** t)) / (np.sqrt(second[k] / (1 - b2 ** t)) + eps)
        params[k] = p - lr(count) * (step + (wd * p if decays[k] else 0.0))
  return params


def test_a_routed_step_is_muon_on_the_matrices_and_adamw_elsewhere():
  rng = np.random.default_rng(0)
  shapes = {('blocks_0', 'wte', 'embedding'): (7, 4), ('blocks_1', 'attn', 'c_attn', 'kernel'):
            (4, 12), ('blocks_1', 'mlp', 'c_proj', 'kernel'): (16, 4),
            ('blocks_1', 'conv1', 'kernel'): (3, 3, 2, 5), ('blocks_1', 'ln_1', 'scale'): (4,),
            ('blocks_2', 'lm_head', 'kernel'): (4, 7)}
  flat = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}

  def nest(values):
    tree = {}
    for path, value in values.items():
      node = tree
      for key in path[:-1]:
        node = node.setdefault(key, {})
      node[path[-1]] = jnp.asarray(value)
    return tree

  grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
           for _ in range(3)]
  lr = optax.linear_schedule(1e-2, 5e-3, 3)     # a schedule: each part must count its steps

  def muon_lr(count):
    return lr(count) * 3.0

  recipe = optimizers.Recipe(
      'muon', lr, weight_decay=0.1, b1=0.8, b2=0.95, eps=1e-8,
      decay_mask=optimizers.weight_decay_mask, muon_learning_rate=muon_lr, muon_momentum=0.9,
      muon_weight_decay=0.05)
  tx = optimizers.build(recipe)
  params = nest(flat)
  state = tx.init(params)
  for g in grads:
    updates, state = jax.jit(tx.update)(nest(g), state, params)
    params = optax.apply_updates(params, updates)
  is_muon = {k: k[-1] == 'kernel' and k[-2] != 'lm_head' for k in shapes}
  decays = {k: len(s) >= 2 and k[-1] != 'embedding' for k, s in shapes.items()}
  expected = reference_updates(flat, grads, is_muon, decays, lambda c: float(lr(c)),
                               lambda c: float(muon_lr(c)), beta=0.9, b1=0.8, b2=0.95, eps=1e-8,
                               wd=0.1, muon_wd=0.05)
  chex.assert_trees_all_close(params, nest({k: v.astype(np.float32)
                                            for k, v in expected.items()}), rtol=1e-4, atol=1e-6)


def test_nesterov_off_is_plain_momentum_and_the_ns_steps_count():
  """muon_nesterov=False orthogonalises the bias-corrected momentum itself, muon_ns_steps sets
  the iterations: one matrix, one step, against the numpy iteration."""
  rng = np.random.default_rng(1)
  kernel = rng.normal(size=(6, 3)).astype(np.float32)
  grad = rng.normal(size=(6, 3)).astype(np.float32)
  params = {'blocks_0': {'mlp': {'c_fc': {'kernel': jnp.asarray(kernel)}}}}
  tx = optimizers.build(optimizers.Recipe('muon', 1e-3, muon_learning_rate=0.1,
                                          muon_nesterov=False, muon_ns_steps=3))
  updates, _ = tx.update({'blocks_0': {'mlp': {'c_fc': {'kernel': jnp.asarray(grad)}}}},
                         tx.init(params), params)
  # One step: the bias-corrected momentum is the gradient; 6 x 3 is read as (in 6, out 3).
  expected = -0.1 * newton_schulz(grad.astype(np.float64), steps=3)
  np.testing.assert_allclose(updates['blocks_0']['mlp']['c_fc']['kernel'], expected,
                             rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ config and checks


def muon_config(**overrides):
  config = default_config.get_config()
  config.update({'optimizer': 'muon', **overrides})
  return config


def test_the_trainer_recipe_scales_the_schedule_for_muon():
  config = muon_config(learning_rate=1e-3, muon_learning_rate=0.02, lr_schedule='warmup_cosine',
                       warmup_steps=10, lr_decay_steps=100, min_learning_rate=1e-4,
                       lr_boundaries_epochs=(), muon_momentum=0.9, muon_ns_steps=4,
                       muon_weight_decay=0.01, muon_nesterov=False)
  recipe = optimizer_config.recipe(config, steps_per_epoch=10)
  assert (recipe.name, recipe.muon_momentum, recipe.muon_ns_steps, recipe.muon_weight_decay,
          recipe.muon_nesterov) == ('muon', 0.9, 4, 0.01, False)
  for count in (0, 9, 10, 50, 100, 200):
    assert float(recipe.muon_learning_rate(count)) == pytest.approx(
        20 * float(recipe.learning_rate(count)), rel=1e-6)
  assert float(recipe.muon_learning_rate(10)) == pytest.approx(0.02)
  assert optimizer_config.validate(config) == []


def test_bad_muon_fields_are_one_line_each():
  bad = optimizer_config.validate(muon_config(
      muon_learning_rate=0.0, muon_momentum=1.0, muon_ns_steps=0, muon_weight_decay=-0.1,
      compensation='nesterov'))
  assert [m.split(':')[0] for m in bad] == [
      'config.muon_learning_rate', 'config.muon_momentum', 'config.muon_ns_steps',
      'config.muon_weight_decay', 'config.compensation']
  assert "not defined for 'muon'" in bad[-1] and "'weight_prediction'" in bad[-1]
  assert "Choose one of ('sgd', 'adamw', 'muon', 'rotated_adamw')" in optimizer_config.validate(
      muon_config(optimizer='lion'))[0]
  # The muon fields are muon's: another optimizer ignores them.
  assert optimizer_config.validate(muon_config(optimizer='sgd', muon_learning_rate=0.0)) == []


@pytest.mark.parametrize('name', compensation.NAMES[1:])
def test_each_compensation_takes_muon_or_refuses_it(name):
  recipe = optimizers.Recipe('muon', 1e-3)
  comp = compensation.Compensation(name, optimizer=recipe, max_delay=2)
  if name in compensation.REBUILDS_OPTIMIZER or name == 'basis_rotation':   # AdamW's rotated
    with pytest.raises(ValueError, match="'muon'"):
      comp.stage_optimizer(optimizers.build(recipe), delay=2)
  else:   # chained before or after the optimizer, whatever it is
    params = {'blocks_0': {'conv1': {'kernel': jnp.ones((3, 3, 2, 2))}}}
    tx = comp.stage_optimizer(optimizers.build(recipe), delay=2)
    extra = ({'stale_params': params} if name == 'delay_compensation' else {})
    updates, _ = tx.update(params, tx.init(params), params, **extra)
    assert np.isfinite(np.asarray(updates['blocks_0']['conv1']['kernel'])).all()


# ------------------------------------------------------------------ the engine and the trainer


def test_fdg_k2_with_muon_equals_the_naive_reference():
  """The engine keeps Muon's partitioned state per stage as any optimizer's: FDG K = 2 against
  tests/test_engine.py's naive_fdg (the tiny conv blocks: every kernel on Muon, one a Dense).
  beta = 1: Muon's orthogonalised step hardly depends on the gradient's scale, so beta would
  not show here; a wrong saved forward (stash 'recompute': 0.06) or momentum (0.94: 0.005)
  would."""
  batches = tiny_batches(8)
  recipe = optimizers.Recipe('muon', 1e-2, muon_learning_rate=0.05, weight_decay=0.01,
                             decay_mask=optimizers.weight_decay_mask)
  modules, variables = initial_variables(2)
  pipe = pipeline.Pipeline(modules, optimizers.build(recipe), pipeline.cross_entropy_loss,
                           beta=1.0, placements=jax.devices()[:2])
  state = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
  for images, labels in batches:
    state, _ = pipe.step(state, images, labels)
  state, _ = pipe.drain(state)
  expected, expected_opt, _ = naive_fdg(modules, variables, optimizers.build(recipe), batches,
                                        1.0, 'vjp')
  # Newton-Schulz amplifies the rounding of jitted against eager gradients (a 3 x 3 head
  # kernel differs by ~3e-6); a wrong delay or state would differ by orders more.
  chex.assert_trees_all_close(jax.device_get(pipe.stage_variables(state)), expected,
                              rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(jax.device_get([s.opt_state for s in state.stages]), expected_opt,
                              rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_the_language_model_trains_with_muon_and_resumes_bit_for_bit(tmp_path):
  text = write_text(tmp_path / 'text.txt')
  fields = dict(optimizer='muon', muon_learning_rate=0.02, method='fdg', num_stages=2)
  straight = train.train_and_evaluate(tiny_config(text, steps=12, **fields),
                                      str(tmp_path / 'straight'))
  first = tiny_config(text, steps=6, **fields)
  first.lr_decay_steps = 12   # the same schedule as the straight run
  train.train_and_evaluate(first, str(tmp_path / 'resumed'))
  resumed = train.train_and_evaluate(tiny_config(text, steps=12, **fields),
                                     str(tmp_path / 'resumed'))
  assert resumed['resumed_from_step'] == 6
  assert resumed['params_digest'] == straight['params_digest']
  assert straight['val_loss'] < np.log(straight['vocabulary_size'])   # it learned something


@pytest.mark.slow
@pytest.mark.parametrize('task, optimizer', [('language_model', 'muon'),
                                             ('image_classification', 'muon'),
                                             ('language_model', 'rotated_adamw')])
def test_cli_trains_with_muon_and_rotated_adamw(tmp_path, task, optimizer):
  if task == 'language_model':
    config = 'configs/shakespeare_char_deep_cpu.py'
    overrides = dict(n_layer=2, n_head=2, n_embd=16, block_size=16, batch_size=4,
                     eval_batch_size=32, eval_max_batches=2, sample_tokens=4, warmup_steps=2,
                     num_stages=2, dataset='textfile', data_dir=write_text(tmp_path / 't.txt'),
                     lr_decay_steps=8)
  else:
    config = 'configs/cifar10_resnet20.py'
    overrides = dict(model=TEST_MODEL, dataset='imagefolder', image_size=16, batch_size=8,
                     eval_batch_size=16, data_dir=write_image_folder(tmp_path / 'data'),
                     learning_rate=1e-3, cache_dir=str(tmp_path / 'cache'))
  overrides.update(optimizer=optimizer, muon_learning_rate=0.02, num_train_steps=8,
                   log_every_steps=4, stage_devices=(0,), rotation_frequency=3)
  workdir = tmp_path / 'work'
  result = subprocess.run(
      [sys.executable, '-m', 'fdg_jax.main', f'--config={config}', f'--workdir={workdir}',
       *[f'--config.{k}={v}' for k, v in overrides.items()]],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((workdir / 'summary.json').read_text())
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['optimizer'] == optimizer and summary['steps'] == 8
  assert summary['num_stages'] == 2
  assert np.isfinite(summary['val_loss'] if task == 'language_model' else summary['test_error'])
