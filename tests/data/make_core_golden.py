"""Write ``tests/data/core_golden/`` -- every surface of the "one core" refactor (issue 19),
frozen before it started (commit 004ed4e).

Run from any checkout: ``PYTHONPATH=<checkout> python tests/data/make_core_golden.py OUT``.
``tests/test_core_unchanged.py`` reruns it with the current code and compares. Recorded on
top of ``bnn_golden`` (fc / vgg3 / vgg7 BNN sweeps, fc metrics):

* ``sweeps.csv``: a trained vgg3 BNN through every engine that takes it (packed, fp32,
  reference), all/hidden layers, symmetric and asymmetric BERs, threshold targets; m-bit
  networks (fc 4-bit symmetric, fc 8-bit asymmetric, vgg3 4-bit) through ``fixed`` and
  ``reference``;
* ``flips.csv``: ``accuracy_under_flips`` with explicit stored-bit flips (fc, vgg3, m-bit);
* ``profile.csv``: a profiled-chip sweep of a BNN and an m-bit fc;
* ``margin_vgg3.csv``, ``margin_summary_vgg3.csv``, ``importance_vgg3.csv``: the metrics of a
  conv BNN; ``flipprob_fc.csv``, ``predict_fc.csv``: flip probability and predicted accuracy;
  ``importance_mc_fc.csv``: the Monte-Carlo estimator (its seeds);
* ``export.json``: sha256 of every file of the export bundles (fc, vgg3) and the ONNX files,
  and of the numpy deploy predictions with and without bit errors.

The script resolves each function by its old and new homes, so it runs before and after.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

import bnn_tol


def _get(*paths: str):
    """The first of ``"module:attr"`` paths that exists."""
    for p in paths:
        mod, attr = p.split(":")
        try:
            return getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"none of {paths}")


build = _get("bnn_tol.core.models:build", "bnn_tol.models:build")
fit = _get("bnn_tol.train:fit")
sweep = _get("bnn_tol.engines:sweep", "bnn_tol.evaluate:sweep")
accuracy_under_flips = _get("bnn_tol.engines:accuracy_under_flips",
                            "bnn_tol.evaluate:accuracy_under_flips")
BNNDataset = _get("bnn_tol.data:BNNDataset")
margin = _get("bnn_tol.metrics:margin")
margin_summary = _get("bnn_tol.metrics:margin_summary")
importance = _get("bnn_tol.metrics:importance")
flip_probability = _get("bnn_tol.metrics:flip_probability")
predict_accuracy = _get("bnn_tol.metrics:predict_accuracy")
synthetic_profile = _get("bnn_tol.faults.chip:synthetic_profile",
                         "bnn_tol.profile:synthetic_profile")
profile_sweep = _get("bnn_tol.faults.chip:profile_sweep", "bnn_tol.engines:profile_sweep",
                     "bnn_tol.profile:profile_sweep")
export = _get("bnn_tol.interop.bundle:export", "bnn_tol.bundle:export")
deploy_predict = _get("bnn_tol.interop.deploy:predict", "bnn_tol.deploy:predict")
export_onnx = _get("bnn_tol.interop.onnx:export_onnx", "bnn_tol.onnx_io:export_onnx")


def onnx_graph_bytes(raw: bytes) -> bytes:
    """The ONNX file without the model record issue 22 added to its metadata
    (``metadata_props["bnn_tol.model"]``, for the exact round trip): the graph, its
    initializers and every other field are compared byte for byte."""
    import onnx

    m = onnx.load_from_string(raw)
    keep = [(p.key, p.value) for p in m.metadata_props if p.key != "bnn_tol.model"]
    if len(keep) == len(m.metadata_props):
        return raw
    del m.metadata_props[:]
    for k, v in keep:
        m.metadata_props.add(key=k, value=v)
    return m.SerializeToString()


def digest_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def dataset(n: int, shape: tuple[int, ...], seed: int):
    """Learnable synthetic images: class c brightens the c-th block of pixels (+ noise)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randint(0, 120, (n, *shape), generator=g)
    flat = x.view(n, -1)
    size = flat.shape[1] // 10
    for c in range(10):
        flat[y == c, c * size:(c + 1) * size] += 120
    return BNNDataset(x.clamp(0, 255).to(torch.uint8), y, name="golden")


NETS = {
    "vgg3": ("vgg3", {"channels": ((8,), (8,)), "fc_width": 32, "in_shape": (1, 8, 8)}, None),
    "fc4": ("fc", {"hidden": (40, 24), "in_shape": (1, 8, 8), "weight_bits": 4}, None),
    "fc8a": ("fc", {"hidden": (40, 24), "in_shape": (1, 8, 8), "weight_bits": 8,
                    "quant": "asymmetric"}, 0.01),
    "vgg3q4": ("vgg3", {"channels": ((8,), (8,)), "fc_width": 32, "in_shape": (1, 8, 8),
                        "weight_bits": 4}, None),
    "fc": ("fc", {"hidden": (48, 32), "in_shape": (1, 8, 8)}, None),
}


def trained(name: str):
    arch, kw, randbet = NETS[name]
    model = build(arch, seed=0, **kw)
    fit(model, dataset(2048, (1, 8, 8), 1), epochs=8, batch_size=64, lr=1e-2, seed=3,
        progress=False, device="cpu", threads=1, randbet_ber=randbet)
    return model


def main(out: Path) -> None:
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    test = dataset(300, (1, 8, 8), 2)
    nets = {name: trained(name) for name in NETS}
    bers = [0, 0.01, 0.05, (0.02, 0.1)]

    rows = []

    def add(df, **tags):
        rows.append(df.assign(**tags))

    for engine in ("packed", "fp32", "reference"):
        for layers in (None, "hidden"):
            add(sweep({"vgg3": nets["vgg3"]}, test, bers=bers, n_maps=3, seed=4, layers=layers,
                      engine=engine, progress=False),
                engine=engine, layers=str(layers), targets="weights")
    add(sweep({"vgg3": nets["vgg3"]}, test, bers=[0.01, 0.05], n_maps=2, seed=4,
              engine="reference", targets=("thresholds",), progress=False),
        engine="reference", layers="None", targets="thresholds")
    for name in ("fc4", "fc8a", "vgg3q4"):
        for engine in ("fixed", "reference"):
            for layers in (None, "hidden"):
                add(sweep({name: nets[name]}, test, bers=bers, n_maps=3, seed=4, layers=layers,
                          engine=engine, progress=False),
                    engine=engine, layers=str(layers), targets="weights")
    pd.concat(rows).to_csv(out / "sweeps.csv", index=False, float_format="%.17g")

    frows = []
    for name in ("fc", "vgg3", "fc4", "vgg3q4"):
        model = nets[name]
        layers = {n: m for n, m in model.named_modules() if hasattr(m, "n_stored_bits")}
        g = torch.Generator().manual_seed(21)
        sets = []
        for k in range(3):
            sets.append({n: torch.randperm(lay.n_stored_bits, generator=g)[: 3 + 7 * k]
                         for j, (n, lay) in enumerate(layers.items()) if (j + k) % 2 == 0})
        for engine in ("auto", "reference"):
            accs = accuracy_under_flips(model, test, sets, engine=engine)
            frows += [{"model": name, "engine": engine, "set": i, "accuracy": a}
                      for i, a in enumerate(accs)]
    pd.DataFrame(frows).to_csv(out / "flips.csv", index=False, float_format="%.17g")

    prof = synthetic_profile(rows=64, cols=16, n_arrays=4, seed=5,
                             voltages=[1.0, 0.9, 0.8, 0.75, 0.7])
    prows = [profile_sweep({n: nets[n]}, test, prof, offsets=(0, 1000), progress=False)
             for n in ("fc", "fc4")]
    pd.concat(prows).to_csv(out / "profile.csv", index=False, float_format="%.17g")

    m = margin(nets["vgg3"], test)
    m.to_csv(out / "margin_vgg3.csv", float_format="%.17g")
    margin_summary(m).to_csv(out / "margin_summary_vgg3.csv", float_format="%.17g")
    imps = [importance(nets["vgg3"], test, estimator=e).assign(estimator=e)
            for e in ("accuracy", "loss", "flips", "taylor", "loss_norm")]
    pd.concat(imps).to_csv(out / "importance_vgg3.csv", index=False, float_format="%.17g")
    importance(nets["fc"], test, estimator="mc", ber=0.1, n_maps=3, seed=3).to_csv(
        out / "importance_mc_fc.csv", index=False, float_format="%.17g")
    flip_probability(nets["fc"], test, ber=[0.01, 0.05]).to_csv(
        out / "flipprob_fc.csv", index=False, float_format="%.17g")
    predict_accuracy(nets["fc"], test, [0.01, 0.05, 0.1]).to_csv(
        out / "predict_fc.csv", index=False, float_format="%.17g")

    ex: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("fc", "vgg3"):
            d = export(nets[name], Path(tmp) / name)
            for f in sorted(d.iterdir()):
                if f.name != "manifest.json":
                    ex[f"bundle/{name}/{f.name}"] = digest_bytes(f.read_bytes())
            man = json.loads((d / "manifest.json").read_text())
            man.pop("library", None)
            man.pop("bnn_tol_version", None)
            ex[f"bundle/{name}/manifest.json:layers"] = digest_bytes(
                json.dumps(man.get("layers"), sort_keys=True).encode())
            x = test.images.numpy()
            for ber, seed in ((None, None), (0.02, 3), ((0.01, 0.05), 4)):
                pred = deploy_predict(d, x, ber=ber, seed=seed)
                ex[f"deploy/{name}/{ber}/{seed}"] = digest_bytes(pred.astype("int64").tobytes())
            try:
                p = export_onnx(nets[name], Path(tmp) / f"{name}.onnx")
                ex[f"onnx/{name}"] = digest_bytes(onnx_graph_bytes(Path(p).read_bytes()))
            except Exception as e:  # onnx not installed: recorded as missing
                ex[f"onnx/{name}"] = f"unavailable: {type(e).__name__}"
    (out / "export.json").write_text(json.dumps(ex, indent=1, sort_keys=True))
    from bnn_tol.provenance import environment

    env = environment(threads=1)
    (out / "recorded.json").write_text(json.dumps(
        {"commit": "004ed4e", "torch": torch.__version__, "bnn_tol": bnn_tol.__version__,
         "cpu": env.get("cpu"), "cpu_flags": env.get("cpu_flags"), "threads": 1}, indent=1))


if __name__ == "__main__":
    threads = torch.get_num_threads()
    try:
        main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "core_golden"))
    finally:
        torch.set_num_threads(threads)
