"""The core: how a weight is stored (:mod:`~bnn_tol.core.codec`), binary layers
(:mod:`~bnn_tol.core.layers`), model factories (:mod:`~bnn_tol.core.models`; residual graphs in
:mod:`~bnn_tol.core.graph`), the compiled model every consumer reads
(:mod:`~bnn_tol.core.compiled`), clean inference (:mod:`~bnn_tol.core.inference`) and the numba
kernels of the bit-level arithmetic (:mod:`~bnn_tol.core.kernels`). Imports nothing above it."""

from bnn_tol.core import graph as _graph  # noqa: F401 -- registers the "graph" factory
