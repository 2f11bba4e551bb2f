"""Faults: seeds, error models and the one path by which stored bits flip."""

from bnn_tol.faults.apply import (
    BULK_FROM,
    FixedFlips,
    FlipSet,
    apply,
    attach,
    check_flips,
    negate,
    negate_,
)
from bnn_tol.faults.maps import *  # noqa: F403
from bnn_tol.faults.maps import __all__ as _maps_all

__all__ = [*_maps_all, "BULK_FROM", "FixedFlips", "FlipSet", "apply", "attach", "check_flips",
           "negate", "negate_"]
