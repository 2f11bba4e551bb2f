"""Region of validity of ``metrics.predict_accuracy``: predicted vs swept accuracy per BER.

One command regenerates every number of ``docs/results/predict_validity/`` and of the region of
validity stated in the docstring of :func:`bnn_tol.metrics.predict_accuracy`::

    python scripts/predict_validity.py --out docs/results/predict_validity

Networks: fc 784-``--hidden``-10 trained ``--epochs`` epochs on the full Fashion-MNIST training
set (Adam, the library's recipe), one per (training BER in ``--train-bers``, seed in
``--seeds``): by default a normal and a bit-flip-trained (BER 0.1) network, two seeds each.
``--dataset`` and ``--n-train`` (a seeded subset of the training set) measure other families,
e.g. the weaker networks and the counter-example quoted in the docstring::

    python scripts/predict_validity.py --hidden 128,128 --n-train 8000 --n-test 2000 \
        --out docs/results/predict_validity_fc128
    python scripts/predict_validity.py --dataset digits --hidden 64,64 --epochs 10 \
        --train-bers 0 --seeds 0 --out docs/results/predict_validity_digits

For each network, on the first ``--n-test`` images of a seeded shuffle of the test set:

* the exact sweep (``evaluate.sweep``, ``--maps`` persistent fault maps per BER, all layers):
  ``acc_p`` is the mean over the maps, ``se_p = std / sqrt(maps)`` its standard error;
* ``metrics.predict_accuracy`` with ``method="poisson"`` and ``method="propagate"`` on the same
  images and BERs.

Outputs:

* ``rows.csv``: one row per (network, BER, method): ``model_id, train_ber, train_seed,
  clean_acc, ber, method, swept, se, predicted, error`` (``error = predicted - swept``);
* ``fit.csv``: one row per (method, BER), pairs over the networks: ``analysis.prediction_fit(
  by=("model", "ber"))`` (``mae``, ``r2``, correlations, ``n``) plus ``bias`` (mean signed
  error), ``max_abs`` and ``max_se`` (the largest sweep standard error of the BER);
* ``summary.md``: the MAE table (BER x network, signed errors) per method and the largest BER
  up to which the MAE stays <= 0.01 and <= 0.02;
* ``environment.json``: versions, commit, CPU, threads, the command, seconds per stage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bnn_tol import analysis, data, evaluate, metrics, models, provenance, train

METHODS = ("poisson", "propagate")


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def train_networks(args, tr: data.BNNDataset) -> dict[str, tuple[models.BNN, dict]]:
    """``{model_id: (model, ids)}`` for every (training BER, seed)."""
    nets = {}
    for fb in _floats(args.train_bers):
        for seed in [int(s) for s in args.seeds.split(",")]:
            mid = f"fc_b{fb:g}_s{seed}"
            m = models.build("fc", seed=seed, hidden=tuple(int(h) for h in args.hidden.split(",")),
                             in_shape=tr.shape)
            train.fit(m, tr, epochs=args.epochs, flip_ber=fb or None, seed=seed,
                      progress=False, threads=args.threads, device="cpu")
            nets[mid] = (m.eval(), {"train_ber": fb, "train_seed": seed})
    return nets


def max_valid_ber(fit: pd.DataFrame, tol: float) -> float:
    """Largest BER up to which (every BER from the smallest) the MAE stays <= ``tol``."""
    best = float("nan")
    for ber, mae in zip(fit["ber"], fit["mae"], strict=True):
        if mae > tol:
            break
        best = ber
    return best


def summary_md(rows: pd.DataFrame, fit: pd.DataFrame, nets: pd.DataFrame, args,
               seconds: dict, command: str) -> str:
    name = {"fashion-mnist": "Fashion-MNIST"}.get(args.dataset, args.dataset)
    lines = ["# Region of validity of `metrics.predict_accuracy`\n",
             f"fc {args.n_in}-{args.hidden.replace(',', '-')}-10, {args.epochs} epochs on {name} "
             f"({args.n_train} images), sweep on {args.n_test} test images x {args.maps} maps "
             "per BER "
             f"(all layers). Regenerate: `{command}` ({sum(seconds.values()):.0f} s here; "
             "`environment.json`).\n",
             "| network | training BER | seed | clean accuracy |", "|---|---|---|---|"]
    for mid, r in nets.iterrows():
        lines.append(f"| {mid} | {r.train_ber:g} | {int(r.train_seed)} | {r.clean_acc:.4f} |")
    for method in METHODS:
        f = fit[fit["method"] == method].set_index("ber")
        e = rows[rows["method"] == method].pivot(index="ber", columns="model_id",
                                                 values="error")[list(nets.index)]
        lines += [f"\n## `method=\"{method}\"`: predicted - swept accuracy\n",
                  "| BER | " + " | ".join(e.columns) + " | MAE | bias | max sweep SE |",
                  "|---" * (len(e.columns) + 4) + "|"]
        for ber, r in e.iterrows():
            lines.append(f"| {ber:g} | " + " | ".join(f"{v:+.4f}" for v in r)
                         + f" | {f.loc[ber, 'mae']:.4f} | {f.loc[ber, 'bias']:+.4f} | "
                         f"{f.loc[ber, 'max_se']:.4f} |")
        fm = fit[fit["method"] == method]
        lines.append("\n" + "; ".join(
            f"MAE <= {tol:g} " + (f"up to BER {b:g}" if np.isfinite(b) else "at no BER")
            for tol in (0.01, 0.02) for b in [max_valid_ber(fm, tol)]) + ".")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/results/predict_validity")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--n-train", type=int, default=None, help="seeded subset (default: all)")
    ap.add_argument("--hidden", default="256,256")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-bers", default="0,0.1")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--n-test", type=int, default=3000)
    ap.add_argument("--maps", type=int, default=20)
    ap.add_argument("--bers", default="0.001,0.002,0.005,0.01,0.02,0.03,0.05,0.1,0.2,0.3")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)
    command = "python scripts/predict_validity.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    # the code that runs: recorded before any output changes the tree (git_dirty)
    env = provenance.environment(threads=args.threads, command=command)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    bers = _floats(args.bers)
    seconds = {}

    t = time.perf_counter()
    tr = data.load(args.dataset, "train")
    if args.n_train is not None:
        tr = tr.subset(args.n_train, seed=0)
    te = data.load(args.dataset, "test")
    te = te.subset(min(args.n_test, len(te)), seed=0)
    args.n_train, args.n_test, args.n_in = len(tr), len(te), int(np.prod(tr.shape))
    nets = train_networks(args, tr)
    seconds["train"] = time.perf_counter() - t

    t = time.perf_counter()
    sw = evaluate.sweep({k: m for k, (m, _) in nets.items()}, te, bers=[0.0, *bers],
                        n_maps=args.maps, seed=0, progress=False, device="cpu")
    seconds["sweep"] = time.perf_counter() - t
    acc = analysis.accuracy_at_ber(sw).set_index(["model_id", "ber"])
    ids = pd.DataFrame({k: {**v, "clean_acc": float(acc.loc[(k, 0.0), "accuracy"])}
                        for k, (_, v) in nets.items()}).T.astype(
        {"train_ber": float, "train_seed": int, "clean_acc": float})

    rows, fits = [], []
    for method in METHODS:
        t = time.perf_counter()
        pred = pd.concat([metrics.predict_accuracy(m, te, bers, method=method)
                          .assign(model_id=k, model=method, **v)
                          for k, (m, v) in nets.items()], ignore_index=True)
        seconds[method] = time.perf_counter() - t
        fit = analysis.prediction_fit(pred, sw, by=("model", "ber")).rename(
            columns={"model": "method"})
        for _, r in pred.iterrows():
            a = acc.loc[(r.model_id, r.ber)]
            rows.append({"model_id": r.model_id, "train_ber": r.train_ber,
                         "train_seed": r.train_seed, "clean_acc": ids.loc[r.model_id, "clean_acc"],
                         "ber": r.ber, "method": method, "swept": a.accuracy,
                         "se": a["std"] / np.sqrt(a.n), "predicted": r.predicted_accuracy,
                         "error": r.predicted_accuracy - a.accuracy})
        fits.append(fit)
    rows = pd.DataFrame(rows)
    g = rows.groupby(["method", "ber"], sort=False)
    extra = pd.DataFrame({"bias": g["error"].mean(), "max_abs": g["error"].apply(
        lambda e: e.abs().max()), "max_se": g["se"].max()}).reset_index()
    fit = pd.concat(fits, ignore_index=True).merge(extra, on=["method", "ber"])
    rows.to_csv(out / "rows.csv", index=False)
    fit.to_csv(out / "fit.csv", index=False)
    (out / "summary.md").write_text(summary_md(rows, fit, ids, args, seconds, command))
    env["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    env["data_digest"] = provenance.data_digest(te)
    (out / "environment.json").write_text(json.dumps(env, indent=2) + "\n")
    print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
