"""A self-contained HTML report of a study: figures, tables and a plain-language summary.

``write(results_dir, out)`` reads the tidy tables written by :func:`bnn_tol.study.run`
(``models.csv, sweeps.csv, metrics.csv, margins.csv, importance.csv``; each read and validated
as its :mod:`bnn_tol.schema` table, tables of the previous release upgraded), runs the analysis
(:mod:`bnn_tol.analysis`), draws the figures (:mod:`bnn_tol.plots`, embedded as PNG data
URIs: the page is one file) and writes next to the report the analysis tables
``correlations.csv, regression.csv, comparison.csv`` and (issue 10)
``correlation_curve.csv`` (:func:`bnn_tol.analysis.correlate_curve`, per architecture, every
BER, noise-aware intervals), ``reliability.csv`` (split-half), ``claims.csv`` (the paper's
two claims answered per architecture) and ``prediction_fit.csv`` (when the study wrote
``predictions.csv``). Metrics with low reliability or a high noise share are flagged in the
tables and the summary. Result directories of older versions (no ``split``/``value_se``
columns, no predictions) give the same report without those parts. Which metrics the summary,
the correlation table and the figures show is declared in the schema
(:func:`bnn_tol.schema.report_metrics`), not here.
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

from bnn_tol import schema
from bnn_tol.exceptions import InvalidArgument, ResultsMismatch, require_int
from bnn_tol.files import atomic_write, check_output, sniff, starts_with
from bnn_tol.study import analysis, plots
from bnn_tol.study.analysis import accuracy_at_ber

__all__ = ["write", "load_results", "summarize", "markdown_summary", "HEADLINE",
           "CURVE_METRICS", "TABLE_BERS", "curve_table", "warnings_html", "SIDE_FILES",
           "MAX_N_BOOT"]

#: Network-level metrics the summary talks about (all metrics are in the tables), as declared
#: in :data:`bnn_tol.schema.REPORT_METRICS` (names of a one-estimator study; with several
#: estimators :func:`bnn_tol.schema.report_metrics` names them per estimator).
HEADLINE = schema.report_metrics("headline")

#: Metrics of the rho-vs-BER table (those present; ``predicted_accuracy`` from predictions.csv,
#: ``clean_accuracy`` from the sweeps), as declared in the schema: the unbiased importance
#: variance of every estimator, the plug-in one of the paper's (accuracy form).
CURVE_METRICS = schema.report_metrics("curve")

#: The study tables the report reads: file stem -> (:mod:`bnn_tol.schema` table, the columns
#: the report needs; the other declared columns are checked where present).
_TABLES = {"models": ("study.models", ("model_id", "model", "train_ber", "train_seed",
                                       "clean_acc")),
           "sweeps": ("study.sweeps", ("model_id", "model", "train_ber", "ber", "accuracy")),
           "metrics": ("study.metrics", ("model_id", "model", "train_ber", "layer", "metric",
                                         "value")),
           "margins": ("study.margins", ("model_id", "model", "train_ber", "layer")),
           "importance": ("study.importance", ("model_id", "model", "train_ber", "layer")),
           "predictions": ("study.predictions", ("model_id", "ber", "predicted_accuracy")),
           "protection": ("study.protection", ("model_id", "model", "ranking", "fraction",
                                               "ber", "map", "accuracy")),
           "protection_auc": ("study.protection_auc", ("model_id", "model", "ranking", "ber",
                                                       "gain"))}
#: The tables the report reads from a results directory (never written by it).
_READS = ("models", "sweeps", "metrics", "margins", "importance", "status", "predictions",
          "protection", "protection_auc")
#: The BER of the recipe front (accuracy under errors vs clean accuracy), if swept.
FRONT_BER = 0.1
#: The files the report writes beside its HTML page, each with how it is recognized as the
#: report's (an existing one is replaced without ``overwrite`` only then).
SIDE_FILES = {
    "correlation_curve.csv": starts_with("model,metric,layer,ber,kind", '""'),
    "reliability.csv": starts_with("model,metric,layer,r_half", '""'),
    "claims.csv": starts_with("model,metric,claim", '""'),
    "prediction_fit.csv": starts_with("model,pearson", '""'),
    "recipe_front.csv": starts_with("arch,model,train_ber,n,clean", '""'),
    "protection_summary.csv": starts_with("arch,model,unit,ber,ranking", '""'),
    "ranking_contrast.csv": starts_with("model_id,model,unit,ber,a,b,diff", '""'),
    "summary.md": starts_with("# Study "),
    "correlations.csv": starts_with("group,metric,layer", '""'),
    "regression.csv": starts_with("ber,features", '""'),
    "comparison.csv": starts_with("layer,metric", '""'),
}
#: Most bootstrap resamples (each analysis holds arrays of n_boot x networks).
MAX_N_BOOT = 100_000


def _is_report(path: Path) -> bool:
    """An HTML page written by :func:`write` (its title)."""
    return sniff(path, b"<title>bnn_tol study", tail=0)


#: Evaluation BERs of the rho table (the nearest BER of the sweep is used).
TABLE_BERS = (0.05, 0.1, 0.2)
#: Test-set sizes of the known datasets (the binomial term of the accuracy noise).
_TEST_SIZE = {"mnist": 10000, "fashion-mnist": 10000, "fmnist": 10000, "kmnist": 10000,
              "cifar10": 10000, "cifar-10": 10000}
#: How to reproduce a study when its environment.json is missing.
REPRODUCE = "make results  (or: bnn-tol study <study file> --out <dir>)"

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

    Each table is read as its :mod:`bnn_tol.schema` table (:func:`bnn_tol.schema.read_csv`):
    validated, and upgraded if the previous release wrote it (``seed`` -> ``train_seed``,
    ``se`` -> ``value_se``, ...).

    Raises:
        FileNotFoundError: ``models.csv``, ``sweeps.csv`` or ``metrics.csv`` is missing
            (says to run ``bnn-tol study`` first).
        ResultsMismatch: a table does not fit the schema (one line: the file, the problem and
            the command that regenerates it).
    """
    d = Path(results_dir)
    out: dict[str, pd.DataFrame] = {}
    for name in _READS:
        p = d / f"{name}.csv"
        if p.is_file() and p.stat().st_size > 0:
            out[name] = (schema.read_csv(p, *_TABLES[name]) if name in _TABLES
                         else _plain_csv(p))
        elif name in ("models", "sweeps", "metrics"):
            raise FileNotFoundError(f"{p} not found: {d} is not a study results directory. "
                                    f"Run `bnn-tol study --preset quick --out {d}` first.")
        else:
            out[name] = pd.DataFrame()
    if out["models"].empty:
        raise InvalidArgument(f"{d / 'models.csv'} has no finished tasks (see status.csv and "
                         "models/<id>/error.txt)")
    cfg = d / "study.json"
    out["config"] = _json_object(cfg) if cfg.is_file() else {}  # type: ignore[assignment]
    return out


def _plain_csv(path: Path) -> pd.DataFrame:
    """A CSV without a declared table (``status.csv``); ResultsMismatch if it is not one."""
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError,
            ValueError) as e:
        raise ResultsMismatch(f"{path} is not a CSV table ({type(e).__name__}); regenerate it "
                              "with `bnn-tol study`") from None


def _json_object(path: Path) -> dict[str, Any]:
    """``study.json`` / ``environment.json`` of a results directory: a JSON object, or
    ResultsMismatch naming the file."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ResultsMismatch(f"{path} is unreadable ({type(e).__name__}); regenerate it with "
                              "`bnn-tol study`") from None
    if not isinstance(obj, dict):
        raise ResultsMismatch(f"{path} is not a JSON object; regenerate it with `bnn-tol study`")
    return obj


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
                 f"; {models['train_seed'].nunique()} seed(s) each)."
                 + (" With so few networks every correlation below is a rough indication; look "
                    "at the intervals." if n < 20 else ""))

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
    headline = schema.report_metrics("headline", names) or names
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


def _n_test(cfg: dict[str, Any]) -> int | None:
    """Test images behind each sweep accuracy: ``[data] test_subset`` or the dataset's size."""
    d = cfg.get("data", {}) if isinstance(cfg, dict) else {}
    sub = d.get("test_subset")
    if isinstance(sub, int) and not isinstance(sub, bool) and sub > 0:
        return sub
    return _TEST_SIZE.get(str(d.get("dataset", "")).lower())


def curve_table(curve: pd.DataFrame, rel: pd.DataFrame | None = None, *,
                bers: tuple[float, ...] = TABLE_BERS, method: str = "spearman",
                kind: str = "raw") -> pd.DataFrame:
    """Display table: ``rho [ci_low, ci_high]`` per (architecture, metric) at the sweep BERs
    nearest to ``bers``, with a ``warning`` column from :func:`bnn_tol.analysis.reliability`
    (low split-half reliability or high noise share)."""
    c = curve[(curve["layer"] == "network") & (curve["method"] == method)
              & (curve["kind"] == kind)]
    names = schema.report_metrics("curve", c["metric"])
    avail = np.array(sorted(c.loc[c["ber"] > 0, "ber"].unique()), dtype=float)
    if not names or avail.size == 0:
        return pd.DataFrame()
    use = sorted({float(avail[np.abs(avail - b).argmin()]) for b in bers})
    rows = []
    for (arch, metric), g in c[c["metric"].isin(names)].groupby(["model", "metric"], sort=True):
        row: dict[str, Any] = {"model": arch, "metric": metric}
        for b in use:
            r = g[np.isclose(g["ber"], b)]
            row[f"BER {b:g}"] = ("–" if r.empty or not np.isfinite(r["r"].iloc[0]) else
                                 f"{r['r'].iloc[0]:.2f} [{r['ci_low'].iloc[0]:.2f}, "
                                 f"{r['ci_high'].iloc[0]:.2f}]")
        row["warning"] = _warning(rel, arch, metric)
        rows.append(row)
    out = pd.DataFrame(rows)
    order = {m: i for i, m in enumerate(names)}
    return out.sort_values(["model", "metric"], key=lambda s: s.map(order) if s.name == "metric"
                           else s).reset_index(drop=True)


def _warning(rel: pd.DataFrame | None, arch: Any, metric: str, layer: str = "network") -> str:
    if rel is None or rel.empty:
        return ""
    r = rel[(rel["model"] == arch) & (rel["metric"] == metric) & (rel["layer"] == layer)]
    if r.empty:
        return ""
    r = r.iloc[0]
    out = []
    if np.isfinite(r["reliability"]) and not r["reliable"]:
        out.append(f"low reliability ({r['reliability']:.2f})")
    if r["noisy"]:
        out.append(f"noise share {r['noise_share']:.0%}")
    return "; ".join(out)


def warnings_html(rel: pd.DataFrame, metrics: list[str] | None = None) -> list[str]:
    """Summary lines (HTML) for network-level metrics whose split-half reliability is low or
    whose noise share is high (:func:`bnn_tol.analysis.reliability` flags)."""
    if rel.empty:
        return []
    r = rel[(rel["layer"] == "network") & ((~rel["reliable"] & rel["reliability"].notna())
                                           | rel["noisy"])]
    if metrics is not None:
        r = r[r["metric"].isin(metrics)]
    lines = []
    for row in r.itertuples():
        what = []
        if np.isfinite(row.reliability) and not row.reliable:
            what.append(f"its split-half reliability across networks is {row.reliability:.2f} "
                        f"(95 % CI [{row.ci_low:.2f}, {row.ci_high:.2f}], n = {row.n})")
        if row.noisy:
            what.append(f"a median {row.noise_share:.0%} of its value is sampling noise")
        lines.append(f"<b>Warning</b> ({html.escape(str(row.model))}): "
                     f"<code>{html.escape(row.metric)}</code> &mdash; {'; '.join(what)}. "
                     "Correlations of this metric are mostly noise; measure it on more images.")
    return lines


def _claims_html(cl: pd.DataFrame) -> list[str]:
    lines = []
    for r in cl.itertuples():
        if r.claim == "a":
            text = (f"flip-trained networks have {r.expected} <code>{html.escape(r.metric)}"
                    f"</code>: <b>{html.escape(r.verdict)}</b> (difference {r.estimate:.4g}, "
                    f"95 % CI [{r.ci_low:.4g}, {r.ci_high:.4g}]; {html.escape(r.detail)})")
        else:
            text = (f"<code>{html.escape(r.metric)}</code> correlates ({r.expected}ly) with "
                    f"accuracy under BER: <b>{html.escape(r.verdict)}</b> "
                    f"({html.escape(r.detail)}: &rho; = {r.estimate:.2f} "
                    f"[{r.ci_low:.2f}, {r.ci_high:.2f}])")
        lines.append(f"Claim ({r.claim}), {html.escape(str(r.model))}: {text}.")
    return lines


def _reproduction_html(rd: Path) -> str:
    """The command that reproduces the study and what its numbers depend on
    (``environment.json`` written by :func:`bnn_tol.study.run`)."""
    path = rd / "environment.json"
    if not path.is_file():
        return ("<h2>Reproduction</h2><p class='note'>No <code>environment.json</code> in the "
                "results directory: the command and environment are not recorded. A study is "
                f"reproduced with <code>{html.escape(REPRODUCE)}</code>.</p>")
    env = _json_object(path)
    keys = ["bnn_tol", "git_commit", "git_dirty", "torch", "numpy", "pandas", "python", "cpu",
            "cores", "torch_threads", "workers"]
    rows = "".join(f"<tr><th>{k}</th><td>{html.escape(str(env.get(k)))}</td></tr>"
                   for k in keys)
    return ("<h2>Reproduction</h2><p>Reproduce these numbers with <code>"
            f"{html.escape(str(env.get('command')))}</code> (training results depend on the CPU "
            f"and the thread count).</p><table>{rows}</table>")


def _md(df: pd.DataFrame, floatfmt: str = ".4g") -> str:
    return df.to_markdown(index=False, floatfmt=floatfmt) if len(df) else "(none)"


def _protection_tables(res: dict[str, Any], sweeps: pd.DataFrame, *, n_boot: int, seed: int
                       ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``(recipe front, protection summary, importance-vs-margin contrast)``; empty frames
    where the study has no BER :data:`FRONT_BER` or no protection curves."""
    front = psum = contrast = pd.DataFrame()
    bers = sweeps["ber"].astype(float)
    if (bers == 0).any() and np.isclose(bers, FRONT_BER).any() and "train_ber" in sweeps:
        front = analysis.recipe_front(sweeps, ber=FRONT_BER)
    if not res["protection_auc"].empty:
        psum = analysis.protection_summary(res["protection_auc"])
    curve = res["protection"]
    if not curve.empty:
        names = sorted(set(curve["ranking"]))
        imp = next((r for r in names if r.split(":")[0] == "importance"), None)
        if imp is not None and "margin" in names:
            contrast = analysis.ranking_contrast(curve, a=imp, b="margin",
                                                 n_boot=n_boot, seed=seed)
    return front, psum, contrast


def _protection_examples(curve: pd.DataFrame) -> list[str]:
    """The networks whose protection curves the report draws: per model group, the one of the
    lowest and of the highest training BER (first seed)."""
    if curve.empty:
        return []
    nets = curve.drop_duplicates("model_id").sort_values(["model", "train_ber", "train_seed"])
    out: list[str] = []
    for _, g in nets.groupby("model", sort=True):
        for mid in (g["model_id"].iloc[0], g["model_id"].iloc[-1]):
            if mid not in out:
                out.append(str(mid))
    return out


def markdown_summary(rd: Path, res: dict[str, Any], curve: pd.DataFrame, rel: pd.DataFrame,
                     cl: pd.DataFrame, pfit: pd.DataFrame, front: pd.DataFrame | None = None,
                     psum: pd.DataFrame | None = None,
                     contrast: pd.DataFrame | None = None) -> str:
    """The study's headline tables as Markdown (written as ``summary.md`` by :func:`write`;
    the README's published numbers are copied from it).

    Sections: reproduction (command, commit, CPU, threads from ``environment.json``), clean
    accuracy and accuracy under BER per training BER (mean +- standard deviation over seeds),
    Spearman rho with accuracy at 5 / 10 / 20 % BER with 95 % intervals (raw and partial given
    clean accuracy), split-half reliability and noise share of the network-level metrics, the
    paper's claims, the fit of the predicted-from-margins accuracy and (issue 21) the recipe
    front (:func:`bnn_tol.study.analysis.recipe_front`), the protection result per ranking
    (:func:`~bnn_tol.study.analysis.protection_summary`) and importance vs margin as a guide
    per network (:func:`~bnn_tol.study.analysis.ranking_contrast`).
    """

    cfg = res["config"] if isinstance(res["config"], dict) else {}
    lines = [f"# Study {cfg.get('name', rd.name)}", "", str(cfg.get("description", "")), ""]
    env_path = rd / "environment.json"
    if env_path.is_file():
        env = _json_object(env_path)
        commit = str(env.get("git_commit") or "unknown")[:12]
        lines += [f"Reproduce: `{env.get('command')}` · bnn_tol {env.get('bnn_tol')} @ {commit}"
                  f"{' (dirty)' if env.get('git_dirty') else ''} · torch {env.get('torch')} · "
                  f"{env.get('cpu')} · {env.get('cores')} cores · {env.get('workers')} workers "
                  f"x {env.get('torch_threads')} threads", ""]
    acc = analysis.accuracy_at_ber(res["sweeps"])
    per_net = acc.groupby(["model", "train_ber", "ber"], as_index=False)["accuracy"]
    g = per_net.agg(mean="mean", sd="std", n="count")
    g["cell"] = [f"{m:.4f} ± {sd:.4f}" if np.isfinite(sd) else f"{m:.4f}"
                 for m, sd in zip(g["mean"], g["sd"], strict=True)]
    wide = g.pivot_table(index=["model", "train_ber"], columns="ber", values="cell",
                         aggfunc="first")
    wide.columns = [f"BER {float(b):g}" for b in wide.columns]
    lines += ["## Accuracy (mean ± sd over seeds; each network: mean over fault maps)", "",
              _md(wide.reset_index()), ""]
    for kind, title in (("raw", "Spearman ρ of the network-level metric with accuracy"),
                        ("partial_clean", "Partial Spearman ρ given clean accuracy")):
        ct = curve_table(curve, rel, kind=kind) if not curve.empty else pd.DataFrame()
        if not ct.empty:
            lines += [f"## {title} (95 % interval: networks resampled, metric and accuracy "
                      "noise included)", "", _md(ct), ""]
    if not rel.empty:
        r = rel[rel["layer"] == "network"]
        keep = (schema.report_metrics("curve", r["metric"])
                + schema.report_metrics("headline", r["metric"]))
        r = r[r["metric"].isin(keep)]
        cols = [c for c in ("model", "metric", "reliability", "ci_low", "ci_high", "n",
                            "noise_share", "reliable", "noisy") if c in r.columns]
        lines += ["## Split-half reliability across networks (Spearman-Brown) and noise share",
                  "", _md(r[cols].drop_duplicates(), ".3g"), ""]
    if not cl.empty:
        cols = [c for c in ("model", "claim", "metric", "expected", "verdict", "estimate",
                            "ci_low", "ci_high", "detail") if c in cl.columns]
        lines += ["## The paper's claims", "", _md(cl[cols], ".3g"), ""]
    if not pfit.empty:
        lines += ["## Accuracy predicted from the margins vs the measured sweep", "",
                  _md(pfit, ".3g"), ""]
    if front is not None and not front.empty:
        f = front.assign(**{c: [f"{m:.4f} [{lo:.4f}, {hi:.4f}]" if np.isfinite(lo) else
                                f"{m:.4f}" for m, lo, hi in zip(front[c], front[f"{c}_low"],
                                                                front[f"{c}_high"], strict=True)]
                            for c in ("clean", "tolerant")})
        lines += [f"## Recipes: clean accuracy vs accuracy at BER {FRONT_BER:g} (mean over "
                  "seeds [95 % t-interval]; on_front: not dominated within the architecture)",
                  "", _md(f[["arch", "model", "train_ber", "n", "clean", "tolerant",
                             "on_front"]]), ""]
    if psum is not None and not psum.empty:
        p = psum.assign(gain=[f"{g:+.4f} [{lo:+.4f}, {hi:+.4f}]" for g, lo, hi in
                              zip(psum["gain"], psum["gain_low"], psum["gain_high"],
                                  strict=True)])
        lines += ["## Protection guided by each ranking: AUC gain over random protection "
                  "(accuracy, mean over the protected fractions; mean over networks [95 % "
                  "interval]; n_better / n_worse: networks whose own bootstrap interval is "
                  "above / below 0)", "",
                  _md(p[["arch", "model", "unit", "ber", "ranking", "n", "gain", "n_better",
                         "n_worse"]]), ""]
    if contrast is not None and not contrast.empty:
        c = contrast.assign(diff=[f"{g:+.4f} [{lo:+.4f}, {hi:+.4f}]" for g, lo, hi in
                                  zip(contrast["diff"], contrast["diff_low"],
                                      contrast["diff_high"], strict=True)])
        a, b = contrast["a"].iloc[0], contrast["b"].iloc[0]
        lines += [f"## {a} vs {b} as a guide, per network (AUC({a}) - AUC({b}) [95 % "
                  "bootstrap interval over maps])", "",
                  _md(c[["model_id", "unit", "ber", "diff", "a_better", "b_better"]]), ""]
    return "\n".join(lines)


def write(
    results_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    echo: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the HTML report of the study in ``results_dir`` (default ``report.html`` there)
    and its tables (:data:`SIDE_FILES`) beside it.

    Every output is checked before the analysis starts: none may be a table the report reads
    (``results_dir/models.csv`` ...; not even with ``overwrite``), and an existing one is
    replaced only if the report wrote it (recognized by its header or title) or ``overwrite``.

    Args:
        results_dir: output directory of :func:`bnn_tol.study.run`.
        out: the HTML file to write.
        n_boot, seed: bootstrap resamples and seed of the correlation intervals.
        overwrite: replace outputs that the report did not write.

    Returns:
        The path of the report.

    Raises:
        ResultsMismatch: an output is an input, a table of the report's own, or a file the
            report did not write (without ``overwrite``). OutputError: it cannot be written.
    """

    say = echo or (lambda s: None)
    rd = Path(results_dir)
    out = Path(out) if out is not None else rd / "report.html"
    if out.name in SIDE_FILES:
        raise ResultsMismatch(f"{out}: the report writes its table {out.name} beside the HTML "
                              "file; choose another --out")
    n_boot = require_int(n_boot, "n_boot", minimum=0)
    if n_boot > MAX_N_BOOT:
        raise InvalidArgument(f"n_boot must be <= {MAX_N_BOOT}, got {n_boot}")
    inputs = [rd / f"{name}.csv" for name in _READS] + [rd / "study.json",
                                                         rd / "environment.json"]

    def replace(name: str):
        return True if overwrite else SIDE_FILES.get(name, _is_report)

    for path in (out, *(out.parent / name for name in SIDE_FILES)):
        check_output(path, inputs=inputs, replace=replace(path.name))

    def save(path: Path, write) -> None:
        atomic_write(path, write, inputs=inputs, replace=replace(path.name))

    def save_csv(df: pd.DataFrame, name: str) -> None:
        save(out.parent / name, lambda p: df.to_csv(p, index=False))

    res = load_results(rd)
    models, sweeps, metrics = res["models"], res["sweeps"], res["metrics"]
    metrics_all_splits = metrics
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
    try:
        curve = analysis.correlate_curve(metrics, sweeps, predictions=res["predictions"],
                                         n_test=_n_test(cfg), n_boot=n_boot, seed=seed)
    except InvalidArgument as e:  # e.g. no BER 0 in the sweep
        say(f"[report] correlation curve skipped: {e}")
        curve = pd.DataFrame(columns=["model", "metric", "layer", "ber", "kind", "method", "r",
                                      "ci_low", "ci_high", "n", "n_boot_valid"])
    rel = analysis.reliability(metrics_all_splits, n_boot=n_boot, seed=seed)
    cl = analysis.claims(metrics, curve, rel=rel, n_boot=n_boot, seed=seed)
    pfit = (analysis.prediction_fit(res["predictions"], sweeps) if not res["predictions"].empty
            else pd.DataFrame())
    front, psum, contrast = _protection_tables(res, sweeps, n_boot=n_boot, seed=seed)
    save_csv(curve, "correlation_curve.csv")
    save_csv(rel, "reliability.csv")
    save_csv(cl, "claims.csv")
    if not pfit.empty:
        save_csv(pfit, "prediction_fit.csv")
    for df, name in ((front, "recipe_front.csv"), (psum, "protection_summary.csv"),
                     (contrast, "ranking_contrast.csv")):
        if not df.empty:
            save_csv(df, name)
    summary = markdown_summary(rd, res, curve, rel, cl, pfit, front, psum, contrast)
    save(out.parent / "summary.md", lambda p: Path(p).write_text(summary, encoding="utf-8"))
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
    save_csv(corr, "correlations.csv")
    save_csv(reg, "regression.csv")
    save_csv(comp, "comparison.csv")

    rel_names = rel["metric"] if "metric" in rel.columns else []
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>bnn_tol study "
             f"{html.escape(str(cfg.get('name', rd.name)))}</title><style>{_CSS}</style>"
             "</head><body>",
             f"<h1>Bit error tolerance study: {html.escape(str(cfg.get('name', rd.name)))}</h1>",
             f"<p class='note'>{html.escape(str(cfg.get('description', '')))} &mdash; results "
             f"from <code>{html.escape(str(rd))}</code>.</p>",
             "<h2>Summary</h2><ul class='summary'>",
             *[f"<li>{s}</li>" for s in summarize(res, corr, reg, comp)],
             *[f"<li>{s}</li>" for s in _claims_html(cl)],
             *[f"<li>{s}</li>" for s in warnings_html(
                 rel, [*schema.report_metrics("curve", rel_names),
                       *schema.report_metrics("headline", rel_names),
                       *set(cl["metric"])])], "</ul>"]

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
    shown = schema.report_metrics("curve", curve["metric"])
    figs.append(("Correlation with accuracy across the BER range",
                 "Spearman correlation of each metric with accuracy at each evaluation BER, "
                 "per architecture; band: 95 % bootstrap interval (networks resampled, metric "
                 "and accuracy perturbed by their standard errors).",
                 lambda: plots.rho_vs_ber(curve, metrics=shown or None)))
    for mname in _pick(net_metrics, schema.report_metrics("scatter")):
        figs.append((f"{mname} vs accuracy at BER {top:g}",
                     "One point per network, one panel per architecture, colour = training "
                     "BER (no line pooled across architectures).",
                     lambda m=mname: plots.metric_scatter_by_model(metrics, sweeps, metric=m,
                                                                   ber=top)))
    if not front.empty:
        figs.append((f"Recipes: clean accuracy vs accuracy at BER {FRONT_BER:g}",
                     "One line per model group (with a recipe axis: per recipe) through its "
                     "training BERs; bars: 95 % t-interval over seeds; hollow: off the Pareto "
                     "front of its architecture.",
                     lambda: plots.recipe_front(front, ber=FRONT_BER)))
    if not psum.empty:
        figs.append(("Metric-guided protection: AUC gain over random",
                     "Per ranking and BER: the mean over networks of the area under the "
                     "protection curve minus random's; bars: 95 % interval over networks (one "
                     "network: its bootstrap interval over maps and random seeds).",
                     lambda: plots.protection_gain(psum)))
    for mid in _protection_examples(res["protection"]):
        figs.append((f"Protection curves of {mid}",
                     "Accuracy vs the protected fraction of stored bits, one line per ranking "
                     "(random: seeds pooled); band: 95 % over fault maps.",
                     lambda mid=mid: plots.protection(
                         analysis.network_curve(res["protection"], mid))))
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
    ct = curve_table(curve, rel)
    if not ct.empty:
        parts += ["<h3>Spearman &rho; with accuracy (95 % interval) at 5, 10 and 20 % BER</h3>",
                  "<p class='note'>Per architecture; intervals resample networks and include "
                  "the metric's standard error and the accuracy noise (fault maps and binomial "
                  "test-image noise). <i>warning</i>: low split-half reliability or high noise "
                  "share. Every BER and kind (partial given clean accuracy, within training "
                  "BER) is in <code>correlation_curve.csv</code>.</p>", _table(ct)]
    if not cl.empty:
        parts += ["<h3>The paper's claims</h3>",
                  "<p class='note'>(a): flip-trained (largest training BER) minus normal, "
                  "bootstrap CI; holds if it excludes 0 in the expected direction. (b): holds "
                  "if the interval of &rho; excludes 0 with the expected sign at every BER, at "
                  "high BER only if at every BER of the upper half of the range.</p>",
                  _table(cl)]
    if not rel.empty:
        parts += ["<h3>Split-half reliability across networks (network level)</h3>",
                  _table(rel[rel.layer == "network"].drop(columns=["layer"]))]
    if not pfit.empty:
        parts += ["<h3>Accuracy predicted from margins vs measured</h3>",
                  "<p class='note'>Pairs (network, BER); R&sup2; of the prediction as is."
                  "</p>", _table(pfit)]
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
    page = "\n".join(parts)
    save(out, lambda p: Path(p).write_text(page, encoding="utf-8"))
    say(f"[report] written to {out}")
    return out
