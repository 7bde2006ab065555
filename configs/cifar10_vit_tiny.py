"""A small ViT on CIFAR-10 with FDG, K = 2: patch 4 (64 tokens), 6 blocks of width 192 with 3
heads (fdg_jax/models/vit.py; 2.7M parameters), AdamW with warm-up and cosine decay.

The recipe of the usual from-scratch CIFAR ViTs (e.g. "ViT for small datasets" set-ups):
AdamW lr 1e-3, weight decay 0.05 on weight matrices, 5 epochs of linear warm-up, cosine to 1e-5
over 100 epochs, gradient clipping at 1.0, batch 128, the CIFAR crop-and-flip augmentation.
Weight decay: the kernels of the patch projection, the attention, the MLPs and the classifier;
not the position embedding (config.decay_embeddings=False, as for the GPT's embeddings), the
biases or the LayerNorms. That is the ViT literature's choice: DeiT and timm leave pos_embed and
cls_token out (`no_weight_decay`), big_vision decays only '.*/kernel$' by default
(tests/test_vit.py checks the table). beta 1: Adam divides each parameter's step by its
gradient's running scale, so a constant factor on stage 0's gradient would change little (only
through eps and the clipping).
The schedule is in steps: 390 steps per epoch of the 50,000 training images at batch 128; give
--config.warmup_steps and --config.lr_decay_steps anew for other sizes. DGL uses the ViT head
as its auxiliary head (--config.aux_head=vit).

    python -m fdg_jax.main --config=configs/cifar10_vit_tiny.py --workdir=/tmp/vit \
        --config.dataset=imagefolder --config.data_dir=PATH/TO/cifar10-jpeg.tar.gz
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = 'vit_tiny'
  config.num_stages = 2
  config.beta = 1.0
  config.aux_head = 'vit'
  config.batch_size = 128
  config.num_epochs = 100
  config.optimizer = 'adamw'
  config.learning_rate = 1e-3
  config.adam_b2 = 0.999
  config.weight_decay = 0.05
  config.lr_schedule = 'warmup_cosine'
  config.warmup_steps = 5 * 390
  config.lr_decay_steps = 100 * 390
  config.min_learning_rate = 1e-5
  config.grad_clip = 1.0
  return config
