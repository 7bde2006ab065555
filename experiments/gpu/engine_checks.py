"""Part 2, engine: the exactness checks of tests/test_engine.py and test_checkpoint.py with the
session's JAX, every stage on device 0, by priority while the budget lasts (the list in `engine`):
FDG against the tests' `naive_fdg` at float32 matmul precision, the residual policies, bit-exact
resumes from compact checkpoints; and, as information, K = 2 at the device's default precision.
"""

import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback
import types
from typing import Optional

from absl import flags
import jax
import numpy as np

import experiments
from experiments.gpu import record as record_lib
from experiments.gpu import workloads
from fdg_jax.engine import checkpoint
from fdg_jax.engine import pipeline

# --smoke's engine checks: one of each kind (each compiles its own pipelines).
SMOKE_CHECKS = ('fdg_k2_vjp', 'checkpoint_k2_vjp_compact')
FLAGS = flags.FLAGS   # --smoke: workloads.py's


def load_test_module(name: str) -> types.ModuleType:
  """tests/NAME.py as the top-level module NAME, as pytest imports it (test_engine.py imports
  `tiny` by that name); from its file, so no other `tests` package can stand in."""
  if name in sys.modules:
    return sys.modules[name]
  path = os.path.join(experiments.REPO, 'tests', f'{name}.py')
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def pytest_stand_in() -> None:
  """The tests decorate with `pytest.mark`; where pytest is missing, marks that do nothing."""
  try:
    import pytest  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    def parametrize(*args, **kwargs):
      del args, kwargs
      return lambda function: function
    sys.modules['pytest'] = types.SimpleNamespace(
        mark=types.SimpleNamespace(parametrize=parametrize, slow=lambda function: function))


def relative_difference(got, expected) -> float:
  """max |got - expected| / max |expected| over the leaves of two trees."""
  worst = 0.0
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    worst = max(worst, float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)))
  return worst


def check_naive(tests, num_stages: int, stash: str, policy: Optional[str] = None,
                precision: Optional[str] = 'float32', exact: bool = True) -> dict:
  """test_engine's engine-against-`naive_fdg` check with every stage on device 0."""
  with jax.default_matmul_precision(precision):
    batches = tests.tiny_batches(12)
    pipe, state, _ = tests.run_engine(num_stages, batches, stash=stash,
                                      placements=workloads.on_one_device(num_stages),
                                      residual_policy=policy)
    modules, variables = tests.initial_variables(num_stages)
    expected, expected_opt, _ = tests.naive_fdg(modules, variables, tests.make_optimizer(),
                                                batches, tests.BETA, stash)
  got = jax.device_get(pipe.stage_variables(state))
  detail = {'relative_difference': relative_difference(got, expected),
            'precision': precision or 'default'}
  if exact:
    tests.assert_matches(pipe, state, expected, expected_opt)
  else:
    detail['within_1e-5'] = detail['relative_difference'] <= 1e-5
  return detail


def check_policy_saves_less(tests, policy: str) -> dict:
  """test_engine's second half: stage 0's saved forward is smaller with the policy."""
  batches = tests.tiny_batches(2)

  def saved_bytes(residual_policy):
    modules, variables = tests.initial_variables(2)
    pipe = pipeline.Pipeline(modules, tests.make_optimizer(), beta=tests.BETA,
                             residual_policy=residual_policy, placements=workloads.on_one_device(2))
    state = pipe.init(jax.random.key(1), batches[0][0], variables=variables)
    state, _ = pipe.step(state, *batches[0])
    [entry] = state.saved[0]
    return sum(a.nbytes for a in jax.tree_util.tree_leaves(entry.arrays))
  detail = {'saved_bytes': saved_bytes(policy), 'saved_bytes_without': saved_bytes(None)}
  assert detail['saved_bytes'] < detail['saved_bytes_without'], detail
  return detail


def check_checkpoint(tests, num_stages: int, stash: str) -> dict:
  """test_checkpoint's mid-stream resume, every stage on device 0: a checkpoint after 5 of 10
  batches, restored into a new pipeline, ends bit for bit where the uninterrupted run ends; with
  'vjp' (or 'vjp+dots_saveable') the saved forwards are stored compact (rebuilt on restore)."""
  stash, _, policy = stash.partition('+')

  def new_pipeline():
    modules, variables = tests.initial_variables(num_stages)
    pipe = pipeline.Pipeline(modules, tests.make_optimizer(), beta=tests.BETA, stash=stash,
                             residual_policy=policy or None,
                             placements=workloads.on_one_device(num_stages))
    return pipe, pipe.init(jax.random.key(1), None, variables=variables)

  def run(pipe, state, batches):
    for inputs, targets in batches:
      state, _ = pipe.step(state, inputs, targets)
    return state

  batches = tests.tiny_batches(10)
  pipe, state = new_pipeline()
  straight, _ = pipe.drain(run(pipe, state, batches))
  expected = jax.device_get(pipe.stage_variables(straight))
  pipe, state = new_pipeline()
  state = run(pipe, state, batches[:5])
  forms = sorted({entry['form'] for records in checkpoint.to_tree(pipe, state)[1]['saved'].values()
                  for entry in records})
  with tempfile.TemporaryDirectory() as directory:
    checkpoint.Checkpointer(directory).save(5, pipe, state, extra={'step': 5})
    del state
    pipe, fresh = new_pipeline()
    restored, _ = checkpoint.Checkpointer(directory).restore(pipe, fresh)
  resumed, _ = pipe.drain(run(pipe, restored, batches[5:]))
  got = jax.device_get(pipe.stage_variables(resumed))
  bit_exact = all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(got),
                                                       jax.tree_util.tree_leaves(expected)))
  detail = {'forms': forms, 'bit_exact': bit_exact}
  want = ['compact'] if stash == 'vjp' and policy in ('', 'dots_saveable') else ['full']
  assert bit_exact and forms == want, {**detail, 'expected_forms': want}
  return detail


def engine(record: dict, budget: record_lib.Budget, report: record_lib.Report) -> None:
  pytest_stand_in()
  load_test_module('tiny')
  tests = load_test_module('test_engine')
  # By priority, as the budget may not reach the end; counts=False: information, not a check.
  checks = [
      ('fdg_k2_vjp', True, lambda: check_naive(tests, 2, 'vjp')),
      ('fdg_k3_vjp', True, lambda: check_naive(tests, 3, 'vjp')),
      ('checkpoint_k2_vjp_compact', True, lambda: check_checkpoint(tests, 2, 'vjp')),
      ('policy_dots_saveable_k3', True, lambda: check_naive(tests, 3, 'vjp', 'dots_saveable')),
      ('policy_nothing_saveable_k3', True,
       lambda: check_naive(tests, 3, 'vjp', 'nothing_saveable')),
      ('fdg_k2_vjp_default_precision', False,
       lambda: check_naive(tests, 2, 'vjp', precision=None, exact=False)),
      ('fdg_k3_recompute', True, lambda: check_naive(tests, 3, 'recompute')),
      ('checkpoint_k3_vjp_compact', True, lambda: check_checkpoint(tests, 3, 'vjp')),
      ('checkpoint_k3_dots_saveable_compact', True,
       lambda: check_checkpoint(tests, 3, 'vjp+dots_saveable')),
      ('policy_nothing_saveable_saves_less', True,
       lambda: check_policy_saves_less(tests, 'nothing_saveable')),
      ('fdg_k2_recompute', True, lambda: check_naive(tests, 2, 'recompute')),
      ('checkpoint_k2_recompute_full', True, lambda: check_checkpoint(tests, 2, 'recompute')),
  ]
  if FLAGS.smoke:
    checks = [c for c in checks if c[0] in SMOKE_CHECKS]
  record['checks'] = results = []
  for name, counts, check in checks:
    result = {'name': name, 'counts': counts}
    results.append(result)
    if budget.left() <= 0:
      result['skipped'] = 'no time left in the budget'
      continue
    start = time.monotonic()
    try:
      result.update(check())
      result['passed'] = True
    except Exception:  # pylint: disable=broad-except
      result['passed'] = False
      result['error'] = traceback.format_exc(limit=-4)
    result['seconds'] = round(time.monotonic() - start, 2)
    print(f"  {name}: {'passed' if result['passed'] else 'FAILED'} in {result['seconds']} s",
          flush=True)
    report.save()
  counted = [r for r in results if r['counts']]
  record['passed'] = sum(r.get('passed', False) for r in counted)
  record['failed'] = sum(r.get('passed') is False for r in counted)
  record['skipped'] = sum('skipped' in r for r in counted)


def markdown(part: dict) -> list[str]:
  rows = []
  for check in part.get('checks', []):
    detail = {k: v for k, v in check.items()
              if k not in ('name', 'counts', 'passed', 'seconds', 'error', 'skipped')}
    outcome = check.get('skipped') or {True: 'passed', False: 'FAILED'}.get(check.get('passed'))
    if not check['counts']:
      outcome = f'(information) {outcome}'
    error = (check.get('error') or '').strip().splitlines()[-1:]
    rows.append([check['name'], outcome, check.get('seconds'),
                 json.dumps(detail, default=str) + (f' {error[0]}' if error else '')])
  return [f"{part.get('passed')} passed, {part.get('failed')} failed, {part.get('skipped')} "
          'skipped.', ''] + record_lib.table(['check', 'outcome', 's', 'detail'], rows)

