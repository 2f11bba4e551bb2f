"""The BNN case is unchanged by the storage-model refactor (issue 11), bit for bit.

``tests/data/bnn_golden/`` was written by ``tests/data/make_bnn_golden.py`` at commit 5d56695,
before codecs existed. Here the same script runs with the current code and its outputs are
compared: fault maps, map seeds, injected weights, transient draws and sweep rows bit for bit on
any machine (integer and seeded CPU arithmetic); metric tables bit for bit on the recording CPU
and thread count, elsewhere within ``1e-5`` relative (float32 loss terms summed over <= 300
images: ~300 * 2^-24 ~ 2e-5 of a term, well inside); trained weights only on the recording CPU
with one thread (float training has no tolerance that bounds its drift).
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
    before = pd.read_csv(GOLDEN / "sweeps.csv")
    after = pd.read_csv(now / "sweeps.csv")
    # sweeps gained bits_per_weight / memory_bits columns; every column that existed is equal
    pd.testing.assert_frame_equal(before, after[before.columns], check_exact=True)
    assert (after["bits_per_weight"] == 1).all()


@pytest.mark.parametrize("name", ["margin.csv", "margin_summary.csv", "importance.csv"])
def test_metric_tables_are_unchanged(now, name):
    before = pd.read_csv(GOLDEN / name)
    after = pd.read_csv(now / name)
    if _same_machine():
        assert (GOLDEN / name).read_bytes() == (now / name).read_bytes()
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
