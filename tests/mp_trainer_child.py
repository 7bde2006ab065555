"""The trainer on tests/test_train.py's tiny image folder, for FDG, DDG and DGL (K = 2) one after
the other in this process: stage k on process k when started by fdg_jax.launch, every stage on
device 0 when run alone (tests/test_multiprocess.py compares the two)."""

import argparse
import os

import jax

from fdg_jax.engine import distributed
from fdg_jax.trainer import train
from test_train import small_config

METHODS = ('fdg', 'ddg', 'dgl')


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
  for method in METHODS:
    config = small_config(dataset='imagefolder', data_dir=args.data, method=method,
                          num_train_steps=args.steps, checkpoint_every_steps=args.steps,
                          cache_dir=os.path.join(args.out_dir, f'cache_{jax.process_index()}'),
                          stage_devices=() if jax.process_count() > 1 else (0, 0))
    train.train_and_evaluate(config, os.path.join(args.out_dir, method))
  print(f'process {jax.process_index()} done', flush=True)


if __name__ == '__main__':
  main()
