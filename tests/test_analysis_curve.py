"""analysis over the BER range (issue 10): noise-aware intervals, partial and within-group
correlation, split-half reliability, prediction fit and the claims, on synthetic tables
with known ground truth."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bnn_tol import analysis
from bnn_tol.exceptions import InvalidArgument

EPS = np.finfo(float).eps


def _tables(x, acc_by_ber, *, se=None, train_ber=None, model="fc", metric="m", maps=2,
            split=True, extra=None):
    """Long metrics (split all/a/b unless ``split=False``) and a sweep with identical maps.

    ``acc_by_ber``: {ber: accuracies (n,)}; must contain BER 0 (clean accuracy).
    """
    n = len(x)
    tb = np.zeros(n) if train_ber is None else np.asarray(train_ber, float)
    ids = [f"{model}{i:03d}" for i in range(n)]
    mrows, srows = [], []
    for i, mid in enumerate(ids):
        base = dict(model_id=mid, model=model, train_ber=tb[i], train_seed=i)
        vals = {metric: x[i], **({} if extra is None else {k: v[i] for k, v in extra.items()})}
        for name, v in vals.items():
            row = {**base, "layer": "network", "metric": name, "value": float(v)}
            if se is not None:
                row["value_se"] = float(se[i])
            if split:
                mrows += [{**row, "split": s} for s in ("all", "a", "b")]
            else:
                mrows.append(row)
        for ber, acc in acc_by_ber.items():
            srows += [{**base, "ber": ber, "map": k, "accuracy": float(acc[i])}
                      for k in range(maps)]
    return pd.DataFrame(mrows), pd.DataFrame(srows)


def _rows(curve, **sel):
    m = np.ones(len(curve), bool)
    for k, v in sel.items():
        m &= (curve[k] == v).to_numpy()
    return curve[m]


def test_monotone_metric_without_noise_has_rho_one_and_a_degenerate_interval_at_every_ber():
    rng = np.random.default_rng(1)
    t = rng.uniform(size=20)
    accs = {0.0: 0.9 - 0.01 * rng.uniform(size=20), 0.05: 0.5 + 0.3 * t,
            0.1: 0.2 + 0.7 * t ** 2}
    metrics, sweeps = _tables(np.exp(t), accs, se=np.zeros(20))
    cur = analysis.correlate_curve(metrics, sweeps, n_boot=200, kinds=["raw"])
    r = _rows(cur, metric="m", method="spearman")
    assert sorted(r["ber"]) == [0.0, 0.05, 0.1]
    hit = r[r["ber"] > 0]
    # ranks are small integers: the coefficient of identical ranks is 1 bit for bit
    assert (hit[["r", "ci_low", "ci_high"]] == 1.0).all().all()
    assert set(cur["metric"]) == {"m", "clean_accuracy"}
    assert list(cur.columns) == ["model", "metric", "layer", "ber", "kind", "method", "r",
                                 "ci_low", "ci_high", "n", "n_boot_valid"]


def test_metric_noise_widens_the_interval_and_large_noise_covers_zero():
    rng = np.random.default_rng(2)
    t = rng.uniform(size=25)
    accs = {0.0: np.full(25, 0.9), 0.1: 0.3 + 0.5 * t}
    accs[0.0] = accs[0.0] + 0.001 * rng.uniform(size=25)
    widths = []
    for s in (0.0, 0.05, 5.0):
        metrics, sweeps = _tables(t, accs, se=np.full(25, s))
        r = _rows(analysis.correlate_curve(metrics, sweeps, n_boot=400, kinds=["raw"]),
                  metric="m", method="pearson", ber=0.1).iloc[0]
        widths.append(r.ci_high - r.ci_low)
        last = r
    assert widths[0] <= 8 * EPS  # Pearson of an exact line: 1 up to rounding
    assert widths[0] < widths[1] < widths[2]
    assert last.ci_low < 0 < last.ci_high
    # same seed, same interval; another seed, another one
    metrics, sweeps = _tables(t, accs, se=np.full(25, 0.05))
    a = analysis.correlate_curve(metrics, sweeps, n_boot=100, seed=3)
    b = analysis.correlate_curve(metrics, sweeps, n_boot=100, seed=3)
    c = analysis.correlate_curve(metrics, sweeps, n_boot=100, seed=4)
    pd.testing.assert_frame_equal(a, b)
    assert not np.array_equal(a["ci_low"].to_numpy(), c["ci_low"].to_numpy(), equal_nan=True)


def test_accuracy_noise_combines_map_spread_and_binomial_image_noise():
    sweeps = pd.DataFrame({"model_id": "a", "ber": 0.1, "map": [0, 1, 2, 3],
                           "accuracy": [0.6, 0.7, 0.8, 0.7]})
    out = analysis.accuracy_noise(sweeps, n_test=1000).iloc[0]
    s2 = np.var([0.6, 0.7, 0.8, 0.7], ddof=1)
    assert out.accuracy_se == pytest.approx(np.sqrt(s2 / 4 + 0.7 * 0.3 / 1000), rel=8 * EPS)
    one = analysis.accuracy_noise(sweeps.iloc[:1], n_test=100).iloc[0]
    assert one.accuracy_se == pytest.approx(np.sqrt(0.6 * 0.4 / 100), rel=8 * EPS)
    with pytest.raises(InvalidArgument, match="n_test"):
        analysis.accuracy_noise(sweeps, n_test=0)


def _orth(cols, v):
    for c in cols:
        v = v - (v @ c) / (c @ c) * c
    return v


def test_partial_correlation_removes_the_clean_accuracy_confounder_and_equals_residual_reference():
    rng = np.random.default_rng(5)
    n = 30
    one = np.ones(n)
    c = rng.normal(size=n)
    c0 = c - c.mean()
    e1 = _orth([one, c0], rng.normal(size=n))
    e2 = _orth([one, c0, e1], rng.normal(size=n))
    x = 0.8 + 0.01 * (c0 + 0.5 * e1)
    y = 0.5 + 0.01 * (c0 + 0.5 * e2)
    clean = 0.85 + 0.01 * c0
    metrics, sweeps = _tables(x, {0.0: clean, 0.1: y}, se=np.zeros(n))
    cur = analysis.correlate_curve(metrics, sweeps, n_boot=0, methods=["pearson"])
    raw = _rows(cur, metric="m", ber=0.1, kind="raw").r.iloc[0]
    part = _rows(cur, metric="m", ber=0.1, kind="partial_clean").r.iloc[0]
    assert raw > 0.5
    assert abs(part) < 50 * n * EPS
    # against the slow definition: correlation of least-squares residuals on clean accuracy
    y2 = 0.5 + 0.01 * rng.normal(size=n)
    metrics, sweeps = _tables(x, {0.0: clean, 0.1: y2}, se=np.zeros(n))
    for method in ("pearson", "spearman"):
        got = _rows(analysis.correlate_curve(metrics, sweeps, n_boot=0, methods=[method]),
                    metric="m", ber=0.1, kind="partial_clean").r.iloc[0]
        tr = (lambda v: stats.rankdata(v)) if method == "spearman" else (lambda v: v)
        xx, yy, cc = tr(x), tr(y2), tr(clean)
        A = np.column_stack([one, cc])
        rx = xx - A @ np.linalg.lstsq(A, xx, rcond=None)[0]
        ry = yy - A @ np.linalg.lstsq(A, yy, rcond=None)[0]
        assert got == pytest.approx(stats.pearsonr(rx, ry)[0], abs=1e-10)


def test_within_training_ber_correlation_sees_the_seed_variation_not_the_group_trend():
    # Simpson: across training BERs metric and accuracy rise together, within each they fall
    tb = np.repeat([0.0, 0.1, 0.2], 6)
    w = np.tile(np.arange(6.0), 3)
    x = 10 * tb + 0.1 * w
    y = 0.4 + tb - 0.01 * w + 0.001 * np.sin(np.arange(18))
    metrics, sweeps = _tables(x, {0.0: np.full(18, 0.9), 0.1: y}, se=np.zeros(18),
                              train_ber=tb)
    cur = analysis.correlate_curve(metrics, sweeps, n_boot=50)
    r = _rows(cur, metric="m", ber=0.1)
    assert r[(r.kind == "raw") & (r.method == "spearman")].r.iloc[0] > 0.5
    within_s = r[(r.kind == "within_train_ber") & (r.method == "spearman")].r.iloc[0]
    within_p = r[(r.kind == "within_train_ber") & (r.method == "pearson")].r.iloc[0]
    d = pd.DataFrame({"g": tb, "x": x, "y": y})
    dm = d.groupby("g")[["x", "y"]].transform(lambda v: v - v.mean())
    assert within_p == pytest.approx(stats.pearsonr(dm.x, dm.y)[0], abs=1e-12)
    rk = d.groupby("g")[["x", "y"]].rank()
    rk = rk - rk.groupby(d.g).transform("mean")
    assert within_s == pytest.approx(stats.pearsonr(rk.x, rk.y)[0], abs=1e-12)
    assert within_s < -0.9


def test_old_tables_without_split_or_se_and_halves_ignored():
    rng = np.random.default_rng(6)
    t = rng.uniform(size=12)
    accs = {0.0: 0.9 + 0.01 * t, 0.1: 0.3 + 0.5 * t}
    old_m, sweeps = _tables(t, accs, split=False)
    new_m, _ = _tables(t, accs, se=np.full(12, np.nan))
    new_m.loc[new_m.split != "all", "value"] = -t[0]  # halves must not enter
    a = analysis.correlate_curve(old_m, sweeps, n_boot=50)
    b = analysis.correlate_curve(new_m, sweeps, n_boot=50)
    pd.testing.assert_frame_equal(a, b)
    assert analysis.reliability(old_m).empty


def test_predicted_accuracy_is_one_more_metric_paired_per_ber_and_its_fit():
    rng = np.random.default_rng(7)
    n = 10
    accs = {0.0: 0.9 + 0.01 * rng.uniform(size=n), 0.05: rng.uniform(0.5, 0.8, n),
            0.1: rng.uniform(0.2, 0.6, n)}
    metrics, sweeps = _tables(rng.normal(size=n), accs)
    ids = sorted(metrics.model_id.unique())
    pred = pd.DataFrame([{"model_id": mid, "model": "fc", "train_ber": 0.0, "train_seed": i,
                          "ber": b, "predicted_accuracy": accs[b][i] - 0.02}
                         for i, mid in enumerate(ids) for b in (0.05, 0.1)])
    cur = analysis.correlate_curve(metrics, sweeps, predictions=pred, n_boot=20)
    p = _rows(cur, metric="predicted_accuracy", kind="raw")
    assert sorted(p.ber.unique()) == [0.05, 0.1]
    assert (p.r == 1.0).all()
    fit = analysis.prediction_fit(pred, sweeps).iloc[0]
    y = np.concatenate([accs[0.05], accs[0.1]])
    assert fit.pearson == pytest.approx(1.0, abs=1e-12) and fit.n == 2 * n
    assert fit.r2 == pytest.approx(1 - 2 * n * 0.02 ** 2 / ((y - y.mean()) ** 2).sum(), rel=1e-9)
    assert fit.mae == pytest.approx(0.02, rel=1e-9)
    # per BER: one row per (model, BER), pairs over the networks at that BER only
    pred.loc[pred.ber == 0.1, "predicted_accuracy"] -= 0.05  # off by 0.07 at 0.1
    per = analysis.prediction_fit(pred, sweeps, by=("model", "ber"))
    assert list(per.columns) == ["model", "ber", "pearson", "spearman", "r2", "mae", "n"]
    assert per.ber.tolist() == [0.05, 0.1] and (per.n == n).all()
    assert per.mae.to_numpy() == pytest.approx([0.02, 0.07], rel=1e-9)
    assert per.pearson.to_numpy() == pytest.approx([1.0, 1.0], abs=1e-12)
    assert analysis.prediction_fit(pred, sweeps, by="ber").mae.to_numpy() == pytest.approx(
        [0.02, 0.07], rel=1e-9)
    with pytest.raises(InvalidArgument, match="by must"):
        analysis.prediction_fit(pred, sweeps, by="map")


def _split_tables(a, b, full, model="fc", extra=None):
    rows = []
    for i in range(len(a)):
        base = dict(model_id=f"n{i:02d}", model=model, train_ber=0.0, seed=i, layer="network",
                    se=np.nan)
        rows += [{**base, "metric": "importance_variance", "value": v, "split": s}
                 for s, v in (("all", full[i]), ("a", a[i]), ("b", b[i]))]
        if extra is not None:
            rows.append({**base, "metric": "importance_noise_share", "value": extra[i],
                         "split": "all"})
    return pd.DataFrame(rows)


def test_reliability_is_spearman_brown_of_the_split_half_correlation_and_flags_noise():
    rng = np.random.default_rng(8)
    n = 30
    t = rng.normal(size=n)
    perfect = analysis.reliability(_split_tables(t, t, t, extra=np.full(n, 0.1)), n_boot=100)
    row = perfect[perfect.metric == "importance_variance"].iloc[0]
    assert row.r_half == pytest.approx(1.0, abs=1e-12) and row.reliable and not row.noisy
    assert row.noise_share == pytest.approx(0.1)
    a, b = t + 2 * rng.normal(size=n), t + 2 * rng.normal(size=n)
    share = rng.uniform(0.7, 0.9, n)
    noisy = analysis.reliability(_split_tables(a, b, (a + b) / 2, extra=share), n_boot=300)
    row = noisy[noisy.metric == "importance_variance"].iloc[0]
    r = stats.pearsonr(a, b)[0]
    assert row.r_half == pytest.approx(r, abs=1e-12)
    assert row.reliability == pytest.approx(2 * r / (1 + r), abs=1e-12)
    assert row.ci_low < row.reliability < row.ci_high
    assert not row.reliable and row.noisy and row.noise_share == pytest.approx(np.median(share))
    with pytest.raises(InvalidArgument, match="threshold"):
        analysis.reliability(_split_tables(t, t, t), threshold=2)


def _claim_study(effect, slope_by_ber, n=8, seed=0):
    """Two training BERs (0 normal, 0.2 flip), n networks each; margin shifted by
    ``effect`` in flip networks; accuracy at BER p = base + slope_p / 2 * margin + noise
    (in [0, 1] for the slopes used)."""
    rng = np.random.default_rng(seed)
    tb = np.repeat([0.0, 0.2], n)
    marg = rng.normal(size=2 * n) + effect * (tb > 0)
    accs = {0.0: 0.9 + 0.001 * rng.normal(size=2 * n)}
    for p, s in slope_by_ber.items():
        accs[p] = 0.5 + 0.5 * s * marg + 0.01 * rng.normal(size=2 * n)
    return _tables(marg, accs, se=np.zeros(2 * n), train_ber=tb, metric="mean_margin_norm")


@pytest.mark.parametrize(("effect", "slopes", "verdict_a", "verdict_b"), [
    (5.0, {0.05: 0.1, 0.1: 0.1, 0.15: 0.1, 0.2: 0.1}, "holds", "holds"),
    (0.0, {0.05: 0.0, 0.1: 0.0, 0.15: 0.1, 0.2: 0.1}, "not supported", "holds at high BER only"),
    (-5.0, {0.05: 0.0, 0.1: 0.0, 0.15: 0.0, 0.2: 0.0}, "contradicted", "not supported"),
])
def test_claims_give_the_known_answer(effect, slopes, verdict_a, verdict_b):
    metrics, sweeps = _claim_study(effect, slopes, n=10)
    cur = analysis.correlate_curve(metrics, sweeps, n_boot=400, kinds=["raw"])
    out = analysis.claims(metrics, cur, n_boot=400).set_index("claim")
    if effect == 0.0:
        assert out.loc["a", "ci_low"] < 0 < out.loc["a", "ci_high"]
    assert out.loc["a", "verdict"] == verdict_a
    assert out.loc["b", "verdict"] == verdict_b


def test_claims_mark_an_unreliable_metric():
    metrics, sweeps = _claim_study(5.0, {0.1: 0.1, 0.2: 0.1})
    cur = analysis.correlate_curve(metrics, sweeps, n_boot=200, kinds=["raw"])
    rel = pd.DataFrame([{"model": "fc", "metric": "mean_margin_norm", "layer": "network",
                         "reliability": 0.3, "reliable": False}])
    out = analysis.claims(metrics, cur, rel=rel, n_boot=200).set_index("claim")
    assert out.loc["b", "verdict"] == "holds (unreliable metric)"
    assert "0.30" in out.loc["b", "detail"]


def test_curve_bad_arguments_are_named():
    metrics, sweeps = _tables(np.arange(4.0), {0.0: np.full(4, 0.9), 0.1: np.arange(4.0) / 4})
    with pytest.raises(InvalidArgument, match="kind"):
        analysis.correlate_curve(metrics, sweeps, kinds=["nope"])
    with pytest.raises(InvalidArgument, match="method"):
        analysis.correlate_curve(metrics, sweeps, methods=["kendall"])
    with pytest.raises(InvalidArgument, match="ber == 0"):
        analysis.correlate_curve(metrics, sweeps[sweeps.ber > 0])


def _two_architectures():
    rng = np.random.default_rng(9)
    parts = []
    for model, scale in (("fc", 1.0), ("vgg3", 30.0)):
        t = rng.uniform(size=8)
        parts.append(_tables(scale * t, {0.0: np.full(8, 0.9), 0.1: 0.3 + 0.5 * t,
                                         0.2: 0.1 + 0.5 * t},
                             se=np.zeros(8), train_ber=np.repeat([0.0, 0.1], 4), model=model,
                             metric="mean_margin_norm"))
    return (pd.concat([p[0] for p in parts], ignore_index=True),
            pd.concat([p[1] for p in parts], ignore_index=True))


def test_figures_have_one_panel_per_architecture_and_no_pooled_line():
    from matplotlib.collections import PolyCollection

    from bnn_tol import plots

    metrics, sweeps = _two_architectures()
    cur = analysis.correlate_curve(metrics, sweeps, n_boot=50)
    fig = plots.rho_vs_ber(cur)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["fc (raw)", "vgg3 (raw)"]
    for ax in axes:  # one band per metric (mean_margin_norm, clean_accuracy)
        assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 2
    sc = plots.metric_scatter_by_model(metrics, sweeps, metric="mean_margin_norm", ber=0.2)
    axes = [ax for ax in sc.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["fc", "vgg3"]
    # points only: no line through data (seaborn's legend handles are empty lines)
    assert all(len(ln.get_xdata()) == 0 for ax in axes for ln in ax.lines)
    from matplotlib.collections import LineCollection, PathCollection

    assert sum(len(c.get_offsets()) for ax in axes for c in ax.collections
               if isinstance(c, PathCollection)) == 16
    # error bars on both axes: one x and one y segment per point
    assert sum(len(c.get_segments()) for ax in axes for c in ax.collections
               if isinstance(c, LineCollection)) == 2 * 16
    with pytest.raises(InvalidArgument, match="kind"):
        plots.rho_vs_ber(cur, kind="nope")


def test_claims_cover_every_estimators_importance_variance_by_default():
    metrics, sweeps = _claim_study(-5.0, {0.1: -0.1, 0.2: -0.1})
    metrics["metric"] = "importance_loss_norm_variance_unbiased"
    cur = analysis.correlate_curve(metrics, sweeps, n_boot=200, kinds=["raw"])
    out = analysis.claims(metrics, cur, n_boot=200).set_index("claim")
    assert set(out["metric"]) == {"importance_loss_norm_variance_unbiased"}
    assert out.loc["a", "expected"] == "smaller" and out.loc["a", "verdict"] == "holds"
    assert out.loc["b", "expected"] == "negative" and out.loc["b", "verdict"] == "holds"
    with pytest.raises(InvalidArgument, match="larger"):
        analysis.claims(metrics, cur, claim_metrics={"x": "bigger"})


def test_negative_half_correlation_is_zero_reliability_and_noise_share_only_for_plug_ins():
    rng = np.random.default_rng(10)
    n = 20
    a = rng.normal(size=n)
    b = -a + 0.1 * rng.normal(size=n)  # halves anti-correlated: no reliability
    m = _split_tables(a, b, a, extra=np.full(n, 0.95))
    m = pd.concat([m, m.assign(metric="importance_mean"),
                   m.assign(metric="importance_variance_unbiased")], ignore_index=True)
    m = m.drop_duplicates(["model_id", "metric", "split"])
    rel = analysis.reliability(m, n_boot=200).set_index("metric")
    row = rel.loc["importance_variance"]
    assert row.r_half < -0.9 and row.reliability == 0.0
    assert row.ci_low == 0.0 and 0.0 <= row.ci_high <= 1.0
    assert row.noise_share == pytest.approx(0.95)
    assert np.isnan(rel.loc["importance_mean", "noise_share"])
    assert np.isnan(rel.loc["importance_variance_unbiased", "noise_share"])
