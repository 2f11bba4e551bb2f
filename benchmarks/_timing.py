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


def best_interleaved(fs: dict[str, Callable[[], object]], rounds: int = 3) -> dict[str, float]:
    """Seconds of the fastest call of each ``fs[name]`` over ``rounds`` rounds that call every
    function once in turn, after one warm-up call each. On a machine whose throughput drifts
    between minutes (shared VMs), rates measured in the same rounds stay comparable where
    back-to-back blocks of repeats would not."""
    for f in fs.values():
        f()
    times: dict[str, list[float]] = {name: [] for name in fs}
    for _ in range(rounds):
        for name, f in fs.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {name: min(ts) for name, ts in times.items()}
