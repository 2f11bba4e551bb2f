"""BER sweep engine vs the naive loop: ``fc`` (784-2048-2048-10) on the 10k Fashion-MNIST test
set, 11 BERs (0 to 10 %) x 20 fault maps, 2 threads. ``naive``: per map deepcopy the model,
write the flipped weights, plain fp32 ``model(x)`` (drawing the map is not timed; median over a
sample of the sweep's maps, interleaved with the engines). ``int8``/``fp32``:
:func:`bnn_tol.evaluate.sweep` on the whole grid (seconds per row, map drawing included; the
BER-0 rows cost nothing). ``int8 kernel``: one evaluation at p = 0.1 without reuse. Every engine
accuracy is checked equal to the naive one on the sampled maps (``exact``). ``roofline``:
5.8e10 MACs at the int8 GEMM throughput measured in this run. Target: naive / engine >= 3.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pandas as pd
import torch

import bnn_tol
from bnn_tol import data, errors, evaluate, models

RUN = Path(__file__).resolve().parents[1] / "runs" / "fc"


def _naive(model, test, ber, seed) -> tuple[float, float]:
    maps = errors.draw_maps(model, seed, ber)  # not timed: the engine amortizes it over BERs
    t0 = time.perf_counter()
    m = copy.deepcopy(model)
    for name, layer in m.binary_layers().items():
        wb = torch.where(layer.weight >= 0, 1.0, -1.0)
        idx = maps[name].flips(wb, ber, ber)
        w = layer.weight.detach().clone().view(-1)
        w[idx] = -wb.view(-1)[idx]
        layer.weight.data = w.view_as(layer.weight)
    acc = evaluate.accuracy(m, test, batch_size=2048)
    return acc, time.perf_counter() - t0


def _int8_peak(n: int) -> float:
    """MAC/s of one large int8 GEMM (2048 x 2048 x n), best of 3."""
    w = torch.randint(0, 2, (2048, 2048), dtype=torch.int8)
    h = torch.randint(0, 2, (2048, n), dtype=torch.int8)
    torch._int_mm(w, h)
    best = min(_timed(lambda: torch._int_mm(w, h)) for _ in range(3))
    return 2048 * 2048 * n / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(quick: bool = False) -> pd.DataFrame:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return _run(quick)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool) -> pd.DataFrame:
    try:
        test = data.load("fashion-mnist", "test")
    except data.DatasetNotFound:
        test = data.load("digits", "test")
    if quick:
        test = test.subset(2000)
    if (RUN / "config.json").exists() and test.shape == (1, 28, 28):
        model, label = bnn_tol.load(RUN), "runs/fc"
    else:
        model, label = models.build("fc", in_shape=test.shape), "fc (random init)"
    model.eval()
    bers = [round(0.01 * k, 2) for k in range(11)]
    n_maps = 3 if quick else 20
    n_naive = 2 if quick else 5
    seeds = errors.map_seeds(0, n_maps)
    sample = [(0.1 if i % 2 == 0 else 0.05, seeds[i]) for i in range(n_naive)]
    macs = sum(layer.weight.numel() for layer in model.binary_layers().values()) * len(test)

    naive_t, naive_acc = [], {}
    engine_t: dict[str, float] = {}
    engine_df: dict[str, pd.DataFrame] = {}
    # interleave: naive half, engines, naive half (load from other jobs hits both alike)
    for b, s in sample[: n_naive // 2 + 1]:
        naive_acc[(b, s)], t = _naive(model, test, b, s)
        naive_t.append(t)
    for engine in ("int8", "fp32"):
        grid_bers = bers if engine == "int8" else [0.05, 0.1]
        maps = n_maps if engine == "int8" else (2 if quick else 4)
        t0 = time.perf_counter()
        df = evaluate.sweep(model, test, bers=grid_bers, n_maps=maps, seed=0, engine=engine,
                            progress=False)
        engine_t[engine] = (time.perf_counter() - t0) / len(df)
        engine_df[engine] = df
    # kernel: one map at p = 0.1, nothing reused (fresh runner, map drawn outside the timing)
    fm = errors.draw_maps(model, seeds[0], 0.1)
    runner = evaluate._Runner(model, test, layers=None, device=torch.device("cpu"),
                              engine="int8", batch_size=None, maps_per_step=None,
                              targets=("weights",))
    runner._chunks()
    flips = {k: fm[st.name].flips(st.wb, 0.1, 0.1) for k, st in enumerate(runner.stages)}
    kernel_t = min(_timed(lambda: runner._eval_group([flips])) for _ in range(3))
    for b, s in sample[n_naive // 2 + 1:]:
        naive_acc[(b, s)], t = _naive(model, test, b, s)
        naive_t.append(t)
    naive = sorted(naive_t)[len(naive_t) // 2]
    peak = _int8_peak(len(test))

    def exact(df) -> bool:
        got = {(r.ber, r.seed): r.accuracy for r in df.itertuples()}
        keys = [k for k in naive_acc if k in got]
        return bool(keys) and all(got[k] == naive_acc[k] for k in keys)

    case = f"{label}, {len(test)} test images, {len(bers)} BERs x {n_maps} maps, 2 threads"
    rows = [
        {"case": case, "implementation": "naive loop (deepcopy + fp32 model(x))",
         "seconds_per_map": naive, "ratio": 1.0, "exact": True},
        {"case": case, "implementation": "sweep int8 engine (whole grid, per row)",
         "seconds_per_map": engine_t["int8"], "ratio": naive / engine_t["int8"],
         "exact": exact(engine_df["int8"])},
        {"case": case, "implementation": "int8 kernel, one map at p=0.1 (no reuse)",
         "seconds_per_map": kernel_t, "ratio": naive / kernel_t, "exact": True},
        {"case": case, "implementation": "sweep fp32 engine (maps batched, p=0.05/0.1)",
         "seconds_per_map": engine_t["fp32"], "ratio": naive / engine_t["fp32"],
         "exact": exact(engine_df["fp32"])},
        {"case": case, "implementation": f"int8 roofline ({macs:.2g} MACs at measured "
                                         f"{peak / 1e9:.0f} GMAC/s)",
         "seconds_per_map": macs / peak, "ratio": naive / (macs / peak), "exact": True},
    ]
    curve = evaluate.summarize(engine_df["int8"])[["ber", "mean", "ci_low", "ci_high"]]
    print("accuracy vs BER (int8 sweep):\n" + curve.to_string(index=False))
    return pd.DataFrame(rows)
