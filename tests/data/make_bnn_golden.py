"""Write ``tests/data/bnn_golden/`` -- the BNN case frozen before the storage-model refactor.

Run from any checkout (``PYTHONPATH=<checkout> python tests/data/make_bnn_golden.py OUT``); the
committed files were written at commit 5d56695, the last commit before codecs existed.
``tests/test_bnn_unchanged.py`` recomputes everything with the current code and compares:

* ``digests.json``: sha256 of init weights, fault maps (indices and uniforms), map seeds,
  the weights seen under ``inject`` and the ``TransientFlip`` draws (exact everywhere);
* ``sweeps.csv``: sweep rows of every engine, symmetric and asymmetric BERs, all/hidden layers,
  activation and threshold targets (integer engines: exact everywhere);
* ``margin.csv``, ``importance.csv``: metric tables at ``%.17g``;
* ``trained.json``: sha256 of trained weights (normal, BFT symmetric and asymmetric) and the
  CPU/threads they were trained on (float training is exact only on the same CPU and threads).

Only public functions that existed at 5d56695 are used, so the script runs before and after.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pandas as pd
import torch

from bnn_tol import errors, evaluate, metrics, models, train
from bnn_tol.data import BNNDataset


def digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode()
                          + t.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def dataset(n: int, shape: tuple[int, ...], seed: int) -> BNNDataset:
    """Learnable synthetic images: class c brightens the c-th block of pixels (+ noise)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randint(0, 120, (n, *shape), generator=g)
    flat = x.view(n, -1)
    size = flat.shape[1] // 10
    for c in range(10):
        flat[y == c, c * size:(c + 1) * size] += 120
    return BNNDataset(x.clamp(0, 255).to(torch.uint8), y, name="golden")


ARCHS = {
    "fc": ("fc", {"hidden": (48, 32), "in_shape": (1, 8, 8)}, (1, 8, 8)),
    "vgg3": ("vgg3", {"channels": ((8,), (8,)), "fc_width": 32, "in_shape": (1, 8, 8)},
             (1, 8, 8)),
    "vgg7": ("vgg7", {"channels": ((4, 4), (8, 8), (8, 8)), "fc_width": 16,
                      "in_shape": (3, 8, 8)}, (3, 8, 8)),
}


def trained(name: str, flip_ber) -> models.BNN:
    arch, kw, shape = ARCHS[name]
    model = models.build(arch, seed=0, **kw)
    train.fit(model, dataset(512, shape, 1), epochs=2, batch_size=64, flip_ber=flip_ber, seed=3,
              progress=False, device="cpu", threads=1)
    return model


def main(out: Path) -> None:
    torch.set_num_threads(1)  # float metrics reproduce bit for bit on the same CPU
    out.mkdir(parents=True, exist_ok=True)
    dig: dict[str, str] = {}
    for name, (arch, kw, _) in ARCHS.items():
        for seed in (0, 7):
            m = models.build(arch, seed=seed, **kw)
            for k, v in m.state_dict().items():
                dig[f"init/{name}/{seed}/{k}"] = digest(v)
            for cap in (0.01, 0.1, 0.5):
                for layers in (None, "hidden"):
                    for lname, fm in errors.draw_maps(m, 11 + seed, cap, layers=layers).items():
                        key = f"map/{name}/{seed}/{cap}/{layers}/{lname}"
                        dig[key + "/idx"] = digest(fm.idx)
                        dig[key + "/u"] = digest(fm.u)
            for ber in (0.02, (0.01, 0.05)):
                with errors.inject(m, ber, seed=5):
                    for lname, lay in m.binary_layers().items():
                        dig[f"inject/{name}/{seed}/{ber}/{lname}"] = digest(lay.binary_weight())
    dig["map_seeds"] = digest(torch.tensor(errors.map_seeds(3, 17)))
    w = torch.where(torch.randn(4000, generator=torch.Generator().manual_seed(2)) >= 0, 1.0, -1.0)
    for ber in (0.01, 0.3, (0.02, 0.06), (0.2, 0.4)):
        f = errors.TransientFlip(ber, torch.Generator().manual_seed(9))
        for call in range(3):
            dig[f"transient/{ber}/{call}"] = digest(f(w))
    (out / "digests.json").write_text(json.dumps(dig, indent=1, sort_keys=True))

    rows = []
    for name in ARCHS:
        arch, kw, shape = ARCHS[name]
        model = trained(name, None)
        test = dataset(300, shape, 2)
        engines = ["reference", "fp32"] + (["int8"] if name == "fc" else [])
        for engine in engines:
            for layers in (None, "hidden"):
                df = evaluate.sweep({name: model}, test, bers=[0, 0.01, 0.05, (0.02, 0.1)],
                                    n_maps=3, seed=4, layers=layers, engine=engine,
                                    progress=False)
                rows.append(df.assign(engine=engine, layers=str(layers), targets="weights"))
        for targets in (("activations",), ("thresholds",), ("weights", "activations")):
            df = evaluate.sweep({name: model}, test, bers=[0.01, 0.05], n_maps=2, seed=4,
                                engine="reference", targets=targets, progress=False)
            rows.append(df.assign(engine="reference", layers="None", targets="+".join(targets)))
        if name == "fc":
            m = metrics.margin(model, test)
            m.to_csv(out / "margin.csv", float_format="%.17g")
            metrics.margin_summary(m).to_csv(out / "margin_summary.csv", float_format="%.17g")
            imps = [metrics.importance(model, test, estimator=e).assign(estimator=e)
                    for e in ("accuracy", "loss", "flips", "taylor", "loss_norm")]
            pd.concat(imps).to_csv(out / "importance.csv", index=False, float_format="%.17g")
    pd.concat(rows).to_csv(out / "sweeps.csv", index=False, float_format="%.17g")

    from bnn_tol.provenance import environment

    env = environment(threads=1)
    tr = {"cpu": env.get("cpu"), "cpu_flags": env.get("cpu_flags"), "threads": 1, "weights": {}}
    for name in ("fc", "vgg3"):
        for ber in (None, 0.05, (0.02, 0.08)):
            model = trained(name, ber)
            for k, v in model.state_dict().items():
                tr["weights"][f"{name}/{ber}/{k}"] = digest(v)
            hist = [{k: v for k, v in r.items() if k != "seconds"} for r in model.meta["history"]]
            tr["weights"][f"{name}/{ber}/history"] = hashlib.sha256(
                json.dumps(hist, sort_keys=True).encode()).hexdigest()
    (out / "trained.json").write_text(json.dumps(tr, indent=1, sort_keys=True))


if __name__ == "__main__":
    threads = torch.get_num_threads()
    try:
        main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "bnn_golden"))
    finally:
        torch.set_num_threads(threads)
