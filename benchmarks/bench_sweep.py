"""BER sweep engines vs the naive loop on the Fashion-MNIST test set, 2 threads.

``naive``: per map deepcopy the model, write the flipped weights, plain fp32 ``model(x)``
(drawing the map is not timed; median over a sample of the sweep's maps, half before and half
after the engines). ``packed``: :func:`bnn_tol.evaluate.sweep` with the packed XNOR/popcount
engine over the whole grid, seconds per faulty row (BER-0 rows cost nothing and are not
counted; map drawing included); for fc also the ``int8`` engine (``= auto``: the engine
``engine="auto"`` picks on this CPU) and, on CPUs with an int8 dot product, the int8 roofline
(the ``_int_mm`` products of one map at the throughput measured in the same run). ``fp32``:
the batched float engine on a few maps. Every engine accuracy is checked equal to the naive
one on the sampled maps (``exact``).

Cases: ``fc`` (784-2048-2048-10; ``runs/fc`` when it exists) and ``vgg3`` on all 10k test
images, 11 BERs (0 to 10 %) x 20 maps; ``vgg7`` (2x128C3-MP2-2x256C3-MP2-2x512C3-MP2-1024FC-10
on 1x28x28, random init) on all 10k images with 11 BERs x 1 map (a naive vgg7 map takes
minutes). Targets (issue 24): naive / engine >= 12 for the conv models, >= 10 for fc.

``memory``: peak resident memory (``VmHWM``) of a fresh process running one sweep --
vgg7 on 10k images (2 maps), fc 2048-2048 at one BER with 10 and 100 maps and at the 11 BERs
with 10 maps -- and its growth over the same process after loading the model and the data
(``rss_above_start_mb``). The engines stream the data in chunks (default from a 256 MiB
budget) and hold one map's weights and flips at a time (the packed engine: one map's flip sets
at up to 16 BERs, and for a first linear layer one more copy of its pre-activations per chunk);
fault maps are kept for reuse across BERs up to a 256 MiB budget and redrawn from their seeds
beyond it, so the peak does not grow with the number of maps.
"""

from __future__ import annotations

import copy
import multiprocessing as mp
import resource
import time
from pathlib import Path

import pandas as pd
import torch

import bnn_tol
import bnn_tol.engines.int8 as int8_engine
from bnn_tol import data, errors, evaluate, models

RUNS = Path(__file__).resolve().parents[1] / "runs"
BERS = [round(0.01 * k, 2) for k in range(11)]


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


def _test_set():
    try:
        return data.load("fashion-mnist", "test")
    except data.DatasetNotFound:
        return data.load("digits", "test")


def _model(arch: str, shape):
    run = RUNS / arch
    if (run / "config.json").exists():
        m = bnn_tol.load(run)
        if tuple(m.in_shape) == tuple(shape):
            return m.eval(), f"runs/{arch}"
    kw = {"in_shape": tuple(shape)}
    return models.build(arch, seed=0, **kw).eval(), f"{arch} (random init)"


def _int8_roofline(model, n: int) -> float:
    """Seconds of the int8 products ``(n, I) x (I, O)`` of every linear layer of ``model``
    (``torch._int_mm``, best of 3): the floor of an int8 engine's time per map."""
    total = 0.0
    for layer in model.binary_layers().values():
        o, i = layer.weight.shape
        a = torch.randint(-128, 128, (n, i), dtype=torch.int8)
        w = torch.randint(-1, 2, (o, i), dtype=torch.int8)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            torch._int_mm(a, w.t())
            best = min(best, time.perf_counter() - t0)
        total += best
    return total


def _case(
    arch: str,
    test,
    n_maps: int,
    n_naive: int,
    fp32_maps: int,
    engines: tuple[str, ...] = ("packed",),
    roofline: bool = False,
) -> list[dict]:
    model, label = _model(arch, test.shape)
    seeds = errors.map_seeds(0, n_maps)
    sample = [(0.1 if i % 2 == 0 else 0.05, seeds[i % n_maps]) for i in range(n_naive)]
    naive_t, naive_acc = [], {}
    half = (n_naive + 1) // 2
    for b, s in sample[:half]:
        naive_acc[(b, s)], t = _naive(model, test, b, s)
        naive_t.append(t)
    auto = evaluate.pick_engine(
        model, device=torch.device("cpu"), engine="auto", targets=("weights",)
    ).name
    grids = {}
    for eng in engines:
        t0 = time.perf_counter()
        df = evaluate.sweep(
            model, test, bers=BERS, n_maps=n_maps, seed=0, engine=eng, progress=False
        )
        grids[eng] = (df, (time.perf_counter() - t0) / int((df["ber"] > 0).sum()))
    fp32_t, fp32_df = None, None
    if fp32_maps:
        t0 = time.perf_counter()
        fp32_df = evaluate.sweep(
            model, test, bers=[0.05, 0.1], n_maps=fp32_maps, seed=0, engine="fp32", progress=False
        )
        fp32_t = (time.perf_counter() - t0) / len(fp32_df)
    for b, s in sample[half:]:
        naive_acc[(b, s)], t = _naive(model, test, b, s)
        naive_t.append(t)
    naive = sorted(naive_t)[len(naive_t) // 2]

    def exact(d) -> bool:
        got = {(r.ber, r.map_seed): r.accuracy for r in d.itertuples()}
        keys = [k for k in naive_acc if k in got]
        return bool(keys) and all(got[k] == naive_acc[k] for k in keys)

    case = f"{label}, {len(test)} images, {len(BERS)} BERs x {n_maps} maps"
    rows = [
        {
            "case": case,
            "implementation": "naive loop (deepcopy + fp32 model(x))",
            "seconds_per_map": naive,
            "ratio": 1.0,
            "exact": True,
        }
    ]
    for eng, (df, secs) in grids.items():
        rows.append(
            {
                "case": case,
                "implementation": f"sweep {eng} engine (whole grid, per "
                f"faulty row){' = auto' if eng == auto else ''}",
                "seconds_per_map": secs,
                "ratio": naive / secs,
                "exact": exact(df),
            }
        )
    if roofline:
        secs = _int8_roofline(model, len(test))
        rows.append(
            {
                "case": case,
                "implementation": "int8 roofline (_int_mm GEMMs of one map, measured here)",
                "seconds_per_map": secs,
                "ratio": naive / secs,
                "exact": True,
            }
        )
    if fp32_t is not None:
        rows.append(
            {
                "case": case,
                "implementation": f"sweep fp32 engine (p=0.05/0.1, {fp32_maps} maps)",
                "seconds_per_map": fp32_t,
                "ratio": naive / fp32_t,
                "exact": exact(fp32_df),
            }
        )
    return rows


def _rss_mb() -> float:
    """Peak resident memory of this process (``VmHWM``; ``ru_maxrss`` would carry the
    parent's peak over ``exec``), MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _memory_child(arch: str, n_maps: int, bers: list[float], queue) -> None:
    torch.set_num_threads(2)
    test = _test_set()
    model, label = _model(arch, test.shape)
    start = _rss_mb()
    t0 = time.perf_counter()
    evaluate.sweep(model, test, bers=bers, n_maps=n_maps, seed=0, engine="packed", progress=False)
    queue.put((label, start, _rss_mb(), time.perf_counter() - t0))


def _memory(arch: str, n_maps: int, bers: list[float] = (0.05,)) -> dict:
    """Peak RSS of a fresh process sweeping ``arch`` (a multi-BER fc sweep also holds the
    chained first layer's pre-activations)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_memory_child, args=(arch, n_maps, list(bers), q))
    p.start()
    label, start, peak, secs = q.get()
    p.join()
    grid = f"p=0.05 x {n_maps} maps" if len(bers) == 1 else f"{len(bers)} BERs x {n_maps} maps"
    return {
        "case": f"memory: {label}, 10k images, {grid}",
        "implementation": "sweep packed engine (fresh process)",
        "seconds_per_map": secs / (n_maps * sum(b > 0 for b in bers)),
        "peak_rss_mb": peak,
        "rss_above_start_mb": peak - start,
    }


def run(quick: bool = False) -> pd.DataFrame:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return _run(quick)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool) -> pd.DataFrame:
    test = _test_set()
    if quick:
        test = test.subset(500)
    fc_engines = (
        ("packed", "int8") if int8_engine.int8_available(torch.device("cpu")) else ("packed",)
    )
    rows = _case(
        "fc",
        test,
        3 if quick else 20,
        2 if quick else 5,
        2,
        fc_engines,
        roofline=evaluate.int8_is_fast(),
    )
    rows += _case("vgg3", test, 2 if quick else 20, 2 if quick else 3, 0)
    rows += _case("vgg7", test.subset(100) if quick else test, 1, 2, 0)
    if not quick:
        rows += [_memory("vgg7", 2), _memory("fc", 10), _memory("fc", 100),
                 _memory("fc", 10, BERS)]
    return pd.DataFrame(rows)
