"""Engines: exact evaluation of a model under stored-bit flips, and the sweep driver.

Every engine reproduces ``model(x).argmax(1)`` of the faulty model bit for bit; they differ
in speed and in what they support (:func:`engines` lists them, fastest first):

* ``packed`` (:mod:`~bnn_tol.engines.packed`): XNOR/popcount on packed bits, any stride-1 BNN
  on CPU (numba);
* ``int8`` (:mod:`~bnn_tol.engines.int8`): ``torch._int_mm``, fc BNNs on CPUs with VNNI/AMX;
* ``fp32`` (:mod:`~bnn_tol.engines.fp32`): maps batched through stacked weights, any BNN,
  also residual graphs (:mod:`bnn_tol.core.graph`; the only engine besides ``reference`` that
  sweeps them), also CUDA;
* ``fixed`` (:mod:`~bnn_tol.engines.fixed`): any codec (m-bit fixed point) and activation;
* ``reference`` (:mod:`~bnn_tol.engines.reference`): inject + forward, every fault target.

The sweep driver (:mod:`~bnn_tol.engines.driver`) draws the fault maps, asks
:func:`pick_engine` for an engine and writes rows through the sweep file format
(:mod:`~bnn_tol.engines.sweep_file`). ``bnn_tol.evaluate`` is this package.

>>> from bnn_tol import evaluate
>>> df = evaluate.sweep(model, test, bers=[0, .01, .05], n_maps=50, seed=0)  # doctest: +SKIP
>>> evaluate.summarize(df)                                                 # doctest: +SKIP
"""

from bnn_tol.core.inference import accuracy, predict, resolve_device
from bnn_tol.engines import fixed, fp32, int8, packed, reference  # noqa: F401 -- registers them
from bnn_tol.engines.base import (
    MEMORY_BUDGET,
    Engine,
    FlipSet,
    SignEngine,
    engine_class,
    engines,
    pick_engine,
    register_engine,
)
from bnn_tol.engines.chips import profile_sweep, summary_energy
from bnn_tol.engines.driver import accuracy_under_flips, summarize, sweep
from bnn_tol.engines.fixed import FixedPointEngine
from bnn_tol.engines.fp32 import Fp32Engine, GraphFp32Engine
from bnn_tol.engines.int8 import Int8Engine, int8_is_fast
from bnn_tol.engines.packed import PackedEngine
from bnn_tol.engines.reference import ReferenceEngine
from bnn_tol.engines.sweep_file import (
    COLUMNS,
    META_SUFFIX,
    META_VERSION,
    OLD_COLUMNS,
    PREVIOUS_COLUMNS,
    load_sweep,
    meta_path,
    read_sweep,
)

__all__ = ["accuracy", "predict", "resolve_device", "sweep", "accuracy_under_flips",
           "summarize", "read_sweep", "load_sweep", "meta_path", "COLUMNS", "PREVIOUS_COLUMNS",
           "OLD_COLUMNS", "META_SUFFIX", "META_VERSION",
           "engines", "engine_class", "pick_engine", "register_engine", "Engine", "SignEngine",
           "FlipSet", "MEMORY_BUDGET", "Int8Engine", "PackedEngine", "Fp32Engine",
           "GraphFp32Engine", "FixedPointEngine", "ReferenceEngine", "int8_is_fast",
           "profile_sweep", "summary_energy"]
