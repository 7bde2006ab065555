"""Training and evaluation: builds the stages from a config, drives the pipeline, logs, summarises.

`train_and_evaluate(config, workdir)` is what `python -m fdg_jax.main` calls, and what a notebook
calls too. Every check of the config runs before any data is read or anything is compiled
(`configuration.validate_config`); the workdir's files, resume checks, preemption and divergence
live in `workdir.py`. The config is resolved here once per run: one task (`tasks.base.Task`,
bound to the config), one method (`engine.methods.REGISTRY`), one optimizer recipe (whose
learning rate is the run's schedule); the engine gets plain values. `initial_run` builds the
pipeline and its initial state exactly as training does, for the benchmarks too.
"""

import dataclasses
import hashlib
import json
import os
import resource
import time
from typing import Any, Callable, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fdg_jax import data as data_lib
from fdg_jax.engine import checkpoint
from fdg_jax.engine import compensation
from fdg_jax.engine import distributed
from fdg_jax.engine import methods
from fdg_jax.engine import optimizers
from fdg_jax.engine import pipeline
from fdg_jax.engine import schedule
from fdg_jax.engine import stage_functions
from fdg_jax.engine import timeline
from fdg_jax.models import partition
from fdg_jax.tasks import base as tasks_base
from fdg_jax.trainer import configuration
from fdg_jax.trainer.configuration import ConfigError, num_stages_of, stage_device_indices
from fdg_jax.trainer import metric_writer
from fdg_jax.trainer import optimizers as optimizer_config
from fdg_jax.trainer import prefetch
from fdg_jax.trainer import workdir as workdir_lib

# ---------------------------------------------------------------- building a run


def total_train_steps(config, steps_per_epoch: int) -> int:
  """Length of training in steps: num_train_steps, or num_epochs epochs."""
  return (config.num_train_steps if config.num_train_steps > 0
          else config.num_epochs * steps_per_epoch)


def create_compensation(config, recipe: optimizers.Recipe,
                        steps_per_epoch: int) -> compensation.Compensation:
  """The config's stale-gradient compensation (engine/compensation.py). The look-ahead ones
  rebuild a stage's optimizer from the run's recipe; delay_momentum scales by the largest
  delay, stage 0's."""
  return compensation.Compensation(
      config.compensation, dc_lambda=config.dc_lambda, dc_adaptive=config.dc_adaptive,
      dc_decay=config.dc_decay, reschedule_steps=max(1, round(
          config.lr_reschedule_fraction * total_train_steps(config, steps_per_epoch))),
      optimizer=recipe,
      nesterov_momentum=config.nesterov_momentum,
      nadam_momentum_decay=config.nadam_momentum_decay,
      delay_momentum_max=config.delay_momentum_max,
      max_delay=stage_delay(config, 0),
      ef_coefficient=config.ef_coefficient, rotation_frequency=config.rotation_frequency,
      rotation_decay=config.rotation_decay, rotation_geometry=config.rotation_geometry)


def stage_delay(config, stage: int) -> int:
  """Stage `stage`'s delay under config.method (0 without delayed gradients; with
  microbatches, in updates)."""
  method = methods.get(config.method)
  return (schedule.delay(stage, num_stages_of(config), method.schedule, config.microbatches)
          if method.delayed_gradients else 0)


def create_pipeline(config, task: tasks_base.Task, stages, recipe: optimizers.Recipe,
                    placements, num_outputs: int, steps_per_epoch: int) -> pipeline.Pipeline:
  """The engine running config.method (the registry's) on these stages."""
  method = methods.get(config.method)
  if configuration.runs_synchronously(config):   # it clips by the whole model's norm itself
    recipe = dataclasses.replace(recipe, grad_clip=0.0)
  return pipeline.Pipeline(
      stages, optimizers.build(recipe), task.loss_fn, metrics=task.metrics,
      beta=pipeline.stage_betas(config.beta, len(stages), config.beta_compounds),
      stash=config.stash, residual_policy=config.residual_policy or None, placements=placements,
      compensation=create_compensation(config, recipe, steps_per_epoch),
      method=method.create(len(stages), num_classes=num_outputs,
                           aux_head=task.aux_head() if method.local_losses else None,
                           microbatches=config.microbatches, grad_clip=config.grad_clip))


def params_digest(variables: dict) -> str:
  """sha256 over every array of `variables` in a fixed order (path, dtype, shape, bytes)."""
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(variables))[0]
  for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
    leaf = np.ascontiguousarray(leaf)
    digest.update(f'{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape}|'.encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def build_stages(config, task: tasks_base.Task, num_outputs: int, rng: jax.Array,
                 check_inputs: Optional[Any] = None, network: Optional[dict] = None):
  """Stages, their initial variables, the split and the placements; prints the stage table.

  `num_outputs` is the model's output size (classes, or the vocabulary's size). The initial
  variables are drawn from `rng`, or are `network` (the unsplit model's, another run's: see
  `source_network`). With `check_inputs` (a few inputs), checks that the composed stages
  reproduce the unsplit model on them.
  """
  blocks, names = task.create_blocks(num_outputs)
  num_stages = num_stages_of(config)
  sample = task.input_spec(config.batch_size)
  flops = partition.block_flops(blocks, sample.shape, sample.dtype)
  times = None
  if config.split_by == 'time' and num_stages > 1:
    # Measured here; in a multi-process run every process uses process 0's measurement.
    times = partition.block_times(blocks, sample.shape, sample.dtype)
    times = list(distributed.broadcast_values(
        {str(i): t for i, t in enumerate(times)}, [str(i) for i in range(len(times))],
        0).values())
  split = tuple(config.split) if num_stages > 1 and config.split else (
      partition.balanced_split(times or flops, num_stages))
  full_model = partition.StageModule(tuple(blocks))
  one = task.input_spec(1)
  def init(key):
    return full_model.init({'params': key, 'dropout': key}, jnp.zeros(one.shape, one.dtype),
                           train=False)
  if network is None:
    full_variables = jax.jit(init)(rng)
  else:
    check_network_fits(network, jax.eval_shape(init, rng), config.init_from)
    full_variables = network
  stages = partition.build_stages(blocks, split)
  stage_variables = partition.split_variables(full_variables, split, len(blocks))
  devices = jax.devices()
  placements = [[devices[i] for i in stage] for stage in stage_device_indices(config)]
  table = partition.stage_table(
      split, names, [partition.count_params(v['params']) for v in stage_variables], flops,
      placements, times)
  if jax.process_index() == 0:
    method = config.method + (f', compensation {config.compensation}'
                              if config.compensation != 'none' else '')
    print(f'Stages of {config.model} ({method}, K={num_stages}):\n{table}', flush=True)
  if check_inputs is not None:
    partition.check_composition(full_model, full_variables, stages, stage_variables,
                                jnp.asarray(check_inputs))
  return stages, stage_variables, split, placements


@dataclasses.dataclass
class Run:
  """A pipeline and its initial state, as `train_and_evaluate` trains them."""
  pipe: pipeline.Pipeline
  state: pipeline.PipelineState
  split: tuple[int, ...]
  placements: list[list[jax.Device]]   # each stage's devices
  recipe: optimizers.Recipe            # the optimizer; its learning_rate is the run's schedule


def initial_run(config, task: tasks_base.Task, num_outputs: int, steps_per_epoch: int,
                check_inputs: Optional[Any] = None, network: Optional[dict] = None) -> Run:
  """Stages, optimizer, engine and initial state from the config's seed, or with the network
  `network` (see `build_stages`)."""
  rng = jax.random.key(config.seed)
  stages, stage_variables, split, placements = build_stages(config, task, num_outputs, rng,
                                                            check_inputs, network)
  recipe = optimizer_config.recipe(config, steps_per_epoch)
  pipe = create_pipeline(config, task, stages, recipe, placements, num_outputs, steps_per_epoch)
  state = pipe.init(jax.random.fold_in(rng, 1), task.input_spec(config.batch_size),
                    variables=stage_variables)
  return Run(pipe, state, split, placements, recipe)


def dry_run(config) -> None:
  """Validate the config and print the stage table, training nothing (and reading no data
  where the config alone gives the model's output size)."""
  task = configuration.validate_config(config)
  num_outputs = task.known_num_outputs()
  if num_outputs is None:
    num_outputs = task.num_outputs(task.load_data())
  build_stages(config, task, num_outputs, jax.random.key(config.seed))


def check_network_fits(network: dict, expected: dict, source: str) -> None:
  """Another run's network must have this model's arrays, shape for shape (`expected`: the
  model's initial variables, or their shapes); a head of another number of classes does not."""
  def shapes(tree):
    return {jax.tree_util.keystr(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
  have, want = shapes(network), shapes(expected)
  for key in sorted(set(have) | set(want)):
    if have.get(key) != want.get(key):
      raise ConfigError(
          f'config.init_from: the network of the run in {source!r} does not fit this model: '
          f'{key} is {have.get(key, "missing")} there and {want.get(key, "missing")} here. '
          'Start from a run of the same model on data with as many classes.')


# ---------------------------------------------------------------- a run restored from its workdir


@dataclasses.dataclass
class Restored:
  """A run at its latest checkpoint, in this process's pipeline (`restore_latest`)."""
  run: Run
  state: pipeline.PipelineState
  method: str        # config.method of the run
  step: int          # the checkpoint's step
  completed: bool    # its batches in flight completed (False: the stages as checkpointed)

  def note(self) -> str:
    """What was restored, e.g. 'fdg K=2, step 12, its batches in flight completed'."""
    return (f'{self.method} K={self.run.pipe.num_stages}, step {self.step}, '
            + ('its batches in flight completed' if self.completed else 'as checkpointed'))

  def network(self, task: tasks_base.Task) -> Optional[dict]:
    return merged_network(self.run, self.state, task)


def merged_network(run: Run, state: pipeline.PipelineState,
                   task: tasks_base.Task) -> Optional[dict]:
  """The unsplit model's variables (params, batch_stats) as numpy arrays on process 0 (None on
  the others; every process must call it)."""
  stages = run.pipe.gathered_variables(state, process=0)
  return None if stages is None else partition.merge_variables(stages, run.split,
                                                               task.num_blocks())


def restore_latest(config, task: tasks_base.Task, workdir: str, dataset,
                   num_outputs: int) -> Restored:
  """The run in `workdir` at its latest checkpoint, in this config's pipeline (one process
  joins the files of a run of several: `checkpoint.restore_joined`), with the batches it had in
  flight completed as the trainer completes them after its last step, so that a finished run
  gives the network of its final evaluation. `dataset` None (its training data unreadable): the
  stages as checkpointed, nothing completed."""
  if dataset is not None:
    steps_per_epoch, batch_inputs = task.steps_per_epoch(dataset), task.stream_inputs(dataset)
  else:   # what the saved forwards are rebuilt from does not matter when nothing is completed
    spec = task.input_spec(config.batch_size)
    steps_per_epoch, batch_inputs = 1, lambda batch: np.zeros(spec.shape, spec.dtype)
  run = initial_run(config, task, num_outputs, steps_per_epoch)
  if jax.process_count() == 1 and checkpoint.written_by(workdir) == checkpoint.PROCESSES:
    state, step = checkpoint.restore_joined(workdir, run.pipe, run.state, batch_inputs)
  else:
    checkpointer = checkpoint.Checkpointer(workdir)
    try:
      step = checkpointer.latest_step()
      state, _ = checkpointer.restore(run.pipe, run.state, batch_inputs=batch_inputs)
    finally:
      checkpointer.close()
  if dataset is not None:
    state, _ = run.pipe.drain(state)
  return Restored(run, state, config.method, step, completed=dataset is not None)


def _keep_tensorflow_off_accelerators() -> None:
  """tfds reads through TensorFlow, which would take the accelerators' memory."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:   # TensorFlow's devices are set up already (the trainer hid them)
    pass


def restore_run(workdir: str, data_dir: Optional[str] = None,
                num_outputs: Optional[int] = None, unreadable_fix: str = ''):
  """(config, task, Restored): the run in `workdir` restored in this process as its config.json
  describes it (`workdir.saved_config`; `restore_latest`): with fewer devices than it used,
  every stage on the first; a split it measured (split_by='time') as its summary records it.
  `data_dir`: where its training data are now, if they moved. Unreadable training data are a
  warning (ending with `unreadable_fix`): the stages as checkpointed, with `num_outputs` outputs
  where the config does not say."""
  config = workdir_lib.saved_config(workdir)
  num_devices = 1 + max(d for stage in stage_device_indices(config) for d in stage)
  if jax.device_count() < num_devices:   # accelerators, fewer than the run's
    logging.warning('The run in %s used %d devices and JAX sees %d: every stage goes on device '
                    '0.', workdir, num_devices, jax.device_count())
    config.stage_devices, config.data_parallel = (0,), 1
  summary_path = os.path.join(workdir, workdir_lib.SUMMARY_FILE)
  if config.split_by == 'time' and not config.split and os.path.exists(summary_path):
    with open(summary_path) as f:   # measuring again could split otherwise
      config.split = tuple(json.load(f)['stage_split'])
  if data_dir:
    config.data_dir = data_dir
  task = configuration.create_task(config)
  dataset = None
  try:
    if configuration.reads_tfds(config):
      _keep_tensorflow_off_accelerators()
    dataset = task.load_data(workdir)   # checks the data against what the run stored
  except (data_lib.DataError, ImportError) as e:
    num_outputs = num_outputs or task.known_num_outputs()
    if num_outputs is None:
      raise
    logging.warning('The training data of the run in %s are not readable (%s): its stages as '
                    'checkpointed, without completing their batches in flight. %s', workdir, e,
                    unreadable_fix)
  if dataset is not None:
    num_outputs = task.num_outputs(dataset)
  return config, task, restore_latest(config, task, workdir, dataset, num_outputs)


def source_network(config, num_outputs: int) -> tuple[dict, dict]:
  """config.init_from's network: the unsplit model's variables of the run in that workdir at
  its latest checkpoint, its batches in flight completed (`restore_run`), and where it came
  from (the summary's `init_from`)."""
  logging.info('Restoring the run in %s, whose network starts this run.', config.init_from)
  source_config, source_task, restored = restore_run(
      os.path.expanduser(config.init_from), num_outputs=num_outputs,
      unreadable_fix="Make them readable at its config.data_dir to start from its final "
                     'network.')
  return restored.network(source_task), {
      'workdir': config.init_from, 'step': restored.step, 'method': source_config.method,
      'num_stages': restored.run.pipe.num_stages, 'completed': restored.completed}


# ---------------------------------------------------------------- the periodic actions


def every(step: int, period: int) -> bool:
  """True at multiples of `period` (never if it is 0): the one rule of every periodic action."""
  return bool(period) and step % period == 0


@dataclasses.dataclass
class _Clock:
  """Time and step of the last progress line; the first interval after a (re)start holds the
  compilation, so it gives no ETA."""
  time: float
  step: int
  compiled: bool = False


@dataclasses.dataclass(frozen=True)
class RunLog:
  """What the periodic actions write with, fixed for a run."""
  writer: Any
  num_steps: int
  steps_per_epoch: int
  learning_rate: optax.Schedule
  items_per_step: int    # images or tokens in a batch
  items: str             # what they are ('images', 'tokens')
  loss_process: int      # the process of the last stage, which holds the training metrics
  metrics: tuple[str, ...] = ('loss', 'accuracy')   # the names of the task's training metrics


# How the progress line names a metric.
_SHORT_NAMES = {'accuracy': 'acc'}


def log_train(log: RunLog, clock: _Clock, step: int, metrics: Optional[Any],
              trained: bool) -> Optional[float]:
  """Writes the training metrics since the last line and prints one progress line; returns the
  loss (None if the last stage has not `trained` since the last line: pipeline fill).

  The metrics live on the last stage's process; in a multi-process run every process calls
  this and gets them from there.
  """
  if not trained:
    return None
  values = None if metrics is None else {
      f'train_{k}': float(v) for k, v in distributed.fetch(metrics).compute().items()}
  values = distributed.broadcast_values(values, tuple(f'train_{name}' for name in log.metrics),
                                        log.loss_process)
  now = time.time()
  seconds_per_step = (now - clock.time) / max(step - clock.step, 1)
  values.update({'learning_rate': float(log.learning_rate(step - 1)),
                 f'{log.items}_per_sec': log.items_per_step / seconds_per_step})
  log.writer.write_scalars(step, values)
  eta = (f'ETA {_format_duration((log.num_steps - step) * seconds_per_step)}' if clock.compiled
         else 'compilation included')
  shown = '  '.join(f'{_SHORT_NAMES.get(name, name)} {values["train_" + name]:.3f}'
                    for name in log.metrics if name != 'loss')
  logging.info('step %d/%d  epoch %.2f  loss %.4f  %s  lr %.4g  %.0f %s/s  %s',
               step, log.num_steps, step / log.steps_per_epoch, values['train_loss'], shown,
               values['learning_rate'], values[f'{log.items}_per_sec'], log.items, eta)
  clock.time, clock.step, clock.compiled = now, step, True
  return values['train_loss']


def evaluate(task: tasks_base.Task, data, pipe: pipeline.Pipeline,
             state: pipeline.PipelineState, writer, step: int) -> dict:
  """The composed stages' metrics on the evaluation split, written and printed."""
  result = pipe.evaluate(state, task.eval_batches(data))
  writer.write_scalars(step, {f'{task.EVAL_SPLIT}_{k}': v for k, v in result.items()})
  logging.info('step %d  %s', step, task.eval_line(result))
  return result


def save_checkpoint(checkpointer: checkpoint.Checkpointer, pipe: pipeline.Pipeline,
                    state: pipeline.PipelineState, step: int, extra: dict,
                    batch_inputs: Callable[[int], np.ndarray]) -> None:
  """Checkpoint the pipeline as it is (in flight); never a diverged state. One line each."""
  workdir_lib.check_finite(state, step, None, checkpointer)
  start = time.time()
  size = checkpointer.save(step, pipe, state, extra=extra, batch_inputs=batch_inputs)
  logging.info('step %d  checkpoint saved (%s, training held %.2f s%s) in %s', step,
               _format_bytes(size), time.time() - start,
               '; written in the background' if checkpointer.asynchronous else '',
               checkpointer.directory)


def draw_timeline(recorder: timeline.TimelineRecorder, state: pipeline.PipelineState, config,
                  workdir: str) -> None:
  """Stop the recorder and draw WORKDIR/timeline.png; a timeline that cannot be drawn is a
  warning, never the end of a run."""
  path = os.path.join(workdir, 'timeline.png')
  try:
    events = recorder.stop(state)   # every process's stage calls (all processes call it)
    if jax.process_index() == 0:
      timeline.draw_timeline(events, path, title=(
          f'{config.model} {config.method} K={num_stages_of(config)}, batch '
          f'{config.batch_size}, steps {config.timeline_start_step}..'
          f'{config.timeline_start_step + config.timeline_num_steps - 1}'))
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('No timeline drawn (training goes on): %s: %s', type(e).__name__, e)
    return
  stats = timeline.summarize(events)
  logging.info('Timeline of %d stage calls in %s: %s', len(events), path,
               ', '.join(f'{k} {v:.3g}' for k, v in stats.items()))


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s'


def _format_bytes(size: int) -> str:
  return f'{size / 2**20:.1f} MiB' if size >= 2**20 else f'{size / 2**10:.1f} KiB'


def _merge(total, metrics):
  return metrics if total is None else total if metrics is None else total.merge(metrics)


# ---------------------------------------------------------------- the run


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Train per `config`, evaluate the composed model, write and return the summary.

  A workdir with a checkpoint resumes from it (the config may change only in
  `workdir.RESUMABLE_FIELDS`); the result is bit-identical to a run that was never interrupted.
  With config.init_from a new run starts from that run's network (`source_network`), evaluated
  once before its first step; with config.eval_only nothing is trained: `evaluate_checkpoint`.
  In a multi-process run (after `distributed.initialize`) every process calls this with the same
  config and workdir; process 0 writes and returns the summary, the others return None.
  """
  task = configuration.validate_config(config)
  if config.eval_only:
    return evaluate_checkpoint(config, task, workdir)
  workdir_lib.check_init_from(config, task, workdir)
  workdir_lib.check_config_matches(config, workdir, task)
  dataset = task.load_data(workdir)
  steps_per_epoch = task.steps_per_epoch(dataset)
  if steps_per_epoch == 0:
    raise ConfigError(f'config.batch_size: {config.batch_size} is larger than the '
                      f'{task.num_train_examples(dataset)} training examples. Use a smaller '
                      'batch.')
  num_steps = total_train_steps(config, steps_per_epoch)
  checkpointer = checkpoint.Checkpointer(workdir, asynchronous=True)
  workdir_lib.check_resumable(workdir, checkpointer.latest_step(), num_steps)
  with workdir_lib.log_file(workdir):
    try:
      return _train(config, task, workdir, dataset, steps_per_epoch, num_steps, checkpointer)
    finally:
      checkpointer.close()   # the last checkpoint is on disk before the run ends, however


def _train(config, task: tasks_base.Task, workdir: str, dataset, steps_per_epoch: int,
           num_steps: int, checkpointer: checkpoint.Checkpointer) -> dict[str, Any]:
  logging.info('Data: %s', task.describe(dataset))
  network, init_from = None, None
  if config.init_from and checkpointer.latest_step() is None:   # else: resumed below
    network, init_from = source_network(config, task.num_outputs(dataset))
  run = initial_run(config, task, task.num_outputs(dataset), steps_per_epoch,
                    check_inputs=task.check_inputs(dataset), network=network)
  pipe, state = run.pipe, run.state
  if init_from is not None:
    init_from['params_digest'] = params_digest(merged_network(run, state, task))
    logging.info('Network from the run in %s (%s K=%d, step %d, %s); params digest %s.',
                 init_from['workdir'], init_from['method'], init_from['num_stages'],
                 init_from['step'], 'its batches in flight completed' if init_from['completed']
                 else 'as checkpointed', init_from['params_digest'][:16])
  extra_params = pipe.num_extra_params(state)
  if extra_params:
    logging.info('%s: %s extra trainable parameters outside the network (auxiliary heads), not '
                 'counted in the table above.', config.method, f'{extra_params:,}')
  start_step, progress = 0, {'history': [], 'train_time_s': 0.0, 'init_from': init_from}
  batch_inputs = task.stream_inputs(dataset)
  if checkpointer.latest_step() is not None:
    state, progress = checkpointer.restore(pipe, state, batch_inputs=batch_inputs)
    start_step = state.batches_fed
    logging.info('Resumed from the checkpoint at step %d in %s.', start_step,
                 checkpointer.directory)
  speaker = jax.process_index() == 0
  if speaker:
    workdir_lib.keep_previous_summary(workdir, start_step)
    workdir_lib.write_json(os.path.join(workdir, workdir_lib.CONFIG_FILE),
                           workdir_lib.jsonable(config))
  writer = metric_writer.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  writer.write_hparams({k: str(v) if isinstance(v, (tuple, list)) else v
                        for k, v in config.to_dict().items()})

  # Inputs to the first stage, targets to the last, where this process owns them; a process
  # without stage 0 may take only the targets (and the inputs' shape) from its copy of the stream.
  batches = prefetch.prefetch_to_device(
      task.train_batches(dataset, start_step, with_inputs=pipe.is_local[0]), 2,
      tuple(s if local else None for s, local in zip((pipe.shardings[0], pipe.shardings[-1]),
                                                     (pipe.is_local[0], pipe.is_local[-1]))))
  log = RunLog(writer=writer, num_steps=num_steps, steps_per_epoch=steps_per_epoch,
               learning_rate=run.recipe.learning_rate, items_per_step=task.items_per_step(),
               items=task.ITEMS, loss_process=distributed.process_of(pipe.shardings[-1]),
               metrics=stage_functions.metric_names(task.metrics))
  eval_every = config.eval_every_steps or config.eval_every_epochs * steps_per_epoch
  report_progress = metric_writer.ReportProgress(num_train_steps=num_steps, writer=writer)
  history = list(progress['history'])
  logging.info('Training steps %d..%d (%.2f epochs of %d steps). The first iterations compile '
               "each stage's functions; that can take a while.", start_step + 1, num_steps,
               num_steps / steps_per_epoch, steps_per_epoch)
  start = time.time()
  clock = _Clock(time=start, step=start_step)
  train_metrics, trained, recorder = None, False, None
  # Seconds spent evaluating (and sampling), so each evaluation records the run's time without
  # them: `train_s`, what a time-to-loss comparison reads (compilation included).
  eval_time = progress.get('eval_time_s', 0.0)

  def checkpoint_extra():
    return {'history': history, 'train_time_s': progress['train_time_s'] + time.time() - start,
            'eval_time_s': eval_time, 'init_from': progress.get('init_from')}

  def evaluate_now(step):
    nonlocal eval_time
    began = time.time()
    result = evaluate(task, dataset, pipe, state, writer, step)
    history.append({'step': step, 'epoch': step / steps_per_epoch, **task.eval_record(result),
                    'train_s': progress['train_time_s'] + began - start - eval_time})
    shown = task.after_evaluation(dataset, pipe, state, step, workdir, writer)
    eval_time += time.time() - began
    return {**result, **shown}

  if init_from is not None:
    evaluate_now(0)   # the network it starts from, on this run's data (nanoGPT's iteration 0)
  timeline_end = config.timeline_start_step + config.timeline_num_steps - 1
  with workdir_lib.PreemptionSignals() as signals:
    for step in range(start_step + 1, num_steps + 1):
      if config.timeline_start_step and step == config.timeline_start_step:
        recorder = timeline.TimelineRecorder(pipe, os.path.join(workdir, 'timeline'))
        recorder.start(state)
      inputs, targets = next(batches)
      state, info = pipe.step(state, inputs, targets)
      train_metrics = _merge(train_metrics, info.metrics)
      trained = trained or info.updated[-1] is not None
      if recorder:
        recorder.add(info)
        if step in (timeline_end, num_steps):
          draw_timeline(recorder, state, config, workdir)
          recorder = None
      report_progress(step)
      if signals.stop_now(step):
        save_checkpoint(checkpointer, pipe, state, step, checkpoint_extra(), batch_inputs)
        raise workdir_lib.Preempted(
            f'Stopped by {signals.received} at step {step}; checkpoint saved in '
            f'{checkpointer.directory}. Resume by running the same command again.')
      if step == num_steps:
        break   # the last step's metrics are logged after the drain, its evaluation at the end
      if every(step, config.log_every_steps):
        loss = log_train(log, clock, step, train_metrics, trained)
        workdir_lib.check_finite(state, step, loss, checkpointer)
        train_metrics, trained = None, False
      if every(step, eval_every):
        evaluate_now(step)
      if every(step, config.checkpoint_every_steps):
        save_checkpoint(checkpointer, pipe, state, step, checkpoint_extra(), batch_inputs)
    if checkpointer.latest_step() != num_steps:
      # Before the drain: a longer run continues this stream.
      save_checkpoint(checkpointer, pipe, state, num_steps, checkpoint_extra(), batch_inputs)
  state, drained = pipe.drain(state)   # every batch's gradient reaches every stage
  for info in drained:
    train_metrics = _merge(train_metrics, info.metrics)
    trained = trained or info.updated[-1] is not None
  loss = log_train(log, clock, num_steps, train_metrics, trained)
  workdir_lib.check_finite(state, num_steps, loss, checkpointer)
  jax.block_until_ready([s for s in state.stages if s is not None])
  train_time = progress['train_time_s'] + time.time() - start
  result = evaluate_now(num_steps)
  writer.flush()
  writer.close()
  items_per_sec = (num_steps - start_step) * log.items_per_step / (
      train_time - progress['train_time_s'])
  summary = make_summary(config, task, dataset, run, state, result, log,
                         start_step=start_step, train_time=train_time,
                         items_per_sec=items_per_sec, history=history,
                         init_from=progress.get('init_from'))
  if not speaker:
    return None
  path = os.path.join(workdir, workdir_lib.SUMMARY_FILE)
  workdir_lib.write_json(path, summary)
  logging.info('%s after %d steps; summary in %s', task.final_line(summary), num_steps, path)
  return summary


def make_summary(config, task: tasks_base.Task, data, run: Run, state: pipeline.PipelineState, result: dict,
                 log: RunLog, *, start_step: int, train_time: float, items_per_sec: float,
                 history: list, init_from: Optional[dict] = None) -> Optional[dict[str, Any]]:
  """The run's summary.json: what ran, on what, its result (the task's fields), and a digest of
  its parameters (on process 0, which gathers every stage's variables; None on the others);
  `init_from`: the run whose network it started from (`source_network`), None: its seed."""
  pipe = run.pipe
  final_variables = pipe.gathered_variables(state, process=0)
  extra_params = pipe.num_extra_params(state)
  if final_variables is None:
    return None
  return {
      'task': config.task,
      'model': config.model,
      'dataset': getattr(data, 'name', config.dataset),
      'method': config.method,
      'num_stages': pipe.num_stages,
      'microbatches': config.microbatches,
      'beta': config.beta,
      'beta_compounds': config.beta_compounds,
      'stash': config.stash,
      'residual_policy': config.residual_policy,
      'compensation': config.compensation,
      'optimizer': config.optimizer,
      'steps': log.num_steps,
      'epochs': log.num_steps / log.steps_per_epoch,
      'batch_size': config.batch_size,
      **task.summary_fields(data, result, items_per_sec),
      **{key: result[key] for key in ('sample',) if key in result},
      'train_time_s': train_time,
      'resumed_from_step': start_step,
      'init_from': init_from,
      # This process's peak resident memory (on CPU it holds the devices' arrays too).
      'peak_host_memory_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      'trainable_params': sum(partition.count_params(v['params']) for v in final_variables),
      'extra_params': extra_params,
      'stage_split': list(run.split),
      'devices': [str(d) for stage in run.placements for d in stage],
      'data_parallel': config.data_parallel,
      'num_processes': jax.process_count(),
      'jax_version': jax.__version__,
      'params_digest': params_digest(
          partition.merge_variables(final_variables, run.split, task.num_blocks())),
      'history': history,
  }


# ---------------------------------------------------------------- evaluation only


def evaluate_checkpoint(config: ml_collections.ConfigDict, task: tasks_base.Task,
                        workdir: str) -> Optional[dict[str, Any]]:
  """config.eval_only: the run in `workdir` at its latest checkpoint, its batches in flight
  completed (`restore_latest`: a finished run gives its final evaluation's numbers), evaluated on
  the task's evaluation split; the result logged (in log.txt too) and written to
  WORKDIR/eval_summary.json. Nothing is trained or saved, and the run's own files (summary,
  config, checkpoints, TensorBoard events) are left as they are. The config must be the run's
  (only the resumable fields, e.g. eval_batch_size, may change). Returns the evaluation's
  summary on process 0, None on the others."""
  workdir_lib.check_evaluable(workdir)
  workdir_lib.check_config_matches(config, workdir, task)
  dataset = task.load_data(workdir)
  with workdir_lib.log_file(workdir):
    logging.info('Evaluation only of the run in %s. Data: %s', workdir, task.describe(dataset))
    start = time.time()
    restored = restore_latest(config, task, workdir, dataset, task.num_outputs(dataset))
    writer = metric_writer.create_default_writer(workdir, just_logging=True)   # no event files
    result = evaluate(task, dataset, restored.run.pipe, restored.state, writer, restored.step)
    network = restored.network(task)
    if network is None:
      return None
    summary = {
        'eval_only': True,
        'task': config.task,
        'model': config.model,
        'dataset': getattr(dataset, 'name', config.dataset),
        'method': config.method,
        'num_stages': restored.run.pipe.num_stages,
        'checkpoint_step': restored.step,
        'restored': restored.note(),
        'eval_batch_size': config.eval_batch_size,
        **task.eval_record(result),
        'eval_time_s': time.time() - start,
        'devices': [str(d) for stage in restored.run.placements for d in stage],
        'num_processes': jax.process_count(),
        'jax_version': jax.__version__,
        'params_digest': params_digest(network),
    }
    path = os.path.join(workdir, workdir_lib.EVAL_SUMMARY_FILE)
    workdir_lib.write_json(path, summary)
    logging.info('Evaluated the checkpoint (%s); nothing trained. Evaluation in %s',
                 restored.note(), path)
  return summary
