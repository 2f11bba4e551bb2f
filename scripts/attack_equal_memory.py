"""Worst-case bit errors at equal memory: a BNN and an 8-bit network with the same number of
stored weight bits, attacked (:func:`bnn_tol.faults.attack.attack`, greedy, gradient-ranked,
exact re-evaluation) and hit by random flips of the same ``N`` bits, on Fashion-MNIST::

    python scripts/attack_equal_memory.py --out docs/results/stutz_attack [--epochs 3]
        [--n-bits 20] [--attack-seeds 0,1,2]

Networks (one training seed each, Adam, ``--epochs`` on the full training set):

* ``8-bit fc 784-512-512-10``: asymmetric, per-layer ranges, rounding (the robust end of the
  quantization ladder), 5,349,376 stored weight bits; also with ``clip=0.1``, and with
  ``clip=0.1`` + RandBET at 1 %.
* ``BNN fc 784-1950-1950-10``: 5,350,800 stored weight bits (+0.03 %); also bit-flip-trained
  at 1 %.

Each attack draws 512 training images (one attack per seed of ``--attack-seeds``: the spread
over attack images); accuracies are on the 10k test images; the random baseline flips ``N``
uniform stored bits, one draw per seed. Outputs in ``--out``: ``attack.csv`` (the ``attack``
table of :mod:`bnn_tol.schema`, every row replayable), ``summary.md`` (accuracy at ``N`` in
{0, 5, 10, 20}, mean ± sd over seeds), ``attack.png`` (accuracy vs ``N``) and
``environment.json`` (versions, commit, CPU, threads; recorded before any output is written).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import torch

from bnn_tol import data, models, provenance, train
from bnn_tol.faults.attack import curves

NETWORKS = {
    "8-bit 512-512": ({"hidden": (512, 512), "weight_bits": 8, "quant": "asymmetric"}, {}),
    "8-bit 512-512 clip": ({"hidden": (512, 512), "weight_bits": 8, "quant": "asymmetric"},
                           {"clip": 0.1}),
    "8-bit 512-512 clip+randbet": ({"hidden": (512, 512), "weight_bits": 8,
                                    "quant": "asymmetric"},
                                   {"clip": 0.1, "randbet_ber": 0.01}),
    "BNN 1950-1950": ({"hidden": (1950, 1950)}, {}),
    "BNN 1950-1950 flip 1%": ({"hidden": (1950, 1950)}, {"flip_ber": 0.01}),
}


def summarize(df: pd.DataFrame, keep: list[int]) -> pd.DataFrame:
    """Accuracy at ``n_flips`` in ``keep``: mean, sd and count over seeds, per network and
    method (``attack``: one greedy attack per attack-image seed; ``random``: one draw each)."""
    g = df[df["n_flips"].isin(keep)].groupby(["model", "method", "n_flips"], sort=False)
    return g["accuracy"].agg(mean="mean", sd="std", n="count").reset_index()


def markdown(s: pd.DataFrame, keep: list[int]) -> str:
    """One row per network and method, one column per ``N``: accuracy mean ± sd over seeds."""
    lines = ["| network | method | " + " | ".join(f"N = {k}" for k in keep) + " |",
             "|---|---|" + "--:|" * len(keep)]
    for (model, method), gm in s.groupby(["model", "method"], sort=False):
        at = gm.set_index("n_flips").reindex(keep)
        cells = [f"{r.mean:.3f} ± {r.sd:.3f}" for r in at.itertuples()]
        lines.append(f"| {model} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (model, gm) in enumerate(df.groupby("model", sort=False)):
        for method, style in (("attack", "-"), ("random", ":")):
            g = gm[gm["method"] == method].groupby("n_flips")["accuracy"]
            m, sd = g.mean(), g.std().fillna(0)
            ax.plot(m.index, m.values, style, color=f"C{i}",
                    label=f"{model} ({method})")
            ax.fill_between(m.index, m - sd, m + sd, color=f"C{i}", alpha=0.15, lw=0)
    ax.set(xlabel="flipped stored bits N", ylabel="test accuracy (mean ± sd over seeds)",
           title="Fashion-MNIST fc, equal memory: greedy attack vs random flips")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/results/stutz_attack")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--n-bits", type=int, default=20)
    ap.add_argument("--attack-seeds", default="0,1,2",
                    help="one attack (512 training images) and one random draw per seed")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.attack_seeds.split(",")]
    # the code that runs: recorded before any output changes the tree (git_dirty)
    env = provenance.environment(threads=args.threads,
                                 command="python scripts/attack_equal_memory.py "
                                 + " ".join(sys.argv[1:] if argv is None else argv))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tr, te = data.load("fashion-mnist", "train"), data.load("fashion-mnist", "test")
    nets = {}
    for label, (arch, fit) in NETWORKS.items():
        m = models.build("fc", seed=0, **arch)
        train.fit(m, tr, epochs=args.epochs, seed=0, progress=False, **fit)
        nets[f"{label} ({models.memory_bits(m):,} bits)"] = m.eval()
        print(f"{label}: trained", file=sys.stderr)
    parts = [curves(nets, tr, args.n_bits, eval_data=te, attack_size=512, seed=s,
                    random_seeds=(s,)) for s in seeds]
    df = pd.concat(parts, ignore_index=True)
    df.to_csv(out / "attack.csv", index=False, float_format="%.17g")
    keep = sorted({k for k in (0, 5, 10) if k < args.n_bits} | {args.n_bits})
    s = summarize(df, keep)
    plot(df, out / "attack.png")
    (out / "environment.json").write_text(json.dumps(env, indent=2))
    text = ["# Adversarial bit errors at equal memory (Fashion-MNIST, fc)", "",
            f"Test accuracy after N flipped stored bits: mean ± sd over {len(seeds)} seeds "
            "(attack: one greedy attack per draw of 512 training images; random: one uniform "
            f"draw of N stored bits per seed). One training seed per network ({args.epochs} "
            "epochs).", "", markdown(s, keep), "", provenance.describe(env)]
    (out / "summary.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
