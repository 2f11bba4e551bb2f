"""Profiled-chip path of the Stutz et al. reproduction: accuracy vs voltage and energy saving.

Runs after ``scripts/stutz_fmnist.py`` (``make stutz`` runs both) on its checkpoints::

    python scripts/stutz_energy.py --out docs/results/stutz_fmnist

No real SRAM profile ships with bnn_tol, so the chip is synthetic. ``--chip calibrated`` (the
default): :func:`bnn_tol.profile.calibrated_profile`, seed 0: Figure 1 of Stutz et al. (bit
error rate 20.6 % at V / V_min = 0.75 ... 0.0069 % at 0.92), errors along columns, 0 -> 1
flips about 4 times as likely as 1 -> 0, voltages 1.0 .. 0.75 in steps of at most 0.1 % bit
error rate, energy per access (V / V_min)^2, swept down to ``--min-voltage`` (0.79, a bit
error rate of about 5.6 %). ``--chip legacy``: the earlier
:func:`bnn_tol.profile.synthetic_profile` (failure voltages ~ N(0.70, 0.05), energy relative to
0.96). Each network is placed at ``--offsets`` (bit addresses) in the same chip.
Outputs in ``--out``: ``chip.npz``, ``chip_sweep.csv`` (one row per network, voltage, offset),
``energy_summary.csv`` (per network and ``--tolerances`` the lowest voltage down to which the
accuracy, mean over placements, stays within that loss of clean -- 1 point and 2.5 points, the
paper's 8-bit and 4-bit criteria -- and its energy saving; :func:`bnn_tol.evaluate.
summary_energy`), ``energy_summary.md`` and ``energy.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

import bnn_tol
from bnn_tol import data, evaluate, plots, profile, provenance

NETS = ["q8 asym+clip+randbet", "q8 sym", "q4 asym+clip+randbet", "q4 sym", "bnn1280 bft",
        "bnn1280"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/results/stutz_fmnist")
    ap.add_argument("--offsets", default="0,1000003,2000006")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chip", choices=["legacy", "calibrated"], default="calibrated",
                    help="synthetic chip generator (module docstring)")
    ap.add_argument("--tolerances", default="0.01,0.025",
                    help="accuracy losses (absolute) for the energy summary")
    ap.add_argument("--min-voltage", type=float, default=0.79,
                    help="sweep the chip's voltages down to this one (V / V_min; 0.79: bit "
                         "error rate about 5.6 %%, where every network here has failed)")
    args = ap.parse_args(argv)
    # the code that runs: recorded before any output changes the tree (git_dirty)
    env = provenance.environment(command="python scripts/stutz_energy.py " +
                                 " ".join(argv or sys.argv[1:]))
    out = Path(args.out)
    make = profile.synthetic_profile if args.chip == "legacy" else profile.calibrated_profile
    chip = make(seed=args.seed)
    profile.save_profile(chip, out / "chip.npz")
    te = data.load("fashion-mnist", "test")
    nets = {}
    for label in NETS:
        path = out / "models" / label.replace(" ", "_").replace("+", "-")
        if not path.exists():
            print(f"missing {path}: run scripts/stutz_fmnist.py first", file=sys.stderr)
            return 1
        nets[label] = bnn_tol.load(path)
    offsets = [int(o) for o in args.offsets.split(",")]
    volts = [float(v) for v in chip.voltages if v >= args.min_voltage]
    df = evaluate.profile_sweep(nets, te, chip, voltages=volts, offsets=offsets, progress=False)
    df.to_csv(out / "chip_sweep.csv", index=False, float_format="%.17g")
    summ = evaluate.summary_energy(df, tolerance=[float(t) for t in args.tolerances.split(",")])
    summ.to_csv(out / "energy_summary.csv", index=False, float_format="%.6g")
    (out / "energy_summary.md").write_text(markdown(summ, min(volts)))
    kind = "" if args.chip == "legacy" else "calibrated "
    plots.energy(df, title=f"synthetic {kind}chip (seed {args.seed}), fc on "
                 "Fashion-MNIST").savefig(out / "energy.png", dpi=120)
    rates = chip.cell_error_rate()
    rates.to_csv(out / "chip_rates.csv", index=False, float_format="%.6g")
    (out / "environment_energy.json").write_text(json.dumps(env, indent=2))
    print(summ.to_string(index=False))
    return 0


def markdown(summ: pd.DataFrame, floor: float = 0.0) -> str:
    """One row per network: per tolerance the voltage, accuracy (mean +- sd over placements)
    and energy saving; a voltage at the sweep's ``floor`` is marked ``<=`` (lower voltages
    were not swept: the saving is a lower bound)."""
    tols = list(dict.fromkeys(summ["tolerance"]))
    head = "| network | clean acc. (%) | " + " | ".join(
        f"loss <= {100 * t:g} pt: V / V_min, acc. (%), saving (%)" for t in tols) + " |"
    lines = [head, "|---|---:|" + "---|" * len(tols)]
    for model, g in summ.groupby("model", sort=False):
        cells = []
        for t in tols:
            r = g[g["tolerance"] == t].iloc[0]
            sd = 0.0 if pd.isna(r["accuracy_sd"]) else r["accuracy_sd"]
            at_floor = "<= " if r["voltage"] <= floor else ""
            cells.append("none" if pd.isna(r["voltage"]) else
                         f"{at_floor}{r['voltage']:.3f}, {100 * r['accuracy']:.2f} ± "
                         f"{100 * sd:.2f}, {'>= ' if at_floor else ''}"
                         f"{100 * r['energy_saving']:.1f}")
        lines.append(f"| {model} | {100 * g['clean_accuracy'].iloc[0]:.2f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
