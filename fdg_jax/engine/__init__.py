"""The engine: one executor that runs a method's schedule over stages on their devices.

What it holds: `schedule` (each method's calls and transfers, as data), `stage_functions` (what
one stage computes in one call), `methods` (FDG, DDG, DGL: the registry of methods), `pipeline`
(the executor), `state` (what the pipeline holds between iterations), `distributed` (placement,
transfers, joining processes), `optimizers` (the optimizer recipes), `compensation` (stale-gradient
compensation), `checkpoint` (compact, bit-exact checkpoints) and `timeline` (profiler timelines).

Import rule (checked by tests/test_layout.py): the engine imports nothing of fdg_jax outside
`fdg_jax.engine`. It knows no task, model, dataset or config: what a stage receives and emits is
any pytree, what the last stage scores is the caller's loss, an optimizer is a `Recipe`.
"""
