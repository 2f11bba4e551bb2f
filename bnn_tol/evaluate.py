"""Evaluation of BNNs: clean accuracy (and, built on it, BER sweeps)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .data import BNNDataset

__all__ = ["accuracy", "predict", "resolve_device"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/``None`` -> ``cuda`` when available, else ``cpu``; other values as given.

    Raises:
        ValueError: ``cuda`` requested but not available.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    return dev


@torch.no_grad()
def predict(model: nn.Module, data: BNNDataset, *, batch_size: int = 2048) -> Tensor:
    """Predicted class ``argmax_c z_c`` per sample, int64 ``(N,)`` on CPU (eval mode)."""
    if len(data) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = [model(x).argmax(1).cpu() for x, _ in data.batches(batch_size, device=device)]
    finally:
        model.train(was_training)
    return torch.cat(out)


def accuracy(model: nn.Module, data: BNNDataset, *, batch_size: int = 2048) -> float:
    """Fraction of correctly classified samples: ``mean_n 1{argmax_c z_nc == y_n}``."""
    return float((predict(model, data, batch_size=batch_size) == data.labels).double().mean())
