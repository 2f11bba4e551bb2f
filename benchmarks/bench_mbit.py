"""m-bit sweep engine vs the naive loop: a 4-bit and an 8-bit fc 784-512-512-10 (asymmetric,
random BN statistics) on the 10k Fashion-MNIST test set (quick: 1k), BERs 0.5 % and 1 %,
``n_maps`` maps each. ``naive``: per map deepcopy the model, flip the stored bits of the map
(encode -> bits -> flip -> decode), make the layers compute with the decoded image, plain fp32
``model(x)`` (drawing the map is not timed). ``fixed``: :func:`bnn_tol.evaluate.sweep` with
``engine="fixed"`` (cached codes, decode only the flipped layer, clean prefix reuse; map drawing
included). Every accuracy is checked equal (``exact``). Target: not slower than naive (ratio
>= 1).
"""

from __future__ import annotations

import copy
import time

import pandas as pd
import torch

from bnn_tol import data, errors, evaluate, models


def _model(bits: int) -> models.BNN:
    m = models.build("fc", hidden=(512, 512), weight_bits=bits, quant="asymmetric", seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for b in m.blocks:
            b.bn.running_mean.normal_(0, 0.2, generator=g)
            b.bn.running_var.uniform_(0.5, 2.0, generator=g)
    return m.eval()


def _naive(model, test, ber, seed) -> tuple[float, float]:
    maps = errors.draw_maps(model, seed, ber)  # not timed, as for the sign engines
    t0 = time.perf_counter()
    bad = copy.deepcopy(model)
    for name, layer in bad.binary_layers().items():
        c = layer.codec
        bits = c.to_bits(c.encode(layer.weight.detach()))
        idx = maps[name].flips(bits.float() * 2 - 1, ber, ber)
        bits[idx] ^= 1
        w = c.decode(c.from_bits(bits, layer.weight.shape))
        layer.deployed_weight = lambda w=w: w
    acc = evaluate.accuracy(bad, test, batch_size=2048)
    return acc, time.perf_counter() - t0


def run(quick: bool = False) -> pd.DataFrame:
    test = data.load("fashion-mnist", "test")
    if quick:
        test = test.subset(1000)
    n_maps = 3 if quick else 10
    bers = [0.005, 0.01]
    rows = []
    for bits in (4, 8):
        model = _model(bits)
        t0 = time.perf_counter()
        df = evaluate.sweep({"q": model}, test, bers=bers, n_maps=n_maps, seed=0,
                            engine="fixed", progress=False)
        engine_t = (time.perf_counter() - t0) / len(df)
        naive_t, exact = [], True
        for r in df.itertuples():
            acc, t = _naive(model, test, r.ber, r.map_seed)
            naive_t.append(t)
            exact &= acc == r.accuracy
        naive = sum(naive_t) / len(naive_t)
        case = f"fc 512-512 {bits}-bit asym, {len(test)} images, 2 BERs x {n_maps} maps"
        rows += [{"case": case, "implementation": "naive loop (deepcopy, flip bits, decode, "
                  "model(x))", "seconds_per_map": naive, "ratio": 1.0, "exact": True},
                 {"case": case, "implementation": "sweep fixed engine", "seconds_per_map":
                  engine_t, "ratio": naive / engine_t, "exact": bool(exact)}]
    return pd.DataFrame(rows)
