"""Figures (matplotlib/seaborn). Every function returns a ``matplotlib.figure.Figure`` built
without pyplot (no global state, never ``plt.show()``): display it in Jupyter, or
``fig.savefig("x.png")``.

Several engineers add their functions here: append, do not rewrite others' functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import stats

from bnn_tol import schema
from bnn_tol.engines.driver import summarize
from bnn_tol.exceptions import InvalidArgument
from bnn_tol.files import atomic_write, check_output, sniff
from bnn_tol.study import analysis
from bnn_tol.study.analysis import feature_name

__all__ = [
    "accuracy_vs_ber",
    "margin_distributions",
    "importance_distributions",
    "metric_scatter",
    "correlation_heatmap",
    "sweep",
    "margins",
    "rho_vs_ber",
    "metric_scatter_by_model",
    "energy",
    "protection",
    "protection_gain",
    "recipe_front",
    "FORMATS",
    "check_out",
    "save",
]


# -- study figures (issue 6) ------------------------------------------------------------------

def _grid(n: int, ncols: int = 3, size: tuple[float, float] = (4.2, 3.3)):
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _hue_str(df: pd.DataFrame, hue: str) -> tuple[pd.DataFrame, list[str] | None]:
    """``hue`` as strings (a categorical legend, not a colour bar) in sorted value order."""
    if hue not in df.columns:
        return df, None
    vals = sorted(df[hue].dropna().unique())
    return df.assign(**{hue: df[hue].map(str)}), [str(v) for v in vals]


def _hue_label(col: str) -> str:
    return {"train_ber": "training BER", "model": "model", "model_id": "network"}.get(col, col)


def accuracy_vs_ber(
    sweeps: pd.DataFrame,
    *,
    hue: str = "train_ber",
    col: str | None = "model",
    errorbar: str | tuple = ("ci", 95),
    y: str = "accuracy",
) -> Figure:
    """Accuracy under BER: mean over fault maps (and seeds) per ``hue`` with a band.

    One panel per value of ``col`` (e.g. per architecture); x = evaluation BER; the band is
    seaborn's ``errorbar`` over all rows at that BER (maps x seeds), e.g. ``("ci", 95)``
    (bootstrap CI of the mean, seeded) or ``"sd"``.

    Args:
        sweeps: tidy sweep rows (``ber``, ``accuracy``, the ``hue``/``col`` columns).
    """
    import seaborn as sns

    panels = [None] if col is None or col not in sweeps.columns else sorted(sweeps[col].unique())
    fig, axes = _grid(len(panels))
    for ax, p in zip(axes, panels, strict=True):
        d = sweeps if p is None else sweeps[sweeps[col] == p]
        d, order = _hue_str(d, hue)
        sns.lineplot(d, x="ber", y=y, hue=hue if order else None, hue_order=order, marker="o",
                     errorbar=errorbar, seed=0, ax=ax)
        ax.set(xlabel="bit error rate", ylabel=y, title=str(p) if p is not None else "")
        if ax.get_legend() is not None:
            ax.get_legend().set_title(_hue_label(hue))
        ax.grid(alpha=0.3)
    return fig


def _per_layer_hist(df: pd.DataFrame, value: str, hue: str, xlabel: str, log: bool) -> Figure:
    import seaborn as sns

    if value not in df.columns:
        raise InvalidArgument(f"column {value!r} not in the table; it has {list(df.columns)}")
    order = (df.drop_duplicates("layer").sort_values("layer_index")["layer"].tolist()
             if "layer_index" in df.columns else list(dict.fromkeys(df["layer"])))
    fig, axes = _grid(len(order))
    d, hue_order = _hue_str(df, hue)
    for ax, layer in zip(axes, order, strict=True):
        dl = d[d["layer"] == layer]
        dl = dl[np.isfinite(dl[value].to_numpy(float))]
        sns.histplot(dl, x=value, hue=hue if hue_order else None, hue_order=hue_order,
                     stat="density",
                     common_norm=False, element="step", fill=False, log_scale=(log, False),
                     ax=ax)
        ax.set(title=str(layer), xlabel=xlabel)
        if ax.get_legend() is not None:
            ax.get_legend().set_title(_hue_label(hue))
    return fig


def margin_distributions(
    margins: pd.DataFrame,
    *,
    value: str = "mean_margin_norm",
    hue: str = "train_ber",
) -> Figure:
    """Per-layer distributions of a per-neuron margin, normal vs flip-trained (``hue``).

    One panel per layer; densities of ``value`` (default the normalized mean margin
    ``mean_n |a_nj - tau_j| / fan_in``) over neurons (and networks), one curve per ``hue``.

    Args:
        margins: per-neuron margin rows (``metrics.margin`` or a study's ``margins.csv``).
    """
    return _per_layer_hist(margins, value, hue, value.replace("_", " "), log=False)


def importance_distributions(
    importance: pd.DataFrame,
    *,
    value: str = "importance",
    hue: str = "train_ber",
    log: bool = False,
) -> Figure:
    """Per-layer distributions of neuron importance ``I_j``, one curve per ``hue``.

    The spread of these curves is the inter-neuron importance variance: flip-trained
    networks are expected to show narrower curves.
    """
    return _per_layer_hist(importance, value, hue, "neuron importance", log=log)


def metric_scatter(
    metrics: pd.DataFrame,
    sweeps: pd.DataFrame,
    *,
    metric: str,
    ber: float,
    layer: str = "network",
    hue: str = "train_ber",
    method: str = "spearman",
) -> Figure:
    """Metric vs accuracy at one BER, one point per network, with a least-squares line.

    The legend gives Pearson's r of the line and the ``method`` coefficient with its
    p-value (:func:`bnn_tol.analysis.correlate`, no bootstrap).
    """
    import seaborn as sns

    feats = analysis.feature_table(metrics, level="all")
    name = analysis.feature_name(metric, layer)
    if name not in feats.columns:
        raise InvalidArgument(f"no metric {metric!r} at layer {layer!r}; available: "
                         f"{sorted(feats.columns)[:20]}")
    acc = analysis.accuracy_at_ber(sweeps)
    acc = acc[np.isclose(acc["ber"].astype(float), float(ber))]
    if acc.empty:
        raise InvalidArgument(
            f"BER {ber} is not in the sweep; it has {sorted(sweeps['ber'].unique())}")
    d = acc.join(feats[name].rename("x"), on="model_id").dropna(subset=["x"])
    sel = metrics[(metrics["metric"] == metric) & (metrics["layer"] == layer)]
    stats_ = analysis.correlate(sel, sweeps[np.isclose(sweeps["ber"].astype(float), float(ber))],
                                methods=["pearson", method], n_boot=0)
    r = stats_.set_index("method")
    fig = Figure(figsize=(5.2, 4.0), layout="constrained")
    ax = fig.subplots()
    sns.regplot(d, x="x", y="accuracy", ax=ax, scatter=False, ci=None, color="0.3",
                line_kws={"label": f"least squares, pearson r = {r.loc['pearson', 'r']:.2f}"})
    hd, hue_order = _hue_str(d, hue)
    sns.scatterplot(hd, x="x", y="accuracy", hue=hue if hue_order else None,
                    hue_order=hue_order, ax=ax, s=45)
    ax.plot([], [], " ", label=f"{method} = {r.loc[method, 'r']:.2f} "
                               f"(p = {r.loc[method, 'p_value']:.2g}, n = {len(d)})")
    ax.legend(fontsize=8)
    ax.set(xlabel=name, ylabel=f"accuracy at BER {ber:g}", title=f"{name} vs accuracy")
    ax.grid(alpha=0.3)
    return fig


def correlation_heatmap(
    corr: pd.DataFrame,
    *,
    method: str = "spearman",
    layer: str | Sequence[str] | None = "network",
    group: str = "all",
    annot: bool = True,
) -> Figure:
    """Heatmap of correlation coefficients over (metric, evaluation BER).

    Args:
        corr: output of :func:`bnn_tol.analysis.correlate`.
        method: which coefficient.
        layer: rows to show: ``"network"`` (default), a list of layers, or ``None`` for all
            (rows are then ``metric@layer``).
        group: the ``group`` of ``correlate(by=...)`` to show.
    """
    import seaborn as sns

    c = corr[(corr["method"] == method) & (corr["group"] == group)]
    if layer is not None:
        c = c[c["layer"].isin([layer] if isinstance(layer, str) else list(layer))]
    if c.empty:
        raise InvalidArgument(f"no correlations for method={method!r}, group={group!r}, "
                         f"layer={layer!r}")
    c = c.assign(row=[feature_name(m, lay) for m, lay in zip(c["metric"], c["layer"],
                                                             strict=True)])
    table = c.pivot_table(index="row", columns="ber", values="r", aggfunc="first",
                          dropna=False).astype(float)  # all-NaN columns come back as object
    table = table[sorted(table.columns, key=float)] if len(table.columns) else table
    table.columns = [f"{float(b):g}" for b in table.columns]
    fig = Figure(figsize=(1.1 * len(table.columns) + 3.5, 0.42 * len(table) + 1.6),
                 layout="constrained")
    ax = fig.subplots()
    sns.heatmap(table, vmin=-1, vmax=1, cmap="RdBu_r", center=0, annot=annot, fmt=".2f",
                cbar_kws={"label": f"{method} correlation with accuracy"}, ax=ax)
    ax.set(xlabel="evaluation BER", ylabel="")
    return fig


# -- BER sweeps (issue 4) -----------------------------------------------------------------------

def sweep(df: pd.DataFrame, *, level: float = 0.95, metric: str = "accuracy",
          title: str | None = None) -> Figure:
    """Accuracy (or ``metric="rerr"``) vs BER: mean over fault maps and a ``level`` band per model.

    Args:
        df: any ``sweep`` table of :mod:`bnn_tol.schema` (:func:`bnn_tol.evaluate.sweep`, one
            row per model, BER, map; a study's ``sweeps.csv``: one line per model and
            training BER, the band over maps and training seeds) or a
            :func:`bnn_tol.evaluate.summarize` (columns ``mean, ci_low, ci_high``).
        level: confidence level of the Student-t band over the rows at a BER (sweep frames
            only).
        metric: ``"accuracy"`` or ``"rerr"`` (robust error ``1 - accuracy``).

    Returns:
        A Figure with one line + shaded band per model.
    """

    if metric not in ("accuracy", "rerr"):
        raise InvalidArgument(f"metric must be 'accuracy' or 'rerr', got {metric!r}")
    if {"mean", "ci_low", "ci_high"} <= set(df.columns):
        s = df
    else:
        df = schema.conform(df, "sweep", what="the sweep frame",
                            require=("model", "ber", "p01", "p10", "accuracy"))
        if "train_ber" in df.columns:  # a study: one line per label and training BER
            df = df.assign(model=[f"{m}, training BER {b:g}"
                                  for m, b in zip(df["model"], df["train_ber"], strict=True)])
        s = summarize(df, level=level)
    if not len(s):
        raise InvalidArgument("the sweep frame is empty: nothing to plot")
    fig = Figure(figsize=(5.5, 3.8), layout="constrained")
    ax = fig.subplots()
    for model, g in s.groupby("model", sort=False):
        g = g.sort_values("ber")
        mean, lo, hi = g["mean"], g["ci_low"], g["ci_high"]
        if metric == "rerr":
            mean, lo, hi = 1 - mean, 1 - hi, 1 - lo
        line, = ax.plot(g["ber"], mean, marker="o", ms=3, label=str(model))
        ax.fill_between(g["ber"], lo, hi, color=line.get_color(), alpha=0.25, linewidth=0)
    ax.set_xlabel("bit error rate p")
    ax.set_ylabel("accuracy" if metric == "accuracy" else "RErr (1 - accuracy)")
    ax.set_title(title or f"mean over fault maps, {level:.0%} band")
    ax.grid(alpha=0.3)
    ax.legend(title="model")
    return fig


# -- metrics figures (issue 5) ------------------------------------------------------------------

def margins(df: pd.DataFrame, *, value: str = "mean_margin_norm", hue: str = "model") -> Figure:
    """Per-layer histograms of a per-neuron margin statistic, one curve per model.

    One panel per hidden layer; densities over neurons of ``value`` (default
    ``mean_n |a_nj - tau_j| / fan_in``), dead neurons (infinite margin) left out.

    Args:
        df: per-neuron rows of :func:`bnn_tol.metrics.margin`, with a ``model`` column to
            overlay several models (the CSV of ``bnn-tol metrics``).
        value: the column to histogram (any per-neuron column, e.g. ``importance_accuracy``).
        hue: column that tells the curves apart.
    """
    return _per_layer_hist(df, value, hue, value.replace("_", " "), log=False)


# -- issue 10: the correlation curve and per-architecture scatter ----------------------------

def rho_vs_ber(
    curve: pd.DataFrame,
    *,
    metrics: Sequence[str] | None = None,
    layer: str = "network",
    kind: str = "raw",
    method: str = "spearman",
) -> Figure:
    """Correlation with accuracy vs evaluation BER, a line and interval band per metric.

    ``curve`` is :func:`bnn_tol.analysis.correlate_curve`; one panel per architecture
    (``model``), the band is ``[ci_low, ci_high]`` (bootstrap over networks with metric and
    accuracy noise). BER 0 (clean accuracy) is left out. ``metrics``: which metrics
    (default all at ``layer``).
    """
    need = ["model", "metric", "layer", "ber", "kind", "method", "r", "ci_low", "ci_high"]
    missing = [c for c in need if c not in curve.columns]
    if missing:
        raise InvalidArgument(f"curve lacks column(s) {missing}: pass "
                              "bnn_tol.analysis.correlate_curve(...)")
    d = curve[(curve["layer"] == layer) & (curve["kind"] == kind) & (curve["method"] == method)
              & (curve["ber"] > 0)]
    if metrics is not None:
        d = d[d["metric"].isin(list(metrics))]
    if d.empty:
        raise InvalidArgument(f"no rows for layer={layer!r}, kind={kind!r}, method={method!r}"
                              + ("" if metrics is None else f", metrics={list(metrics)}"))
    archs = sorted(d["model"].astype(str).unique())
    fig, axes = _grid(len(archs), ncols=min(3, len(archs)), size=(5.2, 3.8))
    names = sorted(d["metric"].unique())
    colors = {m: f"C{i % 10}" for i, m in enumerate(names)}
    for ax, arch in zip(axes, archs, strict=True):
        da = d[d["model"].astype(str) == arch]
        for m, g in da.groupby("metric", sort=True):
            g = g.sort_values("ber")
            ax.plot(g["ber"], g["r"], marker="o", ms=3, color=colors[m], label=m)
            ax.fill_between(g["ber"], g["ci_low"], g["ci_high"], color=colors[m], alpha=0.18,
                            lw=0)
        ax.axhline(0, color="0.4", lw=0.8)
        ax.set(xlabel="evaluation BER", ylabel=f"{method} with accuracy", ylim=(-1.05, 1.05),
               title=f"{arch} ({kind.replace('_', ' ')})")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="lower left")
    return fig


def metric_scatter_by_model(
    metrics: pd.DataFrame,
    sweeps: pd.DataFrame,
    *,
    metric: str,
    ber: float,
    layer: str = "network",
    hue: str = "train_ber",
    level: float = 0.95,
) -> Figure:
    """Metric vs accuracy at one BER, one panel per architecture, colour = ``hue``.

    One point per network (split ``"all"`` of the metrics; accuracy = mean over maps), with
    ``level`` error bars on both axes: the metric's standard error (``value_se``) and the
    accuracy's over fault maps (``std / sqrt(n_maps)``), normal quantile. No
    regression line: architectures differ in scale (fan-in enters the normalized margin),
    so a line pooled across them would be meaningless, and within one the curve of
    :func:`rho_vs_ber` is the summary.
    """
    import seaborn as sns

    m = analysis.metric_table(metrics)
    m = m[(m["metric"] == metric) & (m["layer"] == layer)]
    if m.empty:
        raise InvalidArgument(f"no metric {metric!r} at layer {layer!r}; available: "
                              f"{sorted(metrics['metric'].unique())[:20]}")
    acc = analysis.accuracy_at_ber(sweeps)
    acc = acc[np.isclose(acc["ber"].astype(float), float(ber))]
    if acc.empty:
        raise InvalidArgument(
            f"BER {ber} is not in the sweep; it has {sorted(sweeps['ber'].unique())}")
    se = m["value_se"] if "value_se" in m.columns else pd.Series(np.nan, index=m.index)
    d = m[["model_id", "model", "train_ber", "value"]].assign(value_se=se).merge(
        acc[["model_id", "accuracy", "std", "n"]], on="model_id")
    z = stats.norm.ppf(0.5 + level / 2)
    d["xerr"] = (z * d["value_se"]).fillna(0.0)
    d["yerr"] = (z * d["std"] / np.sqrt(d["n"])).fillna(0.0)
    archs = sorted(d["model"].astype(str).unique())
    fig, axes = _grid(len(archs), ncols=min(3, len(archs)), size=(4.6, 3.6))
    hd, order = _hue_str(d, hue)
    for ax, arch in zip(axes, archs, strict=True):
        sub = hd[hd["model"].astype(str) == arch]
        ax.errorbar(sub["value"], sub["accuracy"], xerr=sub["xerr"], yerr=sub["yerr"],
                    fmt="none", ecolor="0.6", elinewidth=0.8, zorder=1)
        sns.scatterplot(sub, x="value", y="accuracy",
                        hue=hue if order else None, hue_order=order, ax=ax, s=40, zorder=2)
        ax.set(xlabel=analysis.feature_name(metric, layer), ylabel=f"accuracy at BER {ber:g}",
               title=arch)
        ax.grid(alpha=0.3)
        if ax.get_legend() is not None:
            ax.get_legend().set_title(_hue_label(hue))
    return fig


# -- profiled chips (issue 11) -------------------------------------------------------------------

def energy(df: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Accuracy vs supply voltage and vs energy saving, one line per model (never pooled).

    Args:
        df: a profile sweep (:func:`bnn_tol.profile.profile_sweep`): one row per model,
            voltage, offset. Lines are the mean over offsets, bands +- one sd over offsets.
    """
    need = {"model", "voltage", "offset", "accuracy", "energy_saving"}
    if not need <= set(df.columns):
        raise InvalidArgument(f"an energy plot needs a profile sweep with columns {sorted(need)}"
                              " (bnn-tol sweep --profile)")
    df = schema.conform(df, "profile", what="the profile sweep", require=sorted(need))
    if not len(df):
        raise InvalidArgument("the profile sweep is empty: nothing to plot")
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax_v, ax_e = fig.subplots(1, 2)
    for model, g in df.groupby("model", sort=False):
        m = g.groupby("voltage").agg(acc=("accuracy", "mean"), sd=("accuracy", "std"),
                                     saving=("energy_saving", "first")).reset_index()
        sd = m["sd"].fillna(0.0)
        for ax, x in ((ax_v, m["voltage"]), (ax_e, 100 * m["saving"])):
            line, = ax.plot(x, m["acc"], marker="o", ms=3, label=str(model))
            ax.fill_between(x, m["acc"] - sd, m["acc"] + sd, color=line.get_color(),
                            alpha=0.2, linewidth=0)
    ax_v.set_xlabel("supply voltage")
    ax_v.invert_xaxis()
    ax_e.set_xlabel("energy saving (%) vs the lowest error-free voltage")
    for ax in (ax_v, ax_e):
        ax.set_ylabel("accuracy (mean over placements)")
        ax.grid(alpha=0.3)
    ax_e.legend(title="model", fontsize=8)
    fig.suptitle(title or "profiled chip: accuracy vs voltage and energy")
    return fig


def protection(curve: pd.DataFrame, *, level: float = 0.95) -> Figure:
    """Protection curves: accuracy vs the protected fraction of stored bits, one panel per BER,
    one line per ranking with its ``level`` band over fault maps; the ``random:<seed>``
    rankings are pooled into one ``random`` line whose band spans maps and seeds.

    Args:
        curve: a ``protection`` table (:func:`bnn_tol.study.protection.protection`); one model
            and unit (refused otherwise: curves of different networks are not pooled).
    """
    curve = schema.conform(curve, "protection", what="the protection curve")
    if curve["model"].nunique() != 1 or curve["unit"].nunique() != 1:
        raise InvalidArgument("plot one model and one unit at a time (curves of different "
                              "networks or units are not comparable on one axis)")
    df = curve.assign(ranking=[r.split(":")[0] if r.startswith("random") else r
                               for r in curve["ranking"]])
    bers = sorted(df["ber"].unique())
    fig, axes = _grid(len(bers), ncols=3, size=(4.4, 3.4))
    for ax, ber in zip(axes, bers, strict=False):
        for r, g in df[df["ber"] == ber].groupby("ranking", sort=False):
            s = g.groupby("fraction")["accuracy"].agg(["mean", "std", "count"]).reset_index()
            half = (stats.t.ppf(0.5 + level / 2, (s["count"] - 1).clip(lower=1))
                    * s["std"].fillna(0) / np.sqrt(s["count"]))
            line, = ax.plot(s["fraction"], s["mean"], marker="o", ms=3, label=r,
                            ls="--" if r == "random" else "-")
            ax.fill_between(s["fraction"], s["mean"] - half, s["mean"] + half,
                            color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(f"BER {ber:g}")
        ax.set_xlabel(f"protected fraction of stored bits ({curve['unit'].iloc[0]}s)")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(title="ranking", fontsize=8)
    fig.suptitle(f"{curve['model'].iloc[0]}: protection guided by each ranking, "
                 f"{level:.0%} band over maps")
    return fig


def recipe_front(front: pd.DataFrame, *, ber: float | None = None) -> Figure:
    """Clean accuracy vs accuracy under errors, one panel per architecture, one line per model
    group (recipe) through its training BERs (labelled), t-interval bars over seeds; hollow
    markers are off the Pareto front.

    Args:
        front: :func:`bnn_tol.study.analysis.recipe_front`.
        ber: the BER of ``tolerant`` (axis label only).
    """
    archs = sorted(front["arch"].astype(str).unique())
    fig, axes = _grid(len(archs), ncols=min(3, len(archs)), size=(5.0, 3.9))
    for ax, arch in zip(axes, archs, strict=True):
        sub = front[front["arch"].astype(str) == arch]
        for model, g in sub.groupby("model", sort=True):
            g = g.sort_values("train_ber")
            xerr = np.abs(np.vstack([g["clean"] - g["clean_low"], g["clean_high"] - g["clean"]]))
            yerr = np.abs(np.vstack([g["tolerant"] - g["tolerant_low"],
                                     g["tolerant_high"] - g["tolerant"]]))
            line = ax.errorbar(g["clean"], g["tolerant"], xerr=np.nan_to_num(xerr),
                               yerr=np.nan_to_num(yerr), marker="", lw=1.2, capsize=2,
                               label=str(model))
            color = line.lines[0].get_color()
            on = g["on_front"].astype(bool)
            ax.scatter(g.loc[on, "clean"], g.loc[on, "tolerant"], color=color, s=36, zorder=3)
            ax.scatter(g.loc[~on, "clean"], g.loc[~on, "tolerant"], facecolor="white",
                       edgecolor=color, s=36, zorder=3)
            for r in g.itertuples():
                ax.annotate(f"{r.train_ber:g}", (r.clean, r.tolerant), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel="clean accuracy", title=arch,
               ylabel="accuracy under errors" + (f" (BER {ber:g})" if ber is not None else ""))
        ax.grid(alpha=0.3)
        ax.legend(title="model-recipe (labels: training BER)", fontsize=8, title_fontsize=8)
    return fig


def protection_gain(summary: pd.DataFrame, *, level: float = 0.95) -> Figure:
    """AUC gain over random protection per ranking (bars: the summary's ``level`` interval),
    one panel per (architecture, unit), x = BER; random orders are not drawn (they are the
    baseline).

    Args:
        summary: :func:`bnn_tol.study.analysis.protection_summary`.
    """
    s = summary[~summary["ranking"].astype(str).str.startswith("random")]
    panels = sorted({(str(a), str(u)) for a, u in zip(s["arch"], s["unit"], strict=True)})
    fig, axes = _grid(len(panels), ncols=min(3, len(panels)), size=(5.0, 3.7))
    for ax, (arch, unit) in zip(axes, panels, strict=True):
        sub = s[(s["arch"].astype(str) == arch) & (s["unit"] == unit)]
        ranks = sorted(sub["ranking"].unique())
        models = sorted(sub["model"].unique())
        bers = sorted(sub["ber"].unique())
        width = 0.8 / max(1, len(ranks) * len(models))
        k = 0
        for model in models:
            for r in ranks:
                g = sub[(sub["model"] == model) & (sub["ranking"] == r)].set_index("ber")
                g = g.reindex(bers)
                x = np.arange(len(bers)) + (k - (len(ranks) * len(models) - 1) / 2) * width
                err = np.abs(np.vstack([g["gain"] - g["gain_low"], g["gain_high"] - g["gain"]]))
                ax.bar(x, g["gain"], width, yerr=np.nan_to_num(err), capsize=2,
                       label=r if len(models) == 1 else f"{model}: {r}")
                k += 1
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set_xticks(np.arange(len(bers)), [f"{b:g}" for b in bers])
        ax.set(xlabel="bit error rate", ylabel="AUC gain over random (accuracy)",
               title=f"{arch}: protecting {unit}s")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.suptitle(f"Gain over random protection ({level:.0%} interval over networks)",
                 fontsize=10)
    return fig


# -- writing figures (issue 20) -----------------------------------------------------------------

#: Image formats a figure is written in, by the suffix of the file name.
FORMATS = ("png", "pdf", "svg")


def _is_figure(path) -> bool:
    """A figure matplotlib wrote (its producer string, at the head or the end of the file)."""
    return sniff(path, b"matplotlib", b"Matplotlib")


def check_out(out, *, inputs=(), overwrite: bool = False) -> str:
    """Check a figure's file name before drawing; returns its format (:data:`FORMATS`).

    Raises:
        InvalidArgument: the suffix is not ``.png``, ``.pdf`` or ``.svg``.
        ResultsMismatch: ``out`` is an input, or an existing file matplotlib did not write
            (without ``overwrite``), see :func:`bnn_tol.files.check_output`.
    """
    check_output(out, inputs=inputs, replace=True if overwrite else _is_figure)
    fmt = Path(out).suffix[1:].lower()
    if fmt not in FORMATS:
        raise InvalidArgument(f"{out}: the figure format is chosen by the suffix, one of "
                              f"{', '.join('.' + f for f in FORMATS)}")
    return fmt


def save(fig: Figure, out, *, inputs=(), overwrite: bool = False, **kwargs) -> None:
    """Write ``fig`` to ``out`` atomically (checked by :func:`check_out` first; ``kwargs`` go
    to ``savefig``, e.g. ``dpi``)."""
    fmt = check_out(out, inputs=inputs, overwrite=overwrite)
    atomic_write(out, lambda p: fig.savefig(p, format=fmt, **kwargs), inputs=inputs,
                 replace=True if overwrite else _is_figure)
