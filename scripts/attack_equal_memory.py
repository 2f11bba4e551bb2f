"""Worst-case bit errors at equal memory: a BNN and an 8-bit network with the same number of
stored weight bits, attacked (:func:`bnn_tol.faults.attack.attack`, greedy, gradient-ranked,
exact re-evaluation) and hit by random flips of the same ``N`` bits, on Fashion-MNIST::

    python scripts/attack_equal_memory.py [--epochs 3] [--n-bits 20] [--out attack_mem.csv]

Networks (one training seed each, Adam, ``--epochs`` on the full training set):

* ``8-bit fc 784-512-512-10``: asymmetric, per-layer ranges, rounding (the robust end of the
  quantization ladder), 5,349,376 stored weight bits; also with ``clip=0.1`` + RandBET at 1 %.
* ``BNN fc 784-1950-1950-10``: 5,350,800 stored weight bits (+0.03 %); also bit-flip-trained
  at 1 %.

The attack draws 512 training images; accuracies are on the 10k test images; the random
baseline is the mean over seeds 0, 1, 2. Prints accuracy vs ``N`` and the environment.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bnn_tol import data, models, provenance, train
from bnn_tol.faults.attack import curves

NETWORKS = {
    "8-bit 512-512": ({"hidden": (512, 512), "weight_bits": 8, "quant": "asymmetric"}, {}),
    "8-bit 512-512 clip+randbet": ({"hidden": (512, 512), "weight_bits": 8,
                                    "quant": "asymmetric"},
                                   {"clip": 0.1, "randbet_ber": 0.01}),
    "BNN 1950-1950": ({"hidden": (1950, 1950)}, {}),
    "BNN 1950-1950 flip 1%": ({"hidden": (1950, 1950)}, {"flip_ber": 0.01}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--n-bits", type=int, default=20)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=None, help="write the attack table (CSV) here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tr, te = data.load("fashion-mnist", "train"), data.load("fashion-mnist", "test")
    nets = {}
    for label, (arch, fit) in NETWORKS.items():
        m = models.build("fc", seed=0, **arch)
        train.fit(m, tr, epochs=args.epochs, seed=0, progress=False, **fit)
        nets[f"{label} ({models.memory_bits(m):,} bits)"] = m.eval()
    df = curves(nets, tr, args.n_bits, eval_data=te, attack_size=512)
    env = provenance.environment(threads=args.threads,
                                 command="python scripts/attack_equal_memory.py "
                                 + " ".join(sys.argv[1:]))
    if args.out:
        df.to_csv(args.out, index=False)
        Path(args.out).with_suffix(".environment.json").write_text(json.dumps(env, indent=2))
    keep = sorted({0, 1, 5, 10, args.n_bits})
    table = df[df["n_flips"].isin(keep)].groupby(["model", "method", "n_flips"],
                                                 sort=False)["accuracy"].mean()
    print(table.unstack(["method", "n_flips"]).round(3).to_string())
    print("\n" + provenance.describe(env))


if __name__ == "__main__":
    main()
