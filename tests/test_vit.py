"""The ViT (configs/cifar10_vit_tiny.py) through the trainer: which parameters its AdamW decays,
and `vit_tiny` trained with BP and FDG K = 2 at test sizes."""

import jax
import jax.numpy as jnp
import pytest

from configs import cifar10_vit_tiny
from fdg_jax.engine import optimizers
from fdg_jax.models import zoo
from fdg_jax.trainer import configuration
from fdg_jax.trainer import optimizers as optimizer_config
from fdg_jax.trainer import train
from test_train import check_summary, logged_train_losses, write_image_folder

# Which of the ViT's parameters the config's AdamW decays, by block kind and path within the
# block: the weight matrices and kernels, not the position embedding (as DeiT / timm's
# `no_weight_decay` and big_vision's '.*/kernel$' default), biases or LayerNorm parameters.
DECAYED = {
    'patch_embedding/position_embedding': False,
    'patch_embedding/projection/kernel': True,
    'patch_embedding/projection/bias': False,
    'block/ln_1/scale': False,
    'block/ln_1/bias': False,
    'block/attn/c_attn/kernel': True,
    'block/attn/c_attn/bias': False,
    'block/attn/c_proj/kernel': True,
    'block/attn/c_proj/bias': False,
    'block/ln_2/scale': False,
    'block/ln_2/bias': False,
    'block/mlp/c_fc/kernel': True,
    'block/mlp/c_fc/bias': False,
    'block/mlp/c_proj/kernel': True,
    'block/mlp/c_proj/bias': False,
    'head/ln_f/scale': False,
    'head/ln_f/bias': False,
    'head/fc/kernel': True,
    'head/fc/bias': False,
}


def decayed_by_the_stages(config, stage_variables, split) -> dict[str, set]:
  """For each 'block kind/path' of the ViT, whether the optimizer the trainer makes of `config`
  decays it, read off the K stages' updates: with zero gradients AdamW's step is 0, so a
  parameter moves only by its decoupled decay. A set per entry: the answers of every block of
  that kind."""
  names = zoo.block_names(config.model)
  tx = optimizers.build(optimizer_config.recipe(config, 390))
  table = {}
  for start, variables in zip((0, *split), stage_variables):
    params = jax.tree.map(lambda p: p + 1.0, variables['params'])   # nothing at 0
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    for path, update in jax.tree_util.tree_leaves_with_path(updates):
      keys = [key.key for key in path]
      name = names[start + int(keys[0].removeprefix('blocks_'))]
      kind = 'block' if name.startswith('block') else name
      table.setdefault('/'.join([kind, *keys[1:]]), set()).add(bool(jnp.any(update != 0)))
  return table


def test_vit_weight_decay_mask_as_a_table():
  """The config's optimizer on the ViT's two stages decays exactly DECAYED; with
  decay_embeddings the position embedding too, as nanoGPT decays its embeddings."""
  config = cifar10_vit_tiny.get_config()
  task = configuration.create_task(config)
  _, stage_variables, split, _ = train.build_stages(config, task, 10, jax.random.key(0))
  assert len(stage_variables) == 2
  for decay_embeddings in (False, True):
    config.decay_embeddings = decay_embeddings
    expected = dict(DECAYED, **{'patch_embedding/position_embedding': decay_embeddings})
    assert decayed_by_the_stages(config, stage_variables, split) == {
        path: {decays} for path, decays in expected.items()}, decay_embeddings


@pytest.mark.slow
@pytest.mark.parametrize('method, num_stages', [('bp', 1), ('fdg', 2)])
def test_trainer_trains_vit_tiny(method, num_stages, tmp_path):
  """configs/cifar10_vit_tiny.py with its AdamW and warm-up-cosine recipe, at test sizes (32 px
  images of 3 classes with a colour cue, batch 8, 8 steps): the training loss falls, the test
  accuracy is above chance, the summary is complete."""
  data = write_image_folder(tmp_path / 'data', size=32)
  config = cifar10_vit_tiny.get_config()
  config.update(method=method, num_stages=num_stages, dataset='imagefolder', data_dir=data,
                cache_dir=str(tmp_path / 'cache'), batch_size=8, num_train_steps=8,
                warmup_steps=1, lr_decay_steps=8, log_every_steps=2, eval_every_epochs=0,
                eval_batch_size=12)
  workdir = str(tmp_path / 'work')
  summary = train.train_and_evaluate(config, workdir)
  check_summary(summary, workdir, model='vit_tiny', method=method, num_stages=num_stages,
                steps=8, extra_params=0, trainable_params=2_691_843)   # 3 classes
  losses = logged_train_losses(workdir)
  assert len(losses) == 4 and losses[-1] < 0.5 * losses[0], losses
  assert summary['test_accuracy'] > 0.5   # 3 classes
