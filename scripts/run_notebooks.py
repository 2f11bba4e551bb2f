"""Execute the notebooks in place and store them WITH their outputs (`make notebooks`).

Each notebook runs top to bottom with nbclient (kernel ``python3``, the interpreter running this
script, so the venv's), working directory ``notebooks/``, on the notebook's full settings
(``BNN_TOL_NB_SMALL`` unset: the test suite sets it and executes a copy), importing the
``bnn_tol`` of this checkout. What a notebook writes (checkpoints, the study of 03, its report)
goes to ``runs/notebooks/<name>/``, emptied first so a cached study task never stands in for a
fresh run.

The stored file is meant to give a small diff when re-run on the same code: the seeds are fixed in
the notebooks, the thread count is fixed here (``--threads``, default 2), execution timing
metadata is not recorded, widget state and progress-bar widgets are dropped, and the only
environment-dependent warning (tqdm's "IProgress not found") is silenced. A notebook that fails is
reported and left as it was; the others are still run.

    python scripts/run_notebooks.py                    # all of notebooks/*.ipynb
    python scripts/run_notebooks.py notebooks/02_metrics_explained.ipynb
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
WIDGET_MIME = (
    "application/vnd.jupyter.widget-view+json",
    "application/vnd.jupyter.widget-state+json",
)


def normalize(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop what changes between identical runs: timing metadata and widget state/outputs."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            continue
        outputs = []
        for out in cell.outputs:
            data = out.get("data")
            if data is not None:
                for mime in WIDGET_MIME:
                    data.pop(mime, None)
                if not data:  # a widget and nothing else (a tqdm bar)
                    continue
            outputs.append(out)
        cell.outputs = outputs
    return nb


def _environment(out: Path, threads: int) -> None:
    """The kernel inherits this process's environment."""
    os.environ.pop("BNN_TOL_NB_SMALL", None)
    # the bnn_tol of this checkout, also when the venv's editable install points at another
    # one (a git worktree sharing the venv)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    # relative to the kernel's working directory (notebooks/): the printed path is the same
    # on every machine
    os.environ["BNN_TOL_NB_OUT"] = os.path.relpath(out, NOTEBOOKS)
    os.environ["PYTHONHASHSEED"] = "0"
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ["TQDM_DISABLE"] = "1"
    os.environ["PYTHONWARNINGS"] = "ignore:IProgress not found"


def run(path: Path, out_root: Path, *, threads: int, timeout: int) -> float:
    """Execute one notebook and write it back with its outputs; return the seconds it took."""
    out = out_root / path.stem
    shutil.rmtree(out, ignore_errors=True)
    _environment(out, threads)
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = nbclient.NotebookClient(
        nb, timeout=timeout, kernel_name="python3", record_timing=False,
        resources={"metadata": {"path": str(NOTEBOOKS)}})
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    normalize(nb)
    nbformat.validate(nb)
    tmp = path.with_name(f".{path.name}.tmp")
    nbformat.write(nb, tmp)
    tmp.replace(path)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help="notebooks to run (default: notebooks/*.ipynb)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "notebooks",
                        help="where the notebooks write their files (default runs/notebooks)")
    parser.add_argument("--threads", type=int, default=2,
                        help="CPU threads of the kernel (fixed for reproducible numbers)")
    parser.add_argument("--timeout", type=int, default=3600,
                        help="seconds per cell (default 3600: a loaded machine is slow)")
    args = parser.parse_args(argv)
    paths = [p.resolve() for p in args.notebooks] or sorted(NOTEBOOKS.glob("*.ipynb"))
    failed = []
    total = 0.0
    for path in paths:
        print(f"{path.name}: running", flush=True)
        try:
            seconds = run(path, args.out.resolve(), threads=args.threads, timeout=args.timeout)
        except (nbclient.exceptions.CellExecutionError, nbclient.exceptions.CellTimeoutError,
                nbclient.exceptions.DeadKernelError) as exc:
            print(f"{path.name}: FAILED, left unchanged:\n{exc}", flush=True)
            failed.append(path.name)
            continue
        total += seconds
        print(f"{path.name}: stored with outputs, {seconds:.0f} s, "
              f"{path.stat().st_size / 1e3:.0f} kB", flush=True)
    print(f"{len(paths) - len(failed)} of {len(paths)} notebooks stored with outputs "
          f"in {total:.0f} s", flush=True)
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
