"""Clean inference: the device a model runs on, its predictions and its accuracy.

>>> acc = accuracy(model, test)          # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bnn_tol.data import BNNDataset, grid_of
from bnn_tol.exceptions import InvalidArgument, require_int

__all__ = ["resolve_device", "check_batch_size", "predict", "accuracy"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/``None`` -> ``cuda`` when available, else ``cpu``; other values as given.

    Raises:
        InvalidArgument: ``cuda`` requested but not available.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("device 'cuda' requested but torch.cuda.is_available() is False")
    return dev


def check_batch_size(batch_size, *, optional: bool = False) -> int | None:
    """``batch_size``: an int >= 1 (or ``None`` where a default is chosen)."""
    if batch_size is None and optional:
        return None
    return require_int(batch_size, "batch_size", minimum=1, strict=True)


@torch.no_grad()
def predict(model: nn.Module, data: BNNDataset, *, batch_size: int = 2048) -> Tensor:
    """Predicted class ``argmax_c z_c`` per sample, int64 ``(N,)`` on CPU (eval mode).

    Raises:
        InvalidArgument: an empty dataset, ``batch_size`` not an int >= 1.
    """
    batch_size = check_batch_size(batch_size)
    if len(data) == 0:
        raise InvalidArgument("cannot evaluate on an empty dataset")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = [model(x).argmax(1).cpu() for x, _ in data.batches(batch_size, device=device,
                                                                 grid=grid_of(model))]
    finally:
        model.train(was_training)
    return torch.cat(out)


def accuracy(model: nn.Module, data: BNNDataset, *, batch_size: int = 2048) -> float:
    """Fraction of correctly classified samples: ``mean_n 1{argmax_c z_nc == y_n}``.

    Raises:
        InvalidArgument: see :func:`predict`.
    """
    return float((predict(model, data, batch_size=batch_size) == data.labels).double().mean())
