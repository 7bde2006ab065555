"""The trainer's config: its checks before any compute, and its fields' documentation.

A config is an `ml_collections.ConfigDict` from a file in `configs/`: the trainer's fields
(documented by the comment above each in `configs/default.py`) and its task's own fields
(documented in the task's `config_fields`, `fdg_jax/tasks/`). `validate_config` refuses a config
that cannot run, naming the field and the fix, before any data is read or anything compiled; it
asks the task about the task's fields. `field_docs` reads the comments back, for
`python -m fdg_jax.main --help`.
"""

import ast
import difflib
import os
import textwrap

import jax
import ml_collections

from fdg_jax.engine import compensation
from fdg_jax.engine import methods
from fdg_jax.engine import pipeline
from fdg_jax.engine import rotated_adam
from fdg_jax.models import partition
from fdg_jax import tasks
from fdg_jax.trainer import optimizers

WARMUP_SHAPES = ('constant', 'linear')
# configs/default.py, beside the package in a checkout (absent from an installed wheel).
DEFAULT_CONFIG_FILE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'configs',
    'default.py')


class ConfigError(ValueError):
  """A config that cannot run; the message names the field and the fix."""


def reads_tfds(config) -> bool:
  """Whether config.dataset is read through tfds (which needs TensorFlow)."""
  return config.dataset in tasks.get(config.task).TFDS_DATASETS


def num_stages_of(config) -> int:
  return 1 if methods.get(config.method).whole_model else config.num_stages


def runs_synchronously(config) -> bool:
  """Whether config.method flushes every batch over microbatches (GPipe, 1F1B; BP over more
  than one microbatch)."""
  method = methods.get(config.method)
  return method.synchronous or (method.whole_model and config.microbatches > 1)


def stage_device_indices(config) -> tuple[tuple[int, ...], ...]:
  """Global device indices of each stage: D = config.data_parallel consecutive devices from
  config.stage_devices[k] (one entry: the same for all stages), or from k * D."""
  num_stages, width = num_stages_of(config), config.data_parallel
  firsts = (tuple(range(0, num_stages * width, width)) if not config.stage_devices else
            tuple(config.stage_devices) * num_stages if len(config.stage_devices) == 1 else
            tuple(config.stage_devices))
  return tuple(tuple(range(first, first + width)) for first in firsts)


def create_task(config: ml_collections.ConfigDict):
  """The run's task, bound to its config (`fdg_jax.tasks.base.Task`); an unknown task is a
  ConfigError."""
  try:
    return tasks.get(config.task)(config)
  except ValueError as e:
    raise ConfigError(f'config.task: {e}') from None


def validate_config(config: ml_collections.ConfigDict):
  """Raise ConfigError for the first bad field, before any compute; return the run's task
  (bound to the config)."""
  def fail(field, problem, fix):
    raise ConfigError(f'config.{field}: {problem}. {fix}')

  task = create_task(config)
  missing = sorted(set(task.config_fields()) - set(config))
  if missing:
    fail('task', f'{config.task!r} needs its own fields {missing}, which this config lacks (a '
         "config file's task is set in the file, which adds them)",
         f"Use a config of that task, or set it in the file: config = tasks.configure(config, "
         f"{config.task!r}).")
  if config.model not in task.model_names():
    fail('model', f'unknown model {config.model!r} for task {config.task!r}',
         f'Choose one of {task.model_names()}.')
  if config.method not in methods.REGISTRY:
    fail('method', f'unknown method {config.method!r}', f'Choose one of {tuple(methods.REGISTRY)}.')
  if config.dataset not in task.DATASETS:
    fail('dataset', f'unknown dataset {config.dataset!r} for task {config.task!r}',
         f'Choose one of {task.DATASETS}.')
  for message in task.validate() + optimizers.validate(config):
    raise ConfigError(message)
  method = methods.get(config.method)
  if method.local_losses and task.aux_head() is None:
    fail('method', f'{config.method!r} trains each stage on an auxiliary head, which task '
         f'{config.task!r} does not offer', 'Choose another method.')
  if config.split_by not in ('flops', 'time'):
    fail('split_by', f'unknown balance {config.split_by!r}', "Choose 'flops' or 'time'.")
  if not 0.0 < config.beta <= 1.0:
    fail('beta', f'{config.beta} is outside (0, 1]', 'Use 0 < beta <= 1 (1 disables shrinking).')
  if config.stash not in pipeline.STASH_MODES:
    fail('stash', f'unknown stash {config.stash!r}', f'Choose one of {pipeline.STASH_MODES}.')
  if config.residual_policy and config.residual_policy not in pipeline.RESIDUAL_POLICIES:
    fail('residual_policy', f'unknown policy {config.residual_policy!r}',
         f"Choose one of {pipeline.RESIDUAL_POLICIES}, or '' to keep every residual.")
  if config.microbatches < 1:
    fail('microbatches', f'{config.microbatches} microbatches', 'Use 1 or more.')
  if config.microbatches > 1 and not method.takes_microbatches:
    fail('microbatches', f'method {config.method!r} has no microbatch schedule',
         f"Use --config.microbatches=1, or one of "
         f"{[m.name for m in methods.REGISTRY.values() if m.takes_microbatches]}.")
  micro_size, rest = divmod(config.batch_size, config.microbatches)
  if rest or (config.data_parallel > 0 and micro_size % config.data_parallel):
    fail('batch_size', f'{config.batch_size} does not split into {config.microbatches} '
         f'microbatches of a size data_parallel={config.data_parallel} divides',
         'Use a batch size that microbatches x data_parallel divides.')
  if config.microbatches > 1 and config.stash != 'vjp':
    fail('stash', f"{config.stash!r} with microbatches: every microbatch is back-propagated "
         'through its saved forward', "Use --config.stash=vjp.")
  if config.residual_policy and (config.stash != 'vjp' or method.local_losses):
    fail('residual_policy', f"{config.residual_policy!r} needs stash 'vjp' and method fdg, "
         f'ddg or bp (got stash {config.stash!r}, method {config.method!r})',
         "Set --config.residual_policy=''.")
  if config.compensation not in compensation.NAMES:
    fail('compensation', f'unknown compensation {config.compensation!r}',
         f'Choose one of {compensation.NAMES}.')
  if config.compensation != 'none':
    if not method.delayed_gradients or num_stages_of(config) < 2:
      fail('compensation', f'{config.compensation!r} compensates delayed gradients, which '
           f'method {config.method!r} with {num_stages_of(config)} stage(s) does not have',
           'Use a method with delayed gradients '
           f'({[m.name for m in methods.REGISTRY.values() if m.delayed_gradients]}) with '
           'num_stages >= 2, or --config.compensation=none.')
    if (config.compensation in compensation.NEEDS_FORWARD_PARAMETERS
        and config.stash != 'vjp'):
      fail('compensation', f"{config.compensation!r} acts on the parameters of each forward, "
           f"which stash {config.stash!r} does not keep (it redoes the forward at the current "
           'parameters)', "Use --config.stash=vjp, or compensation 'lr_reschedule'.")
    if config.compensation == 'basis_rotation' and config.optimizer != 'adamw':
      fail('compensation', "'basis_rotation' runs the delayed stages' AdamW in a rotated basis, "
           f'which optimizer {config.optimizer!r} is not', 'Use --config.optimizer=adamw, or '
           "optimizer 'rotated_adamw' with --config.compensation=none to rotate every stage.")
    base = config.adam_b1 if config.optimizer == 'adamw' else config.momentum
    if 'delay_momentum' in config.compensation and base > config.delay_momentum_max:
      fail('delay_momentum_max', f'{config.delay_momentum_max} is below the momentum {base} '
           'it raises', 'Use a delay_momentum_max above it, e.g. 0.99.')
  for field in ('nesterov_momentum', 'delay_momentum_max'):
    if not 0 <= config[field] < 1:
      fail(field, f'{config[field]} is outside [0, 1)', 'Use e.g. 0.99 (the paper).')
  if config.nadam_momentum_decay < 0:
    fail('nadam_momentum_decay', f'{config.nadam_momentum_decay} is negative',
         "Use e.g. 0.004 (PyTorch's NAdam).")
  if config.dc_lambda < 0 or not 0 <= config.dc_decay < 1:
    fail('dc_lambda' if config.dc_lambda < 0 else 'dc_decay',
         f'dc_lambda={config.dc_lambda}, dc_decay={config.dc_decay}',
         'Use dc_lambda >= 0 and 0 <= dc_decay < 1.')
  if config.ef_coefficient <= 0:
    fail('ef_coefficient', f'{config.ef_coefficient} is not positive', 'Use e.g. 1 (the paper).')
  if config.rotation_frequency < 1:
    fail('rotation_frequency', f'{config.rotation_frequency} updates between refreshes',
         'Use 1 or more, e.g. 10 (the authors).')
  if config.rotation_decay >= 1:
    fail('rotation_decay', f'{config.rotation_decay} is not below 1',
         "Use e.g. 0.999, or -1 for adam_b2 (the authors' default).")
  if config.rotation_geometry not in rotated_adam.ROTATION_GEOMETRIES:
    fail('rotation_geometry', f'unknown geometry {config.rotation_geometry!r}',
         f'Choose one of {rotated_adam.ROTATION_GEOMETRIES}.')
  if not 0 < config.lr_reschedule_fraction <= 1:
    fail('lr_reschedule_fraction', f'{config.lr_reschedule_fraction} is outside (0, 1]',
         'Use a fraction of the training steps, e.g. 0.25.')
  for field in ('batch_size', 'eval_batch_size', 'log_every_steps', 'timeline_num_steps'):
    if config[field] <= 0:
      fail(field, f'{config[field]} is not positive', 'Use a positive integer.')
  if config.num_train_steps == 0 or config.num_train_steps < -1:
    fail('num_train_steps', f'{config.num_train_steps} is not a length',
         'Use a positive number of steps, or -1 to train num_epochs epochs.')
  if config.num_train_steps == -1 and config.num_epochs <= 0:
    fail('num_epochs', f'{config.num_epochs} is not positive', 'Use a positive number.')
  if config.learning_rate <= 0 or config.warmup_lr <= 0:
    fail('learning_rate', 'learning rates must be positive', 'Use lr > 0 and warmup_lr > 0.')
  if config.warmup_shape not in WARMUP_SHAPES:
    fail('warmup_shape', f'unknown warm-up {config.warmup_shape!r}',
         f'Choose one of {WARMUP_SHAPES}.')
  for field in ('warmup_epochs', 'eval_every_epochs', 'checkpoint_every_steps',
                'timeline_start_step', 'eval_every_steps'):
    if config[field] < 0:
      fail(field, f'{config[field]} is negative', 'Use 0 or more (0 turns it off).')
  num_stages = num_stages_of(config)
  if num_stages < 1:
    fail('num_stages', f'{config.num_stages} stages', 'Use at least 1.')
  num_blocks = task.num_blocks()
  if num_stages > num_blocks:
    fail('num_stages', f'{num_stages} stages but {config.model} has only {num_blocks} blocks',
         f'Use at most {num_blocks} stages.')
  if not method.whole_model and config.split:
    if len(config.split) != num_stages - 1:
      fail('split', f'{tuple(config.split)} has {len(config.split)} entries for {num_stages} '
           'stages', f'Give {num_stages - 1} block indices, or () to balance automatically.')
    try:
      partition.stage_ranges(config.split, num_blocks)
    except ValueError as e:
      fail('split', str(e), 'Fix the block indices.')
  num_devices, width = len(jax.devices()), config.data_parallel
  if width < 1:
    fail('data_parallel', f'{width} devices per stage', 'Use 1 or more.')
  for field in ('batch_size', 'eval_batch_size'):
    if config[field] % width:
      fail(field, f'{config[field]} does not split over data_parallel={width} devices',
           f'Use a multiple of {width}.')
  if config.stage_devices:
    if len(config.stage_devices) not in (1, num_stages):
      fail('stage_devices', f'{len(config.stage_devices)} entries for {num_stages} stages',
           'Give one device index per stage, or one index for all stages.')
    bad = sorted({d for stage in stage_device_indices(config) for d in stage
                  if not 0 <= d < num_devices})
    if bad:
      fail('stage_devices', f'device indices {bad} do not exist ({num_devices} devices, '
           f'{width} per stage from each index)', f'Use indices in 0..{num_devices - width}.')
  elif num_stages * width > num_devices:
    fail('num_stages' if width == 1 else 'data_parallel',
         f'{num_stages} stage(s) x {width} device(s) need {num_stages * width} devices but JAX '
         f'sees {num_devices}',
         'Use fewer stages or devices per stage, put every stage on the same devices with '
         '--config.stage_devices=(0,) to simulate, ' + (
             f'or start {num_stages * width} processes of one device each.'
             if jax.process_count() > 1 else
             'or on CPU set XLA_FLAGS=--xla_force_host_platform_device_count='
             f'{num_stages * width} before starting.'))
  num_processes = jax.process_count()
  if num_processes > 1:
    owners = {jax.devices()[i].process_index
              for stage in stage_device_indices(config) for i in stage}
    idle = sorted(set(range(num_processes)) - owners)
    if idle:
      fail('stage_devices', f'process(es) {idle} of {num_processes} own no stage (stages on '
           f'devices {list(stage_device_indices(config))})',
           f'Start as many processes as stages ({num_stages}), or place a stage on every '
           "process's devices with --config.stage_devices.")
  return task


# ---------------------------------------------------------------- the fields' documentation


def field_docs(path: str = DEFAULT_CONFIG_FILE) -> dict[str, str]:
  """{field: the comment above `config.FIELD = ...` in a config file}; empty if the file is
  absent (an installed wheel)."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return field_docs_in(f.read())


def task_field_docs(task) -> dict[str, str]:
  """{field: its comment} of a task's own fields (the source of its `config_fields`)."""
  return field_docs_in(task.config_fields_source())


def field_docs_in(source: str) -> dict[str, str]:
  """{field: the comment above `NAME.FIELD = ...`} in Python source (a config file's
  `get_config`, a task's `config_fields`). A field written right below another with no comment
  of its own shares that field's comment (e.g. `train_subset` and `test_subset`)."""
  source = textwrap.dedent(source)
  lines = source.splitlines()
  docs, previous = {}, None
  for node in ast.walk(ast.parse(source)):
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Attribute)
            and isinstance(node.targets[0].value, ast.Name)):
      continue
    comment, row = [], node.lineno - 2
    while row >= 0 and lines[row].strip().startswith('#'):
      comment.insert(0, lines[row].strip().lstrip('#').strip())
      row -= 1
    if comment:
      docs[node.targets[0].attr] = ' '.join(comment)
    elif previous is not None and previous[1] == node.lineno - 1:
      docs[node.targets[0].attr] = docs.get(previous[0], '')
    previous = (node.targets[0].attr, node.end_lineno)
  return docs


def fields_help() -> str:
  """`--help`'s list of config fields: the trainer's (defaults of configs/default.py), then
  each built-in task's own, with their meaning and default. Empty without configs/ (a wheel)."""
  if not os.path.exists(DEFAULT_CONFIG_FILE):
    return ''
  import runpy  # pylint: disable=g-import-not-at-top
  defaults = runpy.run_path(DEFAULT_CONFIG_FILE)['get_config']()
  task_fields = set(tasks.get(defaults.task).config_fields())
  trainer_fields = ml_collections.ConfigDict(
      {k: v for k, v in defaults.items() if k not in task_fields})
  parts = ['\n\nConfig fields (override any with --config.FIELD=VALUE; defaults of '
           'configs/default.py, a config file may change them):\n'
           + describe_fields(trainer_fields, field_docs())]
  parts.append('\n\nMethods (config.method):\n' + '\n'.join(
      f'  {name}: {info.description}' for name, info in methods.REGISTRY.items()))
  for name in tasks.BUILTIN:
    task = tasks.get(name)
    parts.append(f"\n\nFields of task '{name}' (config.task={name!r}; a config sets the task "
                 'with tasks.configure, which adds them):\n'
                 + describe_fields(task.config_fields(), task_field_docs(task)))
  return ''.join(parts)


def describe_fields(config: ml_collections.ConfigDict, docs: dict[str, str],
                    width: int = 100) -> str:
  """One entry per field: `--config.FIELD (default VALUE)` and its comment, wrapped."""
  entries = []
  for field, value in config.items():
    entries.append(f'  --config.{field}  (default {value!r})')
    text = docs.get(field, '(undocumented)')
    entries.extend(textwrap.wrap(text, width, initial_indent='      ',
                                 subsequent_indent='      '))
  return '\n'.join(entries)


def misspelt_fields(argv: list[str], config: ml_collections.ConfigDict) -> list[str]:
  """One line per `--config.FIELD` override in argv that names no field of `config`, with the
  closest valid field."""
  lines = []
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    path = arg[len('--config.'):].split('=', 1)[0]
    node, parts = config, path.split('.')
    for depth, part in enumerate(parts):
      if isinstance(node, ml_collections.ConfigDict) and part in node:
        node = node[part]
        continue
      known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(part, known, n=1)
      prefix = '.'.join(parts[:depth] + [close[0]]) if close else ''
      hint = f'; did you mean --config.{prefix}?' if close else ''
      lines.append(f'--config.{path}: no such config field{hint} '
                   '(python -m fdg_jax.main --help lists the fields)')
      break
  return lines
