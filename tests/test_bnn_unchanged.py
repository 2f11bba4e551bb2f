"""The BNN case is unchanged by the storage-model refactor (issue 11), bit for bit.

``tests/data/bnn_golden/`` was written by ``tests/data/make_bnn_golden.py`` at commit 5d56695,
before codecs existed. Here the same script runs with the current code and its outputs are
compared: fault maps, map seeds, injected weights, transient draws and sweep rows bit for bit on
any machine (integer and seeded CPU arithmetic); metric tables bit for bit on the recording CPU
and thread count (the margin tables' standard-error columns within float64 rounding, see
:func:`_check_se_columns`), elsewhere within ``1e-5`` relative (float32 loss terms summed over
<= 300 images: ~300 * 2^-24 ~ 2e-5 of a term, well inside); trained weights only on the
recording CPU with one thread (float training has no tolerance that bounds its drift).

The golden files use the column names of their time; issue 19's schema renamed them
(:func:`_new_names`: ``seed`` -> ``map_seed``, ``se_X`` -> ``X_se``, ``se`` ->
``importance_se``). Only names are mapped; every number is compared as before.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bnn_tol.provenance import environment

GOLDEN = Path(__file__).parent / "data" / "bnn_golden"
SCRIPT = Path(__file__).parent / "data" / "make_bnn_golden.py"


@pytest.fixture(scope="module")
def now(tmp_path_factory) -> Path:
    spec = importlib.util.spec_from_file_location("make_bnn_golden", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path_factory.mktemp("golden_now")
    threads = torch.get_num_threads()
    try:
        mod.main(out)  # one thread, as recorded
    finally:
        torch.set_num_threads(threads)
    return out


def _new_name(c: str) -> str:
    """The schema's name of a golden column (issue 19)."""
    return {"seed": "map_seed", "se": "importance_se"}.get(
        c, f"{c[3:]}_se" if c.startswith("se_") else c)


def _new_names(df: pd.DataFrame) -> pd.DataFrame:
    return df.rename(columns=_new_name)


def _same_machine() -> bool:
    rec = json.loads((GOLDEN / "trained.json").read_text())
    env = environment(threads=1)
    return rec["cpu"] == env["cpu"] and rec["cpu_flags"] == env["cpu_flags"]


def test_fault_maps_injection_and_transient_draws_are_unchanged(now):
    before = json.loads((GOLDEN / "digests.json").read_text())
    after = json.loads((now / "digests.json").read_text())
    assert before.keys() == after.keys()
    diff = [k for k in before if before[k] != after[k]]
    assert not diff, f"{len(diff)} digests changed, e.g. {diff[:3]}"


def test_sweep_rows_are_unchanged(now):
    before = _new_names(pd.read_csv(GOLDEN / "sweeps.csv"))
    after = pd.read_csv(now / "sweeps.csv")
    assert "map_seed" in before.columns
    # sweeps gained bits_per_weight / memory_bits columns; every column that existed is equal
    pd.testing.assert_frame_equal(before, after[before.columns], check_exact=True)
    assert (after["bits_per_weight"] == 1).all()


def _se_columns(columns) -> list[str]:
    """Standard-error columns of the margin tables: float64 co-moment sums whose summation
    order changed with issue 13 (one fused product per batch, exact hidden-layer ``sxx`` from
    the histogram), so they keep only float64 rounding, not bytes."""
    return [c for c in columns if c.startswith("cov_") or c.endswith("_se")]


def _check_se_columns(before: pd.DataFrame, after: pd.DataFrame, name: str) -> None:
    """SE columns within float64 rounding. A sum of N = 300 products rounds by at most
    ~N eps = 7e-14 of the sum of |terms|: for ``se`` (sums of squares) that is relative; a
    covariance can cancel towards 0, so its error is bounded by the Cauchy-Schwarz scale
    ``se_j * se_aggregate`` instead (``|sxy| <= sqrt(sxx syy)``). Tolerances 1e-12 of those."""
    cols = _se_columns(before.columns)
    if name == "margin.csv":
        summary = pd.read_csv(GOLDEN / "margin_summary.csv").set_index("layer_index")
        for c in cols:
            b, a = before[c].to_numpy(float), after[c].to_numpy(float)
            assert (np.isnan(b) == np.isnan(a)).all(), c
            if c.endswith("_se"):
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=0, err_msg=c)
                continue
            stat = c.split("_", 2)[2]
            se_j = before[f"{stat}_se"].to_numpy(float)
            agg = (summary.loc[before["layer_index"], f"{stat}_se"].to_numpy(float)
                   if c.startswith("cov_layer") else summary.loc[-1, f"{stat}_se"])
            tol = 1e-12 * np.nan_to_num(se_j) * agg
            assert (np.abs(a - b) <= tol).all(), (c, np.abs(a - b).max())
    else:
        for c in cols:
            np.testing.assert_allclose(after[c].to_numpy(float), before[c].to_numpy(float),
                                       rtol=1e-12, atol=0, err_msg=c)


@pytest.mark.parametrize("name", ["margin.csv", "margin_summary.csv", "importance.csv"])
def test_metric_tables_are_unchanged(now, name):
    before = _new_names(pd.read_csv(GOLDEN / name))
    after = pd.read_csv(now / name)
    if _same_machine():
        if name == "importance.csv":  # byte for byte below the header (names mapped)
            head, body = (GOLDEN / name).read_bytes().split(b"\n", 1)
            new_head = ",".join(_new_name(c) for c in head.decode().split(","))
            assert new_head.encode() + b"\n" + body == (now / name).read_bytes()
        else:  # every column but the standard errors byte for byte (as printed)
            keep = [c for c in before.columns if c not in _se_columns(before.columns)]
            b_txt = _new_names(pd.read_csv(GOLDEN / name, dtype=str, keep_default_na=False))
            a_txt = pd.read_csv(now / name, dtype=str, keep_default_na=False)
            assert list(b_txt.columns) == list(a_txt.columns)
            pd.testing.assert_frame_equal(b_txt[keep], a_txt[keep], check_exact=True)
            _check_se_columns(before, after, name)
    else:
        pd.testing.assert_frame_equal(before, after, check_exact=False, rtol=1e-5)
    num = before.select_dtypes("number").columns
    assert np.isfinite(before[num].to_numpy(dtype=float)).any()


def test_trained_weights_are_unchanged(now):
    if not _same_machine():
        pytest.skip("trained weights are compared on the recording CPU only (float training)")
    before = json.loads((GOLDEN / "trained.json").read_text())["weights"]
    after = json.loads((now / "trained.json").read_text())["weights"]
    diff = [k for k in before if before[k] != after.get(k)]
    assert not diff, f"{len(diff)} trained tensors changed, e.g. {diff[:3]}"
