"""Bit flip training overhead: seconds per epoch of normal vs bit-flip training (p = 0.1) of
``fc`` (784-2048-2048-10) on Fashion-MNIST, batch 256, measured alternately in one run.
Target: ratio (flip / normal) <= 1.10. Also the cost of drawing the flips alone per training
step (all layers): geometric gaps and one random byte per bit vs the naive dense draw (one
float uniform per weight); ``TransientFlip`` picks bytes from p = 0.125 on, gaps below.
"""

from __future__ import annotations

import time

import pandas as pd
import torch

from bnn_tol import data, errors, models, train


def _epoch_seconds(ds, flip_ber, hidden, seed):
    m = models.build("fc", hidden=hidden, in_shape=ds.shape, seed=seed)
    hist = train.fit(m, ds, epochs=1, flip_ber=flip_ber, seed=seed, device="cpu", progress=False)
    return float(hist["seconds"].iloc[0])


def _dense_flip(wb, p, gen):
    u = torch.rand(wb.shape, generator=gen)
    return torch.where(u < p, -wb, wb)


def run(quick: bool = False) -> pd.DataFrame:
    try:
        ds = data.load("fashion-mnist", "train")
    except data.DatasetNotFound:
        ds = data.load("digits", "train")
    hidden = (256, 256) if quick else (2048, 2048)
    ds = ds.subset(2048 if quick else 15360)
    reps = 1 if quick else 3
    times: dict[str, list[float]] = {"normal": [], "flip p=0.1": []}
    _epoch_seconds(ds.subset(512), None, hidden, 0)  # warm-up
    for r in range(reps):  # alternate, so that load on the machine hits both alike
        times["normal"].append(_epoch_seconds(ds, None, hidden, r))
        times["flip p=0.1"].append(_epoch_seconds(ds, 0.1, hidden, r))
    base = min(times["normal"])
    rows = [{"case": f"fc{hidden} epoch on {len(ds)} samples", "implementation": k,
             "seconds": min(v), "ratio": min(v) / base} for k, v in times.items()]
    # mask generation alone, per training step (all layers), sparse vs dense
    m = models.build("fc", hidden=hidden, in_shape=ds.shape)
    wbs = [torch.sign(layer.weight.detach()) for layer in m.binary_layers().values()]
    gen = torch.Generator().manual_seed(0)
    for p in (0.01, 0.1):
        res = {}
        for name, fn in (("dense uniform per bit (naive)", lambda w, p=p: _dense_flip(w, p, gen)),
                         ("geometric gaps", lambda w, p=p: errors.flip_binary(
                             w, p, p, generator=gen)[0]),
                         ("random byte per bit", lambda w, p=p: torch.where(
                             errors.flip_mask(w, p, p, generator=gen), -w, w)),
                         ("TransientFlip (used in training)",
                          lambda w, p=p: errors.TransientFlip(p, gen)(w))):
            best = float("inf")
            for _ in range(3 if quick else 10):
                t0 = time.perf_counter()
                for w in wbs:
                    fn(w)
                best = min(best, time.perf_counter() - t0)
            res[name] = best
        naive = res["dense uniform per bit (naive)"]
        rows += [{"case": f"flip draw per step, p={p}", "implementation": k, "seconds": v,
                  "ratio": naive / v} for k, v in res.items()]
    return pd.DataFrame(rows)
