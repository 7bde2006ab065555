"""Tests for fdg_jax.models.

Big models are only initialised abstractly (jax.eval_shape); real forward
passes use ResNet-20 or a single narrow wide block on tiny batches.
"""


from flax import errors
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdg_jax import models
from fdg_jax.models import partition


Sequential = partition.StageModule   # how the engine composes blocks


def _key(seed):
  # RBG keys: XLA:CPU compiles the default threefry PRNG very slowly (~2 s per
  # program with random ops here), and the models do not depend on the impl.
  return jax.random.key(seed, impl='rbg')


def _images(batch=2, size=32, seed=0):
  return jnp.asarray(
      np.random.default_rng(seed).normal(size=(batch, size, size, 3)),
      jnp.float32)


def _abstract_variables(model_name, num_classes, **kwargs):
  model = Sequential(models.create_blocks(model_name, num_classes, **kwargs))
  return jax.eval_shape(
      lambda: model.init(_key(0), jnp.zeros((1, 32, 32, 3)),
                         train=False))


def _count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


# Published sizes with 10 classes (trainable parameters only).
TARGET_PARAMS = {
    'resnet8': 0.078e6,     # MLPerf Tiny (Banbury et al., 2021)
    'resnet20': 0.27e6,
    'resnet56': 0.85e6,
    'resnet110': 1.7e6,
    'resnet18': 11.17e6,
    'wrn28_10': 36.5e6,
}

NUM_BLOCKS = {
    'resnet8': 5,
    'resnet20': 11,
    'resnet56': 29,
    'resnet110': 56,
    'resnet18': 10,
    'wrn28_10': 14,
}

# Width of the features entering the classifier.
HEAD_FEATURES = {
    'resnet8': 64,
    'resnet20': 64,
    'resnet56': 64,
    'resnet110': 64,
    'resnet18': 512,
    'wrn28_10': 640,
}


def test_model_names_cover_all_configs():
  assert set(models.MODEL_NAMES) == set(TARGET_PARAMS)


@pytest.mark.parametrize('model_name', models.MODEL_NAMES)
def test_parameter_count(model_name):
  variables = _abstract_variables(model_name, 10)
  count = _count(variables['params'])
  target = TARGET_PARAMS[model_name]
  assert abs(count - target) / target <= 0.02, (model_name, count)


@pytest.mark.parametrize('model_name', models.MODEL_NAMES)
def test_more_classes_only_grow_the_head(model_name):
  count_10 = _count(_abstract_variables(model_name, 10)['params'])
  count_100 = _count(_abstract_variables(model_name, 100)['params'])
  # 90 extra rows of the Dense kernel plus 90 extra biases.
  assert count_100 - count_10 == 90 * (HEAD_FEATURES[model_name] + 1)


@pytest.mark.parametrize('model_name', models.MODEL_NAMES)
def test_block_count_and_names(model_name):
  blocks = models.create_blocks(model_name, 10)
  names = models.block_names(model_name)
  assert len(blocks) == NUM_BLOCKS[model_name]
  assert len(names) == len(blocks)
  assert len(set(names)) == len(names)
  assert names[0] == 'stem' and names[-1] == 'head'
  assert names[1] == 'group1.block0'
  assert all(isinstance(block, nn.Module) for block in blocks)


def test_block_names_resnet20():
  assert models.block_names('resnet20') == [
      'stem',
      'group1.block0', 'group1.block1', 'group1.block2',
      'group2.block0', 'group2.block1', 'group2.block2',
      'group3.block0', 'group3.block1', 'group3.block2',
      'head',
  ]


@pytest.mark.parametrize('bad_name', ['resnet50', '', 'ResNet20'])
def test_unknown_model_raises(bad_name):
  with pytest.raises(ValueError, match='choose one of') as error:
    models.create_blocks(bad_name, 10)
  for name in models.MODEL_NAMES:
    assert name in str(error.value)
  with pytest.raises(ValueError, match='choose one of'):
    models.block_names(bad_name)


def test_activation_shapes_resnet20():
  """Stride 2 at the first block of groups 2 and 3; resolution not fixed."""
  blocks = models.create_blocks('resnet20', 10)
  rng = _key(0)

  def shapes(size):
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    result = []
    for block in blocks:
      x = jax.eval_shape(
          lambda x, block=block: block.init_with_output(rng, x, train=False)[0],
          x)
      result.append(x.shape)
    return result

  out = shapes(32)
  assert out[0] == (2, 32, 32, 16)
  assert out[3] == (2, 32, 32, 16)
  assert out[4] == (2, 16, 16, 32)
  assert out[7] == (2, 8, 8, 64)
  assert out[-1] == (2, 10)
  assert shapes(16)[-1] == (2, 10)


@pytest.fixture(scope='module')
def resnet20():
  """ResNet-20 blocks and real variables, initialised once for the module."""
  blocks = models.create_blocks('resnet20', 10)
  variables = Sequential(blocks).init(_key(0), _images(), train=False)
  return blocks, variables


def test_resnet20_forward_and_batch_stats(resnet20):
  blocks, variables = resnet20
  model = Sequential(blocks)
  images = _images()
  assert set(variables) == {'params', 'batch_stats'}
  assert set(variables['params']) == {f'blocks_{i}' for i in range(11)}

  # jit: one compilation is much cheaper than eager op-by-op dispatch.
  evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False))
  train = jax.jit(
      lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))

  # Evaluation needs no mutable collections.
  logits = evaluate(variables, images)
  assert logits.shape == (2, 10)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))

  # Training updates the running statistics.
  logits, updates = train(variables, images)
  assert logits.shape == (2, 10)
  assert np.all(np.isfinite(logits))
  old = jax.tree.leaves(variables['batch_stats'])
  new = jax.tree.leaves(updates['batch_stats'])
  assert len(old) == len(new)
  assert any(not np.allclose(a, b) for a, b in zip(old, new))

  # Training without declaring batch_stats mutable is an error.
  with pytest.raises(errors.ModifyScopeVariableError):
    model.apply(variables, images, train=True)


def test_split_into_stages_matches_whole_model(resnet20):
  """Chaining two stages built from a slice of the block list (as the engine
  does) reproduces the whole model, given the re-indexed variables."""
  blocks, variables = resnet20
  images = _images(size=16)
  whole = Sequential(blocks)

  split = 4
  stages = [Sequential(blocks[:split]), Sequential(blocks[split:])]
  offsets = [0, split]

  def stage_variables(stage, offset):
    return {
        collection: {
            f'blocks_{i}': tree[f'blocks_{i + offset}']
            for i in range(len(stage.blocks))
            if f'blocks_{i + offset}' in tree
        } for collection, tree in variables.items()
    }

  x = images
  for stage, offset in zip(stages, offsets):
    x = stage.apply(stage_variables(stage, offset), x, train=False)
  expected = whole.apply(variables, images, train=False)
  np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = Sequential(models.create_blocks('resnet20', 10, dtype=jnp.bfloat16))
  variables, logits = jax.eval_shape(
      lambda: model.init_with_output(_key(0),
                                     jnp.zeros((2, 32, 32, 3)), train=False)
      [::-1])
  assert logits.dtype == jnp.float32
  assert all(leaf.dtype == jnp.float32
             for leaf in jax.tree.leaves(variables['params']))


def test_wrn_dropout_needs_rng_only_when_active():
  images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)

  def train_step_shape(dropout_rate, rngs):
    model = Sequential(
        models.create_blocks('wrn28_10', 10, dropout_rate=dropout_rate))
    variables = _abstract_variables('wrn28_10', 10, dropout_rate=dropout_rate)
    return jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'],
                                 rngs=rngs)[0], variables, images)

  assert train_step_shape(0.0, None).shape == (2, 10)
  assert train_step_shape(0.3, {'dropout': _key(0)}).shape == (2, 10)
  with pytest.raises(Exception, match='dropout'):
    train_step_shape(0.3, None)


def test_wide_block_dropout_behaviour():
  """A narrow wide block stands in for WRN-28-10 to keep this cheap."""
  block = models.WideBasicBlock(features=8, strides=2, dropout_rate=0.5)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 4)),
                  jnp.float32)
  variables = jax.jit(lambda x: block.init(_key(1), x, train=False))(x)
  assert 'shortcut_conv' in variables['params']

  evaluate = jax.jit(lambda v, x: block.apply(v, x, train=False))
  y = evaluate(variables, x)
  assert y.shape == (2, 4, 4, 8)
  # Evaluation is deterministic and needs no rng.
  np.testing.assert_array_equal(y, evaluate(variables, x))

  @jax.jit
  def train(seed):
    return block.apply(variables, x, train=True, mutable=['batch_stats'],
                       rngs={'dropout': _key(seed)})[0]

  np.testing.assert_array_equal(train(0), train(0))
  assert not np.allclose(train(0), train(1))
  with pytest.raises(Exception, match='dropout'):
    block.apply(variables, x, train=True, mutable=['batch_stats'])

  no_dropout = models.WideBasicBlock(features=8, strides=2, dropout_rate=0.0)
  y = no_dropout.apply(variables, x, train=True, mutable=['batch_stats'])[0]
  assert np.all(np.isfinite(y))


def test_wide_block_identity_shortcut_has_no_projection():
  block = models.WideBasicBlock(features=4)
  x = jnp.ones((1, 4, 4, 4))
  params = jax.eval_shape(
      lambda: block.init(_key(0), x, train=False))['params']
  assert 'shortcut_conv' not in params
