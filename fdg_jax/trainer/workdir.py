"""A run's working directory: its files, resume checks, preemption and divergence.

Everything the trainer writes lives under one workdir: `config.json` (the config it ran with),
`summary.json` (written once, at the end), `checkpoints/` (fdg_jax.engine.checkpoint), TensorBoard
events and `log.txt` (every log line of the run, the libraries' included); an evaluation-only
run (config.eval_only) adds `eval_summary.json` and its lines in `log.txt`, and changes nothing
else. Other code (the experiment grids, notebooks) takes the file names from here. A run may
start from another run's network (config.init_from): `check_init_from` decides, before any
compute, whether it can.
"""

import contextlib
import json
import logging
import os
import signal
import threading
from typing import Optional

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from fdg_jax.engine import checkpoint
from fdg_jax.engine import distributed
from fdg_jax.engine import pipeline
from fdg_jax.trainer import configuration
from fdg_jax.trainer.configuration import ConfigError

SUMMARY_FILE = 'summary.json'
CONFIG_FILE = 'config.json'
LOG_FILE = 'log.txt'
EVAL_SUMMARY_FILE = 'eval_summary.json'   # the latest evaluation-only run's (config.eval_only)

# The trainer's fields that change only the length or the logging of a run: a resumed run may
# change them (a task adds its own: `Task.RESUMABLE_FIELDS`).
RESUMABLE_FIELDS = frozenset({
    'num_epochs', 'num_train_steps', 'log_every_steps', 'eval_every_epochs',
    'checkpoint_every_steps', 'eval_batch_size', 'timeline_start_step', 'timeline_num_steps',
    'eval_every_steps', 'eval_only'})

# The trainer's fields added after runs could be checkpointed, with the value that computes
# what such a run did: a saved config without one of them resumes as if it held that value (a
# task adds its own: `Task.ADDED_FIELDS`). Every run before the 'task' field was an image run.
ADDED_FIELDS = {'residual_policy': '', 'beta_compounds': True, 'split_by': 'flops',
                'data_parallel': 1, 'compensation': 'none', 'dc_lambda': 2.0,
                'dc_adaptive': True, 'dc_decay': 0.95, 'lr_reschedule_fraction': 0.25,
                'nesterov_momentum': 0.99, 'nadam_momentum_decay': 0.004,
                'delay_momentum_max': 0.99, 'ef_coefficient': 1.0, 'rotation_frequency': 10,
                'rotation_decay': -1.0, 'rotation_geometry': 'bi', 'warmup_shape': 'constant',
                'task': 'image_classification', 'optimizer': 'sgd', 'adam_b1': 0.9,
                'adam_b2': 0.95, 'adam_eps': 1e-8, 'decay_embeddings': False,
                'lr_schedule': 'piecewise', 'warmup_steps': 0, 'lr_decay_steps': 0,
                'min_learning_rate': 0.0, 'grad_clip': 0.0, 'eval_every_steps': 0,
                'microbatches': 1, 'eval_only': False, 'init_from': '',
                'muon_learning_rate': 0.02, 'muon_momentum': 0.95, 'muon_nesterov': True,
                'muon_ns_steps': 5, 'muon_weight_decay': 0.0}

# The trainer's fields that fix the network's variables: a run started from another run's
# network (config.init_from) must have the same values (a task adds its own:
# `Task.ARCHITECTURE_FIELDS`).
ARCHITECTURE_FIELDS = ('model',)


class DivergenceError(FloatingPointError):
  """A non-finite loss or parameter; the message names the step, the stage and the checkpoint."""


class Preempted(RuntimeError):
  """Stopped by SIGTERM/SIGINT after saving a checkpoint; the message says how to resume."""


def jsonable(config) -> dict:
  return json.loads(config.to_json())


def write_json(path: str, value) -> None:
  """Write atomically: a crash leaves the old file or the new one, never half of one."""
  with open(path + '.tmp', 'w') as f:
    json.dump(value, f, indent=2)
  os.replace(path + '.tmp', path)


def check_config_matches(config, workdir: str, task) -> None:
  """A workdir's saved config may differ from this one only in the resumable fields (the
  trainer's and the task's). A saved field this config lacks is ignored: no code reads it (the
  other task's fields, in configs written before each task had its own)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = {**ADDED_FIELDS, **task.ADDED_FIELDS, **json.load(f)}
  current = jsonable(config)
  resumable = RESUMABLE_FIELDS | task.RESUMABLE_FIELDS
  differing = sorted(k for k in current if k not in resumable and saved.get(k) != current[k])
  if differing:
    details = ', '.join(f'{k}: {saved.get(k)!r} there, {current.get(k)!r} here' for k in differing)
    raise ConfigError(
        f'workdir {workdir!r} holds a run with a different computation ({details}). Only the '
        f'length and logging fields ({", ".join(sorted(resumable))}) may change when '
        'resuming. Use a new --workdir, or the saved config.')


def saved_config(workdir: str) -> ml_collections.ConfigDict:
  """The config the run in `workdir` ran with (its config.json, which must exist), with the
  fields added since at the values that compute what it did (the trainer's and its task's
  `ADDED_FIELDS`), JSON lists as the tuples they were."""
  with open(os.path.join(workdir, CONFIG_FILE)) as f:
    saved = {**ADDED_FIELDS, **json.load(f)}
  config = ml_collections.ConfigDict(
      {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
  for field, value in configuration.create_task(config).ADDED_FIELDS.items():
    if field not in config:
      config[field] = value
  return config


def check_evaluable(workdir: str) -> None:
  """config.eval_only: the workdir must hold a checkpoint to evaluate."""
  if checkpoint.written_by(workdir) is None:
    raise ConfigError(
        f'config.eval_only: --workdir {workdir!r} holds no checkpoint to evaluate. Point '
        '--workdir at the workdir of a run that saved one, or train there first (without '
        'eval_only).')


def check_init_from(config, task, workdir: str) -> None:
  """config.init_from's checks, before any data is read: the run it names has a checkpoint
  and the same network (`ARCHITECTURE_FIELDS`, the task's, and `task.start_from`), and this
  workdir holds no checkpoint of another run (one of this run, started from the same source,
  is resumed as usual)."""
  source = config.init_from
  if not source:
    return
  def fail(problem, fix):
    raise ConfigError(f'config.init_from: {problem}. {fix}')
  if os.path.abspath(os.path.expanduser(source)) == os.path.abspath(workdir):
    fail(f"{source!r} is this run's own --workdir", "Point it at another run's workdir (to "
         'continue the run in --workdir, drop init_from)')
  if checkpoint.written_by(workdir) is not None:
    own = (saved_config(workdir).init_from
           if os.path.exists(os.path.join(workdir, CONFIG_FILE)) else '')
    if own == source:
      return   # this run, interrupted: it resumes from its own checkpoint
    fail(f'--workdir {workdir!r} already holds a checkpoint of another run ('
         + (f'started from {own!r}' if own else 'trained from its seed')
         + f'); starting it from {source!r} would mix the two runs',
         'Use a new --workdir for the run that starts from it (to continue the run there, '
         'drop init_from)')
  if jax.process_count() > 1:
    fail('a run of several processes cannot yet start from another run\'s network',
         'Start the run in one process (its stages on this host\'s devices)')
  if not os.path.isfile(os.path.join(os.path.expanduser(source), CONFIG_FILE)):
    fail(f'{source!r} is not the workdir of a run (no {CONFIG_FILE})',
         'Point it at the --workdir of a run of fdg_jax.main')
  source = os.path.expanduser(source)
  if checkpoint.written_by(source) is None:
    fail(f'the run in {source!r} has no checkpoint yet', 'Train it until it saves one '
         '(config.checkpoint_every_steps, and always at its last step)')
  there = saved_config(source)
  fields = (('task',) if there.task != config.task else
            ARCHITECTURE_FIELDS + tuple(task.ARCHITECTURE_FIELDS))
  differing = [field for field in fields if there.get(field) != config.get(field)]
  if differing:
    fail(f'the run in {source!r} has another network ('
         + '; '.join(f'{k}: {there.get(k)!r} there, {config.get(k)!r} here' for k in differing)
         + ')', 'Set the same fields to start from its weights, e.g. '
         + ' '.join(f'--config.{k}={there.get(k)}' for k in differing))
  for problem in task.start_from(source, workdir):
    raise ConfigError(problem)


def check_resumable(workdir: str, latest_step: Optional[int], num_steps: int) -> None:
  """Refuse to overwrite a finished run, or to resume a checkpoint past the asked length."""
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


def keep_previous_summary(workdir: str, start_step: int) -> None:
  """A finished shorter run being continued: its summary is kept as summary-stepN.json."""
  previous = os.path.join(workdir, SUMMARY_FILE)
  if os.path.exists(previous):
    os.replace(previous, os.path.join(workdir, f'summary-step{start_step}.json'))


class PreemptionSignals:
  """Turns SIGTERM and SIGINT into a stop at an iteration boundary: `stop_now(step)`.

  In one process, the flag is checked at the next boundary. In a multi-process run JAX's
  preemption service owns SIGTERM: a SIGTERM to any process makes every process reach the same
  sync step (`multihost_utils.reached_preemption_sync_point`), where all save and stop; SIGINT
  is turned into a SIGTERM to this process so that it does the same.
  """

  def __init__(self):
    self.received = None
    self._previous = {}
    self._multi_process = jax.process_count() > 1

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      signals = (signal.SIGINT,) if self._multi_process else (signal.SIGTERM, signal.SIGINT)
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self._multi_process:
      os.kill(os.getpid(), signal.SIGTERM)   # to JAX's preemption service
    else:
      self.received = signal.Signals(signum).name

  def stop_now(self, step: int) -> bool:
    """Whether to save and stop after `step` (every process agrees, in a multi-process run)."""
    if self._multi_process:
      if multihost_utils.reached_preemption_sync_point(step):
        self.received = 'SIGTERM (to one of the processes)'
        return True
      return False
    return self.received is not None

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def check_finite(state: pipeline.PipelineState, step: int, loss: Optional[float],
                 checkpointer) -> None:
  """Raise DivergenceError for a non-finite loss or parameter (reads one bool per stage; every
  process of a multi-process run checks its own stages and all raise the same error). The
  `checkpoint.Checkpointer` is asked for its latest step only when there is an error to
  report: in a multi-process run that is a collective."""
  finite = distributed.fetch([
      True if stage is None else
      jax.tree_util.tree_reduce(jnp.logical_and, jax.tree_util.tree_map(
          lambda x: jnp.isfinite(x).all(), stage.params)) for stage in state.stages])
  finite = distributed.all_processes([int(bool(ok)) for ok in finite]).all(axis=0)
  bad_stages = [k for k, ok in enumerate(finite) if not ok]
  problems = []
  if loss is not None and not np.isfinite(loss):
    problems.append(f'loss {loss} (computed on the last stage, {len(finite) - 1})')
  if bad_stages:
    problems.append(f'parameters in stage(s) {bad_stages}')
  if not problems:
    return
  latest_step = checkpointer.latest_step()
  kept = (f'the last good checkpoint (step {latest_step}) in {checkpointer.directory} is intact'
          if latest_step is not None else 'no checkpoint was written')
  raise DivergenceError(
      f'Training diverged at step {step}: non-finite {" and ".join(problems)}. Nothing was '
      f'saved from this state; {kept}. Lower config.learning_rate or raise '
      'config.warmup_epochs, and resume or start again.')


class _ConsoleFilter(logging.Filter):
  """Passes fdg_jax's own INFO lines and every library's warnings and errors."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    return (os.sep + 'fdg_jax' + os.sep in record.pathname
            and getattr(record, 'console', True))   # the metric writer's lines: log file only


def quiet_console(speaker: bool = True) -> None:
  """The console shows what is trained, progress, evaluations, checkpoints and warnings; the
  libraries' INFO lines (orbax, clu's writer, JAX's backend probing) go only to the log file.
  In a multi-process run only process 0 speaks: the others (speaker=False) show warnings and
  errors."""
  for handler in logging.getLogger().handlers + logging.getLogger('absl').handlers:
    if not speaker:
      handler.setLevel(logging.WARNING)
    if not any(isinstance(f, _ConsoleFilter) for f in handler.filters):
      handler.addFilter(_ConsoleFilter())


@contextlib.contextmanager
def log_file(workdir: str):
  """Every INFO line of the run, ours and the libraries', appended to WORKDIR/log.txt (process
  I > 0 of a multi-process run: log-processI.txt)."""
  os.makedirs(workdir, exist_ok=True)
  name = LOG_FILE if jax.process_index() == 0 else f'log-process{jax.process_index()}.txt'
  handler = logging.FileHandler(os.path.join(workdir, name))
  handler.setFormatter(logging.Formatter(
      '%(asctime)s %(levelname).1s %(filename)s:%(lineno)d] %(message)s'))
  root = logging.getLogger()
  previous_level = root.level
  root.addHandler(handler)
  if root.level > logging.INFO or root.level == logging.NOTSET:
    root.setLevel(logging.INFO)
  try:
    yield
  except Exception as e:
    # The error, in the run's log too (the console shows it once, as main's `error:` line).
    handler.handle(logging.LogRecord('fdg_jax', logging.ERROR, __file__, 0, '%s: %s',
                                     (type(e).__name__, e), None))
    raise
  finally:
    root.removeHandler(handler)
    root.setLevel(previous_level)
    handler.close()
