"""The README's figures, drawn from finished study directories (``make results`` runs it).

    python scripts/readme_figures.py --out docs/figures docs/results/fmnist_decisive \\
        docs/results/fmnist_vgg3 docs/results/fmnist_recipes

For each study directory ``<dir>`` (named ``<study>``), into ``--out``:

- ``<study>_accuracy.png``: accuracy vs evaluation BER, one panel per model group (per
  recipe with a recipe axis), one line per training BER, 95 % bootstrap band over maps and
  seeds (:func:`bnn_tol.plots.accuracy_vs_ber`);
- ``<study>_<metric>.png``: the normalized margin and the importance variance vs accuracy at
  BER 0.1 (the study's largest BER if it has no 0.1), one point per network with 95 % error
  bars on both axes (:func:`bnn_tol.plots.metric_scatter_by_model`), one file per metric;
- ``<study>_front.png``: clean accuracy vs accuracy at BER 0.1 per recipe
  (:func:`bnn_tol.plots.recipe_front`), when the study has several model groups;
- ``<study>_protection.png`` / ``<study>_protection_curves.png``: the AUC gain over random of
  each ranking (:func:`bnn_tol.plots.protection_gain`) and the curves of the most flip-trained
  protected network (:func:`bnn_tol.plots.protection`), when the study has protection curves.

``figures.json`` records, per figure, the study it was drawn from (with that study's
environment.json: commit, versions, CPU, threads) and the environment of this script. Figures
written by an earlier run are replaced; other files are never overwritten.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from bnn_tol import analysis, plots, provenance, report  # noqa: E402
from bnn_tol.exceptions import BnnTolError  # noqa: E402
from bnn_tol.files import write_text  # noqa: E402

BER = 0.1
#: The margin, then the first importance variance a study has (one estimator: its name has no
#: estimator; several: the paper's accuracy form first).
METRICS = ("mean_margin_norm", "importance_variance_unbiased",
           "importance_accuracy_variance_unbiased", "importance_loss_norm_variance_unbiased")
DPI = 110


def figures(study_dir: Path) -> dict[str, object]:
    """``{file stem: figure}`` of one study directory."""
    res = report.load_results(study_dir)
    name = str(res["config"].get("name", study_dir.name)) if res["config"] else study_dir.name
    sweeps, metrics = res["sweeps"], res["metrics"]
    if "split" in metrics.columns:
        metrics = metrics[metrics["split"].astype(str) == "all"]
    swept = sorted(float(b) for b in sweeps["ber"].unique())
    ber = BER if any(abs(b - BER) < 1e-12 for b in swept) else swept[-1]
    out: dict[str, object] = {f"{name}_accuracy": plots.accuracy_vs_ber(sweeps)}
    present = set(metrics.loc[metrics["layer"] == "network", "metric"])
    for m in METRICS:
        if m in present:
            out[f"{name}_{m}"] = plots.metric_scatter_by_model(metrics, sweeps, metric=m,
                                                               ber=ber)
            if m.startswith("importance"):
                break  # one importance variance: the unbiased one where the study has it
    if res["models"]["model"].nunique() > 1:
        out[f"{name}_front"] = plots.recipe_front(analysis.recipe_front(sweeps, ber=ber),
                                                  ber=ber)
    if not res["protection_auc"].empty:
        out[f"{name}_protection"] = plots.protection_gain(
            analysis.protection_summary(res["protection_auc"]))
        curve = res["protection"]
        top = curve.sort_values(["train_ber", "train_seed"])["model_id"].iloc[-1]
        out[f"{name}_protection_curves"] = plots.protection(analysis.network_curve(curve, top))
    return out


def _is_record(path: Path) -> bool:
    """Did this script write ``path`` (a figures.json with its two keys)?"""
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(rec, dict) and set(rec) == {"environment", "figures"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("studies", nargs="+", type=Path, help="finished study directories")
    ap.add_argument("--out", type=Path, default=Path("docs/figures"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    record: dict[str, object] = {"environment": provenance.environment(), "figures": {}}
    try:
        for d in args.studies:
            env = d / "environment.json"
            source = {"study": str(d), "environment": json.loads(env.read_text())
                      if env.is_file() else None}
            for stem, fig in figures(d).items():
                path = args.out / f"{stem}.png"
                plots.save(fig, path, inputs=[d], dpi=DPI)
                record["figures"][path.name] = source  # type: ignore[index]
                print(f"wrote {path}")
        meta = args.out / "figures.json"
        text = json.dumps(record, indent=1, default=str)
        write_text(meta, text + "\n", inputs=args.studies, replace=_is_record)
    except BnnTolError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
