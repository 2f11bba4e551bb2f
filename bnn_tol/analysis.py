"""Do the metrics explain and predict bit error tolerance? Correlation, regression, comparison.

Inputs are the tidy tables of a study (:mod:`bnn_tol.study`):

- ``metrics``: long form, one row per (model, layer, metric):
  ``model_id, model, train_ber, seed, layer, metric, value``; ``layer == "network"`` holds the
  network-level aggregates.
- ``sweeps``: one row per (model, BER, fault map): ``model_id, ber, map, accuracy, ...``.

The unit of observation is a trained network (``model_id``); its accuracy at BER ``p`` is
the mean over fault maps, ``acc_p = mean_k acc(model, map_k at p)``.

Functions:

- :func:`accuracy_at_ber` -- ``acc_p`` per (model, BER).
- :func:`feature_table` -- metrics as a wide table, one row per model.
- :func:`correlate` -- Pearson, Spearman and Kendall (tau-b) of every metric with ``acc_p``
  at every BER, with p-values (scipy.stats) and bootstrap percentile intervals.
- :func:`predict_accuracy` -- cross-validated R^2 of a ridge regression that predicts
  ``acc_p`` from the metrics, against a baseline that knows only clean accuracy.
- :func:`compare` -- normal vs flip-trained: per-layer differences with effect sizes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from .exceptions import InvalidArgument

__all__ = [
    "METHODS",
    "accuracy_at_ber",
    "clean_accuracy",
    "feature_table",
    "feature_name",
    "correlation_rows",
    "correlate",
    "predict_accuracy",
    "compare",
]

#: Correlation coefficients computed by :func:`correlate`.
METHODS = ("pearson", "spearman", "kendall")
_ID = "model_id"


def _need(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise InvalidArgument(f"{what} lacks column(s) {missing}; it has {list(df.columns)}. "
                         "Pass the tables written by bnn_tol.study.run (metrics.csv, sweeps.csv).")


def accuracy_at_ber(sweeps: pd.DataFrame) -> pd.DataFrame:
    """Mean accuracy over fault maps, one row per (model, BER).

    ``acc_p = mean_k accuracy(model_id, ber = p, map = k)``; also ``std`` and ``n`` (maps).
    Identifying columns (``model, train_ber, seed``) are carried along when present.
    """
    _need(sweeps, [_ID, "ber", "accuracy"], "sweeps")
    keys = [_ID, "ber"]
    extra = [c for c in ("model", "train_ber", "seed") if c in sweeps.columns]
    g = sweeps.groupby(keys, sort=True)["accuracy"]
    out = g.agg(accuracy="mean", std="std", n="count").reset_index()
    if extra:
        ids = sweeps.drop_duplicates(_ID).set_index(_ID)[extra]
        out = out.join(ids, on=_ID)
    return out[[_ID, *extra, "ber", "accuracy", "std", "n"]]


def clean_accuracy(sweeps: pd.DataFrame) -> pd.Series:
    """Clean accuracy per model (the sweep rows at ``ber == 0``), a Series indexed by model_id.

    Raises ``ValueError`` if the sweep has no BER 0 (add 0 to the evaluation BERs).
    """
    acc = accuracy_at_ber(sweeps)
    clean = acc[acc["ber"] == 0]
    if clean.empty:
        raise InvalidArgument("the sweep has no rows at ber == 0, so clean accuracy is unknown; "
                         "add 0 to the evaluation BERs or pass clean= explicitly")
    return clean.set_index(_ID)["accuracy"].rename("clean_acc")


def feature_name(metric: str, layer: str) -> str:
    """Wide-table column of a metric: ``metric`` (network level) or ``metric@layer``."""
    return metric if layer == "network" else f"{metric}@{layer}"


def _select_level(metrics: pd.DataFrame, level: str) -> pd.DataFrame:
    if level == "network":
        return metrics[metrics["layer"] == "network"]
    if level == "layer":
        return metrics[metrics["layer"] != "network"]
    if level == "all":
        return metrics
    raise InvalidArgument(f"level must be 'network', 'layer' or 'all', got {level!r}")


def feature_table(metrics: pd.DataFrame, *, level: str = "network") -> pd.DataFrame:
    """Metrics as a wide table: index ``model_id``, one column per :func:`feature_name`.

    Args:
        metrics: long-form metrics (``model_id, layer, metric, value``).
        level: ``"network"`` (rows with ``layer == "network"``), ``"layer"`` or ``"all"``.
    """
    _need(metrics, [_ID, "layer", "metric", "value"], "metrics")
    m = _select_level(metrics, level)
    names = [feature_name(mt, ly) for mt, ly in zip(m["metric"], m["layer"], strict=True)]
    wide = (m.assign(feature=names)
            .pivot_table(index=_ID, columns="feature", values="value", aggfunc="first",
                         sort=False))
    wide.columns.name = None
    return wide.astype(float)


# -- vectorized correlation coefficients: rows of x, y (B, n) are independent samples ----------

def _constant(x: np.ndarray) -> np.ndarray:
    return x.max(axis=1) == x.min(axis=1)


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``r_b = sum_i xc_bi yc_bi / sqrt(sum xc^2 sum yc^2)``; NaN where a row is constant."""
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    den = np.sqrt((xc * xc).sum(1) * (yc * yc).sum(1))
    bad = _constant(x) | _constant(y) | (den == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xc * yc).sum(1) / np.where(bad, 1.0, den)
    return np.where(bad, np.nan, np.clip(r, -1.0, 1.0))


def _spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of the ranks (ties get their average rank), as scipy.stats.spearmanr."""
    return _pearson_rows(stats.rankdata(x, axis=1), stats.rankdata(y, axis=1))


def _kendall_rows(x: np.ndarray, y: np.ndarray, chunk_elems: int = 4_000_000) -> np.ndarray:
    """Kendall tau-b as scipy.stats.kendalltau:

        tau_b = sum_{i<j} sgn(x_i - x_j) sgn(y_i - y_j)
                / sqrt(sum_{i<j} |sgn(x_i - x_j)| * sum_{i<j} |sgn(y_i - y_j)|).

    O(B n^2) memory in chunks of rows; NaN where a row is constant.
    """
    b, n = x.shape
    out = np.empty(b)
    step = max(1, chunk_elems // max(1, n * n))
    for s in range(0, b, step):
        xs, ys = x[s:s + step], y[s:s + step]
        sx = np.sign(xs[:, :, None] - xs[:, None, :])
        sy = np.sign(ys[:, :, None] - ys[:, None, :])
        num = (sx * sy).sum((1, 2))
        den = np.sqrt(np.abs(sx).sum((1, 2)) * np.abs(sy).sum((1, 2)))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[s:s + step] = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return np.clip(out, -1.0, 1.0)


_ROWS = {"pearson": _pearson_rows, "spearman": _spearman_rows, "kendall": _kendall_rows}
_SCIPY = {"pearson": stats.pearsonr, "spearman": stats.spearmanr, "kendall": stats.kendalltau}


def correlation_rows(x: np.ndarray, y: np.ndarray, method: str) -> np.ndarray:
    """Correlation of each row pair of ``x, y`` (shape ``(B, n)``) -> ``(B,)``.

    ``method`` is one of :data:`METHODS`; equals the scipy.stats coefficient on every row
    (NaN where a row is constant).
    """
    if method not in _ROWS:
        raise InvalidArgument(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    x = np.atleast_2d(np.asarray(x, dtype=float))
    y = np.atleast_2d(np.asarray(y, dtype=float))
    if x.shape != y.shape:
        raise InvalidArgument(f"x and y must have the same shape, got {x.shape} and {y.shape}")
    return _ROWS[method](x, y)


def _pvalue(x: np.ndarray, y: np.ndarray, method: str) -> float:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(_SCIPY[method](x, y)[1])


def correlate(
    metrics: pd.DataFrame,
    sweeps: pd.DataFrame,
    *,
    level: str = "all",
    methods: Sequence[str] = METHODS,
    by: str | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Correlation of each metric with the accuracy at each evaluation BER.

    For every (metric, layer, BER, method) over the trained networks ``i = 1..n``:
    ``r = corr(metric_i, acc_p,i)`` and its two-sided p-value (scipy.stats ``pearsonr``,
    ``spearmanr``, ``kendalltau``; tau-b), plus a percentile bootstrap interval: networks are
    resampled with replacement ``n_boot`` times (``numpy.random.default_rng(seed)``; the same
    resamples for every metric and BER), and ``ci_low, ci_high`` are the ``(1 -+ ci) / 2``
    quantiles of the resampled coefficients (resamples in which either variable is constant
    are dropped; ``n_boot_valid`` counts the rest). Networks enter the resampling in sorted
    ``model_id`` order, so the intervals are reproducible from ``seed``.

    Args:
        metrics, sweeps: study tables (see module docstring).
        level: ``"network"``, ``"layer"`` or ``"all"`` metrics.
        methods: subset of :data:`METHODS`.
        by: optional column of ``metrics`` (e.g. ``"model"``, the architecture): correlate
            within each group separately (layer names differ in meaning across
            architectures). ``None``: all networks together (``group == "all"``).
        n_boot: bootstrap resamples (0 disables the intervals).
        ci: interval coverage.
        seed: bootstrap seed.

    Returns:
        One row per (group, metric, layer, ber, method): ``group, metric, layer, ber, method,
        r, p_value, ci_low, ci_high, n, n_boot_valid``. Networks missing a metric are
        left out of that metric's rows (``n`` counts the rest).
    """
    for m in methods:
        if m not in _ROWS:
            raise InvalidArgument(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    if not 0 < ci < 1:
        raise InvalidArgument(f"ci must be in (0, 1), got {ci}")
    _need(metrics, [_ID, "layer", "metric", "value"], "metrics")
    acc = accuracy_at_ber(sweeps).pivot(index=_ID, columns="ber", values="accuracy")
    m = _select_level(metrics, level)
    if by is None:
        groups = [("all", m)]
    else:
        _need(m, [by], "metrics")
        groups = [(str(k), g) for k, g in m.groupby(by, sort=True)]
    rows = []
    for gname, gm in groups:
        long = gm[[_ID, "metric", "layer", "value"]]
        for (metric, layer), feat in long.groupby(["metric", "layer"], sort=False):
            fv = feat.drop_duplicates(_ID).set_index(_ID)["value"].astype(float)
            for ber in acc.columns:
                pair = pd.concat([fv, acc[ber]], axis=1, join="inner").dropna().sort_index()
                x, y = pair.iloc[:, 0].to_numpy(), pair.iloc[:, 1].to_numpy()
                rows += _corr_block(x, y, methods, n_boot, ci, seed,
                                    dict(group=gname, metric=metric, layer=layer, ber=ber))
    cols = ["group", "metric", "layer", "ber", "method", "r", "p_value", "ci_low", "ci_high",
            "n", "n_boot_valid"]
    return pd.DataFrame(rows, columns=cols)


def _corr_block(x, y, methods, n_boot, ci, seed, ids) -> list[dict]:
    n = len(x)
    rows = []
    if n_boot > 0 and n >= 2:
        idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
        xb, yb = x[idx], y[idx]
    for method in methods:
        r = float(correlation_rows(x[None], y[None], method)[0]) if n >= 2 else float("nan")
        lo = hi = float("nan")
        valid = 0
        if n_boot > 0 and n >= 2:
            rb = correlation_rows(xb, yb, method)
            rb = rb[np.isfinite(rb)]
            valid = int(rb.size)
            if valid:
                lo, hi = np.quantile(rb, [(1 - ci) / 2, (1 + ci) / 2])
        rows.append({**ids, "method": method, "r": r, "p_value": _pvalue(x, y, method),
                     "ci_low": float(lo), "ci_high": float(hi), "n": n, "n_boot_valid": valid})
    return rows


def predict_accuracy(
    metrics: pd.DataFrame,
    sweeps: pd.DataFrame,
    *,
    level: str = "network",
    clean: pd.Series | None = None,
    bers: Sequence[float] | None = None,
    cv: int = 5,
    groups: str | None = None,
    alphas: Sequence[float] = tuple(np.logspace(-3, 3, 13)),
    seed: int = 0,
) -> pd.DataFrame:
    """Predict accuracy under BER from the metrics; cross-validated R^2 against a baseline.

    For each evaluation BER ``p > 0``, three feature sets are compared with the same folds:

    - ``clean``: clean accuracy only (the baseline: does the metric add anything beyond
      "better networks are better under errors too"?),
    - ``metrics``: the metrics only,
    - ``clean+metrics``: both.

    Model: ``StandardScaler -> RidgeCV(alphas)`` (scikit-learn). Out-of-fold predictions
    ``yhat`` come from ``cross_val_predict`` with ``KFold(min(cv, n), shuffle, seed)`` (or
    ``GroupKFold`` over the column ``groups`` of the metrics, e.g. ``"seed"``), and

        R^2 = 1 - sum_i (y_i - yhat_i)^2 / sum_i (y_i - mean(y))^2

    is computed on the pooled out-of-fold predictions (stable with few networks per fold).
    Features with missing values or zero variance are dropped.

    Returns:
        One row per (ber, features): ``ber, features, r2, rmse, n, n_features``.
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.model_selection import GroupKFold, KFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    feats = feature_table(metrics, level=level)
    feats = feats.loc[:, feats.notna().all() & (feats.std(ddof=0) > 0)]
    if clean is None:
        clean = clean_accuracy(sweeps)
    acc = accuracy_at_ber(sweeps).pivot(index=_ID, columns="ber", values="accuracy")
    ids = feats.index.intersection(acc.index).intersection(clean.index)
    if len(ids) < 3:
        raise InvalidArgument(f"need at least 3 networks with metrics and sweeps, have {len(ids)}")
    feats, acc, clean = feats.loc[ids], acc.loc[ids], clean.loc[ids].astype(float)
    if groups is not None:
        _need(metrics, [groups], "metrics")
        g = metrics.drop_duplicates(_ID).set_index(_ID)[groups].loc[ids].to_numpy()
        splitter = GroupKFold(n_splits=min(cv, len(np.unique(g))))
    else:
        g = None
        splitter = KFold(n_splits=min(cv, len(ids)), shuffle=True, random_state=seed)
    sets = {"clean": clean.to_frame(), "metrics": feats,
            "clean+metrics": pd.concat([clean, feats], axis=1)}
    rows = []
    for ber in acc.columns if bers is None else bers:
        if ber == 0:
            continue
        y = acc[ber].to_numpy(float)
        for name, X in sets.items():
            if X.shape[1] == 0:
                continue
            est = make_pipeline(StandardScaler(), RidgeCV(alphas=list(alphas)))
            yhat = cross_val_predict(est, X.to_numpy(float), y, cv=splitter, groups=g)
            rows.append({"ber": ber, "features": name, "r2": float(r2_score(y, yhat)),
                         "rmse": float(np.sqrt(np.mean((y - yhat) ** 2))), "n": len(y),
                         "n_features": X.shape[1]})
    return pd.DataFrame(rows, columns=["ber", "features", "r2", "rmse", "n", "n_features"])


def compare(
    normal: pd.DataFrame,
    flip_trained: pd.DataFrame,
    *,
    columns: Sequence[str] | None = None,
    by: Sequence[str] | str = "layer",
) -> pd.DataFrame:
    """Normal vs flip-trained networks: per-layer metric differences with effect sizes.

    Each input is a tidy table with a ``layer`` column whose rows are the samples being
    compared within a layer -- per-neuron tables from :func:`bnn_tol.metrics.margin` /
    :func:`~bnn_tol.metrics.importance` (neurons are the samples), or the long-form study
    metrics (``metric, value``; networks/seeds are the samples, grouped by layer and metric).

    For each group and value column, with ``a`` = normal and ``b`` = flip-trained samples:

    - ``diff = mean(b) - mean(a)``, ``ratio = mean(b) / mean(a)``;
    - Cohen's ``d = diff / s_pooled``, ``s_pooled^2 = ((n_a-1) s_a^2 + (n_b-1) s_b^2) /
      (n_a + n_b - 2)``;
    - Cliff's ``delta = P(b > a) - P(b < a) = 2 U_b / (n_a n_b) - 1`` (Mann-Whitney U of b);
    - ``p_value``: two-sided Mann-Whitney U test.

    Args:
        normal, flip_trained: the two tables (same columns).
        columns: value columns to compare; default every numeric column that is not an
            identifier (``neuron, layer_index, fan_in, seed, train_ber, ...``), or ``value``
            for long-form tables.
        by: grouping columns; ``"layer"`` (plus ``metric`` for long-form tables).

    Returns:
        One row per (group, column): ``*by, column, mean_normal, mean_flip, diff, ratio,
        cohen_d, cliff_delta, p_value, n_normal, n_flip``.
    """
    by = [by] if isinstance(by, str) else list(by)
    long_form = "metric" in normal.columns and "value" in normal.columns
    if long_form and "metric" not in by:
        by = [*by, "metric"]
    _need(normal, by, "normal")
    _need(flip_trained, by, "flip_trained")
    if columns is None:
        if long_form:
            columns = ["value"]
        else:
            skip = {"neuron", "layer_index", "fan_in", "seed", "train_ber", "direction", "dead",
                    "tau", "map", "epoch", *by}
            columns = [c for c in normal.columns
                       if c not in skip and pd.api.types.is_numeric_dtype(normal[c])
                       and not pd.api.types.is_bool_dtype(normal[c])]
    rows = []
    ga = dict(iter(normal.groupby(by, sort=False)))
    gb = dict(iter(flip_trained.groupby(by, sort=False)))
    for key in ga:
        if key not in gb:
            continue
        keyt = key if isinstance(key, tuple) else (key,)
        for col in columns:
            a = ga[key][col].to_numpy(float)
            b = gb[key][col].to_numpy(float)
            a, b = a[np.isfinite(a)], b[np.isfinite(b)]
            rows.append({**dict(zip(by, keyt, strict=True)), "column": col,
                         **_effect(a, b)})
    cols = [*by, "column", "mean_normal", "mean_flip", "diff", "ratio", "cohen_d",
            "cliff_delta", "p_value", "n_normal", "n_flip"]
    return pd.DataFrame(rows, columns=cols)


def _effect(a: np.ndarray, b: np.ndarray) -> dict:
    na, nb = len(a), len(b)
    nan = float("nan")
    ma = float(a.mean()) if na else nan
    mb = float(b.mean()) if nb else nan
    diff = mb - ma
    d = delta = p = nan
    if na >= 2 and nb >= 2:
        sp2 = ((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2)
        d = diff / np.sqrt(sp2) if sp2 > 0 else nan
    if na and nb:
        if np.ptp(np.concatenate([a, b])) == 0:
            delta, p = 0.0, 1.0
        else:
            res = stats.mannwhitneyu(b, a, alternative="two-sided")
            delta = 2.0 * float(res.statistic) / (na * nb) - 1.0
            p = float(res.pvalue)
    return {"mean_normal": ma, "mean_flip": mb, "diff": diff,
            "ratio": mb / ma if ma not in (0.0,) and na else nan, "cohen_d": float(d),
            "cliff_delta": float(delta), "p_value": float(p), "n_normal": na, "n_flip": nb}
