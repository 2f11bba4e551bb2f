"""Profiled chips: file format, layout, nested failures, p01 != p10, energy, CLI (issue 11)."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import bnn_tol
from bnn_tol import evaluate, models
from bnn_tol import profile as prof
from bnn_tol.cli import main
from bnn_tol.data import BNNDataset
from bnn_tol.exceptions import InvalidArgument


def _tiny(v_fail, flip_to, voltages=(1.0, 0.9, 0.8), rows=2, cols=4, n_arrays=2):
    return prof.Profile(np.asarray(voltages, np.float64), rows, cols, n_arrays,
                        np.asarray(v_fail, np.float32), np.asarray(flip_to, np.uint8))


def _data(n=200, seed=0, shape=(1, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    return BNNDataset(torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8),
                      torch.randint(0, 10, (n,), generator=g), name="synthetic")


def test_layout_interleaves_words_across_arrays():
    p = _tiny(np.full(16, -np.inf), np.zeros(16))
    # words of 4 bits: w0 -> array 0 row 0, w1 -> array 1 row 0, w2 -> array 0 row 1, ...
    assert prof.cells(16, p).tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15]
    assert prof.cells(3, p, offset=4).tolist() == [8, 9, 10]
    assert prof.cells(18, p)[16:].tolist() == [0, 1]  # a larger model wraps around the chip


def test_profile_flips_follow_cells_and_stored_values():
    model = models.build("fc", hidden=(2,), in_shape=(1, 2, 2), n_classes=2)  # 8 + 4 weights
    bits = torch.cat([lay.stored_bits() for lay in model.binary_layers().values()])
    v_fail = np.full(16, -np.inf)
    flip_to = np.zeros(16)
    cell = prof.cells(12, _tiny(v_fail, flip_to))
    # bit 0 and bit 9 sit in failing cells that read the opposite of what they store
    for k, v in ((0, 0.95), (9, 0.85)):
        v_fail[cell[k]] = v
        flip_to[cell[k]] = 1 - int(bits[k])
    # bit 5 sits in a failing cell that reads what it stores: no flip
    v_fail[cell[5]], flip_to[cell[5]] = 0.95, int(bits[5])
    p = _tiny(v_fail, flip_to)
    f = profile_flips_list(model, p, 1.0)
    assert f == {"blocks.0.layer": [], "blocks.1.layer": []}
    assert profile_flips_list(model, p, 0.9) == {"blocks.0.layer": [0], "blocks.1.layer": []}
    assert profile_flips_list(model, p, 0.8) == {"blocks.0.layer": [0], "blocks.1.layer": [1]}


def profile_flips_list(model, p, v):
    return {n: i.tolist() for n, i in prof.profile_flips(model, p, v).items()}


def test_synthetic_profile_is_seeded_nested_and_asymmetric():
    a = prof.synthetic_profile(rows=64, cols=64, n_arrays=8, seed=3, to_one=0.2)
    b = prof.synthetic_profile(rows=64, cols=64, n_arrays=8, seed=3, to_one=0.2)
    c = prof.synthetic_profile(rows=64, cols=64, n_arrays=8, seed=4, to_one=0.2)
    assert np.array_equal(a.v_fail, b.v_fail) and np.array_equal(a.flip_to, b.flip_to)
    assert not np.array_equal(a.v_fail, c.v_fail)
    rate = a.cell_error_rate()
    assert rate["failing"].iloc[0] == 0.0 and 0.005 < rate["failing"].iloc[-1] < 0.06
    model = models.build("fc", hidden=(64,), in_shape=(1, 8, 8), weight_bits=4)
    prev = None
    for v in a.voltages:
        fl = {n: set(i.tolist()) for n, i in prof.profile_flips(model, a, float(v)).items()}
        if prev is not None:
            assert all(prev[n] <= fl[n] for n in fl)  # nested: failures only grow
        prev = fl
    df = evaluate.profile_sweep({"q4": model}, _data(50, shape=(1, 8, 8)), a, offsets=(0, 5000),
                            progress=False)
    low = df[df.voltage == df.voltage.min()]
    # a failing cell reads 1 with probability 0.2: stored 0s flip ~4x less than stored 1s
    assert (low.p01_realized < low.p10_realized / 2).all()
    assert (low.p01_realized > 0).all()


def test_profile_sweep_equals_the_naive_flipped_copy():
    ds = _data(300)
    model = models.build("fc", hidden=(16,), in_shape=(1, 4, 4), seed=1)
    chip = prof.synthetic_profile(rows=16, cols=16, n_arrays=2, v_mean=0.85, v_sd=0.05, seed=0)
    df = evaluate.profile_sweep(model, ds, chip, offsets=(0, 7), progress=False)
    for _, r in df.sample(6, random_state=0).iterrows():
        naive = copy.deepcopy(model)
        fl = prof.profile_flips(model, chip, r.voltage, offset=int(r.offset))
        with torch.no_grad():
            for n, lay in naive.binary_layers().items():
                w = lay.weight.view(-1)
                w[fl[n]] = -torch.where(w[fl[n]] >= 0, 1.0, -1.0)  # flip the sign bit
        assert evaluate.accuracy(naive, ds) == r.accuracy
    for _, g in df.groupby("offset"):  # nested failures: the rate never drops as V falls
        assert g.sort_values("voltage", ascending=False)["ber_realized"].is_monotonic_increasing


def test_energy_is_normalized_to_the_lowest_error_free_voltage():
    e = prof.energy([1.0, 0.9, 0.8], reference=1.0)
    assert np.allclose(e, [1.0, 0.81, 0.64])
    assert np.allclose(prof.energy([1.0, 0.9], reference=0.9, table=[5.0, 4.0]), [1.25, 1.0])
    with pytest.raises(InvalidArgument):
        prof.energy([1.0, 0.9], reference=0.8, table=[5.0, 4.0])
    df = pd.DataFrame({"model": "m", "voltage": [1.0, 0.9, 0.8, 0.7], "offset": 0,
                       "accuracy": [0.90, 0.895, 0.885, 0.5], "clean_accuracy": 0.9,
                       "energy": [1.0, 0.81, 0.64, 0.49]})
    s = evaluate.summary_energy(df, tolerance=0.01)
    assert s["voltage"].iloc[0] == 0.9 and s["energy_saving"].iloc[0] == pytest.approx(0.19)
    s = evaluate.summary_energy(df, tolerance=[0.001, 0.02, 0.5])
    assert list(s["voltage"]) == [1.0, 0.8, 0.7] and list(s["tolerance"]) == [0.001, 0.02, 0.5]
    assert np.isnan(evaluate.summary_energy(df.assign(accuracy=0.1), 0.01)["voltage"].iloc[0])


def test_energy_summary_needs_every_higher_voltage_within_tolerance_and_gives_the_spread():
    """A dip below the tolerance at 0.9 ends the search there, even though 0.8 recovers by
    chance; the accuracy at the chosen voltage is the mean over placements with its sd."""
    df = pd.DataFrame({"model": "m", "voltage": [1.0, 1.0, 0.9, 0.9, 0.8, 0.8],
                       "offset": [0, 1] * 3, "accuracy": [0.9, 0.9, 0.86, 0.87, 0.9, 0.89],
                       "clean_accuracy": 0.9, "energy": [1.0, 1.0, 0.81, 0.81, 0.64, 0.64]})
    s = evaluate.summary_energy(df, tolerance=0.02).iloc[0]
    assert s["voltage"] == 1.0 and s["energy_saving"] == 0 and s["n_placements"] == 2
    s = evaluate.summary_energy(df, tolerance=0.05).iloc[0]
    assert s["voltage"] == 0.8 and s["accuracy"] == pytest.approx(0.895)
    assert s["accuracy_sd"] == pytest.approx(np.std([0.9, 0.89], ddof=1))
    with pytest.raises(InvalidArgument, match="tolerance"):
        evaluate.summary_energy(df, tolerance=1.5)


def test_profile_file_round_trip_and_validation(tmp_path):
    chip = prof.synthetic_profile(rows=8, cols=8, n_arrays=2, seed=1)
    path = prof.save_profile(chip, tmp_path / "chip.npz")
    back = prof.load_profile(path)
    assert np.array_equal(back.v_fail, chip.v_fail) and back.rows == 8
    with np.load(path) as z:
        assert "format" in z.files  # a plain npz, no pickle
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros(3))
    with pytest.raises(InvalidArgument, match="not a bnn_tol profile"):
        prof.load_profile(bad)
    with pytest.raises(InvalidArgument, match="decreasing"):
        _tiny(np.zeros(16), np.zeros(16), voltages=(0.8, 0.9))
    with pytest.raises(InvalidArgument, match="flip_to"):
        _tiny(np.zeros(16), np.full(16, 2))
    with pytest.raises(InvalidArgument, match="entries"):
        _tiny(np.zeros(15), np.zeros(15))


def test_cli_profile_synth_sweep_and_plot(tmp_path):
    run = CliRunner()
    model = models.build("fc", hidden=(16,), in_shape=(1, 8, 8), n_classes=10)
    bnn_tol.save(model, tmp_path / "m")
    r = run.invoke(main, ["profile", "synth", "--out", str(tmp_path / "chip.npz"), "--rows",
                          "16", "--cols", "16", "--arrays", "2", "--v-mean", "0.85",
                          "--generator", "legacy"])
    assert r.exit_code == 0, r.output
    r = run.invoke(main, ["sweep", str(tmp_path / "m"), "--dataset", "digits", "--profile",
                          str(tmp_path / "chip.npz"), "--offsets", "0,100", "--out",
                          str(tmp_path / "chip.csv"), "--quiet"])
    assert r.exit_code == 0, r.output
    df = pd.read_csv(tmp_path / "chip.csv")
    assert len(df) == 11 * 2 and {"energy_saving", "memory_bits"} <= set(df.columns)
    r = run.invoke(main, ["plot", "energy", str(tmp_path / "chip.csv"), "--out",
                          str(tmp_path / "e.png")])
    assert r.exit_code == 0 and (tmp_path / "e.png").stat().st_size > 0
    # errors: one line, no traceback
    for args in (["sweep", str(tmp_path / "m"), "--profile", str(tmp_path / "chip.npz")],
                 ["sweep", str(tmp_path / "m"), "--profile", str(tmp_path / "e.png"), "--out",
                  str(tmp_path / "x.csv")],
                 ["profile", "synth", "--out", str(tmp_path / "chip.npz")],
                 ["plot", "energy", str(tmp_path / "e.png"), "--out", str(tmp_path / "f.png")]):
        r = run.invoke(main, args)
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert r.exit_code != 0 and len(lines) == 1 and lines[0].startswith("Error:"), r.output
