"""bnn_tol: bit error tolerance of binarized neural networks.

Pipeline, one module per stage: ``data -> layers/models -> errors -> train -> evaluate ->
metrics -> analysis -> plots``; ``cli`` is the ``bnn-tol`` command.

>>> import bnn_tol
>>> model = bnn_tol.models.build("fc", hidden=(64, 64), in_shape=(1, 8, 8))
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from . import data, errors, evaluate, layers, models, train  # noqa: E402
from .io import load, save  # noqa: E402

_LAZY = {"metrics", "analysis", "plots", "study", "report", "cli", "codec", "compiled",
         "profile", "bundle", "deploy"}

__all__ = ["data", "errors", "evaluate", "layers", "models", "train", "save", "load", "export",
           *sorted(_LAZY), "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    if name == "export":  # bnn_tol.export(model, out): the bit-exact bundle (bnn_tol.bundle)
        return importlib.import_module(".bundle", __name__).export
    raise AttributeError(f"module 'bnn_tol' has no attribute {name!r}")
