"""Faults: seeds, error models and the one path by which stored bits flip."""

from bnn_tol.faults.maps import *  # noqa: F403
from bnn_tol.faults.maps import __all__  # noqa: F401
