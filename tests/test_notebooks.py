"""Every notebook runs top to bottom on the smoke preset (nbclient), so none of them rots."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(n for n in os.listdir(os.path.join(ROOT, "notebooks")) if n.endswith(".ipynb"))


def test_the_three_notebooks_exist():
    assert NOTEBOOKS == ["ablations.ipynb", "lowshot.ipynb", "tour.ipynb"]


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_on_the_smoke_preset(name, tmp_path, monkeypatch):
    # The notebooks' runs compile in the session's XLA cache (conftest.py), shared with the other tests.
    monkeypatch.setenv("ALLPET_PRESET", "smoke")
    monkeypatch.setenv("ALLPET_RUNS_DIR", str(tmp_path))
    monkeypatch.setenv("ALLPET_ROOT", ROOT)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    # Two of the ablations' six arms: the others are `full` with other flags, which the notebook checks
    # against the config before it trains (the six took 18 of the suite's minutes).
    monkeypatch.setenv("ALLPET_ARMS", "full;TMA on (task)")
    notebook = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
    NotebookClient(notebook, timeout=1500, kernel_name="python3",
                   resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}}).execute()
    text = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))
    if name == "ablations.ipynb":
        assert "| full | 1 |" in text and "| TMA on (task) | 1 |" in text
    if name == "lowshot.ipynb":
        assert "low-shot gap" in text
    if name == "tour.ipynb":
        assert "dot test: relative error" in text
