"""The notebooks run top to bottom (small settings: BNN_TOL_NB_SMALL=1).

Each notebook asserts its own claims in its cells (a checkpoint reloads bit for bit, the
worst-case flip experiment matches ceil(m / 2), importance by hand equals
metrics.importance, ...); a failing assert fails the test.
"""

import json
from pathlib import Path

import nbformat
import pandas as pd
import pytest

nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"


def _execute(name: str, tmp_path: Path, monkeypatch) -> nbformat.NotebookNode:
    monkeypatch.setenv("BNN_TOL_NB_SMALL", "1")
    monkeypatch.setenv("BNN_TOL_NB_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
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


def test_notebooks_are_committed_without_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        assert nb.metadata["kernelspec"]["name"] == "python3"
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), path.name


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
