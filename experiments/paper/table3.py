r"""Table 3 of the paper: Table 2's comparison (BP, DDG, DGL, FDG; K = 2) on CIFAR-100.

The cells, flags and outputs are those of experiments/paper/table2.py, with the
configs/cifar100_*.py rows. `--dataset`/`--data_dir` default to tfds cifar100; an image folder
must hold CIFAR-100.

    python -m experiments.paper.table3 --scale=cpu --dataset=imagefolder \
        --data_dir=PATH/cifar100.tar.gz
"""

from experiments.grids import cells as cells_lib
from experiments.paper import table2


def main(argv):
  del argv
  table2.run('table3', 'cifar100', 'Table 3', 'CIFAR-100')


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  cells_lib.define_flags('table3')
  table2.define_flags()
  flags.adopt_module_key_flags(cells_lib)   # listed by --help
  flags.adopt_module_key_flags(table2)
  app.run(main)
