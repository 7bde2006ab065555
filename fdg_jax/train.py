"""Training and evaluation: builds the stages from a config, drives the pipeline, logs, summarises.

`train_and_evaluate(config, workdir)` is what `python -m fdg_jax.main` calls, and what a notebook
calls too. Every check of the config runs before any data is read or anything is compiled.
"""

import hashlib
import json
import os
import signal
import threading
import time
from typing import Any, Optional, Sequence

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fdg_jax import baselines
from fdg_jax import checkpoint
from fdg_jax import input_pipeline
from fdg_jax import models
from fdg_jax import partition
from fdg_jax import pipeline
from fdg_jax import timeline

METHODS = ('fdg', 'bp', 'ddg', 'dgl')
DATASETS = ('cifar10', 'cifar100', 'cifar_python', 'imagefolder')
SUMMARY_FILE = 'summary.json'
CONFIG_FILE = 'config.json'


class ConfigError(ValueError):
  """A config that cannot run; the message names the field and the fix."""


def _device_count() -> int:
  return len(jax.devices())


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raise ConfigError for the first bad field, before any compute."""
  def fail(field, problem, fix):
    raise ConfigError(f'config.{field}: {problem}. {fix}')

  if config.model not in models.MODEL_NAMES:
    fail('model', f'unknown model {config.model!r}', f'Choose one of {models.MODEL_NAMES}.')
  if config.method not in METHODS:
    fail('method', f'unknown method {config.method!r}', f'Choose one of {METHODS}.')
  if config.dataset not in DATASETS:
    fail('dataset', f'unknown dataset {config.dataset!r}', f'Choose one of {DATASETS}.')
  if config.dataset in ('imagefolder', 'cifar_python'):
    if not config.data_dir:
      fail('data_dir', f'dataset={config.dataset!r} needs data_dir',
           'Set --config.data_dir to a folder or .tar/.tar.gz archive with train/<class>/* and '
           'test/<class>/* images (imagefolder), or to an extracted cifar-10-batches-py or '
           'cifar-100-python folder (cifar_python).')
    if not os.path.exists(config.data_dir):
      fail('data_dir', f'{config.data_dir!r} does not exist', 'Check the path.')
  if config.method == 'dgl' and config.aux_head not in baselines.AUX_HEADS:
    fail('aux_head', f'unknown auxiliary head {config.aux_head!r}',
         f'Choose one of {tuple(baselines.AUX_HEADS)}.')
  if not 0.0 < config.beta <= 1.0:
    fail('beta', f'{config.beta} is outside (0, 1]', 'Use 0 < beta <= 1 (1 disables shrinking).')
  if config.stash not in pipeline.STASH_MODES:
    fail('stash', f'unknown stash {config.stash!r}', f'Choose one of {pipeline.STASH_MODES}.')
  if config.residual_policy and config.residual_policy not in pipeline.RESIDUAL_POLICIES:
    fail('residual_policy', f'unknown policy {config.residual_policy!r}',
         f"Choose one of {pipeline.RESIDUAL_POLICIES}, or '' to keep every residual.")
  if config.residual_policy and (config.stash != 'vjp' or config.method == 'dgl'):
    fail('residual_policy', f"{config.residual_policy!r} needs stash 'vjp' and method fdg, "
         f'ddg or bp (got stash {config.stash!r}, method {config.method!r})',
         "Set --config.residual_policy=''.")
  for field in ('batch_size', 'eval_batch_size', 'log_every_steps', 'image_size',
                'timeline_num_steps'):
    if config[field] <= 0:
      fail(field, f'{config[field]} is not positive', 'Use a positive integer.')
  if config.num_train_steps == 0 or config.num_train_steps < -1:
    fail('num_train_steps', f'{config.num_train_steps} is not a length',
         'Use a positive number of steps, or -1 to train num_epochs epochs.')
  if config.num_train_steps == -1 and config.num_epochs <= 0:
    fail('num_epochs', f'{config.num_epochs} is not positive', 'Use a positive number.')
  if config.learning_rate <= 0 or config.warmup_lr <= 0:
    fail('learning_rate', 'learning rates must be positive', 'Use lr > 0 and warmup_lr > 0.')
  for field in ('warmup_epochs', 'eval_every_epochs', 'checkpoint_every_steps',
                'timeline_start_step'):
    if config[field] < 0:
      fail(field, f'{config[field]} is negative', 'Use 0 or more (0 turns it off).')
  num_stages = num_stages_of(config)
  if num_stages < 1:
    fail('num_stages', f'{config.num_stages} stages', 'Use at least 1.')
  num_blocks = len(models.block_names(config.model))
  if num_stages > num_blocks:
    fail('num_stages', f'{num_stages} stages but {config.model} has only {num_blocks} blocks',
         f'Use at most {num_blocks} stages.')
  if config.method != 'bp' and config.split:
    if len(config.split) != num_stages - 1:
      fail('split', f'{tuple(config.split)} has {len(config.split)} entries for {num_stages} '
           'stages', f'Give {num_stages - 1} block indices, or () to balance automatically.')
    try:
      partition.stage_ranges(config.split, num_blocks)
    except ValueError as e:
      fail('split', str(e), 'Fix the block indices.')
  if config.stage_devices:
    if len(config.stage_devices) != num_stages:
      fail('stage_devices', f'{len(config.stage_devices)} entries for {num_stages} stages',
           'Give one device index per stage.')
    bad = [d for d in config.stage_devices if not 0 <= d < _device_count()]
    if bad:
      fail('stage_devices', f'device indices {bad} do not exist ({_device_count()} devices)',
           f'Use indices in 0..{_device_count() - 1}.')
  elif num_stages > _device_count():
    fail('num_stages', f'{num_stages} stages but JAX sees {_device_count()} device(s)',
         'Use fewer stages, map stages to devices with --config.stage_devices (e.g. all on '
         'device 0 to simulate), or on CPU set XLA_FLAGS=--xla_force_host_platform_device_count'
         f'={num_stages} before starting.')


def num_stages_of(config) -> int:
  return 1 if config.method == 'bp' else config.num_stages


def create_learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  """Warm-up at warmup_lr, then learning_rate divided at each boundary (in optimizer steps)."""
  warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
  boundaries = {int(round(epoch * steps_per_epoch)) - warmup_steps: config.lr_decay_factor
                for epoch in config.lr_boundaries_epochs}
  main = optax.piecewise_constant_schedule(config.learning_rate, boundaries)
  if not warmup_steps:
    return main
  return optax.join_schedules([optax.constant_schedule(config.warmup_lr), main], [warmup_steps])


def create_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
  """SGD with momentum and weight decay coupled into the gradient, as PyTorch's SGD."""
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(create_learning_rate_schedule(config, steps_per_epoch),
                momentum=config.momentum or None))


def create_pipeline(config, stages, optimizer, placements, num_classes: int
                    ) -> pipeline.Pipeline:
  """The engine of config.method on these stages (BP is the single stage of FDG's engine)."""
  loss = pipeline.cross_entropy_loss
  if config.method == 'dgl':
    return baselines.DGLPipeline(stages, optimizer, loss, num_classes=num_classes,
                                 aux_head=config.aux_head, placements=placements)
  engine = baselines.DDGPipeline if config.method == 'ddg' else pipeline.Pipeline
  return engine(stages, optimizer, loss, beta=config.beta, stash=config.stash,
                residual_policy=config.residual_policy or None, placements=placements)


def params_digest(variables: dict) -> str:
  """sha256 over every array of `variables` in a fixed order (path, dtype, shape, bytes)."""
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(variables))[0]
  for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
    leaf = np.ascontiguousarray(leaf)
    digest.update(f'{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape}|'.encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def _placements(config, num_stages: int) -> list[jax.Device]:
  devices = jax.devices()
  return [devices[i] for i in (config.stage_devices or range(num_stages))]


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s'


def build(config, dataset: input_pipeline.Dataset, rng: jax.Array):
  """Stages, their initial variables and the split, printed as a table and checked."""
  blocks = models.create_blocks(config.model, dataset.num_classes,
                                dropout_rate=config.dropout_rate)
  names = models.block_names(config.model)
  num_stages = num_stages_of(config)
  sample_shape = (config.batch_size, config.image_size, config.image_size, 3)
  flops = partition.block_flops(blocks, sample_shape)
  split = tuple(config.split) if config.method != 'bp' and config.split else (
      partition.balanced_split(flops, num_stages))
  full_model = partition.StageModule(tuple(blocks))
  full_variables = jax.jit(lambda key: full_model.init(
      {'params': key, 'dropout': key}, jnp.zeros(sample_shape[1:])[None], train=False))(rng)
  stages = partition.build_stages(blocks, split)
  stage_variables = partition.split_variables(full_variables, split, len(blocks))
  placements = _placements(config, num_stages)
  table = partition.stage_table(
      split, names, [partition.count_params(v['params']) for v in stage_variables], flops,
      placements)
  print(f'Stages of {config.model} ({config.method}, K={num_stages}):\n{table}', flush=True)
  sample = jnp.asarray(_normalise(dataset, dataset.test_images[:8]))
  partition.check_composition(full_model, full_variables, stages, stage_variables, sample)
  return stages, stage_variables, split, placements


def _normalise(dataset, images):
  mean, std = np.asarray(dataset.mean, np.float32), np.asarray(dataset.std, np.float32)
  return (images.astype(np.float32) / 255.0 - mean) / std


# Fields that change only the length or the logging of a run: a resumed run may change them.
RESUMABLE_FIELDS = frozenset({
    'num_epochs', 'num_train_steps', 'log_every_steps', 'eval_every_epochs',
    'checkpoint_every_steps', 'eval_batch_size', 'cache_dir', 'timeline_start_step',
    'timeline_num_steps'})

# Fields added after runs could be checkpointed, with the value that computes what such a run
# did: a saved config without one of them resumes as if it held that value.
ADDED_FIELDS = {'residual_policy': ''}


class DivergenceError(FloatingPointError):
  """A non-finite loss or parameter; the message names the step, the stage and the checkpoint."""


class Preempted(RuntimeError):
  """Stopped by SIGTERM/SIGINT after saving a checkpoint; the message says how to resume."""


def _jsonable(config) -> dict:
  return json.loads(config.to_json())


def _write_json(path: str, value) -> None:
  """Write atomically: a crash leaves the old file or the new one, never half of one."""
  with open(path + '.tmp', 'w') as f:
    json.dump(value, f, indent=2)
  os.replace(path + '.tmp', path)


def _check_config_matches_workdir(config, workdir: str) -> None:
  """A workdir's saved config may differ from this one only in RESUMABLE_FIELDS."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = {**ADDED_FIELDS, **json.load(f)}
  current = _jsonable(config)
  differing = sorted(k for k in set(saved) | set(current)
                     if k not in RESUMABLE_FIELDS and saved.get(k) != current.get(k))
  if differing:
    details = ', '.join(f'{k}: {saved.get(k)!r} there, {current.get(k)!r} here' for k in differing)
    raise ConfigError(
        f'workdir {workdir!r} holds a run with a different computation ({details}). Only the '
        f'length and logging fields ({", ".join(sorted(RESUMABLE_FIELDS))}) may change when '
        'resuming. Use a new --workdir, or the saved config.')


def _check_resumable(workdir: str, latest_step: Optional[int], num_steps: int) -> None:
  finished = os.path.exists(os.path.join(workdir, SUMMARY_FILE))
  if latest_step is not None and latest_step > num_steps:
    raise ConfigError(
        f'config.num_train_steps: the checkpoint in {workdir!r} is at step {latest_step}, past '
        f'the {num_steps} steps asked for. Ask for more steps, or use a new --workdir.')
  if finished and (latest_step is None or latest_step == num_steps):
    raise ConfigError(
        f'workdir {workdir!r} already holds a finished run of {num_steps} steps; nothing is '
        'overwritten. Raise config.num_train_steps (or num_epochs) to continue it, or choose '
        'a new --workdir.')


class _PreemptionSignals:
  """Turns SIGTERM and SIGINT into a flag the loop checks at the next iteration boundary."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _check_finite(state: pipeline.PipelineState, step: int, loss: Optional[float],
                  checkpoint_dir: str, latest_step: Optional[int]) -> None:
  """Raise DivergenceError for a non-finite loss or parameter (reads one bool per stage)."""
  finite = jax.device_get([
      jax.tree_util.tree_reduce(jnp.logical_and, jax.tree_util.tree_map(
          lambda x: jnp.isfinite(x).all(), stage.params)) for stage in state.stages])
  bad_stages = [k for k, ok in enumerate(finite) if not ok]
  problems = []
  if loss is not None and not np.isfinite(loss):
    problems.append(f'loss {loss} (computed on the last stage, {len(finite) - 1})')
  if bad_stages:
    problems.append(f'parameters in stage(s) {bad_stages}')
  if not problems:
    return
  kept = (f'the last good checkpoint (step {latest_step}) in {checkpoint_dir} is intact'
          if latest_step is not None else 'no checkpoint was written')
  raise DivergenceError(
      f'Training diverged at step {step}: non-finite {" and ".join(problems)}. Nothing was '
      f'saved from this state; {kept}. Lower config.learning_rate or raise '
      'config.warmup_epochs, and resume or start again.')


def _draw_timeline(events, config, workdir: str) -> None:
  path = os.path.join(workdir, 'timeline.png')
  timeline.draw_timeline(events, path, title=(
      f'{config.model} {config.method} K={num_stages_of(config)}, batch {config.batch_size}, '
      f'steps {config.timeline_start_step}..'
      f'{config.timeline_start_step + config.timeline_num_steps - 1}'))
  stats = timeline.summarize(events)
  logging.info('Timeline of %d stage calls in %s: %s', len(events), path,
               ', '.join(f'{k} {v:.3g}' for k, v in stats.items()))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Train per `config`, evaluate the composed model, write and return the summary.

  A workdir with a checkpoint resumes from it (the config may change only in RESUMABLE_FIELDS);
  the result is bit-identical to a run that was never interrupted.
  """
  validate_config(config)
  _check_config_matches_workdir(config, workdir)
  dataset = input_pipeline.load_dataset(
      config.dataset, config.data_dir or None, image_size=config.image_size,
      cache_dir=config.cache_dir or None, train_subset=config.train_subset,
      test_subset=config.test_subset)
  steps_per_epoch = input_pipeline.steps_per_epoch(dataset, config.batch_size)
  if steps_per_epoch == 0:
    raise ConfigError(f'config.batch_size: {config.batch_size} is larger than the '
                      f'{len(dataset.train_labels)} training images. Use a smaller batch.')
  num_steps = (config.num_train_steps if config.num_train_steps > 0
               else config.num_epochs * steps_per_epoch)
  checkpointer = checkpoint.Checkpointer(workdir)
  _check_resumable(workdir, checkpointer.latest_step(), num_steps)

  rng = jax.random.key(config.seed)
  stages, stage_variables, split, placements = build(config, dataset, rng)
  optimizer = create_optimizer(config, steps_per_epoch)
  learning_rate = create_learning_rate_schedule(config, steps_per_epoch)
  pipe = create_pipeline(config, stages, optimizer, placements, dataset.num_classes)
  sample = jnp.zeros((config.batch_size, config.image_size, config.image_size, 3))
  state = pipe.init(jax.random.fold_in(rng, 1), sample, variables=stage_variables)
  extra_params = pipe.num_extra_params(state)
  if extra_params:
    print(f'{config.method}: {extra_params:,} extra trainable parameters outside the network '
          f'(auxiliary heads), not counted in the table above.', flush=True)
  start_step, progress = 0, {'history': [], 'train_time_s': 0.0}
  if checkpointer.latest_step() is not None:
    state, progress = checkpointer.restore(pipe, state)
    start_step = state.batches_fed
    logging.info('Resumed from the checkpoint at step %d in %s.', start_step,
                 checkpointer.directory)
  previous_summary = os.path.join(workdir, SUMMARY_FILE)
  if os.path.exists(previous_summary):   # a finished shorter run: keep its summary
    os.replace(previous_summary, os.path.join(workdir, f'summary-step{start_step}.json'))
  os.makedirs(workdir, exist_ok=True)
  _write_json(os.path.join(workdir, CONFIG_FILE), _jsonable(config))
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  writer.write_hparams({k: str(v) if isinstance(v, (tuple, list)) else v
                        for k, v in config.to_dict().items()})

  batches = input_pipeline.prefetch_to_device(
      input_pipeline.train_batches(dataset, config.batch_size, config.seed,
                                   start_step=start_step), 2,
      (pipe.shardings[0], pipe.shardings[-1]))   # images to the first stage, labels to the last
  eval_every = config.eval_every_epochs * steps_per_epoch
  report_progress = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)
  train_metrics, history = None, list(progress['history'])
  logging.info('Training steps %d..%d (%.2f epochs of %d steps). The first iterations compile '
               "each stage's functions; that can take a while.", start_step + 1, num_steps,
               num_steps / steps_per_epoch, steps_per_epoch)
  start = last_log_time = time.time()
  last_log_step = start_step

  def log_train(step: int, metrics: Optional[pipeline.TrainMetrics]):
    nonlocal last_log_time, last_log_step
    if metrics is None:   # nothing has reached the last stage yet (pipeline fill)
      return
    values = {f'train_{k}': float(v) for k, v in metrics.compute().items()}
    _check_finite(state, step, values['train_loss'], checkpointer.directory,
                  checkpointer.latest_step())
    now = time.time()
    images_per_sec = (step - last_log_step) * config.batch_size / (now - last_log_time)
    values.update(learning_rate=float(learning_rate(step - 1)), images_per_sec=images_per_sec)
    writer.write_scalars(step, values)
    eta = (num_steps - step) * (now - last_log_time) / max(step - last_log_step, 1)
    logging.info('step %d/%d  epoch %.2f  loss %.4f  acc %.3f  lr %.4g  %.0f images/s  ETA %s',
                 step, num_steps, step / steps_per_epoch, values['train_loss'],
                 values['train_accuracy'], values['learning_rate'], images_per_sec,
                 _format_eta(eta))
    last_log_time, last_log_step = now, step

  def evaluate(step: int):
    result = pipe.evaluate(state, input_pipeline.test_batches(dataset, config.eval_batch_size))
    writer.write_scalars(step, {f'test_{k}': v for k, v in result.items()})
    logging.info('step %d  test loss %.4f  test error %.4f', step, result['loss'],
                 1 - result['accuracy'])
    history.append({'step': step, 'epoch': step / steps_per_epoch,
                    'test_loss': result['loss'], 'test_error': 1 - result['accuracy']})
    return result

  def save_checkpoint(step: int):
    """Checkpoint the pipeline as it is (in flight); never a diverged state."""
    _check_finite(state, step, None, checkpointer.directory, checkpointer.latest_step())
    checkpointer.save(step, state, extra={
        'history': history, 'train_time_s': progress['train_time_s'] + time.time() - start})

  def merge(total, metrics):
    return metrics if total is None else total if metrics is None else total.merge(metrics)

  timeline_steps = range(config.timeline_start_step,
                         config.timeline_start_step + config.timeline_num_steps)
  recorder = None
  with _PreemptionSignals() as signals:
    for step in range(start_step + 1, num_steps + 1):
      if config.timeline_start_step and step == timeline_steps.start:
        recorder = timeline.TimelineRecorder(pipe, os.path.join(workdir, 'timeline'))
        recorder.start(state)
      images, labels = next(batches)
      state, info = pipe.step(state, images, labels)
      train_metrics = merge(train_metrics, info.metrics)
      if recorder:
        recorder.add(info)
        if step == timeline_steps[-1] or step == num_steps:
          _draw_timeline(recorder.stop(state), config, workdir)
          recorder = None
      report_progress(step)
      if signals.received:
        save_checkpoint(step)
        raise Preempted(f'Stopped by {signals.received} at step {step}; checkpoint saved in '
                        f'{checkpointer.directory}. Resume by running the same command again.')
      if step % config.log_every_steps == 0 and step != num_steps:
        log_train(step, train_metrics)
        train_metrics = None
      if eval_every and step % eval_every == 0 and step != num_steps:
        evaluate(step)
      if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
        save_checkpoint(step)
    if checkpointer.latest_step() != num_steps:
      save_checkpoint(num_steps)   # before the drain: a longer run continues this stream
  state, drained = pipe.drain(state)   # every batch's gradient reaches every stage
  for info in drained:
    train_metrics = merge(train_metrics, info.metrics)
  log_train(num_steps, train_metrics)
  jax.block_until_ready(state.stages)
  train_time = progress['train_time_s'] + time.time() - start
  result = evaluate(num_steps)
  writer.flush()

  final_variables = jax.device_get(pipe.stage_variables(state))
  num_blocks = len(models.block_names(config.model))
  summary = {
      'model': config.model,
      'dataset': dataset.name,
      'method': config.method,
      'num_stages': pipe.num_stages,
      'beta': config.beta,
      'stash': config.stash,
      'residual_policy': config.residual_policy,
      'steps': num_steps,
      'epochs': num_steps / steps_per_epoch,
      'batch_size': config.batch_size,
      'train_images': int(len(dataset.train_labels)),
      'test_images': int(len(dataset.test_labels)),
      'test_error': 1.0 - result['accuracy'],
      'test_accuracy': result['accuracy'],
      'test_loss': result['loss'],
      'train_time_s': train_time,
      'images_per_sec': (num_steps - start_step) * config.batch_size / (
          train_time - progress['train_time_s']),
      'resumed_from_step': start_step,
      'trainable_params': sum(partition.count_params(v['params']) for v in final_variables),
      'extra_params': extra_params,
      'stage_split': list(split),
      'devices': [str(d) for d in placements],
      'jax_version': jax.__version__,
      'params_digest': params_digest(
          partition.merge_variables(final_variables, split, num_blocks)),
      'history': history,
  }
  _write_json(os.path.join(workdir, SUMMARY_FILE), summary)
  logging.info('Test error %.4f after %d steps; summary in %s', summary['test_error'],
               num_steps, os.path.join(workdir, SUMMARY_FILE))
  return summary
