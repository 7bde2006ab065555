"""The trainer's tasks, by name (`config.task`): each is one module behind `base.Task`.

A task supplies its own config fields and their checks, the model's block list by name, the
input spec used for init, its data and their deterministic, resumable batch streams, the loss,
the metrics, what it logs and summarises, and DGL's auxiliary head (`base.Task` documents each
member). The built-in tasks are the modules named in `BUILTIN`; any other importable module with
a `TASK` class is a task by its dotted name (`--config.task=my_package.my_task`), so a new task
is one module and a config, and touches no other file.

Import rule (checked by tests/test_layout.py): tasks import the engine, models and data, never
the trainer.
"""

import importlib

import ml_collections

from fdg_jax.tasks import base

BUILTIN = ('image_classification', 'language_model')


def get(name: str) -> type[base.Task]:
  """The task class of `name`: a built-in task, or a module path with a `TASK` class."""
  module_name = f'fdg_jax.tasks.{name}' if name in BUILTIN else name
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    if name in BUILTIN or e.name != module_name.split('.')[0] and e.name != module_name:
      raise
    raise ValueError(f'Unknown task {name!r}: neither a built-in task {BUILTIN} nor an '
                     'importable module. Check the name, or put the module on PYTHONPATH.'
                     ) from None
  task = getattr(module, 'TASK', None)
  if not (isinstance(task, type) and issubclass(task, base.Task)):
    raise ValueError(f'Task module {module_name!r} has no TASK class subclassing '
                     'fdg_jax.tasks.base.Task. Define one (see fdg_jax/tasks/base.py).')
  return task


def configure(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """`config` set to task `name`: the previous task's own fields replaced by this one's, at
  their defaults. Config files call it (configs/default.py, configs/shakespeare_char*.py)."""
  if 'task' in config:
    for field in get(config.task).config_fields():
      if field in config:
        del config[field]
  config.task = name
  config.update(get(name).config_fields())
  return config
