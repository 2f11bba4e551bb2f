"""The notebooks are committed with their outputs and still run top to bottom in the tests.

Stored: ``make notebooks`` (scripts/run_notebooks.py) executes each notebook on its full
settings and writes it back with its outputs, so its figures show on the repository page;
test_notebooks_are_committed_with_outputs fails for a notebook committed without them.

Executed: on a copy, with its outputs cleared first and never written back, on small settings
(BNN_TOL_NB_SMALL=1). Each notebook asserts its own claims in its cells (a checkpoint reloads
bit for bit, the worst-case flip experiment matches ceil(m / 2), importance by hand equals
metrics.importance, ...); a failing assert fails the test.
"""

import json
import os
import re
from pathlib import Path

import nbformat
import pandas as pd
import pytest

nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
# a code cell that draws: a bnn_tol.plots function or a Figure built by hand
DRAWS = re.compile(r"\bplots\.\w+\(|\bFigure\(")


def _execute(name: str, tmp_path: Path, monkeypatch) -> nbformat.NotebookNode:
    monkeypatch.setenv("BNN_TOL_NB_SMALL", "1")
    monkeypatch.setenv("BNN_TOL_NB_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # the kernel imports the bnn_tol under test, also when the venv's editable install points
    # at another checkout (a git worktree sharing the venv)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)  # a copy in memory
    for cell in nb.cells:  # the checks below read only what this run printed
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    return nb


def _text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            data = out.get("data", {})
            parts.append(json.dumps(data.get("text/html", data.get("text/plain", ""))))
    return "\n".join(parts)


def test_there_are_notebooks():
    assert len(PATHS) >= 4


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebooks_are_committed_with_outputs(path):
    """Run `make notebooks` and commit the notebooks when this fails."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert "widgets" not in nb.metadata, "widget state stored"
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), f"not executed top to bottom: {counts}"
    for cell in code:
        where = f"{path.name}, cell [{cell.execution_count}]"
        assert "execution" not in cell.metadata, f"{where}: timing metadata stored"
        types = [out.output_type for out in cell.outputs]
        assert "error" not in types, f"{where}: error output stored"
        pngs = [out for out in cell.outputs if "image/png" in out.get("data", {})]
        for out in cell.outputs:
            data = out.get("data", {})
            assert not any("widget" in mime for mime in data), f"{where}: widget output stored"
            text = str(out.get("text", "")) + str(data.get("text/plain", ""))
            assert "image/png" in data or not text.startswith("<Figure size"), \
                f"{where}: a figure stored as text, not as an image"
            assert str(ROOT) not in text, f"{where}: output names this machine's path"
        if DRAWS.search(cell.source):
            assert pngs, f"{where} draws a figure but stores no image/png output"


def test_01_quickstart(tmp_path, monkeypatch):
    nb = _execute("01_quickstart", tmp_path, monkeypatch)
    assert (tmp_path / "out" / "normal" / "model.safetensors").is_file()
    text = _text(nb)
    assert "mean_margin_norm" in text and "cohen_d" in text


def test_02_metrics_explained(tmp_path, monkeypatch):
    nb = _execute("02_metrics_explained", tmp_path, monkeypatch)
    assert "output flips after" in _text(nb)


def test_03_flip_vs_normal(tmp_path, monkeypatch):
    _execute("03_flip_vs_normal", tmp_path, monkeypatch)
    out = tmp_path / "out"
    from bnn_tol import study

    models = pd.read_csv(out / "models.csv")
    assert len(models) == len(study.tasks(study.load_config("tiny")))
    assert (out / "report.html").stat().st_size > 10_000


def test_04_bring_your_own_bnn(tmp_path, monkeypatch):
    nb = _execute("04_bring_your_own_bnn", tmp_path, monkeypatch)
    assert (tmp_path / "out" / "deploy" / "manifest.json").is_file()
    assert "numpy == torch" in _text(nb)


def test_run_notebooks_normalize_drops_timing_and_widgets():
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_notebooks",
                                                  ROOT / "scripts" / "run_notebooks.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    nb = nbformat.v4.new_notebook(metadata={"widgets": {"state": {}}})
    bar = nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": {"model_id": "x", "version_major": 2}})
    both = nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": {"model_id": "y", "version_major": 2},
        "text/plain": "50%"})
    text = nbformat.v4.new_output("stream", name="stdout", text="ok\n")
    cell = nbformat.v4.new_code_cell("1", execution_count=1, outputs=[bar, both, text],
                                     metadata={"execution": {"iopub.status.busy": "2026"}})
    nb.cells.append(cell)
    script.normalize(nb)
    assert "widgets" not in nb.metadata and cell.metadata == {}
    assert [o.get("data", {}) for o in cell.outputs] == [{"text/plain": "50%"}, {}]
    nbformat.validate(nb)
