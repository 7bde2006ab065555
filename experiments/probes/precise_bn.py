r"""Are a finished run's BatchNorm statistics what costs FDG its test error? (issue 15)

For the recorded `--scale=cpu` compensation grid the answer is no (docs/record/compensation.md,
"Stale-gradient compensation at `--scale=cpu`": within 0.07 points); kept to ask it of other
grids, e.g. at K = 4 or the paper's scale, whose runs kept their checkpoints
(`--keep_checkpoints`).

A network in evaluation mode normalises with each BatchNorm layer's running statistics: an
exponential average (momentum 0.9, so about the last 10 steps) of the batch statistics seen in
training, taken with parameters that were changing meanwhile. In FDG a stage's forward also
sees inputs from the previous stage's older parameters. If FDG's error were partly stale
statistics, re-estimating them with the final parameters would close part of its gap to BP.

For each finished run (a workdir with `summary.json` and its last checkpoint, e.g. a grid run
with `--keep_checkpoints`) this restores the last checkpoint as the trainer resumes it, drains
the pipeline as the trainer does after its last step, checks that the variables are the
summary's (`params_digest`, bit for bit), and evaluates the unsplit network on the test split:

- with the run's own running statistics (the summary's test error, recomputed), and
- with "precise BN" statistics (Wu and Johnson, "Rethinking 'Batch' in BatchNorm", 2021): each
  BatchNorm layer's mean and variance are the averages of its batch means and batch variances
  over one epoch of training batches (the run's stream of epoch 0, augmented as in training),
  every batch forwarded in training mode through the final parameters.

    python -m experiments.probes.precise_bn --workdirs=RUN1,RUN2,... --out=FILE.json

A run trained in K processes (`fdg_jax.launch`, grids' `--processes`) is restored in as many:

    python -m fdg_jax.launch --num_processes=2 --module=experiments.probes.precise_bn -- \
        --workdirs=RUN1,... --out=FILE.json

FILE.json gets one record per run (merged with the records already there, by workdir).
"""

import json
import os
import sys


# pylint: disable=g-import-not-at-top  (after the path set-up above)
from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from configs import default as default_config
from fdg_jax.data import image_batches
from fdg_jax.engine import checkpoint
from fdg_jax.engine import distributed
from fdg_jax.engine import pipeline
from fdg_jax import models
from fdg_jax.models import partition
from fdg_jax.trainer import configuration
from fdg_jax.trainer import train
from fdg_jax.trainer import workdir as workdir_lib
# pylint: enable=g-import-not-at-top

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_list('workdirs', [], 'Finished runs, each with summary.json and its last '
                    'checkpoint.')
  flags.DEFINE_string('out', '', 'JSON file for the results (records merged by workdir).')
  flags.DEFINE_string('coordinator_address', None, 'Set by fdg_jax.launch.')
  flags.DEFINE_integer('num_processes', None, 'Set by fdg_jax.launch.')
  flags.DEFINE_integer('process_id', None, 'Set by fdg_jax.launch.')


class RunError(ValueError):
  """A workdir this script cannot read; the message names the fix."""


def run_config(workdir: str):
  """The config a run trained with: configs/default.py updated from its config.json."""
  config = default_config.get_config()
  with open(os.path.join(workdir, workdir_lib.CONFIG_FILE)) as f:
    saved = json.load(f)
  for field, value in saved.items():
    default = config[field]
    config[field] = tuple(value) if isinstance(default, tuple) else value
  # The same computation, field by field.
  workdir_lib.check_config_matches(config, workdir, configuration.create_task(config))
  return config


def check_readable(workdir: str) -> dict:
  """The run's summary, after checking that this script can restore its last checkpoint."""
  path = os.path.join(workdir, workdir_lib.SUMMARY_FILE)
  if not os.path.exists(path):
    raise RunError(f'{workdir}: no {workdir_lib.SUMMARY_FILE}; the run has not finished.')
  layout = checkpoint.written_by(workdir)
  if layout is None:
    raise RunError(f'{workdir}: no checkpoint (a grid deletes them unless --keep_checkpoints).')
  with open(path) as f:
    summary = json.load(f)
  processes = summary.get('num_processes', 1)
  if (layout == checkpoint.PROCESSES) != (processes > 1) or processes != jax.process_count():
    raise RunError(
        f'{workdir} was trained in {processes} process(es) and is read here by '
        f'{jax.process_count()}: run `python -m fdg_jax.launch --num_processes={processes} '
        '--module=experiments.probes.precise_bn -- ...` for it, and one process for one-process '
        'runs.')
  return summary


def batch_statistics(model, variables: dict, images: jax.Array) -> dict:
  """Every BatchNorm layer's {'mean', 'var'} over `images`, forwarded in training mode.

  Flax's BatchNorm returns momentum * old + (1 - momentum) * batch: starting from zeros, the
  batch's own statistics are the update divided by (1 - momentum).
  """
  zeros = jax.tree.map(jnp.zeros_like, variables['batch_stats'])
  _, updated = model.apply({'params': variables['params'], 'batch_stats': zeros}, images,
                           train=True, mutable=['batch_stats'],
                           rngs={'dropout': jax.random.key(0)})
  return jax.tree.map(lambda s: s / (1 - models.BATCH_NORM_MOMENTUM), updated['batch_stats'])


def precise_statistics(model, variables: dict, batches) -> dict:
  """The averages of `batch_statistics` over `batches` (equal-sized)."""
  statistics = jax.jit(lambda v, x: batch_statistics(model, v, x))
  total, count = None, 0
  for images, _ in batches:
    stats = statistics(variables, images)
    total = stats if total is None else jax.tree.map(jnp.add, total, stats)
    count += 1
  return jax.tree.map(lambda s: s / count, total)


def test_metrics(model, variables: dict, dataset, batch_size: int) -> dict:
  """Test loss and error of `model` in evaluation mode with `variables`, with the pipeline's
  loss and metrics (`Pipeline.evaluate`'s), read from the device once."""
  @jax.jit
  def batch_metrics(v, images, labels, mask):
    logits = model.apply(v, images, train=False)
    return pipeline.LossAndAccuracy.single_from_model_output(
        loss=pipeline.cross_entropy_loss(logits, labels), logits=logits, labels=labels,
        mask=mask)
  total = None
  for images, labels, mask in image_batches.test_batches(dataset, batch_size):
    update = batch_metrics(variables, images, labels, mask)
    total = update if total is None else total.merge(update)
  result = {name: float(value) for name, value in total.compute().items()}
  return {'test_loss': result['loss'], 'test_error': 1 - result['accuracy']}


def reevaluate(workdir: str) -> dict | None:
  """The record of one run (on process 0; None on the others)."""
  summary = check_readable(workdir)
  config = run_config(workdir)
  task = configuration.create_task(config)
  dataset = task.load_data()
  steps_per_epoch = task.steps_per_epoch(dataset)
  num_steps = train.total_train_steps(config, steps_per_epoch)
  run = train.initial_run(config, task, task.num_outputs(dataset), steps_per_epoch)
  checkpointer = checkpoint.Checkpointer(workdir)
  try:
    latest_step = checkpointer.latest_step()
    if latest_step != num_steps:
      raise RunError(f'{workdir}: the last checkpoint is of step {latest_step}, not of the '
                     f'last step {num_steps}.')
    state, _ = checkpointer.restore(run.pipe, run.state,
                                    batch_inputs=task.stream_inputs(dataset))
  finally:
    checkpointer.close()
  state, _ = run.pipe.drain(state)   # as the trainer does after its last step
  stage_variables = run.pipe.gathered_variables(state, process=0)
  if stage_variables is None:
    return None
  blocks, _ = task.create_blocks(task.num_outputs(dataset))
  variables = partition.merge_variables(stage_variables, run.split, len(blocks))
  if train.params_digest(variables) != summary['params_digest']:
    raise RunError(f'{workdir}: the restored and drained variables are not those of its '
                   'summary (params_digest differs).')
  model = partition.StageModule(tuple(blocks))
  variables = jax.device_put(variables, jax.local_devices()[0])
  own = test_metrics(model, variables, dataset, config.eval_batch_size)
  batches = image_batches.train_batches(dataset, config.batch_size, config.seed)
  precise = precise_statistics(model, variables,
                               (next(batches) for _ in range(steps_per_epoch)))
  recomputed = test_metrics(model, {'params': variables['params'], 'batch_stats': precise},
                            dataset, config.eval_batch_size)
  return {
      'workdir': os.path.normpath(workdir),   # as given: no machine's paths in the records
      'method': config.method, 'num_stages': summary['num_stages'], 'beta': config.beta,
      'compensation': config.compensation, 'seed': config.seed,
      'momentum': config.momentum, 'learning_rate': config.learning_rate,
      'steps': num_steps, 'train_images': summary['train_images'],
      'summary_test_error': summary['test_error'],
      'own_statistics': own,
      'precise_statistics': recomputed,
      'precise_batches': steps_per_epoch,
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if not FLAGS.workdirs or not FLAGS.out:
    sys.exit('error: give --workdirs=RUN1,... and --out=FILE.json.')
  records = []
  try:
    for workdir in FLAGS.workdirs:
      record = reevaluate(workdir)
      if record is None:
        continue
      records.append(record)
      print(f"{workdir}: test error {100 * record['summary_test_error']:.2f}% in its summary, "
            f"{100 * record['own_statistics']['test_error']:.2f}% recomputed, "
            f"{100 * record['precise_statistics']['test_error']:.2f}% with precise BN "
            'statistics', flush=True)
  except (RunError, checkpoint.CheckpointError, configuration.ConfigError) as e:
    sys.exit(f'error: {e}')
  if jax.process_index() != 0:
    return
  existing = {}
  if os.path.exists(FLAGS.out):
    with open(FLAGS.out) as f:
      existing = {r['workdir']: r for r in json.load(f)}
  existing.update({r['workdir']: r for r in records})
  workdir_lib.write_json(FLAGS.out, sorted(existing.values(), key=lambda r: r['workdir']))
  print(f'Results: {FLAGS.out}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
