"""Fault-map drawing: the library's map of one stored tensor (:func:`bnn_tol.faults.maps.
fault_map`: banded geometric gaps in numpy, :mod:`bnn_tol.faults.draw`) against the naive draw
of one float64 uniform per bit (``torch.rand(n) < cap``), for 4.2 Mbit (about the vgg3 weights;
quick: 0.42 Mbit) at caps 0.1 and 0.01, seed to map, best of 7 each in the same process.
``ratio`` = naive seconds / library seconds. Also the raw streams: torch's ``torch.rand`` and
the numpy replica of its generator (``exact``: the same values bit for bit).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from benchmarks._timing import best
from bnn_tol.faults import draw, maps

SEED = 7



def _best(f, repeat: int = 7) -> float:
    return best(f, repeat)


def _naive(n: int, cap: float):
    u = torch.rand(n, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)
    keep = u < cap
    return keep.nonzero().flatten(), u[keep]


def run(quick: bool = False) -> pd.DataFrame:
    n = 420_000 if quick else 4_200_000
    rows = []
    for cap in (0.1, 0.01):
        m = maps.fault_map(n, cap, seed=SEED)
        t_naive = _best(lambda cap=cap: _naive(n, cap))
        t_lib = _best(lambda cap=cap: maps.fault_map(n, cap, seed=SEED))
        rows.append({"case": f"fault map {n / 1e6:g} Mbit cap {cap} ({m.idx.numel()} u)",
                     "naive": "one float64 uniform per bit (torch)", "naive_ms": 1e3 * t_naive,
                     "ms": 1e3 * t_lib, "ratio": t_naive / t_lib, "exact": None})
    k = 100_000 if quick else 1_000_000
    for name, dtype, ours in (("float64", torch.float64, draw.uniform64),
                              ("float32", torch.float32, draw.uniform32)):
        a = torch.rand(k, generator=torch.Generator().manual_seed(SEED), dtype=dtype).numpy()
        exact = bool(np.array_equal(a, ours(draw.generator(SEED), k)))
        t_torch = _best(lambda dtype=dtype: torch.rand(
            k, generator=torch.Generator().manual_seed(SEED), dtype=dtype))
        t_np = _best(lambda ours=ours: ours(draw.generator(SEED), k))
        rows.append({"case": f"rand {k / 1e6:g} M {name}: numpy replica",
                     "naive": "torch.rand", "naive_ms": 1e3 * t_torch, "ms": 1e3 * t_np,
                     "ratio": t_torch / t_np, "exact": exact})
    return pd.DataFrame(rows)


if __name__ == "__main__":
    print(run().to_markdown(index=False, floatfmt=".4g"))
