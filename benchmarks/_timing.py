"""What the benchmarks share: best-of-``repeat`` wall-clock timing."""

from __future__ import annotations

import time
from collections.abc import Callable


def best(f: Callable[[], object], repeat: int = 3) -> float:
    """Seconds of the fastest of ``repeat`` calls of ``f``, after one warm-up call (numba
    compilation, allocator)."""
    f()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)
