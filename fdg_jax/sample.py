r"""Command line: `python -m fdg_jax.sample --workdir=DIR`: text from a trained language model.

nanoGPT's sample.py for a run of `python -m fdg_jax.main`: reads the run's config.json and
vocabulary.json, restores its latest checkpoint in this one process (whatever method, stages,
devices and processes it trained with), completes the batches it had in flight as the trainer
does after its last step (so a finished run gives the model its final evaluation saw: the
summary's params_digest), composes the stages and prints `--num_samples` samples of
`--max_new_tokens` tokens after `--start`, each followed by a line of dashes, with the key-value
cache of `fdg_jax.models.sampling`:

    python -m fdg_jax.sample --workdir=/tmp/shakespeare --start="ROMEO:" --num_samples=3 \
        --max_new_tokens=500 --temperature=0.8 --top_k=200 --seed=1337

Completing the batches in flight needs the training text (config.data_dir, or `--data_dir`
where it moved); without it the samples come from the stages' parameters as checkpointed, and a
line says so. On CPU the run's devices are simulated (as many as it used); a GPU machine with
fewer devices than the run puts every stage on its first.
"""

import contextlib
import os
import sys

from absl import app
from absl import flags
from absl import logging

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, "A language-model run's workdir (config.json, "
                    'vocabulary.json and checkpoints/).')
flags.DEFINE_string('start', '\n', 'The prompt: text, or FILE:path to read it from a file.')
flags.DEFINE_integer('num_samples', 10, 'Samples to draw (in one batch).')
flags.DEFINE_integer('max_new_tokens', 500, 'Tokens generated in each sample.')
flags.DEFINE_float('temperature', 0.8, 'Divides the logits: below 1 less random, above 1 more.')
flags.DEFINE_integer('top_k', 200, 'Draw only from the k most likely tokens (0: from all).')
flags.DEFINE_integer('seed', 1337, 'Seed of the draws.')
flags.DEFINE_string('data_dir', None, "Where the run's training text is now, if not at its "
                    "config.data_dir (it completes the batches in flight).")
flags.DEFINE_bool('use_cache', True, 'Generate with the key-value cache (--nouse_cache: '
                  're-encode the context for every token; the same text, slower).')

_DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'


class SampleError(ValueError):
  """A workdir or flag this command cannot use; the message names the fix."""


def run_config(workdir: str):
  """The config the run trained with (`workdir.saved_config`: its config.json, with the fields
  added since at the values that compute what it did); a workdir of no language-model run is a
  SampleError."""
  # pylint: disable=g-import-not-at-top
  from fdg_jax.trainer import workdir as workdir_lib
  # pylint: enable=g-import-not-at-top
  path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
  if not os.path.isdir(workdir):
    raise SampleError(f'{workdir} does not exist. Point --workdir at the workdir of a '
                      'language-model run of fdg_jax.main.')
  if not os.path.exists(path):
    raise SampleError(f'{workdir} has no {workdir_lib.CONFIG_FILE}: not the workdir of a run. '
                      'Point --workdir at the workdir of a language-model run of fdg_jax.main.')
  config = workdir_lib.saved_config(workdir)
  if config.task != 'language_model':
    raise SampleError(f'{workdir} holds a {config.task} run: samples come from a language '
                      'model. Point --workdir at a run of configs/shakespeare_char*.py or the '
                      'like.')
  return config


def use_simulated_devices(config) -> None:
  """On CPU, as many simulated devices as the run's stages used (before JAX starts a backend)."""
  from fdg_jax.trainer import configuration  # pylint: disable=g-import-not-at-top
  needed = 1 + max(d for stage in configuration.stage_device_indices(config) for d in stage)
  flags_now = os.environ.get('XLA_FLAGS', '').split()
  counts = [int(f.split('=')[1]) for f in flags_now if f.startswith(_DEVICE_COUNT_FLAG + '=')]
  if not counts or counts[-1] < needed:
    kept = [f for f in flags_now if not f.startswith(_DEVICE_COUNT_FLAG)]
    os.environ['XLA_FLAGS'] = ' '.join(kept + [f'{_DEVICE_COUNT_FLAG}={needed}'])


def read_start(start: str) -> str:
  """The prompt: `start`, or the text of the file after 'FILE:'."""
  if not start.startswith('FILE:'):
    return start
  path = os.path.expanduser(start[len('FILE:'):])
  try:
    with open(path, encoding='utf-8') as f:
      return f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise SampleError(f'--start={start}: cannot read {path} ({e}). Give a UTF-8 text file '
                      'after FILE:, or the prompt itself.') from None


def load_model(workdir: str, data_dir=None):
  """(config, vocabulary, blocks, variables, note) of the run in `workdir`: its model's blocks
  and the composed variables of its latest checkpoint, completed as the trainer completes a
  run (`train.restore_run`; `note` says what was restored)."""
  # pylint: disable=g-import-not-at-top
  from fdg_jax.data import text_data
  from fdg_jax.engine import checkpoint
  from fdg_jax.models import sampling
  from fdg_jax.trainer import train
  # pylint: enable=g-import-not-at-top
  run_config(workdir)
  vocabulary = text_data.load_vocabulary(workdir)
  if vocabulary is None:
    raise SampleError(f'{workdir} has no {text_data.VOCABULARY_FILE}: its run stopped before '
                      'reading its text. Train it (python -m fdg_jax.main) until a checkpoint.')
  if checkpoint.written_by(workdir) is None:
    raise SampleError(f'{workdir} has no checkpoint yet. Train the run until it saves one '
                      '(config.checkpoint_every_steps, and always at its last step).')
  with contextlib.redirect_stdout(sys.stderr):   # the stage table: stdout is for the samples
    config, _, restored = train.restore_run(workdir, data_dir, num_outputs=vocabulary.size,
                                            unreadable_fix='Give --data_dir=PATH to complete '
                                                           'them.')
  pipe = restored.run.pipe
  blocks, variables = sampling.composed(pipe.modules, pipe.gathered_variables(restored.state))
  return config, vocabulary, blocks, variables, restored.note()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from fdg_jax.trainer import configuration  # pylint: disable=g-import-not-at-top
  try:
    for name, value, least in (('num_samples', FLAGS.num_samples, 1),
                               ('max_new_tokens', FLAGS.max_new_tokens, 0),
                               ('top_k', FLAGS.top_k, 0)):
      if value < least:
        raise SampleError(f'--{name}={value} is below {least}. Use {least} or more.')
    if FLAGS.temperature <= 0:
      raise SampleError(f'--temperature={FLAGS.temperature} is not positive. Use e.g. 0.8.')
    start = read_start(FLAGS.start)
    use_simulated_devices(run_config(FLAGS.workdir))   # before JAX starts a backend
  except (SampleError, configuration.ConfigError) as e:
    sys.exit(f'error: {e}')
  # pylint: disable=g-import-not-at-top
  import numpy as np
  from fdg_jax import data as data_lib
  from fdg_jax.engine import checkpoint
  from fdg_jax.models import sampling
  from fdg_jax.trainer import workdir as workdir_lib
  # pylint: enable=g-import-not-at-top
  workdir_lib.quiet_console()
  try:
    _, vocabulary, blocks, variables, note = load_model(FLAGS.workdir, FLAGS.data_dir)
    prompt = vocabulary.encode(start or '\n', where='--start',
                               fix=f'Use characters of the vocabulary ({vocabulary.size} '
                               'symbols, in WORKDIR/vocabulary.json)')
  except (SampleError, configuration.ConfigError, data_lib.DataError,
          checkpoint.CheckpointError) as e:
    sys.exit(f'error: {e}')
  logging.info('Sampling %s (%s).', FLAGS.workdir, note)
  tokens = sampling.Sampler(blocks).generate(
      variables, np.tile(prompt, (FLAGS.num_samples, 1)), FLAGS.max_new_tokens,
      temperature=FLAGS.temperature, top_k=FLAGS.top_k or None,
      rng=np.random.default_rng(FLAGS.seed), use_cache=FLAGS.use_cache)
  for row in tokens:
    print(vocabulary.decode(row))
    print('---------------', flush=True)


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
