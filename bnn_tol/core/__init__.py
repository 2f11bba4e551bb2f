"""The core: how a weight is stored (:mod:`~bnn_tol.core.codec`), binary layers
(:mod:`~bnn_tol.core.layers`), model factories (:mod:`~bnn_tol.core.models`), the compiled
model every consumer reads (:mod:`~bnn_tol.core.compiled`), clean inference
(:mod:`~bnn_tol.core.inference`) and the numba kernels of the bit-level arithmetic
(:mod:`~bnn_tol.core.kernels`). Imports nothing above it."""
