"""pyproject.toml builds a wheel holding every module of fdg_jax and declaring what they import."""

import ast
import glob
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Top-level module -> the distribution that provides it (where the names differ).
DISTRIBUTIONS = {'absl': 'absl-py', 'orbax': 'orbax-checkpoint', 'PIL': 'pillow',
                 'tensorflow_datasets': 'tensorflow-datasets', 'tensorflow': 'tensorflow-cpu'}


def imported_distributions() -> set:
  """Third-party distributions imported anywhere in fdg_jax/ (nested imports included)."""
  modules = set()
  for path in glob.glob(os.path.join(REPO, 'fdg_jax', '**', '*.py'), recursive=True):
    with open(path) as f:
      for node in ast.walk(ast.parse(f.read())):
        if isinstance(node, ast.Import):
          modules.update(a.name.split('.')[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
          modules.add(node.module.split('.')[0])
  third_party = modules - set(sys.stdlib_module_names) - {'fdg_jax', '__future__'}
  return {DISTRIBUTIONS.get(m, m).lower().replace('_', '-') for m in third_party}


@pytest.mark.slow
def test_wheel_has_the_modules_and_declares_their_imports(tmp_path):
  source = tmp_path / 'src'   # a copy, so the build leaves no build/ or egg-info in the repo
  source.mkdir()
  for name in ('pyproject.toml', 'README.md'):
    shutil.copy(os.path.join(REPO, name), source)
  shutil.copytree(os.path.join(REPO, 'fdg_jax'), source / 'fdg_jax',
                  ignore=shutil.ignore_patterns('__pycache__'))
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps',
                  '--no-build-isolation', '-w', str(tmp_path / 'dist'), str(source)],
                 check=True, capture_output=True)
  [wheel] = glob.glob(str(tmp_path / 'dist' / 'fdg_jax-*.whl'))
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    [metadata] = [n for n in names if n.endswith('.dist-info/METADATA')]
    metadata = z.read(metadata).decode()
  package = os.path.join(REPO, 'fdg_jax')
  modules = {os.path.relpath(p, package)
             for p in glob.glob(os.path.join(package, '**', '*.py'), recursive=True)}
  assert {'engine/pipeline.py', 'tasks/base.py', 'trainer/train.py'} <= modules
  assert {n.split('/', 1)[1] for n in names if n.startswith('fdg_jax/')} == modules
  declared = {re.split(r'[<>=;\[ ]', line, maxsplit=1)[0].lower().replace('_', '-')
              for line in re.findall(r'^Requires-Dist: (.+)$', metadata, flags=re.M)}
  missing = imported_distributions() - declared
  assert not missing, f'fdg_jax imports {missing}: declare them in pyproject.toml'


def test_readme_install_makes_the_package_importable_from_any_directory(tmp_path):
  result = subprocess.run(
      [sys.executable, '-c', 'import fdg_jax, os; print(os.path.dirname(fdg_jax.__file__))'],
      cwd=tmp_path, capture_output=True, text=True, env={**os.environ, 'PYTHONPATH': ''})
  assert result.returncode == 0, (
      "fdg_jax is not installed in this environment: run the README's set-up command "
      '(pip install --no-deps --no-build-isolation -e .)\n' + result.stderr[-1000:])
  assert os.path.samefile(result.stdout.strip(), os.path.join(REPO, 'fdg_jax'))
