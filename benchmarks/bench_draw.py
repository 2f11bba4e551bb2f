"""Fault-map drawing: the numpy replica (:mod:`bnn_tol.faults.draw`) vs the library's torch
draw (:func:`bnn_tol.faults.maps.fault_map`, numba gap kernel when present) for one map of
4.2 Mbit (about the vgg3 weights) at caps 0.1 and 0.01 (quick: 0.42 Mbit), seed to map
(generator construction included), best of 7 each, in the same process. ``exact``: the two
maps are equal (indices and float64 uniforms bit for bit). ``ratio`` = torch seconds / numpy
seconds (> 1: numpy faster). Also the raw streams (1 M float64 / float32 uniforms).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from bnn_tol.faults import draw, maps

SEED = 7


def _best(f: Callable[[], object], repeat: int = 7) -> float:
    f()  # warm up (numba's cached kernel, allocator)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def _row(case: str, t_torch: float, t_np: float, exact: bool) -> dict:
    return {"case": case, "torch_ms": 1e3 * t_torch, "numpy_ms": 1e3 * t_np,
            "ratio": t_torch / t_np, "exact": exact}


def run(quick: bool = False) -> pd.DataFrame:
    n = 420_000 if quick else 4_200_000
    rows = []
    for cap in (0.1, 0.01):
        tm = maps.fault_map(n, cap, generator=torch.Generator().manual_seed(SEED))
        nm = draw.fault_map(n, cap, draw.generator(SEED))
        exact = (np.array_equal(tm.idx.numpy(), nm.idx)
                 and np.array_equal(tm.u.numpy().view(np.uint64), nm.u.view(np.uint64)))
        t_torch = _best(lambda cap=cap: maps.fault_map(
            n, cap, generator=torch.Generator().manual_seed(SEED)))
        t_np = _best(lambda cap=cap: draw.fault_map(n, cap, draw.generator(SEED)))
        rows.append(_row(f"fault_map {n / 1e6:g} Mbit cap {cap} ({nm.idx.size} u)",
                         t_torch, t_np, exact))
    m = 100_000 if quick else 1_000_000
    for name, dtype, ours in (("float64", torch.float64, draw.uniform64),
                              ("float32", torch.float32, draw.uniform32)):
        a = torch.rand(m, generator=torch.Generator().manual_seed(SEED), dtype=dtype).numpy()
        exact = np.array_equal(a, ours(draw.generator(SEED), m))
        t_torch = _best(lambda dtype=dtype: torch.rand(
            m, generator=torch.Generator().manual_seed(SEED), dtype=dtype))
        t_np = _best(lambda ours=ours: ours(draw.generator(SEED), m))
        rows.append(_row(f"rand {m / 1e6:g} M {name}", t_torch, t_np, exact))
    return pd.DataFrame(rows)


if __name__ == "__main__":
    print(run().to_markdown(index=False, floatfmt=".4g"))
