"""Every notebook in notebooks/ runs top to bottom in a fresh kernel at the CI size, and the copy stored
in the repository carries the outputs of a complete run (GitHub and Colab show them as they are).

The notebooks run through `notebooks/execute.py` (`python notebooks/execute.py` refreshes the stored
outputs): a kernel of this interpreter, a temporary working folder, VSTEER_NOTEBOOK_SIZE=ci and the
Hugging Face hub offline. A new notebook in notebooks/ is picked up without changes here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def _runner():
    """notebooks/execute.py as a module (notebooks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("vsteer_notebooks_execute", NOTEBOOK_DIR / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_notebooks_are_found():
    names = {path.name for path in NOTEBOOKS}
    assert {"01_quickstart.ipynb", "02_train_value_head.ipynb", "03_compare_profs.ipynb"} <= names
    assert [p.name for p in _runner().notebook_paths()] == [p.name for p in NOTEBOOKS]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_at_ci_size(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    # raises nbclient's CellExecutionError, with the failing cell and its traceback, on any error
    _runner().execute(nb, tmp_path, size="ci")
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_stored_outputs_come_from_a_complete_run(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), (
        f"{path.name} was not executed top to bottom in one kernel; run `python notebooks/execute.py {path.name}`"
    )
    outputs = [output for cell in code for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"], f"{path.name} is stored with an error output"
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} is stored without its plots"
    assert nb.metadata.kernelspec.name == "python3"
