"""Importance estimators: a registry, the single source of their names.

Every estimator is the mean over images of a per-image contribution ``c_nj`` of neuron ``j``
(:func:`bnn_tol.metrics.importance`). Three families compute the perturbed network
differently:

* ``negation``: neuron ``j``'s binary output is negated on every sample and the exact
  perturbed class scores ``z'_j`` of all neurons of a layer come from one batched rank-1
  update (:func:`bnn_tol.metrics.importance.negation_logits`); the estimator maps
  ``(z'_j, clean)`` to ``c_nj``. Adding one is a function and a :func:`register` line;
* ``taylor``: the first-order change of the loss under the negation (one backward pass);
* ``faults``: neuron ``j``'s incoming weights get the bit errors of the sweep's chips.

>>> from bnn_tol.metrics import estimators
>>> estimators.names()
['accuracy', 'loss', 'flips', 'taylor', 'mc', 'loss_norm']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch.nn.functional as F
from torch import Tensor

from bnn_tol.exceptions import InvalidArgument

__all__ = ["Estimator", "Clean", "register", "names", "get", "check", "FAMILIES"]

FAMILIES = ("negation", "taylor", "faults")


@dataclass
class Clean:
    """The clean network on one batch, what a negation estimator compares against.

    Attributes:
        z: clean class scores ``(B, C)``; ``y``: labels ``(B,)``.
        scale: the output BatchNorm's mean scale (the unit of ``loss_norm``; 1 unless an
            estimator of the call needs it).
    """

    z: Tensor
    y: Tensor
    scale: float = 1.0

    @cached_property
    def pred(self) -> Tensor:
        """Clean predictions ``(B,)``."""
        return self.z.argmax(1)

    @cached_property
    def ok(self) -> Tensor:
        """Clean correctness ``(B,)`` float64 in {0, 1}."""
        return (self.pred == self.y).double()

    @cached_property
    def ce(self) -> Tensor:
        """Clean cross-entropy per sample ``(B,)`` float64."""
        return F.cross_entropy(self.z, self.y, reduction="none").double()

    @cached_property
    def ce_norm(self) -> Tensor:
        """Clean cross-entropy of ``z / scale`` per sample ``(B,)`` float64."""
        return F.cross_entropy(self.z / self.scale, self.y, reduction="none").double()


#: ``(z'_j (B, C, J), predictions of z'_j (B, J), clean) -> c_nj (B, J)`` float64.
Contribution = Callable[[Tensor, Tensor, Clean], Tensor]


@dataclass(frozen=True)
class Estimator:
    """A registered importance estimator.

    Attributes:
        name: the ``estimator=`` value.
        family: one of :data:`FAMILIES`.
        formula: ``I_j`` in words (shown by the CLI help and the docs).
        contribution: the per-image contribution of a ``negation`` estimator, else ``None``.
        needs_scale: it reads ``clean.scale`` (the output BN's scale).
    """

    name: str
    family: str
    formula: str
    contribution: Contribution | None = None
    needs_scale: bool = False


_REGISTRY: dict[str, Estimator] = {}


def register(name: str, *, family: str = "negation", formula: str,
             needs_scale: bool = False) -> Callable[[Contribution | None], Contribution | None]:
    """Decorator registering a ``negation`` estimator's contribution function under ``name``
    (or, called on ``None``, declaring an estimator of another family).

    Raises:
        InvalidArgument: an unknown family, a taken name, or a negation estimator without a
            function.
    """
    if family not in FAMILIES:
        raise InvalidArgument(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if name in _REGISTRY:
        raise InvalidArgument(f"importance estimator {name!r} is already registered")

    def deco(fn: Contribution | None) -> Contribution | None:
        if family == "negation" and fn is None:
            raise InvalidArgument(f"negation estimator {name!r} needs a contribution function")
        _REGISTRY[name] = Estimator(name, family, formula, fn, needs_scale)
        return fn

    return deco


def names() -> list[str]:
    """Registered estimator names, in registration order."""
    return list(_REGISTRY)


def get(name: str) -> Estimator:
    """The estimator ``name``.

    Raises:
        InvalidArgument: an unknown name (lists the registered ones).
    """
    if name not in _REGISTRY:
        raise InvalidArgument(f"unknown importance estimator {name!r}; choose from "
                              f"{', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def check(estimator: str | list[str] | tuple[str, ...]) -> list[str]:
    """``estimator=`` as a non-empty list of registered names.

    Raises:
        InvalidArgument: empty, or naming an unknown estimator.
    """
    ests = [estimator] if isinstance(estimator, str) else list(estimator)
    bad = [e for e in ests if e not in _REGISTRY]
    if bad or not ests:
        raise InvalidArgument(f"unknown importance estimator(s) {bad or ests}; choose from "
                              f"{', '.join(_REGISTRY)}")
    return ests


@register("accuracy", formula="acc(net) - acc(net with h_j -> -h_j)")
def _accuracy(zj: Tensor, pj: Tensor, clean: Clean) -> Tensor:
    return clean.ok[:, None] - (pj == clean.y[:, None]).double()


@register("loss", formula="mean_n [CE(net with h_j -> -h_j)(x_n) - CE(net)(x_n)]")
def _loss(zj: Tensor, pj: Tensor, clean: Clean) -> Tensor:
    cej = F.cross_entropy(zj, clean.y[:, None].expand(pj.shape), reduction="none").double()
    return cej - clean.ce[:, None]


@register("flips", formula="mean_n 1{argmax z'_n != argmax z_n} (prediction flip rate)")
def _flips(zj: Tensor, pj: Tensor, clean: Clean) -> Tensor:
    return (pj != clean.pred[:, None]).double()


register("taylor", family="taylor",
         formula="mean_n sum_pos -2 h_nj dCE_n/dh_nj (first order, one backward pass)")(None)
register("mc", family="faults",
         formula="acc(net) - mean_k acc(net with neuron j's incoming weights on chip k)")(None)


@register("loss_norm", needs_scale=True,
          formula="mean_n [CE(z'_n / s) - CE(z_n / s)], s the output BN's mean scale")
def _loss_norm(zj: Tensor, pj: Tensor, clean: Clean) -> Tensor:
    cej = F.cross_entropy(zj / clean.scale, clean.y[:, None].expand(pj.shape),
                          reduction="none").double()
    return cej - clean.ce_norm[:, None]
