"""Execute every notebook in notebooks/ and fail on any error (including a failed assert)."""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))


def test_notebooks_found():
    assert any(path.name == "training.ipynb" for path in PATHS), PATHS


@pytest.mark.parametrize("path", PATHS, ids=[path.stem for path in PATHS])
def test_notebook_runs(path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=300,  # per cell
        kernel_name="python3",  # jupyter_client starts it with this interpreter (the venv)
        resources={"metadata": {"path": str(NOTEBOOKS)}},  # cwd of the kernel
    )
    client.execute()  # raises CellExecutionError, with the cell's traceback, on any error
