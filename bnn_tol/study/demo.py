"""The end-to-end demo behind ``make demo`` / ``bnn-tol demo``.

1. Trains a normal and a bit-flip-trained (p = 0.1) ``fc`` BNN on Fashion-MNIST (hidden layers
   of 1024 so that this takes about a minute on 2 CPU cores) and prints their clean accuracy.
2. Sweeps both over BER 0..10 % with persistent fault maps (``engines.sweep``) and prints
   mean accuracy per BER; writes ``sweeps.csv`` and ``acc_vs_ber.png``.
3. Computes both tolerance metrics (``metrics.margin_summary``, ``metrics.importance_variance``)
   with their standard errors (the importance variance as its unbiased estimate, with the
   share of the plug-in that is sampling noise) and writes ``metrics.csv``.
4. Runs the quick correlation study (``study.run("quick")``) and writes its HTML report.

The output directory is the demo's own: the first run writes a marker file (``MARKER``) into a
new or empty directory; later runs rewrite only directories that carry it, and refuse any other
non-empty directory (``ResultsMismatch``), so ``--out`` never clobbers files it did not create.
Everything is validated before the directory is claimed or anything is trained: the
arguments, the dataset, the study preset (its config and datasets) and the models' memory.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from bnn_tol import data, engines, faults, files, metrics, train
from bnn_tol.exceptions import InvalidArgument, require_int
from bnn_tol.interop import checkpoint
from bnn_tol.study import plots, report
from bnn_tol.study import runner as study_mod

__all__ = ["run", "MARKER"]

#: Marker file that identifies a directory written by the demo.
MARKER = ".bnn_tol_demo"
_WHAT = "`bnn-tol demo`"
_NOTE = "written by bnn-tol demo; its files are rewritten by the next run\n"


def run(
    out: str | Path = "runs/demo",
    *,
    dataset: str = "fashion-mnist",
    data_dir: str | Path | None = None,
    hidden: tuple[int, ...] = (1024, 1024),
    epochs: int = 2,
    flip_ber: float = 0.1,
    bers: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05, 0.1),
    n_maps: int = 10,
    study: str | None = "quick",
    seed: int = 0,
    device: str = "auto",
    echo=print,
) -> dict[str, Any]:
    """Run the demo; returns paths and headline numbers.

    Returns:
        ``{"models": {label: dir}, "accuracy": {label: clean acc}, "sweeps": DataFrame,
        "metrics": DataFrame, "report": path or None}``.

    Raises:
        InvalidArgument: ``epochs`` or ``n_maps`` not integers >= 1 (``n_maps`` at most
            :data:`bnn_tol.engines.driver.MAX_MAPS`), a bad seed or BER, an unknown dataset or
            study preset, a model too large to train here.
        ResultsMismatch: ``out`` is not the demo's (nothing is written into it).
    """

    out = Path(out)
    epochs = require_int(epochs, "epochs", minimum=1)
    n_maps = require_int(n_maps, "n_maps", minimum=1)
    if n_maps > engines.driver.MAX_MAPS:
        raise InvalidArgument(f"n_maps must be <= {engines.driver.MAX_MAPS}, got {n_maps}")
    if isinstance(flip_ber, bool) or not isinstance(flip_ber, int | float) \
            or not math.isfinite(flip_ber) or not 0 < flip_ber <= 1:
        raise InvalidArgument(f"flip_ber must be a BER in (0, 1], got {flip_ber!r}")
    for b in bers:
        faults.rates(b)
    files.check_claim(out, MARKER, what=_WHAT)
    tr = data.load(dataset, "train", data_dir=data_dir)
    te = data.load(dataset, "test", data_dir=data_dir)
    train.check_fits("fc", seed=seed, hidden=hidden, in_shape=tr.shape,
                     n_classes=len(tr.classes))
    if study:  # the study's config and datasets, and its directory, before any training
        study_mod.check(study_mod.load_config(study))
        files.check_claim(out / "study", study_mod.MARKER, what="`bnn-tol study`")
    files.claim_dir(out, MARKER, what=_WHAT, note=_NOTE)
    result: dict[str, Any] = {"models": {}, "accuracy": {}}
    trained = {}
    for label, ber in (("fc", None), (f"fc-bft{flip_ber:g}", flip_ber)):
        model = train.build("fc", seed=seed, hidden=hidden, in_shape=tr.shape,
                            n_classes=len(tr.classes))
        echo(f"[demo] training {label} ({epochs} epochs, hidden {hidden}, flip BER {ber or 0})")
        hist = train.fit(model, tr, te, epochs=epochs, flip_ber=ber, seed=seed, device=device)
        checkpoint.check_out(out / label, overwrite=True)  # a checkpoint of an earlier demo run
        path = checkpoint.save(model, out / label)
        acc = float(hist["test_acc"].iloc[-1])
        result["models"][label] = str(path)
        result["accuracy"][label] = acc
        trained[label] = model
        echo(f"[demo] {label}: clean test accuracy {acc:.4f}  "
             f"({hist['seconds'].sum():.1f} s)  -> {path}")

    echo(f"[demo] BER sweep: {len(bers)} BERs x {n_maps} fault maps on {len(te)} test images")
    df = engines.sweep(trained, te, bers=list(bers), n_maps=n_maps, seed=seed, device=device)
    files.atomic_write(out / "sweeps.csv", lambda p: df.to_csv(p, index=False), replace=True)
    plots.save(plots.sweep(df), out / "acc_vs_ber.png", overwrite=True, dpi=120,
               bbox_inches="tight")
    table = engines.summarize(df).pivot(index="ber", columns="model", values="mean")
    echo("[demo] mean accuracy under bit errors:\n" + table.to_string(float_format="{:.4f}".format))
    result["sweeps"] = df

    sub = te.subset(2000, seed=seed)
    rows = []
    for label, model in trained.items():
        ms = metrics.margin_summary(metrics.margin(model, sub))
        iv = metrics.importance_variance(metrics.importance(model, sub))
        net_m = ms[ms["layer"] == "network"].iloc[0]
        net_i = iv[iv["layer"] == "network"].iloc[0]
        rows.append({"model": label, "mean_margin_norm": float(net_m["value"]),
                     "mean_margin_norm_se": float(net_m["value_se"]),
                     "importance_variance": float(net_i["variance_unbiased"]),
                     "importance_variance_se": float(net_i["variance_unbiased_se"]),
                     "importance_variance_plugin": float(net_i["variance"]),
                     "importance_noise_share": float(net_i["noise_share"])})
    met = pd.DataFrame(rows)
    files.atomic_write(out / "metrics.csv", lambda p: met.to_csv(p, index=False), replace=True)
    echo("[demo] tolerance metrics (network level, 2000 test images; importance variance is the "
         "unbiased estimate, noise_share the part of the plug-in that is sampling noise):\n"
         + met.to_string(index=False, float_format="{:.4g}".format))
    result["metrics"] = met

    result["report"] = None
    if study:

        echo(f"[demo] correlation study, preset {study!r}")
        res = study_mod.run(study, out / "study")
        result["report"] = str(report.write(res["out"], overwrite=True))
        echo(f"[demo] report: {result['report']}")
    echo(f"[demo] done; everything is in {out}/")
    return result
