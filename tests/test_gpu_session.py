"""experiments/gpu_session.py --smoke: every part runs on CPU with only what the lent GPU machine
has (no TensorFlow, tfds or ml_collections; of clu only clu.metrics, its carried wheel)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = {'environment', 'engine', 'throughput', 'shakespeare', 'two_gpus'}

# `python -m experiments.gpu_session ARGS` after hiding the packages the GPU machine lacks.
HIDE_AND_RUN = '''
import importlib.abc
import runpy
import sys

HIDDEN = ('tensorflow', 'tensorflow_datasets', 'ml_collections')
CLU_KEPT = ('clu', 'clu.metrics', 'clu.values', 'clu.internal', 'clu.internal.utils')


class Hiding(importlib.abc.MetaPathFinder):
  """An import finder that finds nothing hidden (importlib.util.find_spec gives None, as for a
  package that is not installed: etils asks so for TensorFlow)."""

  def __init__(self, finder):
    self.finder = finder

  def find_spec(self, name, path=None, target=None):
    top = name.split('.')[0]
    if top in HIDDEN or (top == 'clu' and name not in CLU_KEPT):
      return None
    return self.finder.find_spec(name, path, target)

  def __getattr__(self, name):
    return getattr(self.finder, name)


sys.meta_path[:] = [Hiding(finder) for finder in sys.meta_path]
runpy.run_module('experiments.gpu_session', run_name='__main__', alter_sys=True)
'''

WORDS = ('the king', 'my lord', 'and', 'of', 'to thee', 'what', 'shall', 'be', 'not', 'love',
         'night', 'speak', 'CORIOLANUS:', 'First Citizen:', '\n', ',', '.', '?')


@pytest.mark.slow
def test_smoke_runs_every_part_without_tensorflow_ml_collections_or_most_of_clu(tmp_path):
  text = tmp_path / 'text.txt'
  rng = np.random.default_rng(0)
  text.write_text(' '.join(rng.choice(WORDS, size=4000)), encoding='utf-8')
  out = tmp_path / 'out'
  run = subprocess.run([sys.executable, '-c', HIDE_AND_RUN, f'--out={out}', '--smoke',
                        f'--data={text}'], cwd=REPO, capture_output=True, text=True,
                       timeout=900, check=False)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
  results = json.loads((out / 'results.json').read_text())
  assert set(results['parts']) == PARTS
  for name, part in results['parts'].items():
    assert part['status'] == 'ok', (name, part.get('traceback'), part)
  engine = results['parts']['engine']
  assert engine['passed'] >= 2 and not engine['failed'] and not engine['skipped']
  assert len(results['parts']['throughput']['rows']) == 2
  assert [r['devices'] for r in results['parts']['two_gpus']['rows']] == [1, 2]
  runs = results['parts']['shakespeare']['runs']
  assert [(r['method'], r['steps']) for r in runs] == [('bp', 24), ('fdg', 24)]
  assert all(np.isfinite(r['best_val_loss']) and r['steps_per_sec'] > 0 for r in runs)
  summary = (out / 'summary.md').read_text()
  for name in PARTS:
    assert f'## {name}: ok' in summary
  assert sorted(os.listdir(out)) == ['results.json', 'summary.md']
