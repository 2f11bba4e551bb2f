"""A self-contained HTML report of a study: figures, tables and a plain-language summary.

``write(results_dir, out)`` reads the tidy tables written by :func:`bnn_tol.study.run`
(``models.csv, sweeps.csv, metrics.csv, margins.csv, importance.csv``), runs the analysis
(:mod:`bnn_tol.analysis`), draws the figures (:mod:`bnn_tol.plots`, embedded as PNG data
URIs: the page is one file) and writes next to the report the analysis tables
``correlations.csv, regression.csv, comparison.csv``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .exceptions import InvalidArgument

__all__ = ["write", "load_results", "summarize", "HEADLINE"]

#: Network-level metrics the summary talks about (all metrics are in the tables).
HEADLINE = ["mean_margin_norm", "mean_q10_margin", "importance_variance", "importance_cv"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.7em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
td,th{border:1px solid #ccc;padding:.2em .5em;text-align:right}th{background:#f4f4f4}
img{max-width:100%;margin:.5em 0}.note{color:#666;font-size:.9em}
ul.summary li{margin:.35em 0}code{background:#f4f4f4;padding:0 .2em}
"""


def load_results(results_dir: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """The study tables of ``results_dir`` as DataFrames (missing optional ones are empty).

    Raises:
        FileNotFoundError: ``models.csv``, ``sweeps.csv`` or ``metrics.csv`` is missing
            (says to run ``bnn-tol study`` first).
    """
    d = Path(results_dir)
    out: dict[str, pd.DataFrame] = {}
    for name in ("models", "sweeps", "metrics", "margins", "importance", "status"):
        p = d / f"{name}.csv"
        if p.is_file() and p.stat().st_size > 0:
            out[name] = pd.read_csv(p)
        elif name in ("models", "sweeps", "metrics"):
            raise FileNotFoundError(f"{p} not found: {d} is not a study results directory. "
                                    f"Run `bnn-tol study --preset quick --out {d}` first.")
        else:
            out[name] = pd.DataFrame()
    if out["models"].empty:
        raise InvalidArgument(f"{d / 'models.csv'} has no finished tasks (see status.csv and "
                         "models/<id>/error.txt)")
    cfg = d / "study.json"
    out["config"] = json.loads(cfg.read_text()) if cfg.is_file() else {}  # type: ignore[assignment]
    return out


def _fig_html(fig, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(df: pd.DataFrame, floatfmt: str = "{:.4g}") -> str:
    return df.to_html(index=False, float_format=lambda v: floatfmt.format(v), border=0,
                      na_rep="–")


def _pick(names: list[str], prefer: list[str]) -> list[str]:
    return [p for p in prefer if p in names] or names[:1]


def _extremes(models: pd.DataFrame) -> tuple[float, float] | None:
    bers = sorted(models["train_ber"].unique())
    return (bers[0], bers[-1]) if len(bers) > 1 else None


def _who(row) -> str:
    model = getattr(row, "model", None)
    return f"{html.escape(str(model))}: " if isinstance(model, str) else ""


def summarize(res: dict[str, Any], corr: pd.DataFrame, reg: pd.DataFrame,
              comp: pd.DataFrame) -> list[str]:
    """Plain-language findings (HTML list items) computed from the tables, hedged by ``n``.

    Covers clean accuracy and tolerance by training BER, then for the :data:`HEADLINE`
    metrics: normal vs most flip-trained (effect sizes), Spearman correlation at the
    highest evaluation BER with its interval, and the regression against the baseline.
    """
    models, sweeps = res["models"], res["sweeps"]
    lines = []
    n = len(models)
    lines.append(f"{n} networks were trained ({', '.join(sorted(models['model'].unique()))}; "
                 f"training BERs {', '.join(f'{b:g}' for b in sorted(models.train_ber.unique()))}"
                 f"; {models['seed'].nunique()} seed(s) each)."
                 + (" With so few networks every correlation below is a rough indication; look "
                    "at the intervals." if n < 20 else ""))
    from .analysis import accuracy_at_ber

    acc = accuracy_at_ber(sweeps)
    top = float(acc["ber"].max())
    ext = _extremes(models)
    if ext is not None:
        lo, hi = ext
        for arch, ma in models.groupby("model", sort=True):
            mids = set(ma["model_id"])
            at_top = acc[(acc.ber == top) & acc.model_id.isin(mids)]
            by = at_top.groupby("train_ber")["accuracy"].mean()
            clean = ma.groupby("train_ber")["clean_acc"].mean()
            if lo not in by.index or hi not in by.index:
                continue
            verdict = "more" if by[hi] > by[lo] else "less"
            cost = clean[lo] - clean[hi]
            lines.append(
                f"{html.escape(str(arch))}: bit flip training at BER {hi:g} "
                f"{'costs' if cost >= 0 else 'gains'} {100 * abs(cost):.1f} points of clean "
                f"accuracy ({clean[lo]:.3f} &rarr; {clean[hi]:.3f}) and makes the networks "
                f"{verdict} tolerant: at evaluation BER {top:g} they reach {by[hi]:.3f} "
                f"against {by[lo]:.3f} for normally trained ones.")
    names = sorted(res["metrics"].loc[res["metrics"].layer == "network", "metric"].unique())
    headline = [m for m in HEADLINE if m in names] or names
    if not comp.empty:
        net = comp[(comp["layer"] == "network") & comp["metric"].isin(headline)]
        for r in net.itertuples():
            if not np.isfinite(r.diff):
                continue
            if abs(r.cliff_delta) < 0.33 and abs(r.cohen_d) < 0.5:
                lines.append(
                    f"{_who(r)}<code>{html.escape(r.metric)}</code> barely differs between "
                    f"normal and flip-trained networks ({r.mean_normal:.4g} vs "
                    f"{r.mean_flip:.4g}; Cohen's d {r.cohen_d:.2f}, Cliff's &delta; "
                    f"{r.cliff_delta:.2f}).")
                continue
            direction = "larger" if r.diff > 0 else "smaller"
            expect = ("larger" if "margin" in r.metric else
                      "smaller" if "importance" in r.metric else None)
            note = "" if expect is None else (
                " (as the hypothesis expects)" if expect == direction
                else " (contrary to the hypothesis)")
            if min(r.n_normal, r.n_flip) < 2:
                note += " &mdash; one network each: an observation, not evidence"
            lines.append(
                f"{_who(r)}<code>{html.escape(r.metric)}</code> is {direction} in the flip-trained "
                f"networks ({r.mean_normal:.4g} &rarr; {r.mean_flip:.4g}; Cohen's d "
                f"{r.cohen_d:.2f}, Cliff's &delta; {r.cliff_delta:.2f}, "
                f"n = {r.n_normal} vs {r.n_flip}){note}.")
    if not corr.empty:
        c = corr[(corr.layer == "network") & (corr.method == "spearman") & (corr.group == "all")
                 & np.isclose(corr.ber.astype(float), top) & corr.metric.isin(headline)]
        for r in c.sort_values("r", key=lambda s: -s.abs()).itertuples():
            if not np.isfinite(r.r):
                continue
            sure = ("the 95 % interval excludes 0" if r.ci_low > 0 or r.ci_high < 0
                    else "the 95 % interval includes 0, so the sign is not established")
            lines.append(
                f"At BER {top:g}, <code>{html.escape(r.metric)}</code> has Spearman "
                f"&rho; = {r.r:.2f} with accuracy (95 % bootstrap CI [{r.ci_low:.2f}, "
                f"{r.ci_high:.2f}], p = {r.p_value:.2g}, n = {r.n}); {sure}.")
    if not reg.empty:
        rr = reg[np.isclose(reg.ber.astype(float), top)].set_index("features")["r2"]
        if {"clean", "clean+metrics"} <= set(rr.index):
            gain = rr["clean+metrics"] - rr["clean"]
            word = ("add to" if gain > 0.05 else "do not clearly add to")
            lines.append(
                f"Predicting accuracy at BER {top:g} (ridge regression, cross-validated): "
                f"R&sup2; = {rr['clean']:.2f} from clean accuracy alone, "
                f"{rr.get('metrics', np.nan):.2f} from the metrics alone, "
                f"{rr['clean+metrics']:.2f} from both &mdash; the metrics {word} what clean "
                "accuracy already tells.")
    return lines


def _reproduction_html(rd: Path) -> str:
    """The command that reproduces the study and what its numbers depend on
    (``environment.json`` written by :func:`bnn_tol.study.run`)."""
    path = rd / "environment.json"
    if not path.is_file():
        return ("<h2>Reproduction</h2><p class='note'>No <code>environment.json</code> in the "
                "results directory: the command and environment are not recorded.</p>")
    env = json.loads(path.read_text())
    keys = ["bnn_tol", "git_commit", "git_dirty", "torch", "numpy", "pandas", "python", "cpu",
            "cores", "torch_threads", "workers"]
    rows = "".join(f"<tr><th>{k}</th><td>{html.escape(str(env.get(k)))}</td></tr>"
                   for k in keys)
    return ("<h2>Reproduction</h2><p>Reproduce these numbers with <code>"
            f"{html.escape(str(env.get('command')))}</code> (training results depend on the CPU "
            f"and the thread count).</p><table>{rows}</table>")


def write(
    results_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    echo: Callable[[str], None] | None = None,
) -> Path:
    """Write the HTML report of the study in ``results_dir`` (default ``report.html`` there).

    Args:
        results_dir: output directory of :func:`bnn_tol.study.run`.
        out: the HTML file to write.
        n_boot, seed: bootstrap resamples and seed of the correlation intervals.

    Returns:
        The path of the report.
    """
    from . import analysis, plots

    say = echo or (lambda s: None)
    rd = Path(results_dir)
    out = Path(out) if out is not None else rd / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    res = load_results(rd)
    models, sweeps, metrics = res["models"], res["sweeps"], res["metrics"]
    if "split" in metrics.columns:  # the halves "a"/"b" are for split-half reliability only
        metrics = metrics[metrics["split"].astype(str) == "all"]
    cfg = res["config"]
    multi = models["model"].nunique() > 1
    say(f"[report] analysing {len(models)} networks from {rd}")
    corr = analysis.correlate(metrics, sweeps, level="network", n_boot=n_boot, seed=seed)
    if multi:
        corr = pd.concat([corr, analysis.correlate(metrics, sweeps, level="all", by="model",
                                                   n_boot=n_boot, seed=seed)],
                         ignore_index=True)
    else:
        corr = pd.concat([corr, analysis.correlate(metrics, sweeps, level="layer",
                                                   n_boot=n_boot, seed=seed)],
                         ignore_index=True)
    try:
        reg = analysis.predict_accuracy(metrics, sweeps, level="network", seed=seed)
    except ValueError as e:
        say(f"[report] regression skipped: {e}")
        reg = pd.DataFrame(columns=["ber", "features", "r2", "rmse", "n", "n_features"])
    ext = _extremes(models)
    comp = pd.DataFrame(columns=["layer", "metric"])
    neuron_comp = pd.DataFrame()
    if ext is not None:
        lo, hi = ext
        comp = analysis.compare(metrics[metrics.train_ber == lo], metrics[metrics.train_ber == hi],
                                by=["model", "layer"] if multi else "layer")
        if not res["margins"].empty:
            mg = res["margins"]
            neuron_comp = analysis.compare(mg[mg.train_ber == lo], mg[mg.train_ber == hi],
                                           by=["model", "layer"] if multi else "layer")
    corr.to_csv(out.parent / "correlations.csv", index=False)
    reg.to_csv(out.parent / "regression.csv", index=False)
    comp.to_csv(out.parent / "comparison.csv", index=False)

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>bnn_tol study "
             f"{html.escape(str(cfg.get('name', rd.name)))}</title><style>{_CSS}</style>"
             "</head><body>",
             f"<h1>Bit error tolerance study: {html.escape(str(cfg.get('name', rd.name)))}</h1>",
             f"<p class='note'>{html.escape(str(cfg.get('description', '')))} &mdash; results "
             f"from <code>{html.escape(str(rd))}</code>.</p>",
             "<h2>Summary</h2><ul class='summary'>",
             *[f"<li>{s}</li>" for s in summarize(res, corr, reg, comp)], "</ul>"]

    figs: list[tuple[str, str, Any]] = []
    figs.append(("Accuracy under bit errors",
                 "Mean accuracy over fault maps and seeds per training BER; band: 95 % "
                 "bootstrap CI of the mean.", lambda: plots.accuracy_vs_ber(sweeps)))
    if not res["margins"].empty:
        figs.append(("Margin distributions per layer",
                     "Per-neuron normalized mean margin, normal vs flip-trained.",
                     lambda: plots.margin_distributions(res["margins"])))
    if not res["importance"].empty:
        figs.append(("Importance distributions per layer",
                     "Per-neuron importance; a narrower curve is a lower inter-neuron "
                     "importance variance.",
                     lambda: plots.importance_distributions(res["importance"])))
    top = float(sweeps["ber"].max())
    net_metrics = sorted(metrics.loc[metrics.layer == "network", "metric"].unique())
    for mname in _pick(net_metrics, ["mean_margin_norm", "importance_variance",
                                     "importance_cv"]):
        figs.append((f"{mname} vs accuracy at BER {top:g}", "One point per network.",
                     lambda m=mname: plots.metric_scatter(metrics, sweeps, metric=m, ber=top)))
    figs.append(("Correlation heatmap (network-level metrics)",
                 "Spearman correlation of each metric with accuracy at each evaluation BER.",
                 lambda: plots.correlation_heatmap(corr)))
    if not multi:
        figs.append(("Correlation heatmap (layer-level metrics)", "",
                     lambda: plots.correlation_heatmap(corr, layer=None)))
    import matplotlib

    with matplotlib.rc_context({"figure.max_open_warning": 0}):
        for title, caption, make in figs:
            parts.append(f"<h2>{html.escape(title)}</h2>")
            try:
                parts.append(_fig_html(make(), title))
            except (ValueError, KeyError) as e:
                parts.append(f"<p class='note'>figure not available: {html.escape(str(e))}</p>")
            if caption:
                parts.append(f"<p class='note'>{html.escape(caption)}</p>")

    acc = analysis.accuracy_at_ber(sweeps)
    wide = acc.pivot_table(index=["model", "train_ber"], columns="ber", values="accuracy")
    wide.columns = [f"BER {float(b):g}" for b in wide.columns]
    parts += ["<h2>Tables</h2><h3>Accuracy at each evaluation BER (mean over maps and seeds)"
              "</h3>", _table(wide.reset_index()),
              "<h3>Networks</h3>", _table(models)]
    show = corr[(corr.layer == "network") & (corr.group == "all")]
    parts += ["<h3>Correlations of network-level metrics with accuracy</h3>",
              _table(show.drop(columns=["group", "layer"]).round(4)),
              "<p class='note'>All coefficients, including layer-level ones, are in "
              "<code>correlations.csv</code>.</p>"]
    if not reg.empty:
        parts += ["<h3>Predicting accuracy under BER (cross-validated R&sup2;)</h3>",
                  "<p class='note'>Ridge regression on standardized features; <i>clean</i> is "
                  "the baseline that knows only clean accuracy.</p>", _table(reg)]
    if not comp.empty and ext is not None:
        parts += [f"<h3>Flip-trained (training BER {ext[1]:g}) vs normal: metrics</h3>",
                  "<p class='note'>Samples are networks (seeds). Cohen's d uses the pooled "
                  "standard deviation; Cliff's &delta; = P(flip &gt; normal) - "
                  "P(flip &lt; normal).</p>",
                  _table(comp.drop(columns=["column"]))]
    if not neuron_comp.empty:
        parts += ["<h3>Flip-trained vs normal: per-neuron margins</h3>",
                  "<p class='note'>Samples are neurons (pooled over seeds).</p>",
                  _table(neuron_comp)]
    parts.append(_reproduction_html(rd))
    parts.append("<p class='note'>Generated by <code>bnn-tol report</code>.</p></body></html>")
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("\n".join(parts))
    os.replace(tmp, out)
    say(f"[report] written to {out}")
    return out
