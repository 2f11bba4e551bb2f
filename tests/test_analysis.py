"""bnn_tol.analysis on synthetic tidy tables with known correlations."""

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bnn_tol import analysis


def _study(n=24, seed=0, bers=(0.0, 0.05, 0.1), n_maps=3):
    """Synthetic study: accuracy at BER p = clean - p * 4 * (1 - tol); tol is a known metric.

    Metrics: ``tol`` (network; increasing in tolerance), ``inv`` (= -tol^3, monotone
    decreasing), ``noise`` (independent), and per-layer ``tol`` on two layers.
    """
    rng = np.random.default_rng(seed)
    ids = [f"m{i}" for i in range(n)]
    tol = rng.uniform(0, 1, n)
    clean = rng.uniform(0.80, 0.90, n)
    noise = rng.normal(size=n)
    mrows, srows = [], []
    for i, mid in enumerate(ids):
        base = dict(model_id=mid, model="fc", train_ber=[0.0, 0.1][i % 2], train_seed=i // 2)
        for layer, metric, v in [("network", "tol", tol[i]), ("network", "inv", -tol[i] ** 3),
                                 ("network", "noise", noise[i]),
                                 ("blocks.0.layer", "tol", 2 * tol[i]),
                                 ("blocks.1.layer", "tol", tol[i] + 1)]:
            mrows.append({**base, "layer": layer, "metric": metric, "value": v})
        for ber in bers:
            mean = clean[i] - ber * 4 * (1 - tol[i])
            for k in range(n_maps):
                jitter = 0.0 if ber == 0 else (k - (n_maps - 1) / 2) * 1e-3
                srows.append({**base, "ber": ber, "map": k, "accuracy": mean + jitter})
    return pd.DataFrame(mrows), pd.DataFrame(srows), dict(tol=tol, clean=clean, noise=noise)


@pytest.mark.parametrize("method", analysis.METHODS)
def test_vectorized_coefficients_equal_scipy_row_by_row_including_ties(method):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 4, size=(50, 9)).astype(float)  # many ties
    y = x + rng.integers(-2, 3, size=(50, 9))
    x[0] = 3.0  # a constant row -> NaN
    fast = analysis.correlation_rows(x, y, method)
    ref = {"pearson": stats.pearsonr, "spearman": stats.spearmanr,
           "kendall": stats.kendalltau}[method]
    assert np.isnan(fast[0])
    for b in range(1, 50):
        if np.ptp(y[b]) == 0:
            assert np.isnan(fast[b])
            continue
        assert fast[b] == pytest.approx(float(ref(x[b], y[b])[0]), abs=1e-12)


def test_accuracy_at_ber_is_the_mean_over_maps():
    m, s, truth = _study(n=5)
    acc = analysis.accuracy_at_ber(s)
    row = acc[(acc.model_id == "m3") & (acc.ber == 0.1)].iloc[0]
    assert row["accuracy"] == pytest.approx(truth["clean"][3] - 0.4 * (1 - truth["tol"][3]))
    assert row["n"] == 3 and row["train_seed"] == 1 and row["train_ber"] == 0.1
    assert analysis.clean_accuracy(s)["m3"] == pytest.approx(truth["clean"][3])


def test_correlate_recovers_known_rank_correlations_exactly():
    m, s, _ = _study(n=30)
    # make accuracy at BER > 0 an exact monotone function of tol: equal clean accuracy
    s = s.copy()
    s["accuracy"] = s.groupby(["model_id", "ber"])["accuracy"].transform("mean")
    tol = m[(m.metric == "tol") & (m.layer == "network")].set_index("model_id")["value"]
    s["accuracy"] = np.where(s.ber > 0, 0.9 - s.ber * 4 * (1 - s.model_id.map(tol)), 0.9)
    c = analysis.correlate(m, s, n_boot=200, seed=3)
    c = c[c.ber == 0.1].set_index(["metric", "layer", "method"])
    for layer in ("network", "blocks.0.layer", "blocks.1.layer"):
        for method in ("spearman", "kendall"):
            row = c.loc[("tol", layer, method)]
            assert row["r"] == pytest.approx(1.0)
            assert row["ci_low"] == pytest.approx(1.0) and row["ci_high"] == pytest.approx(1.0)
            assert row["p_value"] < 1e-6
    assert c.loc[("inv", "network", "spearman"), "r"] == pytest.approx(-1.0)
    assert c.loc[("inv", "network", "kendall"), "r"] == pytest.approx(-1.0)
    # pearson of the exact linear relation is 1; of the cubic one strictly between -1 and -0.8
    assert c.loc[("tol", "network", "pearson"), "r"] == pytest.approx(1.0)
    assert -1 < c.loc[("inv", "network", "pearson"), "r"] < -0.8
    # at ber 0 accuracy is constant: no correlation defined
    c0 = analysis.correlate(m, s, n_boot=0)
    assert c0[c0.ber == 0.0]["r"].isna().all()


def test_bootstrap_interval_equals_slow_scipy_reference():
    m, s, _ = _study(n=12, seed=5)
    n_boot, seed = 300, 11
    c = analysis.correlate(m, s, level="network", n_boot=n_boot, seed=seed)
    acc = analysis.accuracy_at_ber(s)
    y = acc[acc.ber == 0.05].set_index("model_id")["accuracy"]
    x = m[(m.metric == "noise")].set_index("model_id")["value"].loc[y.index]
    x, y = x.to_numpy(), y.to_numpy()
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
    for method, fn in [("pearson", stats.pearsonr), ("spearman", stats.spearmanr),
                       ("kendall", stats.kendalltau)]:
        rb = np.array([fn(x[i], y[i])[0] for i in idx])
        rb = rb[np.isfinite(rb)]
        lo, hi = np.quantile(rb, [0.025, 0.975])
        row = c[(c.metric == "noise") & (c.ber == 0.05) & (c.method == method)].iloc[0]
        assert row["ci_low"] == pytest.approx(lo, abs=1e-12)
        assert row["ci_high"] == pytest.approx(hi, abs=1e-12)
        assert row["r"] == pytest.approx(fn(x, y)[0], abs=1e-12)
        assert row["p_value"] == pytest.approx(fn(x, y)[1], rel=1e-9)
        assert row["n"] == 12 and row["n_boot_valid"] == len(rb)


def test_independent_metric_interval_covers_zero():
    m, s, _ = _study(n=40, seed=2)
    c = analysis.correlate(m, s, level="network", methods=["spearman"], n_boot=500)
    row = c[(c.metric == "noise") & (c.ber == 0.1)].iloc[0]
    assert row["ci_low"] < 0 < row["ci_high"] and row["p_value"] > 0.01


def test_correlate_by_group_splits_networks():
    m, s, _ = _study(n=20)
    m = m.assign(model=np.where(m.model_id.str[1:].astype(int) < 8, "fc", "vgg3"))
    c = analysis.correlate(m, s, level="network", by="model", n_boot=0)
    assert set(c.group) == {"fc", "vgg3"}
    assert set(c[c.group == "fc"].n) == {8} and set(c[c.group == "vgg3"].n) == {12}


def test_regression_metrics_beat_clean_baseline_when_tolerance_is_independent():
    m, s, _ = _study(n=40, seed=4)
    r = analysis.predict_accuracy(m, s, cv=5, seed=0).set_index(["ber", "features"])
    assert set(r.index.get_level_values(0)) == {0.05, 0.1}
    # acc_0.1 = clean - 0.4 (1 - tol): tol explains most of the variance, clean the rest
    assert r.loc[(0.1, "metrics"), "r2"] > r.loc[(0.1, "clean"), "r2"] + 0.3
    assert r.loc[(0.1, "clean+metrics"), "r2"] > 0.99
    assert r.loc[(0.1, "clean"), "n_features"] == 1


def test_regression_baseline_wins_when_only_clean_accuracy_matters():
    m, s, truth = _study(n=40, seed=6)
    clean = dict(zip([f"m{i}" for i in range(40)], truth["clean"], strict=True))
    s = s.assign(accuracy=s.model_id.map(clean) - s.ber)
    r = analysis.predict_accuracy(m, s, seed=1).set_index(["ber", "features"])
    assert r.loc[(0.1, "clean"), "r2"] > 0.999
    assert r.loc[(0.1, "metrics"), "r2"] < 0.5
    g = analysis.predict_accuracy(m, s, groups="train_seed")
    assert len(g) == 6


def test_compare_hand_computed_effect_sizes():
    a = pd.DataFrame({"layer": ["l0"] * 3 + ["l1"] * 2, "neuron": [0, 1, 2, 0, 1],
                      "mean_margin": [1.0, 2.0, 3.0, 5.0, 5.0]})
    b = pd.DataFrame({"layer": ["l0"] * 3 + ["l1"] * 2, "neuron": [0, 1, 2, 0, 1],
                      "mean_margin": [4.0, 5.0, 6.0, 5.0, 5.0]})
    c = analysis.compare(a, b).set_index("layer")
    assert list(c.column) == ["mean_margin", "mean_margin"]  # neuron is an identifier
    assert c.loc["l0", "diff"] == 3.0 and c.loc["l0", "ratio"] == 2.5
    assert c.loc["l0", "cohen_d"] == pytest.approx(3.0)  # pooled sd = 1
    assert c.loc["l0", "cliff_delta"] == 1.0
    assert c.loc["l1", "diff"] == 0 and c.loc["l1", "cliff_delta"] == 0.0
    assert np.isnan(c.loc["l1", "cohen_d"])


def test_compare_cliff_delta_equals_pairwise_count_and_long_form_groups_by_metric():
    rng = np.random.default_rng(0)
    m, _, _ = _study(n=16)
    normal, flip = m[m.train_ber == 0.0], m[m.train_ber == 0.1]
    c = analysis.compare(normal, flip)
    assert set(c.columns[:2]) == {"layer", "metric"} and len(c) == 5
    row = c[(c.layer == "network") & (c.metric == "noise")].iloc[0]
    a = normal[(normal.layer == "network") & (normal.metric == "noise")]["value"].to_numpy()
    b = flip[(flip.layer == "network") & (flip.metric == "noise")]["value"].to_numpy()
    ref = np.mean([np.sign(bj - ai) for ai, bj in itertools.product(a, b)])
    assert row["cliff_delta"] == pytest.approx(ref)
    assert row["n_normal"] == 8 and row["n_flip"] == 8
    x = pd.DataFrame({"layer": "l", "v": rng.normal(size=50)})
    y = pd.DataFrame({"layer": "l", "v": rng.normal(size=60) + 0.5})
    r = analysis.compare(x, y).iloc[0]
    sp = np.sqrt((49 * x.v.var() + 59 * y.v.var()) / 108)
    assert r["cohen_d"] == pytest.approx((y.v.mean() - x.v.mean()) / sp)


def test_bad_inputs_say_what_is_missing():
    with pytest.raises(ValueError, match="lacks column"):
        analysis.correlate(pd.DataFrame({"x": [1]}), pd.DataFrame({"y": [1]}))
    m, s, _ = _study(n=5)
    with pytest.raises(ValueError, match="unknown method"):
        analysis.correlate(m, s, methods=["cosine"])
    with pytest.raises(ValueError, match="ber == 0"):
        analysis.clean_accuracy(s[s.ber > 0])
