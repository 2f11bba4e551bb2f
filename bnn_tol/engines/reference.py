"""The reference engine: ``faults.inject`` / ``faults.apply`` + the model's own forward pass.

Any model, every fault target and error model; the oracle the other engines are tested against
(and the only engine for activation, threshold and BN errors).
"""

from __future__ import annotations

from bnn_tol.core.inference import accuracy
from bnn_tol.engines.base import Engine, register_engine
from bnn_tol.faults.apply import apply
from bnn_tol.faults.inject import inject

__all__ = ["ReferenceEngine"]


@register_engine
class ReferenceEngine(Engine):
    """``faults.inject`` + :func:`~bnn_tol.core.inference.accuracy` per map: any model, every
    target."""

    name, rank = "reference", 9
    targets = frozenset({"weights", "activations", "thresholds", "bn"})

    def accuracies(self, maps, seeds, p01, p10, bar):  # noqa: D102
        out = []
        for s in seeds:
            with inject(self.model, (p01, p10), seed=s, layers=self.layers,
                        targets=self.targets, error=self.error, protect=self.protect):
                out.append(accuracy(self.model, self.data, batch_size=self.batch_size))
            bar.update(1)
        return out

    def flips(self, fmap, p01, p10):  # noqa: D102
        return {}

    def evaluate(self, flips):  # noqa: D102
        out = []
        for fl in flips:
            with apply(self.model, fl):
                out.append(accuracy(self.model, self.data, batch_size=self.batch_size))
        return out
