"""Tolerance metrics on ``fc`` (784-2048-2048-10), Fashion-MNIST test set (10k; quick: 1k).

``importance``: exact negation importance (accuracy estimator) of all 4096 hidden neurons,
batched (:func:`bnn_tol.metrics.importance`: sparse near-threshold product for layer 0, rank-1
update of the class scores for layer 1) vs the naive loop (one full forward pass per neuron
with a hook negating it), timed on a sample of ``n_naive`` neurons per layer and
extrapolated to all 4096 (column ``extrapolated``). The sampled neurons' importances are
checked equal (``max_abs_diff``). ``margin``: :func:`bnn_tol.metrics.margin` vs one plain
forward pass (best of 3, interleaved); target ratio margin / forward <= 1.2.
Target for importance: naive / batched >= 50. Uses ``runs/fc`` when it exists, else a
randomly initialized fc with random BN statistics.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch

import bnn_tol
from bnn_tol import data, metrics, models

RUN = Path(__file__).resolve().parents[1] / "runs" / "fc"


def _model():
    if (RUN / "model.safetensors").exists():
        return bnn_tol.load(RUN).eval(), "runs/fc"
    m = models.build("fc", seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for b in m.blocks:
            b.bn.running_mean.normal_(0, 10, generator=g)
            b.bn.running_var.uniform_(100, 400, generator=g)
    return m.eval(), "random fc"


def _naive_neuron(model, ds, l, j, batch_size=2000):
    """acc(net) - acc(net with h_lj negated): full forward with a negating hook."""
    def hook(_m, _i, out):
        out = out.clone()
        out[:, j] = -out[:, j]
        return out

    handle = model.blocks[l].register_forward_hook(hook)
    try:
        acc = bnn_tol.evaluate.accuracy(model, ds, batch_size=batch_size)
    finally:
        handle.remove()
    return acc


def run(quick: bool = False) -> pd.DataFrame:
    model, source = _model()
    ds = data.load("fashion-mnist", "test")
    if quick:
        ds = ds.subset(1000)
    n_naive = 3 if quick else 8
    rows = []
    # importance
    t0 = time.perf_counter()
    imp = metrics.importance(model, ds, estimator="accuracy")
    t_fast = time.perf_counter() - t0
    acc0 = bnn_tol.evaluate.accuracy(model, ds)
    t_naive, diffs, n_total = 0.0, [], 0
    for l in (0, 1):
        width = model.blocks[l].layer.weight.shape[0]
        n_total += width
        cols = torch.linspace(0, width - 1, n_naive).long().tolist()
        t1 = time.perf_counter()
        for j in cols:
            ref = acc0 - _naive_neuron(model, ds, l, j)
            got = imp[(imp.layer_index == l) & (imp.neuron == j)]["importance"].iloc[0]
            diffs.append(abs(ref - got))
        t_naive += (time.perf_counter() - t1) / len(cols) * width
    rows.append({"case": "importance, all hidden neurons (accuracy)", "model": source,
                 "n_samples": len(ds), "naive_s": t_naive, "engine_s": t_fast,
                 "ratio": t_naive / t_fast, "extrapolated": f"naive from {2 * n_naive} neurons",
                 "max_abs_diff": max(diffs)})
    # margin vs one plain forward pass
    fw, mg = [], []
    for _ in range(3):
        t1 = time.perf_counter()
        with torch.no_grad():
            for x, _ in ds.batches(1000):
                model(x)
        fw.append(time.perf_counter() - t1)
        t1 = time.perf_counter()
        metrics.margin(model, ds)
        mg.append(time.perf_counter() - t1)
    rows.append({"case": "margin (2 hidden layers, with standard errors) vs plain forward",
                 "model": source,
                 "n_samples": len(ds), "naive_s": min(fw), "engine_s": min(mg),
                 "ratio": min(mg) / min(fw), "extrapolated": "ratio = margin / forward",
                 "max_abs_diff": 0.0})
    return pd.DataFrame(rows)


if __name__ == "__main__":  # pragma: no cover
    print(run(quick=False).to_string())
