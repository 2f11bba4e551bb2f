"""The end-to-end demo behind ``make demo`` / ``bnn-tol demo``.

Trains a normal and a bit-flip-trained (p = 0.1) ``fc`` BNN on Fashion-MNIST (narrow hidden
layers so that it takes about a minute on 2 CPU cores), saves both checkpoints, and prints
their clean test accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import data, io, models, train

__all__ = ["run"]


def run(
    out: str | Path = "runs/demo",
    *,
    dataset: str = "fashion-mnist",
    data_dir: str | Path | None = None,
    hidden: tuple[int, ...] = (1024, 1024),
    epochs: int = 2,
    flip_ber: float = 0.1,
    seed: int = 0,
    device: str = "auto",
    echo=print,
) -> dict[str, Any]:
    """Run the demo; returns ``{"models": {label: checkpoint dir}, "accuracy": {label: acc}}``."""
    out = Path(out)
    tr = data.load(dataset, "train", data_dir=data_dir)
    te = data.load(dataset, "test", data_dir=data_dir)
    result: dict[str, Any] = {"models": {}, "accuracy": {}}
    for label, ber in (("fc", None), (f"fc-bft{flip_ber:g}", flip_ber)):
        model = models.build("fc", seed=seed, hidden=hidden, in_shape=tr.shape,
                             n_classes=len(tr.classes))
        echo(f"[demo] training {label} ({epochs} epochs, hidden {hidden}, flip BER {ber or 0})")
        hist = train.fit(model, tr, te, epochs=epochs, flip_ber=ber, seed=seed, device=device)
        path = io.save(model, out / label)
        acc = float(hist["test_acc"].iloc[-1])
        result["models"][label] = str(path)
        result["accuracy"][label] = acc
        echo(f"[demo] {label}: clean test accuracy {acc:.4f}  "
             f"({hist['seconds'].sum():.1f} s)  -> {path}")
    return result
