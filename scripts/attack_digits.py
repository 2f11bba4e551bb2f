"""Worst-case bit errors on ``digits``: accuracy vs the number ``N`` of flipped bits under the
greedy gradient-guided attack (:func:`bnn_tol.faults.attack.attack`) and under random flips of
the same ``N`` (:func:`~bnn_tol.faults.attack.random_baseline`), for normal, clipped, RandBET,
bit-flip-trained and adversarially trained networks. Regenerates the numbers of the README's
paragraph on worst-case bit errors (one torch thread; a few seconds)::

    python scripts/attack_digits.py [--n-bits 20] [--out attack.csv]

Networks: fc 64-64-48-10 on scikit-learn's 8x8 digits (train split), 8 epochs, Adam lr 1e-2,
batch 64, seed 0; BNNs (sign bits) and 8-bit symmetric fixed point. The attack draws 256
training images (``attack_size``); accuracies are on the 360 test images; the random baseline
is the mean over seeds 0, 1, 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bnn_tol import data, models, provenance, train
from bnn_tol.faults.attack import curves

RECIPES = {
    1: {"normal": {}, "flip 0.1": {"flip_ber": 0.1}, "adversarial 4": {"adversarial_bits": 4}},
    8: {"normal": {}, "clip 0.1": {"clip": 0.1},
        "randbet 0.01": {"randbet_ber": 0.01, "clip": 0.1},
        "adversarial 4": {"adversarial_bits": 4},
        "adversarial 4 + clip 0.1": {"adversarial_bits": 4, "clip": 0.1}},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-bits", type=int, default=20)
    ap.add_argument("--out", default=None, help="write the attack table (CSV) here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tr, te = data.load("digits", "train"), data.load("digits", "test")
    nets = {}
    for bits, recipes in RECIPES.items():
        for label, kw in recipes.items():
            m = models.build("fc", seed=0, hidden=(64, 48), in_shape=(1, 8, 8), weight_bits=bits)
            train.fit(m, tr, epochs=8, batch_size=64, lr=1e-2, progress=False, **kw)
            nets[f"{'bnn' if bits == 1 else f'{bits}-bit'} {label}"] = m.eval()
    df = curves(nets, tr, args.n_bits, eval_data=te, attack_size=256)
    env = provenance.environment(threads=1, command="python scripts/attack_digits.py "
                                 + " ".join(sys.argv[1:]))
    if args.out:
        df.to_csv(args.out, index=False)
        Path(args.out).with_suffix(".environment.json").write_text(json.dumps(env, indent=2))
    last = df[df["n_flips"].isin([0, args.n_bits])]
    table = last.groupby(["model", "method", "n_flips"], sort=False)["accuracy"].mean()
    print(table.unstack(["method", "n_flips"]).round(3).to_string())
    print("\n" + provenance.describe(env))


if __name__ == "__main__":
    main()
