"""Stutz et al. (MLSys 2021) on Fashion-MNIST: robust quantization, clipping, RandBET, and BNNs.

One command regenerates every number of ``docs/results/stutz_fmnist/`` (``make stutz``)::

    python scripts/stutz_fmnist.py --out docs/results/stutz_fmnist

Networks (fc, Fashion-MNIST, one training seed each, same recipe: Adam, ``--epochs``):

* ``m = 8`` and ``m = 4`` bit fc 784-512-512-10 (ReLU), four variants each, the paper's ladder:
  ``sym`` (symmetric two's complement, per layer, rounding), ``asym`` (asymmetric unsigned,
  the paper's robust quantization), ``asym+clip`` (weight clipping ``w_max = 0.1``),
  ``asym+clip+randbet`` (RandBET at ``p = 1 %``).
* BNNs (sign weights and activations): fc 784-512-512-10 normal and flip-trained (BFT at 1 %),
  and fc 784-1280-1280-10 -- the BNN with the memory of the 4-bit 512-512 network (2.65 vs 2.67
  Mbit of stored weights) -- normal and flip-trained.

``--sweeps`` adds the w_max and training-p sweeps and the fixed-pattern and label-smoothing
controls around the 8-bit asym+clip+randbet network (:func:`sweeps`). ``--conv`` trains the same
ladder as conv networks instead (vgg3 64C3-MP2-64C3-MP2-2048FC-10 with m-bit weights,
:func:`conv_networks`).

Every network is swept over ``--bers`` with ``--maps`` persistent fault maps per BER (the same
chips for every network of a layout; ``evaluate.sweep``, exact engines). Outputs: ``rows.csv``
(one row per network, BER, map: accuracy, RErr, bits per weight, memory bits), ``summary.csv``
and ``summary.md`` (RErr mean +- std over maps and the standard error of the mean),
``rerr_vs_ber.png`` (one panel per weight width: the widths are never pooled),
``equal_memory.csv``/``.png``, ``environment.json`` (versions, commit, CPU, threads).
Checkpoints go to ``<out>/models/`` and are reused when their recipe matches.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch

import bnn_tol
from bnn_tol import data, evaluate, models, provenance, train

#: The paper's quantization ladder (Stutz et al., MLSys 2021, 4.1; their CIFAR-10 8-bit RErr
#: at p = 1 %: Normal 72.65 -> +asymmetric 76.72 -> +unsigned 54.57 -> +rounding 32.05), then
#: per-layer instead of global ranges, and symmetric with rounding for reference:
#: ``label -> (quant, granularity, rounding)``.
LADDER = {
    "normal": ("symmetric", "network", "truncate"),
    "+asymmetric": ("asymmetric-signed", "network", "truncate"),
    "+unsigned": ("asymmetric", "network", "truncate"),
    "+rounding": ("asymmetric", "network", "nearest"),
    "+per-layer": ("asymmetric", "layer", "nearest"),
    "sym+rounding": ("symmetric", "layer", "nearest"),
}


def ladder(epochs: int, bits=(8, 4, 3, 2)) -> dict[str, tuple[dict, dict, str]]:
    """The ladder networks (fc 784-512-512-10, no clipping, no RandBET) per weight width."""
    nets = {}
    for m in bits:
        for step, (quant, gran, rounding) in LADDER.items():
            nets[f"q{m} {step}"] = ({"hidden": [512, 512], "weight_bits": m, "quant": quant,
                                     "granularity": gran, "rounding": rounding},
                                    {"epochs": epochs}, f"{m}-bit ladder")
    return nets


def sweeps(epochs: int) -> dict[str, tuple[dict, dict, tuple[str, ...]]]:
    """Stutz et al.'s sweeps around the 8-bit ``asym+clip+randbet`` network (fc 784-512-512-10,
    ``w_max = 0.1``, RandBET at ``p = 1 %``): ``w_max`` in {0.025, 0.05, 0.1, 0.2}, training
    ``p`` in {0.1, 1, 5} %, and two controls: RandBET with one fixed error pattern (drawn once,
    ``randbet_fixed``; in the paper it does not generalize to other rates) and label smoothing
    0.1 with clipping instead of RandBET (the paper's check that clipping's gain is not a
    regularization effect alone). The ``w_max = 0.1, p = 1 %`` network belongs to both sweeps
    (trained once)."""
    base = {"hidden": [512, 512], "weight_bits": 8, "quant": "asymmetric"}
    wmax, rate, ctrl = "8-bit w_max (RandBET 1 %)", "8-bit training p (w_max 0.1)", \
        "8-bit controls (w_max 0.1)"
    nets: dict[str, tuple[dict, dict, tuple[str, ...]]] = {}
    for w in (0.025, 0.05, 0.1, 0.2):
        nets[f"q8 w{w:g} p1%"] = (base, {"clip": w, "randbet_ber": 0.01},
                                  (wmax, rate) if w == 0.1 else (wmax,))
    for p in (0.001, 0.05):
        nets[f"q8 w0.1 p{100 * p:g}%"] = (base, {"clip": 0.1, "randbet_ber": p}, (rate,))
    nets["q8 w0.1 p1% fixed pattern"] = (base, {"clip": 0.1, "randbet_ber": 0.01,
                                                "randbet_fixed": True}, (ctrl,))
    nets["q8 w0.1 label smoothing 0.1"] = (base, {"clip": 0.1, "label_smoothing": 0.1}, (ctrl,))
    return {k: (a, {**f, "epochs": epochs}, g) for k, (a, f, g) in nets.items()}


def networks(epochs: int) -> dict[str, tuple[dict, dict, str]]:
    """The trained networks: ``label -> (build kwargs, fit kwargs, comparison group)``."""
    nets: dict[str, tuple[dict, dict, str]] = {}
    for m in (8, 4):
        base = {"hidden": [512, 512], "weight_bits": m}
        nets[f"q{m} sym"] = ({**base, "quant": "symmetric"}, {}, f"{m}-bit")
        nets[f"q{m} asym"] = ({**base, "quant": "asymmetric"}, {}, f"{m}-bit")
        nets[f"q{m} asym+clip"] = ({**base, "quant": "asymmetric"}, {"clip": 0.1}, f"{m}-bit")
        nets[f"q{m} asym+clip+randbet"] = ({**base, "quant": "asymmetric"},
                                           {"clip": 0.1, "randbet_ber": 0.01}, f"{m}-bit")
    for width in (512, 1280):
        arch = {"hidden": [width, width]}
        nets[f"bnn{width}"] = (arch, {}, "1-bit")
        nets[f"bnn{width} bft"] = (arch, {"flip_ber": 0.01}, "1-bit")
    return {k: (a, {**f, "epochs": epochs}, g) for k, (a, f, g) in nets.items()}


def conv_networks(epochs: int) -> dict[str, tuple[dict, dict, str]]:
    """The conv networks: vgg3 (``64C3-MP2-64C3-MP2-2048FC-10``, every layer stored in ``m``
    bits) symmetric and asymmetric + clipping + RandBET at 8 and 4 bits, and the same vgg3 as a
    BNN, normal and flip-trained (BFT at 1 %). The fc layer holds 99 % of the weights, so the
    BNN stores 1/8 (1/4) of the 8-bit (4-bit) network's bits."""
    nets: dict[str, tuple[dict, dict, str]] = {}
    for m in (8, 4):
        base = {"model": "vgg3", "weight_bits": m}
        nets[f"vgg3 q{m} sym"] = ({**base, "quant": "symmetric"}, {}, f"{m}-bit")
        nets[f"vgg3 q{m} asym+clip+randbet"] = ({**base, "quant": "asymmetric"},
                                                {"clip": 0.1, "randbet_ber": 0.01}, f"{m}-bit")
    nets["vgg3 bnn"] = ({"model": "vgg3"}, {}, "1-bit")
    nets["vgg3 bnn bft"] = ({"model": "vgg3"}, {"flip_ber": 0.01}, "1-bit")
    return {k: (a, {**f, "epochs": epochs}, g) for k, (a, f, g) in nets.items()}


def _train(label: str, arch: dict, fit: dict, out: Path, tr, te, seed: int) -> models.BNN:
    """Train ``models.build(arch["model"] or "fc", **arch)`` with ``train.fit(**fit)``, or load
    the checkpoint under ``out/models`` whose recipe is the same."""
    path = out / "models" / label.replace(" ", "_").replace("+", "-")
    recipe = {"arch": arch, "fit": fit, "seed": seed}
    if (path / "recipe.json").exists() and json.loads((path / "recipe.json").read_text()) == recipe:
        return bnn_tol.load(path)
    kw = dict(arch)
    model = models.build(kw.pop("model", "fc"), seed=seed, **kw)
    train.fit(model, tr, te, seed=seed, device="cpu", progress=False, **fit)
    bnn_tol.save(model, path)
    (path / "recipe.json").write_text(json.dumps(recipe))
    return model


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """RErr mean, std over maps and the standard error of the mean, per network and BER."""
    g = rows.groupby(["group", "model", "bits_per_weight", "memory_bits", "ber"], sort=False)
    s = g["rerr"].agg(rerr_mean="mean", rerr_std="std", n_maps="count").reset_index()
    s["rerr_se"] = s["rerr_std"] / s["n_maps"] ** 0.5
    return s


def markdown(s: pd.DataFrame, bers: list[float]) -> str:
    """RErr (%) mean +- std over maps, one row per network, one column per BER."""
    lines = []
    for group, gs in s.groupby("group", sort=False):
        cols = [f"p = {100 * b:g} %" for b in bers]
        lines += [f"### {group}", "", "| network | memory (Mbit) | " + " | ".join(cols) + " |",
                  "|---|---:|" + "---:|" * len(cols)]
        for model, gm in gs.groupby("model", sort=False):
            cells = []
            for b in bers:
                r = gm[gm["ber"] == b]
                cells.append("" if r.empty else
                             f"{100 * r.rerr_mean.iloc[0]:.2f} ± {100 * r.rerr_std.iloc[0]:.2f}")
            mbit = gm["memory_bits"].iloc[0] / 1e6
            lines.append(f"| {model} | {mbit:.2f} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(s: pd.DataFrame, path: Path, groups: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    for ax, group in zip(axes[0], groups, strict=True):
        for model, gm in s[s["group"] == group].groupby("model", sort=False):
            ax.errorbar(100 * gm["ber"], 100 * gm["rerr_mean"], yerr=100 * gm["rerr_std"],
                        marker="o", capsize=3, label=model)
        ax.set(xlabel="bit error rate p (%)", ylabel="RErr (%), mean ± sd over maps",
               title=f"{title}: {group}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/results/stutz_fmnist")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--maps", type=int, default=25)
    ap.add_argument("--bers", default="0,0.001,0.005,0.01,0.02,0.05")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--only", default=None, help="comma-separated labels (quick runs)")
    ap.add_argument("--ladder", default="", help="weight widths of the quantization ladder, "
                    "e.g. 8,4,3,2 (empty: no ladder networks)")
    ap.add_argument("--ladder-only", action="store_true",
                    help="only the ladder networks (with --ladder)")
    ap.add_argument("--sweeps", action="store_true",
                    help="also the w_max / training-p sweeps and controls (sweeps())")
    ap.add_argument("--sweeps-only", action="store_true",
                    help="only the sweep networks (implies --sweeps)")
    ap.add_argument("--conv", action="store_true",
                    help="only the vgg3 networks (conv_networks()) instead of the fc ones")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    # the code that runs: recorded before any output changes the tree (git_dirty)
    env = provenance.environment(threads=args.threads,
                                 command="python scripts/stutz_fmnist.py " + " ".join(argv or
                                                                                     sys.argv[1:]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bers = [float(b) for b in args.bers.split(",")]
    tr, te = data.load("fashion-mnist", "train"), data.load("fashion-mnist", "test")
    if sum((args.ladder_only, args.sweeps_only, args.conv)) > 1:
        ap.error("--ladder-only, --sweeps-only and --conv exclude each other")
    if args.conv and (args.ladder or args.sweeps):
        ap.error("--conv trains only the vgg3 networks: no --ladder or --sweeps with it")
    nets = {} if args.ladder_only or args.sweeps_only else \
        conv_networks(args.epochs) if args.conv else networks(args.epochs)
    if args.ladder and not args.sweeps_only:
        nets.update(ladder(args.epochs, [int(m) for m in args.ladder.split(",")]))
    if args.sweeps or args.sweeps_only:
        nets.update(sweeps(args.epochs))
    if not nets:
        ap.error("no networks: --ladder-only needs --ladder")
    if args.only:
        nets = {k: v for k, v in nets.items() if k in args.only.split(",")}
    frames, clean, t0 = [], [], time.perf_counter()
    for label, (arch, fit, group) in nets.items():
        t1 = time.perf_counter()
        model = _train(label, arch, fit, out, tr, te, args.seed)
        t2 = time.perf_counter()
        sign = model.blocks[0].layer.codec.is_sign
        df = evaluate.sweep({label: model}, te, bers=bers, n_maps=args.maps, seed=args.seed,
                            progress=False, engine="auto" if sign else "reference")
        df["bits_per_weight"] = model.blocks[0].layer.codec.bits_per_weight
        df["memory_bits"] = models.memory_bits(model)
        groups = (group,) if isinstance(group, str) else group  # a network in several sweeps
        frames += [df.assign(group=g) for g in groups]
        clean.append({"model": label, "group": ", ".join(groups),
                      "clean_acc": evaluate.accuracy(model, te),
                      "train_s": t2 - t1, "sweep_s": time.perf_counter() - t2})
        print(f"{label}: clean {clean[-1]['clean_acc']:.4f}, train {t2 - t1:.0f} s, "
              f"sweep {clean[-1]['sweep_s']:.0f} s", file=sys.stderr)
    rows = pd.concat(frames, ignore_index=True)
    rows.to_csv(out / "rows.csv", index=False, float_format="%.17g")
    s = summarize(rows)
    s.to_csv(out / "summary.csv", index=False, float_format="%.6g")
    pd.DataFrame(clean).to_csv(out / "networks.csv", index=False, float_format="%.6g")
    groups = [g for g in ("8-bit", "4-bit", "1-bit") if g in set(s["group"])]
    groups += [g for g in s["group"].unique() if g not in groups]  # never pooled: a panel each
    arch_name = "vgg3" if args.conv else "fc 784-512-512-10"
    plot(s, out / "rerr_vs_ber.png", groups, arch_name)
    eq = s[s["model"].isin(["q4 asym+clip+randbet", "bnn1280 bft", "bnn1280"])].copy()
    eq["group"] = "equal memory (~2.66 Mbit)"
    if len(eq):
        eq.to_csv(out / "equal_memory.csv", index=False, float_format="%.6g")
        plot(eq, out / "equal_memory.png", ["equal memory (~2.66 Mbit)"], "fc")
    (out / "environment.json").write_text(json.dumps(env, indent=2))
    text = [f"# Stutz et al. on Fashion-MNIST ({arch_name})", "",
            f"RErr (%) = test error under bit errors, mean ± sd over {args.maps} fault maps "
            f"(the standard error of the mean is sd / {args.maps ** 0.5:.0f}); one training "
            f"seed per network ({args.epochs} epochs), so differences between networks also "
            "carry training-seed noise that these intervals do not show.", "",
            markdown(s, bers), "## Clean accuracy and cost", "",
            pd.DataFrame(clean).to_markdown(index=False, floatfmt=".4f"), "",
            f"Total {time.perf_counter() - t0:.0f} s. Environment: `environment.json`."]
    (out / "summary.md").write_text("\n".join(text) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
