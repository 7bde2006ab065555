"""A deep character GPT for tiny Shakespeare on a CPU: 8 transformer blocks, so K = 8 puts about
one block on each stage (issue 38).

configs/shakespeare_char_cpu.py (nanoGPT's CPU recipe: 4 layers, 4 heads, 128 wide, context 64,
batch 12, AdamW lr 1e-3, beta2 0.99, weight decay 0.1, 100 warm-up steps, cosine to lr / 10,
clipping at 1.0) with twice its depth and a batch of 16 windows, so that PipeDream-2BW's
microbatches, M >= 2(K - 1), divide it at K = 8 (M = 16) and K = 4 (M = 8), and AdamW's learning
rate doubled. BP's learning rates were tuned with 600-step runs: AdamW 2e-3 against 1e-3,
Muon's 0.02 against 0.01 and 0.05 (with AdamW at 2e-3 for the rest); BP with Muon was 0.31 nats
below BP with AdamW there (docs/record/language_model.md, "A deep CPU recipe and Muon"). The
grid over it is experiments/lm/depth_grid.py.

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
  # AdamW (and, with optimizer 'muon', AdamW's part): 2e-3 beat nanoGPT's 1e-3 at this depth.
  config.learning_rate = 2e-3
  config.min_learning_rate = 2e-4
  # With --config.optimizer=muon: Muon's peak rate on the blocks' matrices (Keller Jordan's
  # default, the best of 0.01, 0.02, 0.05 here).
  config.muon_learning_rate = 0.02
  config.num_train_steps = 2000
  config.lr_decay_steps = 2000
  return config
