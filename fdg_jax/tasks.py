"""The trainer's tasks by name (`config.task`): each is one module with the same functions.

A task supplies the model's block list by name, the input spec used for init, the data and
its deterministic, resumable batch streams, the loss, the metrics, the evaluation's log line
and history record, and its summary fields; the engine, schedule, checkpoints, launcher and
distributed code know nothing of it. To add a task, write one module like
`language_model.py`, add it here, and give it configs (WORKSPACE.md says how).
"""

from fdg_jax import image_classification
from fdg_jax import language_model

TASKS = {module.NAME: module for module in (image_classification, language_model)}


def get(name: str):
  """The task module of a name in TASKS."""
  if name not in TASKS:
    raise ValueError(f'Unknown task {name!r}; choose one of {tuple(TASKS)}.')
  return TASKS[name]
