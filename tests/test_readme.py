"""The README's Python example runs as printed."""

import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md')


def test_readme_python_example_runs(capsys):
  with open(README) as f:
    blocks = re.findall(r'```python\n(.*?)```', f.read(), flags=re.S)
  assert blocks, 'the README lost its Python example'
  exec(compile(blocks[0], 'README.md', 'exec'), {})  # pylint: disable=exec-used
  assert '(32, 10)' in capsys.readouterr().out
