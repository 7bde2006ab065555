"""The models: networks as ordered lists of flax blocks, and how to split them into stages.

`zoo` (the CIFAR ResNets, WRN-28-10 and the ViT by name), `gpt` (a nanoGPT-style GPT as blocks),
`vit` (a small ViT as blocks), `aux_heads` (DGL's auxiliary heads by name), `partition` (a
stage as a run of blocks, FLOP and time balancing, splitting and merging variables) and
`sampling` (text from a GPT's parameters, with a key-value cache).

Import rule (checked by tests/test_layout.py): models import nothing of fdg_jax outside
`fdg_jax.models`: no data, no engine, no trainer.

The zoo's names are re-exported here (`fdg_jax.models.create_blocks('resnet20', 10)`).
"""

from fdg_jax.models.zoo import (BATCH_NORM_MOMENTUM, MODEL_NAMES, VIT_NAMES, BasicBlock, Head,
                                Stem, WideBasicBlock, batch_norm, block_names, create_blocks)

__all__ = ['BATCH_NORM_MOMENTUM', 'MODEL_NAMES', 'VIT_NAMES', 'BasicBlock', 'Head', 'Stem',
           'WideBasicBlock', 'batch_norm', 'block_names', 'create_blocks']
