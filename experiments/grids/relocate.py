r"""Rewrites a grid's text records so that they name no machine paths (docs/record's rule).

A grid run from a clean clone records absolute paths: the clone it ran from, the repository its
`--out_dir` points into, the data beside it, the virtual environment's python. This rewrites
them as a reader of the committed records runs them, from the repository root: the repository
and each clone become '.' (paths inside them relative), their parent '..', any virtual
environment's python 'python'. Binary files (TensorBoard event files) are left as they are;
commit them only if they name no machine path (`.gitignore` keeps them out).

    python -m experiments.grids.relocate experiments/results/NAME [--clone=/tmp/grid_repo]

Idempotent; run it again after a grid adds cells. A finished cell's grid_cell.json keeps its
meaning: a data_dir relative to the repository root is the same setting
(`grid._same_setting`).
"""

import argparse
import os
import re
import sys
from typing import Sequence

from experiments.grids import cells as cells_lib

TEXT_SUFFIXES = ('.json', '.md', '.csv', '.txt', '.sh', '.log')
_VENV_PYTHON = re.compile(r'[^\s\'"=]*/\.?venv/bin/python[0-9.]*')


def relocate_text(text: str, roots: Sequence[str]) -> str:
  """`text` with every root (absolute paths; the repository first) written as '.', paths under
  a root relative to it, and the repository's parent as '..'."""
  text = _VENV_PYTHON.sub('python', text)
  for root in sorted({os.path.normpath(r) for r in roots}, key=len, reverse=True):
    text = re.sub(re.escape(root) + r'/', '', text)
    text = re.sub(re.escape(root) + r'(?![\w.-])', '.', text)
  parent = os.path.dirname(os.path.normpath(roots[0]))
  if parent != '/':
    text = re.sub(re.escape(parent) + r'/', '../', text)
  return text


def relocate_tree(folder: str, roots: Sequence[str]) -> list[str]:
  """Rewrites the text records under `folder`; returns the files it changed."""
  changed = []
  for dirpath, _, filenames in os.walk(folder):
    for name in sorted(filenames):
      if not name.endswith(TEXT_SUFFIXES):
        continue
      path = os.path.join(dirpath, name)
      with open(path, encoding='utf-8') as f:
        text = f.read()
      new = relocate_text(text, roots)
      if new != text:
        with open(path, 'w', encoding='utf-8') as f:
          f.write(new)
        changed.append(path)
  return changed


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('folders', nargs='+', help='grid output folders (or any folder of records)')
  parser.add_argument('--clone', action='append', default=[],
                      help='a clone the grid ran from (repeatable)')
  args = parser.parse_args(argv)
  for folder in args.folders:
    if not os.path.isdir(folder):
      print(f'error: {folder!r} is not a folder.', file=sys.stderr)
      return 2
  roots = [cells_lib.REPO] + args.clone
  for folder in args.folders:
    changed = relocate_tree(folder, roots)
    print(f'{folder}: {len(changed)} file(s) rewritten')
  return 0


if __name__ == '__main__':
  sys.exit(main())
