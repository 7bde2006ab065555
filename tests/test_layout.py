"""The package layout's import rules (each package's __init__ states its own), read from the
source: which fdg_jax modules every module of the package imports."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'fdg_jax'

# What each part of fdg_jax may import of fdg_jax (besides itself).
ALLOWED = {
    'engine': set(),
    'models': set(),
    'data': set(),
    'tasks': {'engine', 'models', 'data'},
    'trainer': {'engine', 'models', 'data', 'tasks'},
    '__init__': {'engine', 'models'},   # the library's API: no trainer dependencies
    'main': {'trainer', 'engine', 'data'},
    'sample': {'trainer', 'engine', 'models', 'data'},
    'launch': {'engine'},
}


def _part(path: pathlib.Path) -> str:
  relative = path.relative_to(PACKAGE)
  return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _imported_parts(path: pathlib.Path) -> set[str]:
  """The parts of fdg_jax a module imports (`from fdg_jax import X`, `from fdg_jax.X...`,
  `import fdg_jax.X`), wherever the import statement is."""
  parts = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module:
      names = node.module.split('.')
      if names[0] != 'fdg_jax':
        continue
      if len(names) > 1:
        parts.add(names[1])
      else:
        parts.update(alias.name for alias in node.names)
    elif isinstance(node, ast.Import):
      for alias in node.names:
        names = alias.name.split('.')
        if names[0] == 'fdg_jax' and len(names) > 1:
          parts.add(names[1])
  return parts


MODULES = sorted(PACKAGE.rglob('*.py'))


def test_every_module_belongs_to_a_part_with_rules():
  assert {_part(path) for path in MODULES} == set(ALLOWED)


@pytest.mark.parametrize('path', MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_rules(path):
  part = _part(path)
  forbidden = _imported_parts(path) - ALLOWED[part] - {part}
  assert not forbidden, f'{path.relative_to(PACKAGE)} ({part}) imports {sorted(forbidden)}'


def test_nothing_imports_the_trainer_but_main():
  importers = {str(path.relative_to(PACKAGE)) for path in MODULES
               if _part(path) != 'trainer' and 'trainer' in _imported_parts(path)}
  assert importers == {'main.py', 'sample.py'}


def test_the_rules_see_a_violation(tmp_path):
  """The reader finds every form of import a violation could take."""
  module = tmp_path / 'm.py'
  module.write_text('from fdg_jax import tasks\nimport fdg_jax.trainer.train\n'
                    'def f():\n  from fdg_jax.data.text_data import load_text\n')
  assert _imported_parts(module) == {'tasks', 'trainer', 'data'}
