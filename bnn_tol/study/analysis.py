"""Do the metrics explain and predict bit error tolerance? Correlation, regression, comparison.

Inputs are tables of :mod:`bnn_tol.schema` (checked on entry; tables of the previous release
are upgraded, see :func:`bnn_tol.schema.upgrade`):

- ``metrics``: a study's long-form ``metrics.csv`` (``study.metrics``), one row per (network,
  layer, metric): ``model_id, model, arch, train_ber, train_seed, layer, metric, value,
  value_se, split``; ``layer == "network"`` holds the network-level aggregates.
- ``sweeps``: any ``sweep`` table, one row per (network, BER, fault map): a study's
  ``sweeps.csv`` (``model_id, ..., ber, map, accuracy, ...``) or the rows of
  :func:`bnn_tol.evaluate.sweep` (no ``model_id``: each ``model`` label is one network).

The unit of observation is a trained network (``model_id``); its accuracy at BER ``p`` is
the mean over fault maps, ``acc_p = mean_k acc(model, map_k at p)``. ``model`` is the label
of a study's ``[[models]]`` entry (one architecture and its arguments): analyses "per
architecture" group by it.

Functions:

- :func:`accuracy_at_ber` -- ``acc_p`` per (model, BER).
- :func:`feature_table` -- metrics as a wide table, one row per model.
- :func:`correlate` -- Pearson, Spearman and Kendall (tau-b) of every metric with ``acc_p``
  at every BER, with p-values (scipy.stats) and bootstrap percentile intervals.
- :func:`predict_accuracy` -- cross-validated R^2 of a ridge regression that predicts
  ``acc_p`` from the metrics, against a baseline that knows only clean accuracy.
- :func:`compare` -- normal vs flip-trained: per-layer differences with effect sizes.

Issue 10 (metrics with standard errors, ``split`` halves and ``predictions.csv``; tables of
older studies without ``value_se``/``split`` read as ``value_se = NaN``, ``split = "all"``):

- :func:`correlate_curve` -- per architecture, every BER: raw, partial (given clean accuracy)
  and within-training-BER Spearman/Pearson, bootstrap intervals with metric and accuracy
  noise (:func:`accuracy_noise`); ``predicted_accuracy`` is one more metric.
- :func:`prediction_fit` -- rho, R^2 and MAE of predicted vs measured accuracy.
- :func:`reliability` -- split-half reliability (Spearman-Brown) and noise share, flagged.
- :func:`claims` -- the paper's two claims answered per architecture by stated rules.

Issue 21 (the causal test inside one network, and the recipe as an axis):

- :func:`protection_summary` -- per ranking, the mean AUC gain over random across networks.
- :func:`ranking_contrast` -- ranking ``a`` vs ``b`` (importance vs margin) per network.
- :func:`recipe_front` -- clean accuracy vs accuracy under errors per recipe, Pareto front.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from bnn_tol import schema
from bnn_tol.exceptions import InvalidArgument
from bnn_tol.study.protection import protection, protection_auc

__all__ = [
    "METHODS",
    "protection",
    "protection_auc",
    "accuracy_at_ber",
    "clean_accuracy",
    "feature_table",
    "feature_name",
    "correlation_rows",
    "correlate",
    "predict_accuracy",
    "compare",
    "metric_table",
    "accuracy_noise",
    "predictions_long",
    "correlate_curve",
    "prediction_fit",
    "reliability",
    "claims",
    "recipe_front",
    "protection_summary",
    "ranking_contrast",
    "network_curve",
]

#: Correlation coefficients computed by :func:`correlate`.
METHODS = ("pearson", "spearman", "kendall")
_ID = "model_id"
#: Columns that identify a network of a study, carried along by :func:`accuracy_at_ber`.
_IDS = ("model", "arch", "train_ber", "train_seed")


def _sweeps(sweeps: pd.DataFrame, what: str = "sweeps") -> pd.DataFrame:
    """``sweeps`` as a ``sweep`` table with ``model_id`` (a plain sweep: its ``model``)."""
    if isinstance(sweeps, pd.DataFrame) and _ID not in sweeps.columns and \
            "model" in sweeps.columns:
        sweeps = sweeps.assign(**{_ID: sweeps["model"].astype(str)})
    return schema.conform(sweeps, "sweep", what=what, require=(_ID, "ber", "accuracy"))


def _metrics(metrics: pd.DataFrame, what: str = "metrics") -> pd.DataFrame:
    """``metrics`` as a ``study.metrics`` table (at least ``model_id, layer, metric, value``)."""
    return schema.conform(metrics, "study.metrics", what=what,
                          require=(_ID, "layer", "metric", "value"))


def _need(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise InvalidArgument(f"{what} lacks column(s) {missing}; it has {list(df.columns)}. "
                         "Pass the tables written by bnn_tol.study.run (metrics.csv, sweeps.csv).")


def accuracy_at_ber(sweeps: pd.DataFrame) -> pd.DataFrame:
    """Mean accuracy over fault maps, one row per (network, BER).

    ``acc_p = mean_k accuracy(model_id, ber = p, map = k)``; also ``std`` and ``n`` (maps).
    Identifying columns (``model, arch, train_ber, train_seed``) are carried along when
    present. ``sweeps``: any ``sweep`` table (a plain sweep's ``model`` is its ``model_id``).
    """
    sweeps = _sweeps(sweeps)
    keys = [_ID, "ber"]
    extra = [c for c in _IDS if c in sweeps.columns and c != _ID]
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
    m = _select_level(_metrics(metrics), level)
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
    acc = accuracy_at_ber(sweeps).pivot(index=_ID, columns="ber", values="accuracy")
    m = _select_level(_metrics(metrics), level)
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
    ``GroupKFold`` over the column ``groups`` of the metrics, e.g. ``"train_seed"``), and

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
            skip = {"neuron", "layer_index", "fan_in", "train_seed", "map_seed", "train_ber",
                    "direction", "dead", "tau", "map", "epoch", *by}
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


# -- issue 10: correlation over the BER range with noise, reliability, claims --------------------

#: Coefficients of :func:`correlate_curve` (Kendall is left to :func:`correlate`).
CURVE_METHODS = ("spearman", "pearson")
#: Kinds of association in :func:`correlate_curve`.
KINDS = ("raw", "partial_clean", "within_train_ber")


def metric_table(metrics: pd.DataFrame, *, split: str = "all") -> pd.DataFrame:
    """Long metrics of one ``split`` with the columns old result directories lack filled in.

    A table without ``split`` is all ``"all"``; without ``value_se`` the standard error is
    NaN; without ``model`` (the ``[[models]]`` label) every network is ``"all"``.
    Returns ``model_id, model, train_ber, train_seed, layer, metric, value, value_se``.
    """
    m = _metrics(metrics)
    if "split" in m.columns:
        m = m[m["split"].astype(str) == split]
    elif split != "all":
        m = m.iloc[:0]
    m = m.copy()
    if "value_se" not in m.columns:
        m["value_se"] = np.nan
    if "model" not in m.columns:
        m["model"] = "all"
    for c in ("train_ber", "train_seed"):
        if c not in m.columns:
            m[c] = np.nan
    m["value"] = m["value"].astype(float)
    m["value_se"] = pd.to_numeric(m["value_se"], errors="coerce").astype(float)
    return m[[_ID, "model", "train_ber", "train_seed", "layer", "metric", "value", "value_se"]]


def accuracy_noise(sweeps: pd.DataFrame, *, n_test: int | None = None) -> pd.DataFrame:
    """Accuracy per (network, BER) with its standard error.

    With ``K`` fault maps of standard deviation ``s`` and ``N`` test images,

        accuracy_se^2 = s^2 / K + acc (1 - acc) / N.

    The first term is the fault-map noise; the second is the binomial noise of a mean over
    ``N`` images, which approximates resampling the test images (it treats images as
    independent and ignores that all maps see the same images). ``s`` is 0 for ``K = 1``;
    ``n_test=None`` leaves the image term out.
    Returns ``model_id, [model, arch, train_ber, train_seed,] ber, accuracy, std, n,
    accuracy_se``.
    """
    if n_test is not None and (isinstance(n_test, bool) or int(n_test) != n_test
                               or n_test < 1):
        raise InvalidArgument(f"n_test must be a positive integer (test images), got {n_test!r}")
    acc = accuracy_at_ber(sweeps)
    var = acc["std"].fillna(0.0) ** 2 / acc["n"]
    if n_test is not None:
        var = var + acc["accuracy"] * (1 - acc["accuracy"]) / float(n_test)
    return acc.assign(accuracy_se=np.sqrt(var))


def predictions_long(predictions: pd.DataFrame) -> pd.DataFrame:
    """``predictions.csv`` as per-BER metric rows ``metric == "predicted_accuracy"``.

    Returns ``model_id, model, train_ber, train_seed, layer ("network"), metric, value,
    value_se (NaN), ber``: one more metric for :func:`correlate_curve`, paired with the
    accuracy at its BER.
    """
    p = schema.conform(predictions, "study.predictions", what="predictions",
                       require=(_ID, "ber", "predicted_accuracy")).copy()
    for c, d in (("model", "all"), ("train_ber", np.nan), ("train_seed", np.nan)):
        if c not in p.columns:
            p[c] = d
    return pd.DataFrame({_ID: p[_ID], "model": p["model"], "train_ber": p["train_ber"],
                         "train_seed": p["train_seed"], "layer": "network",
                         "metric": "predicted_accuracy",
                         "value": p["predicted_accuracy"].astype(float), "value_se": np.nan,
                         "ber": p["ber"].astype(float)})


def _demean_groups(v: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Subtract each row's group means: ``v_bi - mean_{j: g_bj = g_bi} v_bj`` (shape (B, n))."""
    same = (g[:, :, None] == g[:, None, :]).astype(float)
    return v - (same @ v[:, :, None])[:, :, 0] / same.sum(2)


def _rank_groups(v: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Average rank of ``v_bi`` among the entries of its row with the same group label."""
    same = g[:, :, None] == g[:, None, :]
    less = ((v[:, None, :] < v[:, :, None]) & same).sum(2)
    ties = ((v[:, None, :] == v[:, :, None]) & same).sum(2)
    return less + (ties + 1) / 2.0


def _assoc(x: np.ndarray, y: np.ndarray, c: np.ndarray, g: np.ndarray, kind: str,
           method: str) -> np.ndarray:
    """Row-wise association of ``x, y`` (B, n); see :func:`correlate_curve`."""
    if kind == "raw":
        return correlation_rows(x, y, method)
    if kind == "partial_clean":
        if method == "spearman":
            x, y, c = (stats.rankdata(a, axis=1) for a in (x, y, c))
        rxy, rxc, ryc = (_pearson_rows(a, b) for a, b in ((x, y), (x, c), (y, c)))
        with np.errstate(invalid="ignore", divide="ignore"):
            den = np.sqrt((1 - rxc ** 2) * (1 - ryc ** 2))
            r = (rxy - rxc * ryc) / den
        return np.where(den > 1e-12, np.clip(r, -1, 1), np.nan)
    if method == "spearman":
        x, y = _rank_groups(x, g), _rank_groups(y, g)
    return _pearson_rows(_demean_groups(x, g), _demean_groups(y, g))


def correlate_curve(
    metrics: pd.DataFrame,
    sweeps: pd.DataFrame,
    *,
    predictions: pd.DataFrame | None = None,
    n_test: int | None = None,
    level: str = "network",
    methods: Sequence[str] = CURVE_METHODS,
    kinds: Sequence[str] = KINDS,
    n_boot: int = 1000,
    ci: float = 0.95,
    noise: bool = True,
    seed: int = 0,
) -> pd.DataFrame:
    """Correlation of each metric with accuracy at every evaluation BER, per architecture.

    Networks ``i`` of one architecture (``model`` column) have metric ``x_i`` (standard error
    ``se_i``: its ``value_se``; split ``"all"``), accuracy ``y_i = acc_p,i`` at BER ``p`` with
    standard error ``accuracy_se,i`` (:func:`accuracy_noise`) and clean accuracy
    ``c_i = acc_0,i``. Kinds:

    - ``raw``: ``corr(x, y)``;
    - ``partial_clean``: ``(r_xy - r_xc r_yc) / sqrt((1 - r_xc^2)(1 - r_yc^2))``, the
      correlation left after removing clean accuracy, the obvious confounder (on ranks for
      Spearman);
    - ``within_train_ber``: pooled within-training-BER correlation across seeds: values
      (ranks within each training BER group for Spearman) centred on their group mean, then
      Pearson. Only the seed-to-seed variation at equal training BER is left.

    Bootstrap (``n_boot`` replicates, ``numpy.random.default_rng(seed)``): each replicate
    draws ``n`` networks with replacement and, with ``noise=True``, adds
    ``N(0, se_i^2)`` to each drawn metric, ``N(0, accuracy_se,i^2)`` to its accuracy and to
    its clean accuracy (NaN counts as 0), so the interval contains metric and test-image
    noise (approximately: see :func:`accuracy_noise`). ``ci_low, ci_high`` are the
    ``(1 -+ ci)/2`` quantiles of the finite replicates (``n_boot_valid``).

    ``predictions`` (``predictions.csv``) adds the metric ``predicted_accuracy`` whose value
    at BER ``p`` is paired with the accuracy at ``p``. The sweep's clean accuracy is added
    as the metric ``clean_accuracy`` (``value_se = accuracy_se`` at BER 0).

    Returns one row per (model, metric, layer, ber, kind, method): ``model, metric, layer,
    ber, kind, method, r, ci_low, ci_high, n, n_boot_valid``.
    """
    for m in methods:
        if m not in CURVE_METHODS:
            raise InvalidArgument(f"unknown method {m!r}; choose from {', '.join(CURVE_METHODS)}")
    for k in kinds:
        if k not in KINDS:
            raise InvalidArgument(f"unknown kind {k!r}; choose from {', '.join(KINDS)}")
    if not 0 < ci < 1:
        raise InvalidArgument(f"ci must be in (0, 1), got {ci}")
    if isinstance(n_boot, bool) or int(n_boot) != n_boot or n_boot < 0:
        raise InvalidArgument(f"n_boot must be an integer >= 0, got {n_boot!r}")
    m = _select_level(metric_table(metrics), level).assign(ber=np.nan)
    acc = accuracy_noise(sweeps, n_test=n_test)
    ya = acc.pivot(index=_ID, columns="ber", values="accuracy")
    ys = acc.pivot(index=_ID, columns="ber", values="accuracy_se")
    if 0 not in ya.columns and 0.0 not in ya.columns:
        raise InvalidArgument("the sweep has no rows at ber == 0, so clean accuracy is unknown; "
                              "add 0 to the evaluation BERs")
    ids = m.drop_duplicates(_ID).set_index(_ID)[["model", "train_ber", "train_seed"]]
    clean = pd.DataFrame({_ID: ya.index, "layer": "network", "metric": "clean_accuracy",
                          "value": ya[0.0].to_numpy(), "value_se": ys[0.0].to_numpy(),
                          "ber": np.nan})
    clean = clean.join(ids, on=_ID, how="inner")
    parts = [m, clean]
    if predictions is not None and not predictions.empty:
        parts.append(predictions_long(predictions))
    feats = pd.concat(parts, ignore_index=True)
    rows = []
    q = [(1 - ci) / 2, (1 + ci) / 2]
    for arch, fa in feats.groupby("model", sort=True):
        net = ids[ids["model"] == arch].index.intersection(ya.index).sort_values()
        n = len(net)
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, n, size=(n_boot, n)) if n_boot and n else None
        noise_y = {b: rng.standard_normal((n_boot, n)) for b in ya.columns}
        z_c = rng.standard_normal((n_boot, n))
        c_all = ya.loc[net, 0.0].to_numpy(float)
        cs_all = np.nan_to_num(ys.loc[net, 0.0].to_numpy(float))
        g_all = ids.loc[net, "train_ber"].to_numpy(float)
        keys = sorted(fa.groupby(["metric", "layer"]).groups)
        for k, (metric, layer) in enumerate(keys):
            f = fa[(fa["metric"] == metric) & (fa["layer"] == layer)]
            z_x = np.random.default_rng([seed, k]).standard_normal((n_boot, n))
            for ber in ya.columns:
                fb = f[f["ber"].isna() | np.isclose(f["ber"], ber)]
                fb = fb.drop_duplicates(_ID).set_index(_ID)
                if "predicted_accuracy" == metric and not np.isclose(f["ber"], ber).any():
                    continue
                pos = np.flatnonzero(net.isin(fb.index) & ya.loc[net, ber].notna().to_numpy())
                if len(pos) == 0:
                    continue
                sub = net[pos]
                x = fb.loc[sub, "value"].to_numpy(float)
                xs = np.nan_to_num(fb.loc[sub, "value_se"].to_numpy(float))
                y = ya.loc[sub, ber].to_numpy(float)
                yse = np.nan_to_num(ys.loc[sub, ber].to_numpy(float))
                c, cs, g = c_all[pos], cs_all[pos], g_all[pos]
                if idx is not None and len(pos) >= 2:
                    # resample the networks present (all of them: the shared draw)
                    nn = len(pos)
                    j = idx if nn == n else np.random.default_rng([seed, k, 1]).integers(
                        0, nn, size=(n_boot, nn))
                    xb, yb, cb, gb = x[j], y[j], c[j], g[j]
                    if noise:
                        xb = xb + xs[j] * z_x[:, :nn]
                        yb = yb + yse[j] * noise_y[ber][:, :nn]
                        cb = cb + cs[j] * z_c[:, :nn]
                for kind in kinds:
                    for method in methods:
                        r = float(_assoc(x[None], y[None], c[None], g[None], kind, method)[0]) \
                            if len(pos) >= 3 else float("nan")
                        lo = hi = float("nan")
                        valid = 0
                        if idx is not None and len(pos) >= 3:
                            rb = _assoc(xb, yb, cb, gb, kind, method)
                            rb = rb[np.isfinite(rb)]
                            valid = int(rb.size)
                            if valid:
                                lo, hi = (float(v) for v in np.quantile(rb, q))
                        rows.append({"model": arch, "metric": metric, "layer": layer,
                                     "ber": float(ber), "kind": kind, "method": method, "r": r,
                                     "ci_low": lo, "ci_high": hi, "n": len(pos),
                                     "n_boot_valid": valid})
    cols = ["model", "metric", "layer", "ber", "kind", "method", "r", "ci_low", "ci_high", "n",
            "n_boot_valid"]
    return pd.DataFrame(rows, columns=cols)


def prediction_fit(predictions: pd.DataFrame, sweeps: pd.DataFrame, *,
                   by: str | Sequence[str] = "model") -> pd.DataFrame:
    """How well accuracy predicted from margins tracks the measured sweep, per architecture.

    Pairs ``(predicted_accuracy, acc_p)`` over networks and BERs ``p`` (the mean over maps)
    and reports ``pearson``, ``spearman``, ``r2 = 1 - sum (y - yhat)^2 / sum (y - mean y)^2``
    (the prediction taken as is, no fitted line: R^2 < 0 is worse than the mean),
    ``mae = mean |y - yhat|`` and ``n`` pairs. Returns one row per architecture: ``model,
    pearson, spearman, r2, mae, n``.

    ``by=("model", "ber")`` scores each BER on its own (one row per architecture and BER,
    pairs over the networks: ``model, ber, pearson, ...``): the error of the prediction
    depends strongly on the BER (:func:`bnn_tol.metrics.predict_accuracy`, region of
    validity), so a pooled MAE mixes its valid and invalid regions.
    """
    keys = [by] if isinstance(by, str) else list(by)
    if not keys or any(k not in ("model", "ber") for k in keys) or len(set(keys)) < len(keys):
        raise InvalidArgument(f"by must name 'model' and/or 'ber', got {by!r}")
    p = predictions_long(predictions)
    acc = accuracy_at_ber(sweeps)[[_ID, "ber", "accuracy"]]
    p = p.assign(ber_key=p["ber"].round(12))
    acc = acc.assign(ber_key=acc["ber"].astype(float).round(12)).drop(columns="ber")
    d = p.merge(acc, on=[_ID, "ber_key"], how="inner")
    rows = []
    for key, g in d.groupby(keys, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        y, yh = g["accuracy"].to_numpy(float), g["value"].to_numpy(float)
        ok = np.isfinite(y) & np.isfinite(yh)
        y, yh = y[ok], yh[ok]
        ss = float(((y - y.mean()) ** 2).sum()) if len(y) else 0.0
        const = len(y) < 3 or np.ptp(y) == 0 or np.ptp(yh) == 0
        rows.append({**dict(zip(keys, key, strict=True)),
                     "pearson": np.nan if const else float(stats.pearsonr(yh, y)[0]),
                     "spearman": np.nan if const else float(stats.spearmanr(yh, y)[0]),
                     "r2": 1 - float(((y - yh) ** 2).sum()) / ss if ss > 0 else np.nan,
                     "mae": float(np.abs(y - yh).mean()) if len(y) else np.nan, "n": len(y)})
    return pd.DataFrame(rows, columns=[*keys, "pearson", "spearman", "r2", "mae", "n"])


#: Plug-in statistics whose sampling-noise share is ``<prefix>noise_share``.
_NOISY_SUFFIXES = ("variance", "std", "cv")


def _noise_share_name(metric: str, names: set[str]) -> str | None:
    """``<prefix>noise_share`` for a plug-in ``<prefix>variance|std|cv`` metric, else None."""
    for suf in _NOISY_SUFFIXES:
        if metric.endswith("_" + suf):
            cand = metric[: -len(suf)] + "noise_share"
            return cand if cand in names else None
    return None


def reliability(
    metrics: pd.DataFrame,
    *,
    method: str = "pearson",
    threshold: float = 0.8,
    noise_threshold: float = 0.5,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Split-half reliability of each metric across the networks of each architecture.

    For each (model, metric, layer) with values ``a_i, b_i`` on the two disjoint halves of
    the metric images (``split == "a"/"b"``) of networks ``i = 1..n``:

        r_half = corr(a, b),        reliability = 2 r+ / (1 + r+),  r+ = max(r_half, 0)

    (Spearman-Brown), the expected correlation between two independent measurements on the
    full image set; a negative half correlation means no measurable reliability (0).
    ``ci_low, ci_high``: percentile bootstrap over networks (``default_rng(seed)``) of the
    Spearman-Brown value. ``noise_share``: median over networks (split ``"all"``) of the
    metric's ``<prefix>noise_share`` metric for the plug-in ``<prefix>variance``, ``_std``
    and ``_cv`` where the study wrote one (importance), else NaN. Flags:
    ``reliable = reliability >= threshold`` (NaN reliability: False),
    ``noisy = noise_share > noise_threshold``.

    Tables without halves (old result directories) give an empty table with these columns:
    ``model, metric, layer, r_half, reliability, ci_low, ci_high, n, noise_share, reliable,
    noisy``.
    """
    if method not in ("pearson", "spearman"):
        raise InvalidArgument(f"method must be 'pearson' or 'spearman', got {method!r}")
    if not 0 < ci < 1:
        raise InvalidArgument(f"ci must be in (0, 1), got {ci}")
    for name, v in (("threshold", threshold), ("noise_threshold", noise_threshold)):
        if not 0 <= v <= 1:
            raise InvalidArgument(f"{name} must be in [0, 1], got {v}")
    cols = ["model", "metric", "layer", "r_half", "reliability", "ci_low", "ci_high", "n",
            "noise_share", "reliable", "noisy"]
    a, b = metric_table(metrics, split="a"), metric_table(metrics, split="b")
    full = metric_table(metrics, split="all")
    names = set(full["metric"])
    key = ["model", "metric", "layer", _ID]
    d = a.merge(b, on=key, suffixes=("_a", "_b"))
    d = d[np.isfinite(d["value_a"]) & np.isfinite(d["value_b"])]
    rows = []
    for (arch, metric, layer), g in d.groupby(["model", "metric", "layer"], sort=True):
        g = g.sort_values(_ID)
        x, y = g["value_a"].to_numpy(float), g["value_b"].to_numpy(float)
        n = len(x)
        r = float(correlation_rows(x[None], y[None], method)[0]) if n >= 3 else float("nan")
        lo = hi = float("nan")
        if n >= 3 and n_boot:
            j = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
            rb = correlation_rows(x[j], y[j], method)
            rp = np.maximum(rb, 0.0)
            sb = 2 * rp / (1 + rp)
            sb = sb[np.isfinite(sb)]
            if sb.size:
                lo, hi = (float(v) for v in np.quantile(sb, [(1 - ci) / 2, (1 + ci) / 2]))
        rel = 2 * max(r, 0.0) / (1 + max(r, 0.0)) if np.isfinite(r) else float("nan")
        ns_name = _noise_share_name(metric, names)
        share = float("nan")
        if ns_name is not None:
            s = full[(full["model"] == arch) & (full["metric"] == ns_name)
                     & (full["layer"] == layer)]["value"]
            share = float(s.median()) if s.notna().any() else float("nan")
        rows.append({"model": arch, "metric": metric, "layer": layer, "r_half": r,
                     "reliability": rel, "ci_low": lo, "ci_high": hi, "n": n,
                     "noise_share": share, "reliable": bool(np.isfinite(rel) and rel >= threshold),
                     "noisy": bool(np.isfinite(share) and share > noise_threshold)})
    return pd.DataFrame(rows, columns=cols)


#: Metrics of claim (a) and the direction the paper expects in flip-trained networks (as
#: declared in :data:`bnn_tol.schema.REPORT_METRICS`; one-estimator names).
CLAIM_METRICS = schema.claim_metrics()


def claims(
    metrics: pd.DataFrame,
    curve: pd.DataFrame,
    *,
    rel: pd.DataFrame | None = None,
    claim_metrics: dict[str, str] | None = None,
    method: str = "spearman",
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """The paper's two claims answered per architecture and network-level metric.

    **(a) difference**: "flip-trained BNNs have larger normalized margins / lower importance
    variance than normal ones". Normal = networks at the smallest training BER, flip = at
    the largest; ``effect = mean(flip) - mean(normal)`` with a percentile bootstrap interval
    (networks resampled within each group, ``default_rng(seed)``). Verdict: ``holds`` if
    the interval excludes 0 on the side the claim expects (``claim_metrics``:
    ``"larger"``/``"smaller"``; by default :func:`bnn_tol.schema.claim_metrics` of the
    metrics present: :data:`CLAIM_METRICS` and every
    ``importance_<estimator>_variance[_unbiased]`` as ``"smaller"``), ``contradicted`` if it
    excludes 0 on the other side, else ``not supported`` (also with fewer than 2 networks in
    a group).

    **(b) correlation**: "the metric correlates with accuracy under BER". From the ``raw``
    rows of ``curve`` (:func:`correlate_curve`, ``method``) at BERs ``p > 0``: the BER
    range is split at its median; a BER is *significant* when the interval excludes 0 with
    the claim's sign (positive for ``larger`` metrics, negative for ``smaller`` ones).
    Verdict: ``holds`` if every BER is significant, ``holds at high BER only`` if every
    BER of the upper half is (and some lower one is not), else ``not supported``. A
    verdict other than ``not supported`` gets `` (unreliable metric)`` appended when
    ``rel`` (:func:`reliability`) flags the metric at network level as not reliable.

    Returns one row per (model, metric, claim): ``model, metric, claim ("a" | "b"),
    expected, estimate, ci_low, ci_high, verdict, detail``.
    """
    if claim_metrics is None:  # as declared, for every estimator present
        cm = schema.claim_metrics(metric_table(metrics)["metric"])
    else:
        cm = claim_metrics
    for k, v in cm.items():
        if v not in ("larger", "smaller"):
            raise InvalidArgument(f"claim_metrics[{k!r}] must be 'larger' or 'smaller', got {v!r}")
    m = metric_table(metrics)
    m = m[(m["layer"] == "network") & m["metric"].isin(list(cm))]
    rows = []
    q = [(1 - ci) / 2, (1 + ci) / 2]
    for (arch, metric), g in m.groupby(["model", "metric"], sort=True):
        sign = 1 if cm[metric] == "larger" else -1
        tb = sorted(g["train_ber"].dropna().unique())
        est = lo = hi = float("nan")
        verdict, detail = "not supported", "needs two training BERs"
        if len(tb) >= 2:
            a = g.loc[g["train_ber"] == tb[0], "value"].dropna().to_numpy(float)
            b = g.loc[g["train_ber"] == tb[-1], "value"].dropna().to_numpy(float)
            detail = f"training BER {tb[-1]:g} vs {tb[0]:g}, n = {len(b)} vs {len(a)}"
            if len(a) and len(b):
                est = float(b.mean() - a.mean())
            if len(a) >= 2 and len(b) >= 2:
                rng = np.random.default_rng(seed)
                ea = a[rng.integers(0, len(a), (n_boot, len(a)))].mean(1)
                eb = b[rng.integers(0, len(b), (n_boot, len(b)))].mean(1)
                lo, hi = (float(v) for v in np.quantile(eb - ea, q))
                if (sign > 0 and lo > 0) or (sign < 0 and hi < 0):
                    verdict = "holds"
                elif (sign > 0 and hi < 0) or (sign < 0 and lo > 0):
                    verdict = "contradicted"
                else:
                    verdict = "not supported"
            else:
                detail += " (fewer than 2 networks in a group)"
        rows.append({"model": arch, "metric": metric, "claim": "a", "expected": cm[metric],
                     "estimate": est, "ci_low": lo, "ci_high": hi, "verdict": verdict,
                     "detail": detail})
        c = curve[(curve["model"] == arch) & (curve["metric"] == metric)
                  & (curve["layer"] == "network") & (curve["kind"] == "raw")
                  & (curve["method"] == method) & (curve["ber"] > 0)].sort_values("ber")
        verdict, detail = "not supported", "no correlations"
        est = lo = hi = float("nan")
        if not c.empty:
            sig = ((sign * c["ci_low"] > 0) & (sign * c["ci_high"] > 0)).to_numpy()
            bers = c["ber"].to_numpy(float)
            high = bers >= np.median(bers)
            if sig.all():
                verdict = "holds"
            elif sig[high].all():
                verdict = "holds at high BER only"
            top = c.iloc[-1]
            est, lo, hi = float(top["r"]), float(top["ci_low"]), float(top["ci_high"])
            detail = (f"{method} interval excludes 0 with the expected sign at "
                      f"{int(sig.sum())} of {len(sig)} BERs "
                      f"({', '.join(f'{b:g}' for b in bers[sig]) or 'none'}); estimate at "
                      f"BER {bers[-1]:g}")
            if rel is not None and not rel.empty and verdict != "not supported":
                rr = rel[(rel["model"] == arch) & (rel["metric"] == metric)
                         & (rel["layer"] == "network")]
                if not rr.empty and not bool(rr["reliable"].iloc[0]):
                    verdict += " (unreliable metric)"
                    detail += f"; split-half reliability {rr['reliability'].iloc[0]:.2f}"
        rows.append({"model": arch, "metric": metric, "claim": "b",
                     "expected": "positive" if sign > 0 else "negative", "estimate": est,
                     "ci_low": lo, "ci_high": hi, "verdict": verdict, "detail": detail})
    return pd.DataFrame(rows, columns=["model", "metric", "claim", "expected", "estimate",
                                       "ci_low", "ci_high", "verdict", "detail"])


# -- issue 21: recipes and protection -----------------------------------------------------------

def _t_half(v: np.ndarray, level: float) -> float:
    """Half width of the ``level`` t-interval of the mean of ``v`` (NaN for fewer than 2)."""
    if len(v) < 2:
        return np.nan
    return float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))


def network_curve(curve: pd.DataFrame, model_id: str) -> pd.DataFrame:
    """The ``protection`` table of one network of a study's ``protection.csv``, its
    ``model_id`` as the model (for :func:`~bnn_tol.study.protection.protection_auc` and
    :func:`bnn_tol.plots.protection`, which take one network's curve)."""
    one = curve[curve[_ID] == model_id]
    return one.assign(model=str(model_id))[schema.columns("protection")]


def recipe_front(sweeps: pd.DataFrame, *, ber: float = 0.1, level: float = 0.95) -> pd.DataFrame:
    """Clean accuracy vs accuracy at ``ber``: the price and the gain of each training recipe.

    One row per (architecture, model group, training BER): the means over the group's networks
    (seeds) of ``clean = acc_0`` and ``tolerant = acc_ber`` (each network: mean over maps),
    their ``level`` t-intervals over networks (NaN with one network), and ``on_front``: no
    other row of the same architecture has a mean at least as high on both axes and higher on
    one (the Pareto front; rows of different architectures are never compared). With a recipe
    axis (:func:`bnn_tol.study.runner.recipes`) the model groups are ``<label>-<recipe>``.

    Returns:
        ``arch, model, train_ber, n, clean, clean_low, clean_high, tolerant, tolerant_low,
        tolerant_high, on_front`` (``ber`` and ``recipe`` columns are not needed: the group
        label carries the recipe).

    Raises:
        InvalidArgument: the sweep lacks BER 0 or ``ber``, or study columns.
    """
    acc = accuracy_at_ber(sweeps)
    _need(acc, ["model", "train_ber"], "sweeps")
    if "arch" not in acc.columns:
        acc = acc.assign(arch=acc["model"])
    bers = acc["ber"].astype(float)
    clean = acc[bers == 0.0].set_index(_ID)["accuracy"]
    at = acc[np.isclose(bers, float(ber))].set_index(_ID)["accuracy"]
    if clean.empty or at.empty:
        raise InvalidArgument(f"recipe_front needs sweep rows at BER 0 and {ber:g}; the sweep "
                              f"has {sorted(bers.unique())}")
    nets = (acc.drop_duplicates(_ID).set_index(_ID)[["arch", "model", "train_ber"]]
            .assign(clean=clean, tolerant=at).dropna(subset=["clean", "tolerant"]))
    rows = []
    for (arch, model, tb), g in nets.groupby(["arch", "model", "train_ber"], sort=True):
        row = {"arch": arch, "model": model, "train_ber": float(tb), "n": len(g)}
        for col in ("clean", "tolerant"):
            v = g[col].to_numpy(float)
            m, half = float(v.mean()), _t_half(v, level)
            row.update({col: m, f"{col}_low": m - half, f"{col}_high": m + half})
        rows.append(row)
    out = pd.DataFrame(rows)
    front = []
    for _, r in out.iterrows():
        same = out[out["arch"] == r["arch"]]
        dominated = ((same["clean"] >= r["clean"]) & (same["tolerant"] >= r["tolerant"])
                     & ((same["clean"] > r["clean"]) | (same["tolerant"] > r["tolerant"])))
        front.append(not bool(dominated.any()))
    return out.assign(on_front=front)


def protection_summary(auc: pd.DataFrame, *, level: float = 0.95) -> pd.DataFrame:
    """The protection result of each ranking over a study's networks.

    ``auc``: a study's ``protection_auc.csv`` (one row per network, unit, BER and ranking:
    :func:`bnn_tol.study.protection.protection_auc`). Per (architecture, model group, unit,
    BER, ranking): ``gain`` = the mean over networks of the ranking's AUC minus random's (a
    mean accuracy gain over the protected fractions), its ``level`` t-interval over networks
    (with one network: that network's bootstrap interval over maps and random seeds), and how
    many networks' own intervals lie above 0 (``n_better``) and below 0 (``n_worse``).

    Returns:
        ``arch, model, unit, ber, ranking, n, gain, gain_low, gain_high, n_better, n_worse``.
    """
    auc = schema.conform(auc, "study.protection_auc", what="the protection AUC table")
    if "arch" not in auc.columns:
        auc = auc.assign(arch=auc["model"])
    rows = []
    keys = ["arch", "model", "unit", "ber", "ranking"]
    for key, g in auc.groupby(keys, sort=True):
        v = g["gain"].to_numpy(float)
        m = float(v.mean())
        if len(v) > 1:
            half = _t_half(v, level)
            lo, hi = m - half, m + half
        else:
            lo, hi = float(g["gain_low"].iloc[0]), float(g["gain_high"].iloc[0])
        rows.append({**dict(zip(keys, key, strict=True)), "n": len(v), "gain": m,
                     "gain_low": lo, "gain_high": hi,
                     "n_better": int(g["better_than_baseline"].astype(bool).sum()),
                     "n_worse": int((g["gain_high"] < 0).sum())})
    return pd.DataFrame(rows, columns=[*keys, "n", "gain", "gain_low", "gain_high", "n_better",
                                       "n_worse"])


def ranking_contrast(curve: pd.DataFrame, *, a: str = "importance", b: str = "margin",
                     n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Is ranking ``a`` a better guide than ranking ``b``, network by network?

    ``curve``: a study's ``protection.csv``. For each network (``model_id``), unit and BER:
    ``diff = auc(a) - auc(b)`` (:func:`~bnn_tol.study.protection.protection_auc` with ``b`` as
    the baseline: the same chips for both, the interval resamples the fault maps). Rows of
    networks whose curve lacks ``a`` or ``b`` are left out.

    Returns:
        ``model_id, model, unit, ber, a, b, diff, diff_low, diff_high, a_better`` (the interval
        above 0), ``b_better`` (below 0).
    """
    curve = schema.conform(curve, "study.protection", what="the protection curve")
    rows = []
    for mid, g in curve.groupby(_ID, sort=True):
        names = set(g["ranking"])
        if a not in names or b not in names:
            continue
        two = network_curve(g[g["ranking"].isin([a, b])], mid)
        res = protection_auc(two, baseline=b, n_boot=n_boot, level=level, seed=seed)
        for r in res[res["ranking"] == a].itertuples():
            rows.append({_ID: mid, "model": g["model"].iloc[0], "unit": r.unit, "ber": r.ber,
                         "a": a, "b": b, "diff": r.gain, "diff_low": r.gain_low,
                         "diff_high": r.gain_high, "a_better": bool(r.gain_low > 0),
                         "b_better": bool(r.gain_high < 0)})
    return pd.DataFrame(rows, columns=[_ID, "model", "unit", "ber", "a", "b", "diff",
                                       "diff_low", "diff_high", "a_better", "b_better"])
