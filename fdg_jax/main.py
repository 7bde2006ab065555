"""Command line: `python -m fdg_jax.main --config=configs/cifar10_resnet56.py --workdir=DIR`.

Override any config field with `--config.FIELD=VALUE`, e.g. `--config.beta=0.5`.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for TensorBoard logs and summary.json.')
config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # TensorFlow only reads data here (tfds, TensorBoard); keep it off the accelerators.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  from fdg_jax import checkpoint, input_pipeline, train  # pylint: disable=g-import-not-at-top
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (train.ConfigError, input_pipeline.DataError, checkpoint.CheckpointError,
          train.DivergenceError, train.Preempted) as e:
    logging.error('%s', e)
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
