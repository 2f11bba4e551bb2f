"""``chip:<profile.npz>``: a profiled chip behind the error-model registry. Its rate axis is the
fraction of failing cells (rate p(V) fails exactly the cells failing at voltage V), its map
axis the placement (seed s = offset s mod n_cells): sweep rows equal the profile sweep's
(V, offset) rows and a naive deepcopy-and-write loop, and replay alone."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bnn_tol import errors, evaluate
from bnn_tol import profile as prof
from bnn_tol.cli import main
from bnn_tol.interop import checkpoint


@pytest.fixture(scope="module")
def chip(tmp_path_factory):
    p = prof.synthetic_profile(rows=64, cols=16, n_arrays=4, seed=5, v_mean=0.85, v_sd=0.06,
                               voltages=[1.3, 0.9, 0.85, 0.8, 0.75])
    path = tmp_path_factory.mktemp("chip") / "chip.npz"
    prof.save_profile(p, path)
    return p, str(path)


def test_rate_p_of_v_fails_exactly_the_cells_failing_at_v_and_rates_are_nested(chip):
    p, _ = chip
    u = prof.failure_rank(p)
    prev = np.zeros(p.n_cells, dtype=bool)
    for v in p.voltages:
        rate = prof.voltage_rate(p, v)
        assert rate == p.cell_error_rate().set_index("voltage").loc[v, "failing"]
        fails = u < rate
        assert np.array_equal(fails, p.failing(v))
        assert not (prev & ~fails).any()
        prev = fails
    # ties in v_fail and never-failing cells
    t = prof.Profile(np.array([1.0, 0.5]), 1, 4, 1, np.array([0.7, 0.7, -np.inf, 0.9],
                                                            np.float32), np.zeros(4, np.uint8))
    assert prof.failure_rank(t).tolist() == [0.25, 0.25, 1.0, 0.0]
    assert (prof.failure_rank(t) < prof.voltage_rate(t, 0.5)).tolist() == [True, True, False,
                                                                           True]


def _naive(model, test, profile, v, offset) -> float:
    """Copy the model; every bit whose cell fails at v reads flip_to (written as the weight)."""
    m = copy.deepcopy(model)
    layers = list(m.binary_layers().values())
    bits = torch.cat([lay.stored_bits() for lay in layers]).numpy()
    c = prof.cells(bits.size, profile, offset)
    read = np.where(profile.failing(v)[c], profile.flip_to[c], bits)
    start = 0
    for lay in layers:
        n = lay.weight.numel()
        w = torch.from_numpy(read[start:start + n].astype(np.float32) * 2 - 1)
        lay.weight.data = w.view_as(lay.weight)
        start += n
    with torch.no_grad():
        pred = torch.cat([m(x).argmax(1) for x, _ in test.batches(500)])
    return float((pred == test.labels).double().mean())


def test_chip_sweep_rows_are_the_profile_sweep_rows_and_the_naive_loop(fc, digits, chip):
    p, path = chip
    volts = [0.9, 0.85, 0.8, 0.75]
    rates = [prof.voltage_rate(p, v) for v in volts]
    df = evaluate.sweep(fc, digits, bers=rates, n_maps=3, seed=2, error=f"chip:{path}",
                        progress=False)
    offsets = [int(s) % p.n_cells for s in df.map_seed.unique()]
    ps = evaluate.profile_sweep(fc, digits, p, voltages=volts, offsets=offsets, progress=False)
    for v, r in zip(volts, rates, strict=True):
        got = df[df.ber == r].sort_values("map").accuracy.tolist()
        want = ps[ps.voltage == v].set_index("offset").loc[offsets, "accuracy"].tolist()
        assert got == want == [_naive(fc, digits, p, v, o) for o in offsets]
    assert df.accuracy.iloc[-3:].mean() < df.accuracy.iloc[:3].mean()
    for row in df.iloc[-3:].itertuples():
        with errors.inject(fc, row.ber, seed=int(row.map_seed), error=f"chip:{path}"):
            assert evaluate.accuracy(fc, digits) == row.accuracy
    ref = evaluate.sweep(fc, digits, bers=rates[-1:], n_maps=3, seed=2, engine="reference",
                         error=errors.error_model(f"chip:{path}"), progress=False)
    assert ref.accuracy.tolist() == df.accuracy.iloc[-3:].tolist()


def test_chip_errors_refuse_what_a_profile_cannot_say(fc, digits, chip, tmp_path):
    _, path = chip
    with pytest.raises(ValueError, match="takes one rate p"):
        evaluate.sweep(fc, digits, bers=[(0.01, 0.02)], error=f"chip:{path}", progress=False)
    with pytest.raises(ValueError, match="weights only"):
        with errors.inject(fc, 0.01, error=f"chip:{path}", targets="thresholds"):
            pass
    with pytest.raises(ValueError, match="needs an argument: chip:<profile.npz>"):
        errors.error_model("chip")
    with pytest.raises(ValueError, match="not a bnn_tol profile"):
        errors.error_model(f"chip:{tmp_path / 'missing.npz'}")


def test_cli_sweep_error_chip(fc, digits, chip, tmp_path):
    p, path = chip
    run = tmp_path / "fc"
    checkpoint.save(fc, run)
    out = tmp_path / "s.csv"
    r = prof.voltage_rate(p, 0.8)
    res = CliRunner().invoke(main, ["sweep", str(run), "--bers", f"0,{r!r}", "--maps", "2",
                                    "--dataset", "digits", "--error", f"chip:{path}", "--quiet",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    df = evaluate.read_sweep(out)
    assert df.accuracy.tolist() == [_naive(fc, digits, p, np.inf if b == 0 else 0.8,
                                           int(s) % p.n_cells)
                                    for b, s in zip(df.ber, df.map_seed, strict=True)]
    res = CliRunner().invoke(main, ["sweep", str(run), "--bers", "0.1", "--dataset", "digits",
                                    "--error", f"chip:{tmp_path / 'nope.npz'}", "--quiet"])
    assert res.exit_code == 2 and "not a bnn_tol profile" in res.output
    assert len(res.output.strip().splitlines()) == 1
