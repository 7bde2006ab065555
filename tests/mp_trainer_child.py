"""The trainer on tests/test_train.py's tiny image folder, for FDG, DDG, DGL, 1F1B over 2
microbatches (clipped by the whole model's norm), FDG over 2 microbatches, FDG with error
feedback, and the ViT (32 px: the folder resized) with FDG and basis rotation (its attention and
MLP matrices' covariances and bases in the optimizer state, 0 x 0 arrays for the rest, saved by
each process) (K = 2) one after the other in this process, each in OUT_DIR/NAME: stage k on process k when started by
fdg_jax.launch, every stage on device 0 when run alone (tests/test_multiprocess.py compares the
two)."""

import argparse
import os

import jax

from fdg_jax.engine import distributed
from fdg_jax.trainer import train
from test_train import small_config

# NAME: the config's fields besides small_config's. The methods over microbatches also draw
# the timeline of steps 8-9 (it only observes: the numbers stay the same).
TIMELINE = dict(timeline_start_step=8, timeline_num_steps=2)
METHODS = {'fdg': dict(method='fdg'), 'ddg': dict(method='ddg'), 'dgl': dict(method='dgl'),
           '1f1b.m2': dict(method='1f1b', microbatches=2, grad_clip=1.0, **TIMELINE),
           'fdg.m2': dict(method='fdg', microbatches=2, **TIMELINE),
           'fdg.ef': dict(method='fdg', compensation='error_feedback'),
           'vit.rot': dict(method='fdg', model='vit_tiny', image_size=32, optimizer='adamw',
                           learning_rate=1e-3, compensation='basis_rotation',
                           rotation_frequency=5)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--coordinator_address')
  parser.add_argument('--num_processes', type=int)
  parser.add_argument('--process_id', type=int)
  parser.add_argument('--data')
  parser.add_argument('--out_dir')
  parser.add_argument('--steps', type=int)
  args = parser.parse_args()
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  for name, fields in METHODS.items():
    config = small_config(dataset='imagefolder', data_dir=args.data, **fields,
                          num_train_steps=args.steps, checkpoint_every_steps=args.steps,
                          cache_dir=os.path.join(args.out_dir, f'cache_{jax.process_index()}'),
                          stage_devices=() if jax.process_count() > 1 else (0, 0))
    train.train_and_evaluate(config, os.path.join(args.out_dir, name))
  print(f'process {jax.process_index()} done', flush=True)


if __name__ == '__main__':
  main()
