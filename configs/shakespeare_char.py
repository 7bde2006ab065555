"""nanoGPT's GPU recipe for character-level tiny Shakespeare (config/train_shakespeare_char.py),
with FDG K = 2: 6 layers, 6 heads, 384 wide, 256 characters of context, batch 64, dropout 0.2,
AdamW lr 1e-3 (beta2 0.99, weight decay 0.1) decayed to 1e-4 over 5000 steps after 100 of
warm-up, gradient clipping at 1.0. nanoGPT's README: best validation loss 1.4697 in about 3
minutes on one A100.

    python -m fdg_jax.main --config=configs/shakespeare_char.py --workdir=/tmp/shakespeare_gpu \
        --config.dataset=textfile --config.data_dir=PATH/TO/tinyshakespeare.txt

On accelerators add --config.dtype=bfloat16 (float32 parameters, bfloat16 compute). Stages sit
on device 0 by default; with two devices, --config.stage_devices="()" puts stage k on device k.
"""

from configs import shakespeare_char_cpu


def get_config():
  config = shakespeare_char_cpu.get_config()
  config.n_layer = 6
  config.n_head = 6
  config.n_embd = 384
  config.block_size = 256
  config.dropout_rate = 0.2
  config.batch_size = 64
  config.num_train_steps = 5000
  config.lr_decay_steps = 5000
  config.eval_batch_size = 64
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  return config
