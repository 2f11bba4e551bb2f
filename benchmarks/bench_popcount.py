"""Popcount roofline of one binary layer, and where a packed sweep map spends its time.

``roofline``: one 2048 x 2048 binary layer on 10k samples (quick: 1k samples, 512 x 512), 2
threads: fp32 ``a @ b``, int8 ``torch._int_mm`` and a plain XOR + popcount + accumulate numba
kernel over packed ``uint64`` words in a few blockings (``numba.prange`` over sample blocks,
inner loop over words, ``S`` samples x ``N`` neurons held in registers so one weight-word load
serves ``S`` samples; or 2 samples per weight load with the neurons vectorized over transposed
weights, either 4 words per pass over counts in memory or 64 neurons' counts in registers over
all words as 32-bit lanes), each reducing its counts to one total per sample (so that no kernel
measures the store of a (B, O) int64 array); ``popcount roofline`` is the best rate of them.
Then the packed engine's own kernels (the hidden ones as ``kernels.TILES`` picks them for this
CPU): ``fc_hidden`` (popcount, comparator, packed output bits)
and ``fc_output`` (exact int64 pre-activations) on the same fc layer, and ``conv_hidden``
(zero-bordered image copy, 2 positions x 64 units per register tile, the comparator as a
popcount window per border class) on vgg3's 64 -> 64 channels on 14 x 14, 256 -> 256 on 8 x 8
and vgg7's 512 -> 512 on 7 x 7 (an odd number of positions). Every kernel is timed in the same 9
interleaved rounds (best of each), so the fractions survive this VM's drift. A conv counts every
tap it computes as a MAC, the padding taps included (a padded 8 x 8 layer has 16 % of its taps
outside the image). ``gmacs``: G (binary) multiply-accumulates per second,
``ratio``: against fp32 (fc layer), ``of_roofline``: fraction of the popcount roofline.

``profile``: one packed-engine sweep of fc 784-2048-2048-10 (``runs/fc`` when it exists, else
random init; 5 maps, quick: 2) and of vgg3 (random init; 2 maps, quick: 1) on the 10k test
images (quick: 500), 11 BERs (0 to 10 %), seconds per faulty row split by stage: first layer
(fc: the delta update from the clean output or from the same map's previous BER, a float GEMM
on integer pixels from ``p >= 1 / DELTA_FRACTION``; conv: the channels whose weights flip),
hidden binary layers (``fc_hidden``, ``conv_hidden``, ``pool_or``), output layer
(``fc_output`` and the float BatchNorm + argmax), the per-map weight flips
(:meth:`PackedNet.weights_seq`) and the rest (drawing the fault maps, the sweep driver).
Measured by wrapping the engine's kernel calls with timers.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager

import numpy as np
import pandas as pd
import torch

from benchmarks._timing import best, best_interleaved
from bnn_tol import evaluate
from bnn_tol.core import kernels
from bnn_tol.engines import packed

if kernels.AVAILABLE:
    from numba import njit, prange

    _pc = kernels._popcount
    _taps = kernels._taps
    _tile_sum = kernels._tile_sum

    # The plain kernels reduce their counts to one total per sample (``s`` ``(B,)``), which
    # keeps every count live: writing a (B, O) int64 array moves 8 bytes per (sample, neuron)
    # and on this machine made the 2048 x 2048 layer memory-bound (~1.1x slower), so a
    # roofline would have measured the store, not the popcounts.

    @njit(parallel=True, cache=True, nogil=True)
    def _xor_pop_1x4(x, w, s):  # pragma: no cover - compiled
        nb, nw = x.shape
        for b in prange(nb):
            t = 0
            for o in range(0, w.shape[0], 4):
                a0 = a1 = a2 = a3 = 0
                for k in range(nw):
                    v = x[b, k]
                    a0 += _pc(v ^ w[o, k])
                    a1 += _pc(v ^ w[o + 1, k])
                    a2 += _pc(v ^ w[o + 2, k])
                    a3 += _pc(v ^ w[o + 3, k])
                t += a0 + a1 + a2 + a3
            s[b] = t

    @njit(parallel=True, cache=True, nogil=True)
    def _xor_pop_4x1(x, w, s):  # pragma: no cover - compiled
        nb, nw = x.shape
        for ib in prange(nb // 4):
            b = 4 * ib
            t0 = t1 = t2 = t3 = 0
            for o in range(w.shape[0]):
                a0 = a1 = a2 = a3 = 0
                for k in range(nw):
                    v = w[o, k]
                    a0 += _pc(x[b, k] ^ v)
                    a1 += _pc(x[b + 1, k] ^ v)
                    a2 += _pc(x[b + 2, k] ^ v)
                    a3 += _pc(x[b + 3, k] ^ v)
                t0, t1, t2, t3 = t0 + a0, t1 + a1, t2 + a2, t3 + a3
            s[b], s[b + 1], s[b + 2], s[b + 3] = t0, t1, t2, t3

    @njit(parallel=True, cache=True, nogil=True)
    def _xor_pop_4x2(x, w, s):  # pragma: no cover - compiled
        nb, nw = x.shape
        for ib in prange(nb // 4):
            b = 4 * ib
            t0 = t1 = t2 = t3 = 0
            for o in range(0, w.shape[0], 2):
                a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = 0
                for k in range(nw):
                    v0, v1 = w[o, k], w[o + 1, k]
                    x0, x1, x2, x3 = x[b, k], x[b + 1, k], x[b + 2, k], x[b + 3, k]
                    a00 += _pc(x0 ^ v0)
                    a01 += _pc(x0 ^ v1)
                    a10 += _pc(x1 ^ v0)
                    a11 += _pc(x1 ^ v1)
                    a20 += _pc(x2 ^ v0)
                    a21 += _pc(x2 ^ v1)
                    a30 += _pc(x3 ^ v0)
                    a31 += _pc(x3 ^ v1)
                t0, t1 = t0 + a00 + a01, t1 + a10 + a11
                t2, t3 = t2 + a20 + a21, t3 + a30 + a31
            s[b], s[b + 1], s[b + 2], s[b + 3] = t0, t1, t2, t3

    @njit(parallel=True, cache=True, nogil=True)
    def _xor_pop_2xv(x, w, s):  # pragma: no cover - compiled
        """2 samples per weight load, the neurons vectorized over the transposed weights ``w``
        ``(nw, O)``, the counts in memory, 4 words per pass over them (the engine's kernels on
        CPUs without AVX-512 VPOPCNTDQ, :func:`bnn_tol.core.kernels._taps`)."""
        nb, nw = x.shape
        n_o = w.shape[1]
        xf = x.ravel()
        off = np.arange(nw)
        for ib in prange(nb // 2):
            b = 2 * ib
            s0 = np.empty(n_o, np.int64)
            s1 = np.empty(n_o, np.int64)
            _taps(xf, off, w, b * nw, (b + 1) * nw, s0, s1)
            s[b], s[b + 1] = s0.sum(), s1.sum()

    @njit(parallel=True, cache=True, nogil=True)
    def _xor_pop_tile(x, w, s):  # pragma: no cover - compiled
        """2 samples x 64 neurons per register tile over the transposed weights as 32-bit
        half-words ``w`` ``(2 nw, O)`` (:func:`bnn_tol.core.kernels._halves`), the counts in
        registers across all words (the engine's scheme,
        :func:`bnn_tol.core.kernels._tile_counts`), each tile summed; ``O`` a multiple of
        64."""
        nb, nh = x.shape[0], w.shape[0]
        xf = x.ravel().view(np.uint32)
        off = np.arange(nh)
        for ib in prange(nb // 2):
            b = 2 * ib
            t0 = t1 = 0
            for o0 in range(0, w.shape[1], 64):
                u0, u1 = _tile_sum(xf, off, w, b * nh, (b + 1) * nh, o0)
                t0, t1 = t0 + u0, t1 + u1
            s[b], s[b + 1] = t0, t1

    _BLOCKINGS = {"1 sample x 4 neurons": _xor_pop_1x4, "4 samples x 1 neuron": _xor_pop_4x1,
                  "4 samples x 2 neurons": _xor_pop_4x2,
                  "2 samples x neurons vectorized, 4 words per pass": _xor_pop_2xv,
                  "2 samples x 64 neurons in registers over all words (32-bit lanes)":
                      _xor_pop_tile}



def _best(f, repeat: int = 3) -> float:
    return best(f, repeat)


def _roofline(quick: bool) -> list[dict]:
    """The rooflines and the engine's kernels, timed in the same interleaved rounds."""
    n, m = (1000, 512) if quick else (10_000, 2048)
    fc_case = f"one {m}x{m} binary layer, {n} samples"
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    jobs: dict[str, tuple[str, int, object]] = {}  # implementation -> (case, MACs, call)
    a, b = torch.randn(n, m, generator=g), torch.randn(m, m, generator=g)
    jobs["fp32 a @ b (torch)"] = (fc_case, n * m * m, lambda: a @ b)
    a8 = torch.randint(-128, 128, (n, m), dtype=torch.int8, generator=g)
    w8 = torch.randint(-1, 2, (m, m), dtype=torch.int8, generator=g)
    jobs["int8 torch._int_mm"] = (fc_case, n * m * m, lambda: torch._int_mm(a8, w8.t()))
    x = rng.integers(0, 2**63, (n, m // 64), dtype=np.int64).view(np.uint64)
    w = rng.integers(0, 2**63, (m, m // 64), dtype=np.int64).view(np.uint64)
    s, totals = np.empty((n, m), np.int64), np.empty(n, np.int64)
    w_t = np.ascontiguousarray(w.T)
    w_h = kernels._halves(w_t)
    for name, f in _BLOCKINGS.items():
        wf = {_xor_pop_2xv: w_t, _xor_pop_tile: w_h}.get(f, w)
        jobs[f"XOR+popcount numba, {name}"] = (fc_case, n * m * m,
                                               lambda f=f, wf=wf: f(x, wf, totals))
    n_plain = len(jobs)
    d, td = kernels.comparator(np.ones(m), np.zeros(m), np.ones(m))
    bits = np.empty((n, m // 64), np.uint64)
    jobs["packed engine fc_hidden (popcount + comparator + pack)"] = (
        fc_case, n * m * m, lambda: kernels.fc_hidden(x, w_t, m, d, td, bits))
    jobs["packed engine fc_output (popcount, int64 a)"] = (
        fc_case, n * m * m, lambda: kernels.fc_output(x, w, m, s))
    # hidden 3x3 convs of vgg3 and vgg7 (an odd number of positions on 7 x 7)
    sizes = ((64, 14, n), (64, 8, n // 4)) if quick else ((64, 14, n), (256, 8, n // 4),
                                                         (512, 7, n // 8))
    for c, hw, nb in sizes:
        layout = packed._PackedLayout(_ConvStage(c, hw), (c, hw, hw))
        wt = layout.pack(torch.where(torch.rand(c, c, 3, 3, generator=g) < 0.5, 1.0, -1.0))
        xc = rng.integers(0, 2**63, (nb, hw, hw, -(-c // 64)), dtype=np.int64).view(np.uint64)
        dc, tdc = kernels.comparator(np.ones(c), np.zeros(c), np.ones(c))
        oc = np.empty((nb, hw, hw, -(-c // 64)), np.uint64)
        args = (xc, wt, 3, 1, *layout.windows(wt, (dc, tdc)), oc)
        jobs[f"packed engine conv_hidden {c}->{c} on {hw}x{hw}"] = (
            f"3x3 conv {c}->{c} on {hw}x{hw} (every tap), {nb} samples",
            nb * hw * hw * 9 * c * c, lambda args=args: kernels.conv_hidden(*args))
    times = best_interleaved({name: job[2] for name, job in jobs.items()}, rounds=9)
    rates = {name: job[1] / times[name] for name, job in jobs.items()}
    roof = max(list(rates.values())[2:n_plain])
    fp32 = rates["fp32 a @ b (torch)"]
    out = [{"section": "roofline", "case": case, "implementation": name, "seconds": times[name],
            "gmacs": rates[name] / 1e9, "ratio": rates[name] / fp32 if case == fc_case
            else float("nan"), "of_roofline": rates[name] / roof}
           for name, (case, _, _) in jobs.items()]
    out.insert(n_plain, {"section": "roofline", "case": "best of the XOR+popcount blockings",
                         "implementation": "popcount roofline", "seconds": float("nan"),
                         "gmacs": roof / 1e9, "ratio": roof / fp32, "of_roofline": 1.0})
    return out


class _ConvStage:
    """The compiled-stage facts a :class:`packed._PackedLayout` reads, for a stride-1 3x3
    conv with padding 1."""

    conv, pool, index, kernel, padding = True, None, 1, (3, 3), (1, 1)

    def __init__(self, c: int, hw: int) -> None:
        self.in_shape, self.preact_shape = (c, hw, hw), (c, hw, hw)


@contextmanager
def _timed(obj, name: str, acc: dict, key: str):
    """Replace ``obj.name`` by a wrapper adding its wall time to ``acc[key]``."""
    f = getattr(obj, name)

    def wrapper(*args, **kw):
        t0 = time.perf_counter()
        try:
            return f(*args, **kw)
        finally:
            acc[key] += time.perf_counter() - t0

    setattr(obj, name, wrapper)
    try:
        yield
    finally:
        setattr(obj, name, f)


def _profile(quick: bool) -> list[dict]:
    from benchmarks.bench_sweep import BERS, _model, _test_set

    test = _test_set()
    if quick:
        test = test.subset(500)
    rows = []
    for arch, n_maps in (("fc", 2 if quick else 5), ("vgg3", 1 if quick else 2)):
        model, label = _model(arch, test.shape)
        rows += _profile_one(model, label, test, n_maps, BERS)
    return rows


def _profile_one(model, label: str, test, n_maps: int, bers: list[float]) -> list[dict]:
    """Seconds per faulty row of one packed sweep, split by stage (the engine's kernel calls
    wrapped with timers)."""
    acc: dict[str, float] = defaultdict(float)
    parts = [(kernels, "fc_hidden", "hidden"), (kernels, "conv_hidden", "hidden"),
             (kernels, "pool_or", "hidden"), (kernels, "fc_output", "output"),
             (packed.PackedNet, "_scores", "output"), (kernels, "fc_first_delta", "first_delta"),
             (kernels, "conv_first", "first_conv"), (kernels, "pack_threshold", "first_gemm"),
             (packed.PackedNet, "run", "run"), (packed.PackedNet, "weights_seq", "weights")]
    evaluate.sweep(model, test.subset(64), bers=[0.05], n_maps=1, engine="packed",
                   progress=False)  # warm up
    with ExitStack() as stack:
        for obj, name, key in parts:
            stack.enter_context(_timed(obj, name, acc, key))
        t0 = time.perf_counter()
        df = evaluate.sweep(model, test, bers=bers, n_maps=n_maps, seed=0, engine="packed",
                            progress=False)
        total = time.perf_counter() - t0
    rows_n = int((df["ber"] > 0).sum())
    first = acc["run"] - acc["hidden"] - acc["output"]
    split = [("first layer (all of it)", first),
             ("  of which fc delta update (from the clean output or the map's previous BER)",
              acc["first_delta"]),
             ("  conv_first calls (per map the channels whose weights flip; with the clean "
              "pass once per data chunk, outside the rows)", acc["first_conv"]),
             ("hidden binary layers (fc_hidden, conv_hidden, pool_or)", acc["hidden"]),
             ("output layer (fc_output, BatchNorm, argmax)", acc["output"]),
             ("weight flips (PackedNet.weights_seq)", acc["weights"]),
             ("map drawing, driver (the rest)", total - acc["run"] - acc["weights"]),
             ("total", total)]
    case = f"packed sweep, {label}, {len(test)} images, {len(bers)} BERs x {n_maps} maps"
    return [{"section": "profile", "case": case, "implementation": name,
             "seconds": t / rows_n, "share": t / total} for name, t in split
            if t > 0 or "of which" not in name]


def run(quick: bool = False) -> pd.DataFrame:
    if not kernels.AVAILABLE:
        raise RuntimeError("the popcount benchmark needs numba")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with kernels.threads(2):
            rows = _roofline(quick)
        rows += _profile(quick)
    finally:
        torch.set_num_threads(threads)
    return pd.DataFrame(rows)


if __name__ == "__main__":
    print(run().to_markdown(index=False, floatfmt=".4g"))
