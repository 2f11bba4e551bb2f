"""bnn-tol report (issue 10) on synthetic result directories: the rho-vs-BER table, the
claims, reliability warnings, reproduction, and old result directories without split/se."""

import html

import numpy as np
import pandas as pd

from bnn_tol import report


def _write_results(d, *, new_format=True, seed=0):
    rng = np.random.default_rng(seed)
    n = 12
    tb = np.repeat([0.0, 0.1, 0.2], 4)
    tol = rng.uniform(size=n) + 2 * tb
    clean = 0.9 - 0.05 * tb + 0.002 * rng.uniform(size=n)
    ids = [f"fc_{i:02d}" for i in range(n)]
    seed = "train_seed" if new_format else "seed"  # old directories: the previous names
    models = pd.DataFrame({"model_id": ids, "model": "fc", "train_ber": tb,
                           seed: np.tile(np.arange(4), 3), "clean_acc": clean})
    srows, mrows, prows = [], [], []
    for i, mid in enumerate(ids):
        base = {"model_id": mid, "model": "fc", "train_ber": tb[i], seed: i % 4}
        for ber in (0.0, 0.05, 0.1, 0.2):
            acc = clean[i] if ber == 0 else 0.2 + 0.3 * tol[i] - ber
            srows += [{**base, "ber": ber, "map": k, "accuracy": acc + 0.001 * k}
                      for k in range(2)]
            if ber > 0:
                prows.append({**base, "ber": ber, "predicted_accuracy": acc - 0.01})
        half_noise = rng.normal(size=2)
        vals = {"mean_margin_norm": (tol[i], tol[i], tol[i], 0.01),
                "importance_variance": (rng.normal(), half_noise[0], half_noise[1], 0.5),
                "importance_noise_share": (0.9, 0.9, 0.9, np.nan)}
        for metric, (v, a, b, se) in vals.items():
            row = {**base, "layer": "network", "metric": metric}
            if new_format:
                mrows += [{**row, "value": x, "value_se": se, "split": s}
                          for s, x in (("all", v), ("a", a), ("b", b))]
            else:
                mrows.append({**row, "value": v})
    d.mkdir(parents=True, exist_ok=True)
    models.to_csv(d / "models.csv", index=False)
    pd.DataFrame(srows).to_csv(d / "sweeps.csv", index=False)
    pd.DataFrame(mrows).to_csv(d / "metrics.csv", index=False)
    if new_format:
        pd.DataFrame(prows).to_csv(d / "predictions.csv", index=False)


def test_report_states_claims_warnings_and_reproduction(tmp_path):
    _write_results(tmp_path / "res")
    text = report.write(tmp_path / "res", tmp_path / "out" / "r.html", n_boot=200).read_text()
    cl = pd.read_csv(tmp_path / "out" / "claims.csv").set_index(["metric", "claim"])
    # the margin rises with training BER and orders accuracy at every BER
    assert cl.loc[("mean_margin_norm", "a"), "verdict"] == "holds"
    assert cl.loc[("mean_margin_norm", "b"), "verdict"] == "holds"
    rel = pd.read_csv(tmp_path / "out" / "reliability.csv").set_index("metric")
    assert not rel.loc["importance_variance", "reliable"] and rel.loc["importance_variance",
                                                                      "noisy"]
    assert "<b>Warning</b> (fc): <code>importance_variance</code>" in text
    assert "The paper&#x27;s claims" in text or "The paper's claims" in text
    assert "Claim (a), fc: flip-trained networks have larger <code>mean_margin_norm" in text
    assert html.escape(report.REPRODUCE) in text
    curve = pd.read_csv(tmp_path / "out" / "correlation_curve.csv")
    assert {"predicted_accuracy", "clean_accuracy"} <= set(curve.metric)
    fit = pd.read_csv(tmp_path / "out" / "prediction_fit.csv").iloc[0]
    assert fit.n == 36 and abs(fit.mae - 0.0105) < 1e-9  # maps add 0.0005, prediction -0.01
    assert "noise share 90%" in text


def test_report_works_on_an_old_result_dir_without_split_se_or_predictions(tmp_path):
    _write_results(tmp_path / "old", new_format=False)
    text = report.write(tmp_path / "old", n_boot=50).read_text()
    assert "<h2>Summary</h2>" in text and "<b>Warning</b>" not in text
    assert pd.read_csv(tmp_path / "old" / "reliability.csv").empty
    assert not (tmp_path / "old" / "prediction_fit.csv").exists()
    assert "mean_margin_norm" in set(pd.read_csv(tmp_path / "old" / "claims.csv").metric)


def test_curve_table_shows_the_named_metrics_at_5_10_20_percent_with_warnings():
    rows = [{"model": "fc", "metric": m, "layer": "network", "ber": b, "kind": "raw",
             "method": "spearman", "r": 0.5, "ci_low": 0.1, "ci_high": 0.9}
            for m in ("importance_accuracy_variance_unbiased", "mean_margin_norm", "foo")
            for b in (0.0, 0.05, 0.1, 0.15, 0.21)]
    rel = pd.DataFrame([{"model": "fc", "metric": "importance_accuracy_variance_unbiased",
                         "layer": "network", "reliability": 0.4, "reliable": False,
                         "noise_share": np.nan, "noisy": False}])
    t = report.curve_table(pd.DataFrame(rows), rel)
    assert list(t.columns) == ["model", "metric", "BER 0.05", "BER 0.1", "BER 0.21", "warning"]
    assert list(t.metric) == ["mean_margin_norm", "importance_accuracy_variance_unbiased"]
    assert (t["BER 0.1"] == "0.50 [0.10, 0.90]").all()
    assert list(t.warning) == ["", "low reliability (0.40)"]
