"""BER sweeps: exact vs a naive reference, replay, determinism, statistics, resume, CLI."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from scipy import stats

import bnn_tol
import bnn_tol.engines.int8 as int8_engine
from bnn_tol import data, errors, evaluate, models, train


@pytest.fixture(scope="module")
def fc():
    tr = data.load("digits", "train")
    m = models.build("fc", seed=0, hidden=(96, 64), in_shape=(1, 8, 8))
    train.fit(m, tr, epochs=3, batch_size=64, progress=False)
    return m.eval()


@pytest.fixture(scope="module")
def vgg():
    tr = data.load("digits", "train")
    m = models.build("vgg3", seed=0, channels=((8,), (16,)), fc_width=32, in_shape=(1, 8, 8))
    train.fit(m, tr.subset(512), epochs=2, batch_size=64, progress=False)
    return m.eval()


def naive_accuracy(model, test, ber, seed, layers=None) -> float:
    """Obvious reference: copy the model, write -sign(w) at the map's flips, plain model(x)."""
    p01, p10 = errors.rates(ber)
    m = copy.deepcopy(model)
    maps = errors.draw_maps(model, seed, max(p01, p10), layers=layers)
    for name, layer in m.binary_layers().items():
        if name not in maps:
            continue
        wb = torch.where(layer.weight >= 0, 1.0, -1.0)
        idx = maps[name].flips(wb, p01, p10)
        w = layer.weight.detach().clone().view(-1)
        w[idx] = -wb.view(-1)[idx]  # not -w: -(0.0) is -0.0 and sign(-0.0) = +1
        layer.weight.data = w.view_as(layer.weight)
    with torch.no_grad():
        pred = torch.cat([m(x).argmax(1) for x, _ in test.batches(500)])
    return float((pred == test.labels).double().mean())


BERS = [0.0, 0.01, 0.05, (0.02, 0.15), 0.3]


@pytest.mark.parametrize("engine", ["int8", "fp32"])
def test_fc_sweep_equals_naive_loop_exactly(fc, digits, engine):
    df = evaluate.sweep(fc, digits, bers=BERS, n_maps=4, seed=3, engine=engine, progress=False,
                        batch_size=200)
    ref = [naive_accuracy(fc, digits, (a, b), s) for a, b, s in zip(df.p01, df.p10, df.map_seed,
                                                                     strict=True)]
    assert df["accuracy"].tolist() == ref
    assert df["accuracy"].nunique() > 3  # the errors did something


def test_vgg_sweep_equals_naive_loop_exactly(vgg, digits):
    df = evaluate.sweep(vgg, digits, bers=[0.02, 0.1, (0.0, 0.2)], n_maps=3, seed=1,
                        progress=False, maps_per_step=2, batch_size=150)
    ref = [naive_accuracy(vgg, digits, (a, b), s) for a, b, s in zip(df.p01, df.p10, df.map_seed,
                                                                      strict=True)]
    assert df["accuracy"].tolist() == ref
    assert df["accuracy"].nunique() > 2


@pytest.mark.parametrize("layers", ["hidden", [0], ["blocks.2.layer"]])
def test_layer_selection_and_clean_prefix_equal_naive(fc, digits, layers):
    for engine in ("int8", "fp32"):
        df = evaluate.sweep(fc, digits, bers=[0.05, 0.2], n_maps=2, seed=0, layers=layers,
                            engine=engine, progress=False)
        ref = [naive_accuracy(fc, digits, b, s, layers=layers) for b, s in zip(df.ber, df.map_seed,
                                                                               strict=True)]
        assert df["accuracy"].tolist() == ref, engine


def test_any_row_replays_alone_with_inject(fc, digits):
    df = evaluate.sweep({"a": fc}, digits, bers=[0.03, (0.1, 0.01)], n_maps=3, seed=5,
                        progress=False)
    for row in df.itertuples():
        with errors.inject(fc, (row.p01, row.p10), seed=row.map_seed):
            assert evaluate.accuracy(fc, digits) == row.accuracy


def test_tidy_columns_identical_for_identical_seeds_and_differ_otherwise(fc, digits):
    kw = dict(bers=[0, 0.05, 0.1], n_maps=5, progress=False)
    a = evaluate.sweep({"fc": fc, "fc2": fc}, digits, seed=0, **kw)
    b = evaluate.sweep({"fc": fc, "fc2": fc}, digits, seed=0, **kw)
    c = evaluate.sweep({"fc": fc, "fc2": fc}, digits, seed=1, **kw)
    assert list(a.columns) == evaluate.COLUMNS
    assert len(a) == 2 * 3 * 5
    pd.testing.assert_frame_equal(a, b)
    assert not a["accuracy"].equals(c["accuracy"])
    assert (a["rerr"] == 1 - a["accuracy"]).all()
    assert a[a.ber == 0]["accuracy"].nunique() == 1
    assert a[a.ber == 0]["accuracy"].iloc[0] == evaluate.accuracy(fc, digits)
    # the same chips for both models: identical rows for identical weights
    assert a[a.model == "fc"]["accuracy"].tolist() == a[a.model == "fc2"]["accuracy"].tolist()


def test_summarize_by_hand():
    df = pd.DataFrame({"model": ["m"] * 3 + ["m"], "ber": [0.1] * 3 + [0.2],
                       "p01": [0.1] * 3 + [0.2], "p10": [0.1] * 3 + [0.2],
                       "accuracy": [0.5, 0.7, 0.9, 0.4]})
    s = evaluate.summarize(df)
    r = s.iloc[0]
    assert r["mean"] == pytest.approx(0.7) and r["std"] == pytest.approx(0.2)
    half = stats.t.ppf(0.975, 2) * 0.2 / np.sqrt(3)
    assert r["ci_low"] == pytest.approx(0.7 - half) and r["ci_high"] == pytest.approx(0.7 + half)
    assert r["n"] == 3
    assert s.iloc[1]["ci_low"] == s.iloc[1]["ci_high"] == 0.4


def test_bad_inputs_give_clear_errors(fc, digits):
    with pytest.raises(ValueError, match="empty"):
        evaluate.sweep(fc, digits, bers=[], progress=False)
    with pytest.raises(ValueError, match="outside"):
        evaluate.sweep(fc, digits, bers=[0.1, 1.2], progress=False)
    with pytest.raises(ValueError, match="unknown layer"):
        evaluate.sweep(fc, digits, bers=[0.1], layers=["blocks.9.layer"], progress=False)
    with pytest.raises(ValueError, match="no binary layers"):
        evaluate.sweep(torch.nn.Sequential(torch.nn.Linear(64, 10)), digits, bers=[0.1],
                       progress=False)
    with pytest.raises(ValueError, match="n_maps"):
        evaluate.sweep(fc, digits, bers=[0.1], n_maps=0, progress=False)


def test_reference_engine_for_activation_targets_matches_inject(fc, digits):
    df = evaluate.sweep(fc, digits, bers=[0.05], n_maps=2, seed=0, targets=("activations",),
                        progress=False)
    for row in df.itertuples():
        with errors.inject(fc, row.ber, seed=row.map_seed, targets="activations"):
            assert evaluate.accuracy(fc, digits) == row.accuracy


def test_interrupted_sweep_resumes_to_identical_results(fc, digits, tmp_path):
    bers = [0, 0.02, 0.05, 0.1]
    full = evaluate.sweep(fc, digits, bers=bers, n_maps=3, seed=2, progress=False)
    out = tmp_path / "s.csv"
    evaluate.sweep(fc, digits, bers=bers[:2], n_maps=3, seed=2, progress=False, out=out)
    with open(out, "a") as fh:  # a torn row from a killed process
        fh.write("fc,0.05,0.05,0.05,0,123,0.9")
    with pytest.raises(ValueError, match="resume"):
        evaluate.sweep(fc, digits, bers=bers, n_maps=3, seed=2, progress=False, out=out)
    res = evaluate.sweep(fc, digits, bers=bers, n_maps=3, seed=2, progress=False, out=out,
                         resume=True)
    pd.testing.assert_frame_equal(res, full)
    on_disk = pd.read_csv(out)
    assert len(on_disk) == len(full)
    pd.testing.assert_frame_equal(on_disk, full, check_dtype=False)


def test_cli_sweep_resume_and_plot(fc, digits, tmp_path):
    run = tmp_path / "fcrun"
    bnn_tol.save(fc, run)
    out = tmp_path / "sw.csv"
    cli = bnn_tol.cli.main
    r = CliRunner().invoke(cli, ["sweep", str(run), "--dataset", "digits", "--bers",
                                 "0:0.1:0.05", "--maps", "2", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    df = pd.read_csv(out)
    assert sorted(df.ber.unique()) == [0.0, 0.05, 0.1] and set(df.model) == {"fcrun"}
    ref = evaluate.sweep({"fcrun": fc}, digits, bers=[0, 0.05, 0.1], n_maps=2, progress=False)
    assert df.accuracy.tolist() == ref.accuracy.tolist()
    r = CliRunner().invoke(cli, ["sweep", str(run), "--dataset", "digits", "--out", str(out)])
    assert r.exit_code != 0 and "resume" in r.output
    png = tmp_path / "a.png"
    r = CliRunner().invoke(cli, ["plot", "sweep", str(out), "--out", str(png)])
    assert r.exit_code == 0, r.output
    assert Path(png).stat().st_size > 1000


FC_RUN = Path(__file__).resolve().parents[1] / "runs" / "fc"


@pytest.mark.slow
@pytest.mark.skipif(not (FC_RUN / "config.json").exists(), reason="runs/fc not trained")
def test_fashion_fc_int8_sweep_equals_naive_loop():
    test = data.load("fashion-mnist", "test").subset(3000)
    model = bnn_tol.load(FC_RUN)
    df = evaluate.sweep(model, test, bers=[0.01, 0.1], n_maps=2, seed=0, progress=False)
    ref = [naive_accuracy(model, test, b, s) for b, s in zip(df.ber, df.map_seed, strict=True)]
    assert df["accuracy"].tolist() == ref


def test_sweep_keeps_training_mode_and_matches_eval_semantics(fc, digits):
    ref = evaluate.sweep(fc, digits, bers=[0.05], n_maps=2, seed=0, progress=False)
    fc.train()
    try:
        df = evaluate.sweep(fc, digits, bers=[0.05], n_maps=2, seed=0, progress=False)
        assert fc.training
    finally:
        fc.eval()
    assert df["accuracy"].tolist() == ref["accuracy"].tolist()


def test_plot_has_one_mean_line_and_band_per_model(fc, digits):
    df = evaluate.sweep({"a": fc, "b": fc}, digits, bers=[0, 0.1], n_maps=3, progress=False)
    fig = bnn_tol.plots.sweep(df)
    ax = fig.axes[0]
    assert len(ax.lines) == 2 and len(ax.collections) == 2
    means = evaluate.summarize(df).query("model == 'a'")["mean"].tolist()
    assert ax.lines[0].get_ydata().tolist() == means


@pytest.mark.parametrize("fast", [True, False])
def test_auto_engine_picks_int8_only_on_cpus_with_a_fast_int8_product(monkeypatch, fc, digits,
                                                                      fast):
    # torch._int_mm without VNNI was measured ~30x slower than fp32: auto must not pick it there
    # (the packed engine comes first where numba is installed; here it is taken away)
    from bnn_tol.core import kernels

    monkeypatch.setattr(kernels, "AVAILABLE", False)
    monkeypatch.setattr(int8_engine, "int8_is_fast", lambda: fast)
    cls = evaluate.pick_engine(fc, device="cpu", engine="auto", targets=("weights",))
    assert cls.name == ("int8" if fast else "fp32")
