"""A deep character GPT for tiny Shakespeare on a CPU: 8 transformer blocks, so K = 8 puts about
one block on each stage (issue 38).

configs/shakespeare_char_cpu.py (nanoGPT's CPU recipe: 4 layers, 4 heads, 128 wide, context 64,
batch 12, AdamW lr 1e-3, beta2 0.99, weight decay 0.1, 100 warm-up steps, cosine to lr / 10,
clipping at 1.0) with twice its depth and a batch of 16 windows, so that PipeDream-2BW's
microbatches, M >= 2(K - 1), divide it at K = 8 (M = 16) and K = 4 (M = 8). The length and the
learning rates were measured and tuned for BP here (docs/record/language_model.md, "A deep CPU
recipe"); the grid over it is experiments/lm/depth_grid.py.

    python -m fdg_jax.main --config=configs/shakespeare_char_deep_cpu.py --workdir=/tmp/deep \
        --config.dataset=textfile --config.data_dir=PATH/TO/tinyshakespeare.txt \
        --config.method=bp

`--config.optimizer=muon` trains the blocks' matrices with Muon and the rest with this AdamW
(configs/default.py says how). The config's own method is FDG at K = 8, every stage on device 0
(a simulation on one CPU device: right numbers, no parallel speed).
"""

from configs import shakespeare_char_cpu


def get_config():
  config = shakespeare_char_cpu.get_config()
  config.method = 'fdg'
  config.num_stages = 8
  config.n_layer = 8
  config.batch_size = 16
  config.num_train_steps = 2000
  config.lr_decay_steps = 2000
  return config
