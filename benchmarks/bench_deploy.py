"""Numpy inference of an exported BNN (:mod:`bnn_tol.deploy`: XNOR + popcount on packed
uint64 words) vs the torch fp32 forward of the same model: fc 784-2048-2048-10 (random BN
statistics) on the 10k Fashion-MNIST test set (quick: 1k), best of 3 each, predictions checked
equal (``exact``). Also the memory image (packed weights) vs the float checkpoint
(``model.safetensors``). ``ratio`` = torch seconds / numpy seconds (> 1: numpy faster).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import bnn_tol
from bnn_tol import data, deploy, evaluate, models


def run(quick: bool = False) -> pd.DataFrame:
    test = data.load("fashion-mnist", "test")
    if quick:
        test = test.subset(1000)
    model = models.build("fc", seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for b in model.blocks:
            b.bn.running_mean.normal_(0, 10, generator=g)
            b.bn.running_var.uniform_(100, 400, generator=g)
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = bnn_tol.export(model, Path(tmp) / "b")
        ckpt = bnn_tol.save(model, Path(tmp) / "ckpt")
        man = deploy.load_bundle(bundle)
        imgs = test.images.numpy()
        t_torch, t_np = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            ref = evaluate.predict(model, test, batch_size=2000).numpy()
            t_torch.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            got = deploy.predict(man, imgs, batch_size=2000)
            t_np.append(time.perf_counter() - t0)
        image = sum(a.nbytes for n, a in man["arrays"].items() if "weights" in n)
        ckpt_bytes = (Path(ckpt) / "model.safetensors").stat().st_size
    case = f"fc 784-2048-2048-10, {len(test)} images"
    exact = bool(np.array_equal(ref, got))
    return pd.DataFrame([
        {"case": case, "implementation": "torch fp32 forward (evaluate.predict)",
         "seconds": min(t_torch), "ratio": 1.0, "exact": True, "bytes": ckpt_bytes},
        {"case": case, "implementation": "numpy XNOR/popcount (deploy.predict)",
         "seconds": min(t_np), "ratio": min(t_torch) / min(t_np), "exact": exact,
         "bytes": image},
    ])
