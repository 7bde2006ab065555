"""The trainer: a config in, a trained, evaluated and summarised run out.

`train` (`train_and_evaluate(config, workdir)`: builds the run from the config and drives the
pipeline), `configuration` (the checks before any compute, the fields' documentation),
`optimizers` (the config's optimizer recipe and learning-rate schedule), `workdir` (a run's
files, resume checks, preemption, divergence), `metric_writer` (TensorBoard and the log) and
`prefetch` (batches onto the stages' devices ahead of time).

Import rule (checked by tests/test_layout.py): the trainer may import every package; nothing in
fdg_jax imports it but the commands (`fdg_jax.main`, `fdg_jax.sample`). The config is read here and only here: the
engine, models and data get plain values, a task reads its own fields.
"""
