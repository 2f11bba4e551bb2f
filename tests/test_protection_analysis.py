"""Study-level analysis of issue 21: the recipe front, the protection summary and the
importance-vs-margin contrast, each against a slow obvious reference; and the README figures
script on a finished study."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bnn_tol import schema
from bnn_tol.study import analysis
from bnn_tol.study import protection as prot
from bnn_tol.study import runner as study

ROOT = Path(__file__).resolve().parents[1]


def _sweeps(seed=0):
    """A synthetic study sweep: 2 recipes x 3 training BERs x 3 seeds, BERs 0 / 0.1, 4 maps."""
    rng = np.random.default_rng(seed)
    rows = []
    for model, tb, s in itertools.product(("fc-all", "fc-hidden"), (0.0, 0.1, 0.2), range(3)):
        for ber, k in itertools.product((0.0, 0.1), range(4)):
            rows.append({"model_id": f"{model}_ber{tb:g}_s{s}", "model": model, "arch": "fc",
                         "train_ber": tb, "train_seed": s, "ber": ber, "p01": ber, "p10": ber,
                         "map": k, "map_seed": k, "accuracy": rng.uniform(0.5, 0.9),
                         "rerr": 0.0, "bits_per_weight": 1.0, "memory_bits": 100})
    return pd.DataFrame(rows)


def test_recipe_front_means_intervals_and_domination_by_brute_force():
    sw = _sweeps()
    front = analysis.recipe_front(sw, ber=0.1)
    assert len(front) == 6 and (front["n"] == 3).all()
    per_net = sw.groupby(["model_id", "model", "train_ber", "ber"])["accuracy"].mean()
    for r in front.itertuples():
        for col, ber in (("clean", 0.0), ("tolerant", 0.1)):
            v = np.array([per_net[(f"{r.model}_ber{r.train_ber:g}_s{s}", r.model, r.train_ber,
                                   ber)] for s in range(3)])
            half = stats.t.ppf(0.975, 2) * v.std(ddof=1) / np.sqrt(3)
            assert getattr(r, col) == pytest.approx(v.mean(), rel=1e-12)
            assert getattr(r, f"{col}_low") == pytest.approx(v.mean() - half, rel=1e-12)
    pts = front[["clean", "tolerant"]].to_numpy()
    for i, p in enumerate(pts):
        dominated = any((q >= p).all() and (q > p).any() for j, q in enumerate(pts) if j != i)
        assert front["on_front"].iloc[i] == (not dominated)
    assert front["on_front"].any()


def test_recipe_front_never_compares_architectures():
    sw = _sweeps()
    other = sw.assign(arch="vgg3", model=sw["model"].str.replace("fc", "vgg3"),
                      model_id=sw["model_id"].str.replace("fc", "vgg3"),
                      accuracy=sw["accuracy"] + 1.0)  # dominates everything of fc, if pooled
    front = analysis.recipe_front(pd.concat([sw, other], ignore_index=True).assign(
        accuracy=lambda d: d["accuracy"].clip(upper=1.0)), ber=0.1)
    assert front[front.arch == "fc"]["on_front"].any()


def _auc_table(seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for mid, (model, tb) in enumerate(itertools.product(("fc-a", "fc-b"), (0.0, 0.1, 0.2))):
        for ber, rank in itertools.product((0.05, 0.1), ("margin", "importance", "random:0")):
            g = rng.normal(0.01, 0.02)
            rows.append({"model_id": f"n{mid}", "model": model, "arch": "fc", "train_ber": tb,
                         "train_seed": 0, "unit": "neuron", "ber": ber, "ranking": rank,
                         "auc": 0.7 + g, "gain": g, "gain_low": g - 0.01, "gain_high": g + 0.01,
                         "better_than_baseline": g - 0.01 > 0, "n_maps": 5, "n_baseline": 1})
    return pd.DataFrame(rows)


def test_protection_summary_is_the_t_interval_over_networks():
    auc = _auc_table()
    s = analysis.protection_summary(auc)
    assert len(s) == 2 * 2 * 3
    for r in s.itertuples():
        g = auc[(auc.model == r.model) & (auc.ber == r.ber) & (auc.ranking == r.ranking)]
        v = g["gain"].to_numpy()
        half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
        assert (r.n, r.gain) == (3, pytest.approx(v.mean(), rel=1e-12))
        assert (r.gain_low, r.gain_high) == (pytest.approx(v.mean() - half, rel=1e-12),
                                             pytest.approx(v.mean() + half, rel=1e-12))
        assert r.n_better == int(g["better_than_baseline"].sum())
        assert r.n_worse == int((g["gain_high"] < 0).sum())
    one = analysis.protection_summary(auc[auc.model_id == "n0"])  # one network: its interval
    row = auc[auc.model_id == "n0"].iloc[0]
    hit = one[(one.ber == row.ber) & (one.ranking == row.ranking)].iloc[0]
    assert (hit.gain_low, hit.gain_high) == (row.gain_low, row.gain_high)


def test_ranking_contrast_is_auc_with_the_other_ranking_as_baseline(tmp_path):
    res = study.run("tiny", tmp_path, echo=None, overrides={
        "train": {"seeds": [0], "bers": [0.2], "epochs": 2}, "eval": {"bers": [0.0, 0.2],
                                                                      "n_maps": 2},
        "protection": {"rankings": ["importance", "margin", "random:0"],
                       "fractions": [0.0, 0.3, 1.0], "bers": [0.2], "n_maps": 3}})
    curve = pd.read_csv(res["out"] + "/protection.csv")
    c = analysis.ranking_contrast(curve, a="importance", b="margin", n_boot=300, seed=1)
    assert len(c) == 1
    one = curve.assign(model=curve["model_id"])[schema.columns("protection")]
    ref = prot.protection_auc(one[one.ranking.isin(["importance", "margin"])],
                              baseline="margin", n_boot=300, seed=1)
    ref = ref[ref.ranking == "importance"].iloc[0]
    assert (c["diff"].iloc[0], c["diff_low"].iloc[0], c["diff_high"].iloc[0]) == (
        ref.gain, ref.gain_low, ref.gain_high)
    # by hand: the trapezoid areas of the two mean curves over the fractions
    m = curve.groupby(["ranking", "fraction"])["accuracy"].mean()
    f = np.array([0.0, 0.3, 1.0])
    area = {r: np.trapezoid(m[r].reindex(f).to_numpy(), f) for r in ("importance", "margin")}
    assert c["diff"].iloc[0] == pytest.approx(area["importance"] - area["margin"], abs=1e-12)
    # and the README figures of that study: every figure written, provenance recorded
    figs = tmp_path.parent / f"{tmp_path.name}_figs"  # not inside the study it reads
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "readme_figures.py"), "--out",
                          str(figs), str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    names = sorted(p.name for p in figs.iterdir())
    assert {"tiny_accuracy.png", "tiny_mean_margin_norm.png", "tiny_protection.png",
            "tiny_protection_curves.png", "figures.json"} <= set(names)
    rec = json.loads((figs / "figures.json").read_text())
    assert rec["figures"]["tiny_accuracy.png"]["environment"]["git_commit"]
    assert {"cpu", "torch_threads"} <= set(rec["environment"])
    again = subprocess.run([sys.executable, str(ROOT / "scripts" / "readme_figures.py"),
                            "--out", str(figs), str(tmp_path)], capture_output=True, text=True,
                           cwd=ROOT)
    assert again.returncode == 0, again.stderr  # its own figures and record are replaced
    # a foreign file of a figure's name is refused
    (figs / "tiny_accuracy.png").write_text("my notes")
    again = subprocess.run([sys.executable, str(ROOT / "scripts" / "readme_figures.py"),
                            "--out", str(figs), str(tmp_path)], capture_output=True, text=True,
                           cwd=ROOT)
    assert again.returncode == 2 and "tiny_accuracy.png" in again.stderr
    assert (figs / "tiny_accuracy.png").read_text() == "my notes"
