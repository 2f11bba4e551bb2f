"""Faults: seeds, error models and the one path by which stored bits flip.

* :mod:`~bnn_tol.faults.seeds` -- the one seed derivation;
* :mod:`~bnn_tol.faults.draw` -- the persistent map draws, numpy only (the library's and
  deploy's), on torch's CPU generator stream;
* :mod:`~bnn_tol.faults.maps` -- rates, fault maps (:func:`fault_map`), transient draws on the
  model's device (bit flip training), transient and persistent layer faults, layer selection;
* :mod:`~bnn_tol.faults.registry` -- error models by name (:func:`models`,
  :func:`error_model`, :func:`register_error`) and the one drawing entry point;
* one module per built-in error model (:mod:`~bnn_tol.faults.bernoulli`, ...);
* :mod:`~bnn_tol.faults.params` -- errors in BN thresholds and BN words;
* :mod:`~bnn_tol.faults.apply` -- flip sets applied to a model, the flip primitive;
* :mod:`~bnn_tol.faults.inject` -- :func:`inject`, the replay of a sweep row;
* :mod:`~bnn_tol.faults.attack` -- worst-case bit errors: the greedy gradient-guided attack
  (``faults.attack.attack``) and its random baseline, as flip sets in flip order.
"""

from bnn_tol.faults import attack, bernoulli, chip, stuck_at  # noqa: F401 -- models register
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
from bnn_tol.faults.inject import inject
from bnn_tol.faults.maps import *  # noqa: F403
from bnn_tol.faults.maps import __all__ as _maps_all
from bnn_tol.faults.registry import (
    DEFAULT,
    STREAMS,
    BitMap,
    ErrorModel,
    Site,
    draw_maps,
    draw_sites,
    error_model,
    model_sites,
    models,
    register_error,
)

__all__ = [*_maps_all, "BULK_FROM", "FixedFlips", "FlipSet", "apply", "attach", "check_flips",
           "negate", "negate_", "inject", "DEFAULT", "STREAMS", "BitMap", "ErrorModel", "Site",
           "draw_maps", "draw_sites", "error_model", "model_sites", "models", "register_error"]
