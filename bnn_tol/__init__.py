"""bnn_tol: bit error tolerance of binarized neural networks.

The package is layered bottom up (each layer imports only those below it; ``make lint``
checks it with import-linter)::

    cli                       the bnn-tol command
    study                     study runner, analysis, report, plots, demo
    metrics | train           tolerance metrics | (bit flip) training
    engines | interop         exact sweep engines + sweep driver | checkpoints, adapt, ONNX,
                              export, numpy deploy
    faults                    seeds, error models, the one flip path
    core                      codecs, layers, models, the compiled model, kernels
    data, schema, files, ...  datasets, table schemas, safe files, provenance, exceptions

The stage names of the pipeline are attributes of the package, so a notebook reads as the
pipeline does (``bnn_tol.errors`` is :mod:`bnn_tol.faults`, ``bnn_tol.evaluate`` is
:mod:`bnn_tol.engines`, ``bnn_tol.models`` is :mod:`bnn_tol.core.models`, ...):

>>> import bnn_tol
>>> model = bnn_tol.models.build("fc", hidden=(64, 64), in_shape=(1, 8, 8))
"""

from __future__ import annotations

import importlib
from typing import Any

from bnn_tol._version import __version__

#: Stage name -> the module that implements it (imported on first use).
STAGES = {
    "data": "bnn_tol.data",
    "codec": "bnn_tol.core.codec",
    "layers": "bnn_tol.core.layers",
    "models": "bnn_tol.core.models",
    "compiled": "bnn_tol.core.compiled",
    "errors": "bnn_tol.faults",
    "faults": "bnn_tol.faults",
    "profile": "bnn_tol.faults.chip",
    "evaluate": "bnn_tol.engines",
    "engines": "bnn_tol.engines",
    "train": "bnn_tol.train",
    "metrics": "bnn_tol.metrics",
    "interop": "bnn_tol.interop",
    "bundle": "bnn_tol.interop.bundle",
    "deploy": "bnn_tol.interop.deploy",
    "study": "bnn_tol.study",
    "analysis": "bnn_tol.study.analysis",
    "plots": "bnn_tol.study.plots",
    "report": "bnn_tol.study.report",
    "provenance": "bnn_tol.provenance",
    "schema": "bnn_tol.schema",
    "exceptions": "bnn_tol.exceptions",
    "cli": "bnn_tol.cli",
    "core": "bnn_tol.core",
}
#: Functions at the top: ``bnn_tol.save/load`` (checkpoints), ``export`` (deploy bundle),
#: ``adapt`` (bring your own BNN).
FUNCTIONS = {
    "save": ("bnn_tol.interop.checkpoint", "save"),
    "load": ("bnn_tol.interop.checkpoint", "load"),
    "export": ("bnn_tol.interop.bundle", "export"),
    "adapt": ("bnn_tol.interop.adapt", "adapt"),
}

__all__ = [*STAGES, *FUNCTIONS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in STAGES:
        return importlib.import_module(STAGES[name])
    if name in FUNCTIONS:
        mod, attr = FUNCTIONS[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'bnn_tol' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
