"""Command line: `python -m fdg_jax.main --config=configs/cifar10_resnet56.py --workdir=DIR`.

Override any config field with `--config.FIELD=VALUE`, e.g. `--config.beta=0.5`.
`--dry_run` validates the config, prints it and the stage table, and exits.

Several processes (one per host, or per device): add `--coordinator_address=HOST:PORT
--num_processes=N --process_id=I` on each (or none of them where JAX detects the cluster, e.g.
Slurm); stage k runs on global device k. `python -m fdg_jax.launch` starts N local processes.
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from fdg_jax.trainer import configuration

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard logs, log.txt and '
                    'summary.json.')
flags.DEFINE_bool('dry_run', False, 'Validate the config, print it and the stage table, exit.')
flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0, for a multi-process '
                    'run (jax.distributed); not a config field: it does not change the result.')
flags.DEFINE_integer('num_processes', None, 'Number of processes of a multi-process run.')
flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.')
flags.DEFINE_integer('join_timeout_s', 120, 'How long a process waits for the others to join.')
config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                lock_config=True)


__doc__ += configuration.fields_help()   # absl prints the main module's docstring for --help


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a one-line error for a misspelt or bad --config field."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {e}\nPass --help to see the flags and config fields.')
  except (AttributeError, KeyError, TypeError, ValueError) as e:   # from ml_collections
    config_file = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
    lines = []
    if config_file and os.path.exists(config_file):
      import runpy  # pylint: disable=g-import-not-at-top
      sys.path.insert(0, os.getcwd())   # config files import their siblings as `configs.X`
      config = runpy.run_path(config_file)['get_config']()
      lines = configuration.misspelt_fields(argv, config)
    sys.exit('error: ' + (lines[0] if lines else ' '.join(str(e).split())))


def _import_tensorflow_quietly():
  """TensorFlow (for tfds to read a prepared dataset), without the start-up banners its C++
  side writes to stderr before any log setting applies. An import error still surfaces."""
  saved = os.dup(2)
  try:
    with open(os.devnull, 'w') as devnull:
      os.dup2(devnull.fileno(), 2)
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
  finally:
    os.dup2(saved, 2)
    os.close(saved)
  return tf


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # pylint: disable=g-import-not-at-top
  import jax
  from fdg_jax.engine import distributed
  from fdg_jax.trainer import workdir
  workdir.quiet_console()
  try:   # before anything touches a device
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                           timeout_s=FLAGS.join_timeout_s)
  except distributed.DistributedError as e:
    sys.exit(f'error: {e}')
  workdir.quiet_console(speaker=jax.process_index() == 0)   # process 0 speaks
  # A bad config or command line ends here, before TensorFlow's import (seconds of it) where
  # the dataset is a tfds one.
  try:
    configuration.validate_config(FLAGS.config)
  except configuration.ConfigError as e:
    sys.exit(f'error: {e}')
  if not FLAGS.workdir and not FLAGS.dry_run:
    sys.exit('error: --workdir is required (except with --dry_run).')
  if configuration.reads_tfds(FLAGS.config):   # only tfds needs TensorFlow
    tf = _import_tensorflow_quietly()
    tf.config.set_visible_devices([], 'GPU')   # keep TensorFlow off the accelerators
  from fdg_jax import data
  from fdg_jax.engine import checkpoint
  from fdg_jax.trainer import train
  # pylint: enable=g-import-not-at-top
  try:
    if FLAGS.dry_run:
      print(FLAGS.config)
      train.dry_run(FLAGS.config)
      return
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (configuration.ConfigError, data.DataError, checkpoint.CheckpointError,
          workdir.DivergenceError, workdir.Preempted) as e:
    sys.exit(f'error: {e}')   # once: the run's log.txt has it too


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main, flags_parser=_parse_flags)
