"""nanoGPT's CPU recipe for character-level tiny Shakespeare, with FDG K = 2.

nanoGPT's README (karpathy/nanoGPT, "I only have a macbook"): config/train_shakespeare_char.py
with --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
--lr_decay_iters=2000 --dropout=0.0 reaches validation loss about 1.88 on a CPU. Everything
else is that config's and nanoGPT's train.py defaults: AdamW lr 1e-3 (beta2 0.99, weight decay
0.1), 100 warm-up steps, cosine to 1e-4, gradient clipping at 1.0. Two differences: the input
embedding and the LM head are not tied (each stage owns its parameters: fdg_jax/models/gpt.py), and
the embeddings are not weight-decayed (config.decay_embeddings; nanoGPT decays every matrix).

    python -m fdg_jax.main --config=configs/shakespeare_char_cpu.py --workdir=/tmp/shakespeare \
        --config.dataset=textfile --config.data_dir=PATH/TO/tinyshakespeare.txt

`--config.method=bp` trains the unsplit model; every stage sits on device 0 by default (a
simulation on one CPU device: right numbers, no parallel speed; for real parallelism run the
stages in processes with `python -m fdg_jax.launch --num_processes=2 -- ... --config.stage_devices="()"`).
"""

from configs import default
from fdg_jax import tasks


def get_config():
  config = tasks.configure(default.get_config(), 'language_model')
  config.model = 'gpt'
  # tfds' tiny_shakespeare (needs internet once), or 'textfile' with data_dir.
  config.dataset = 'tiny_shakespeare'
  config.method = 'fdg'
  config.num_stages = 2
  # No gradient shrinking: the paper tunes beta per CNN; the language-model grid compares.
  config.beta = 1.0
  # Plain FDG, as the recorded grid's FDG cells (docs/record/language_model.md). Measured there:
  # --config.compensation=weight_prediction brings K = 2 within 0.003 nats of BP (from 0.043);
  # at K = 4 use 'nesterov' (0.19 nats behind BP, from 0.54).
  config.compensation = 'none'
  # Every stage on device 0, whatever K, so it runs without simulated devices.
  config.stage_devices = (0,)
  # nanoGPT's CPU model: 4 layers, 4 heads, 128 wide, 64 characters of context.
  config.n_layer = 4
  config.n_head = 4
  config.n_embd = 128
  config.block_size = 64
  config.dropout_rate = 0.0
  config.batch_size = 12
  config.num_train_steps = 2000
  # nanoGPT's optimizer and schedule.
  config.optimizer = 'adamw'
  config.learning_rate = 1e-3
  config.adam_b1 = 0.9
  config.adam_b2 = 0.99
  config.weight_decay = 0.1
  config.lr_schedule = 'warmup_cosine'
  config.warmup_steps = 100
  config.lr_decay_steps = 2000
  config.min_learning_rate = 1e-4
  config.grad_clip = 1.0
  # nanoGPT evaluates every 250 steps (on 20 random batches); we cover the whole validation text.
  config.eval_every_steps = 250
  config.eval_batch_size = 256
  config.log_every_steps = 100
  config.checkpoint_every_steps = 500
  return config
