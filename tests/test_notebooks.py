"""The notebooks in notebooks/ run top to bottom (small setting) and are stored without outputs."""

import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(REPO, 'notebooks')
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, '*.ipynb')))
CELL_TIMEOUT_S = 120


def test_the_notebooks_are_there():
  names = {os.path.basename(p) for p in NOTEBOOKS}
  assert {'quickstart.ipynb', 'paper_models.ipynb', 'results.ipynb',
          'language_model.ipynb'} <= names


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_stripped(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == 'code':
      assert cell.outputs == [], f'{os.path.basename(path)} cell {i} has outputs: strip them'
      assert cell.execution_count is None, f'{os.path.basename(path)} cell {i} has a count'


@pytest.mark.slow
@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, monkeypatch, tmp_path):
  # The kernel inherits this environment (conftest's simulated CPU devices included).
  monkeypatch.setenv('FDG_NOTEBOOK_SMALL', '1')
  monkeypatch.setenv('MPLBACKEND', 'module://matplotlib_inline.backend_inline')
  # The notebooks keep their outputs in tempfile.mkdtemp() folders, for the user to look at;
  # here they go under the test's own temporary folder, which pytest prunes.
  monkeypatch.setenv('TMPDIR', str(tmp_path))
  nb = nbformat.read(path, as_version=4)
  # 'python3' is the kernel spec ipykernel installs in this environment; jupyter_client starts
  # it with this interpreter (sys.executable), so nothing is registered globally.
  client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name='python3',
                          resources={'metadata': {'path': NOTEBOOK_DIR}})
  client.execute()   # raises CellExecutionError, naming the cell, on any error
