"""Protection (issue 21): protected stored bits never flip, on every engine and in inject; the
protection curves and their area against random protection."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
from _helpers import plain_accuracy
from click.testing import CliRunner
from scipy import stats

import bnn_tol
from bnn_tol import data, errors, evaluate, models, train
from bnn_tol.cli import main
from bnn_tol.exceptions import InvalidArgument, ResultsMismatch
from bnn_tol.faults import protect as shield
from bnn_tol.study import protection as prot


@pytest.fixture(scope="module")
def vgg():
    m = models.build("vgg3", seed=0, in_shape=(1, 8, 8), channels=((8,), (8,)), fc_width=24)
    train.fit(m, data.load("digits", "train"), epochs=2, batch_size=64, progress=False)
    return m.eval()


def _naive(model, test, ber, map_seed, masks):
    """Deepcopy, write the chip's flips except the protected bits into the weights, forward."""
    m = copy.deepcopy(model)
    maps = errors.draw_maps(m, map_seed, max(errors.rates(ber)))
    p01, p10 = errors.rates(ber)
    with torch.no_grad():
        for name, layer in errors.select_layers(m).items():
            w = torch.where(layer.weight >= 0, 1.0, -1.0)
            idx = maps[name].flips(w, p01, p10)
            if name in masks:
                idx = idx[~masks[name][idx]]
            flat = w.view(-1)
            flat[idx] = -flat[idx]
            layer.weight.copy_(w)
    return plain_accuracy(m, test)


@pytest.mark.parametrize("which", ["fc", "vgg"])
def test_protected_rows_equal_the_naive_loop_on_every_engine_and_replay(request, digits, which):
    model = request.getfixturevalue(which)
    order = prot.order(model, prot.scores(model, digits, "random:3"), "neuron")
    masks = shield.protection(model, order, 0.4)
    assert 0.3 < shield.protected_fraction(model, masks) <= 0.4
    bers = [0.05, (0.02, 0.1)]
    ref = None
    for engine in ("auto", "fp32", "reference"):
        df = evaluate.sweep(model, digits, bers=bers, n_maps=3, seed=1, engine=engine,
                            protect=masks, progress=False)
        if ref is None:
            ref = df
            naive = [_naive(model, digits, (r.p01, r.p10), r.map_seed, masks)
                     for r in df.itertuples()]
            assert df["accuracy"].tolist() == naive
        pd.testing.assert_frame_equal(df, ref)
    unprotected = evaluate.sweep(model, digits, bers=bers, n_maps=3, seed=1, progress=False)
    assert not unprotected["accuracy"].equals(ref["accuracy"])  # protection changes rows
    for r in ref.itertuples():
        with errors.inject(model, (r.p01, r.p10), seed=r.map_seed, protect=masks):
            assert evaluate.accuracy(model, digits) == r.accuracy


def test_all_protected_is_clean_and_none_protected_is_the_sweep(fc, digits):
    curve = prot.protection(fc, digits, rank=["importance", "random:0"], fractions=[0.0, 1.0],
                            bers=[0.1], n_maps=3, seed=2, progress=False)
    clean = evaluate.accuracy(fc, digits)
    sweep = evaluate.sweep(fc, digits, bers=[0.1], n_maps=3, seed=2, progress=False)
    for _, g in curve.groupby("ranking"):
        assert (g[g.fraction == 1.0]["accuracy"] == clean).all()
        assert (g[g.fraction == 1.0]["protected_fraction"] == 1.0).all()
        zero = g[g.fraction == 0.0].reset_index(drop=True)
        assert zero["accuracy"].tolist() == sweep["accuracy"].tolist()
        assert zero["map_seed"].tolist() == sweep["map_seed"].tolist()
        assert (zero["protected_fraction"] == 0.0).all()


def test_random_protection_of_a_fraction_spares_that_fraction_of_the_flips(fc):
    """Randomly protected weights at fraction f: each flip of the chip survives with
    probability 1 - f, so the surviving count is Binomial(F, 1 - f) given the F flips."""
    p, f = 0.1, 0.3
    order = prot.order(fc, prot.scores(fc, None, "random:5", unit="weight"), "weight")
    masks = shield.protection(fc, order, f)
    f_real = shield.protected_fraction(fc, masks)
    assert f - 0.001 < f_real <= f
    total = kept = 0
    for chip in errors.map_seeds(4, 20):
        maps = errors.draw_maps(fc, chip, p)
        for name, layer in errors.select_layers(fc).items():
            w = torch.where(layer.weight >= 0, 1.0, -1.0)
            idx = maps[name].flips(w, p, p)
            total += idx.numel()
            kept += int((~masks[name][idx]).sum()) if name in masks else idx.numel()
    test = stats.binomtest(kept, total, 1 - f_real)
    assert test.pvalue > 1e-3, (kept, total, f_real)


def test_units_cover_every_stored_bit_once(vgg):
    for unit in ("neuron", "weight"):
        us = shield.units(vgg, unit)
        for name, layer in errors.select_layers(vgg).items():
            spans = sorted((u.start, u.stop) for u in us if u.layer == name)
            assert spans[0][0] == 0 and spans[-1][1] == layer.n_stored_bits
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    full = shield.protection(vgg, shield.units(vgg), 1.0)
    assert shield.protected_fraction(vgg, full) == 1.0


@pytest.mark.parametrize("rank", ["importance", "importance:loss", "margin", "magnitude",
                                  "gradient", "flip_probability"])
def test_every_ranking_orders_all_units_and_puts_what_it_scores_first(vgg, digits, rank):
    s = prot.scores(vgg, digits, rank)
    order = prot.order(vgg, s)
    assert len(order) == len(shield.units(vgg)) == len({(u.layer, u.index) for u in order})
    vals = [s[u.layer][u.index] for u in order]
    assert vals == sorted(vals, reverse=True)
    if rank.startswith(("importance", "margin")):  # hidden neurons scored, the output last
        out = list(errors.select_layers(vgg))[-1]
        assert all(u.layer == out for u in order[-vgg.blocks[-1].layer.weight.shape[0]:])


def test_gradient_ranking_is_the_first_order_flip_effect(fc, digits):
    s = prot.scores(fc, digits, "gradient", unit="weight")
    x, y = next(digits.batches(len(digits)))
    name = list(errors.select_layers(fc))[-1]
    layer = errors.select_layers(fc)[name]
    wb = torch.where(layer.weight >= 0, 1.0, -1.0).requires_grad_(True)
    h = x
    with torch.enable_grad():
        for b in fc.blocks[:-1]:
            h = b(h).detach()
        z = fc.blocks[-1].bn(torch.nn.functional.linear(h, wb))
        g, = torch.autograd.grad(torch.nn.functional.cross_entropy(z, y), wb)
    np.testing.assert_allclose(s[name], (2 * g.abs()).reshape(-1).double().numpy(),
                               rtol=1e-5, atol=1e-9)


def test_protection_auc_matches_a_hand_computed_curve():
    fr = [0.0, 0.5, 1.0]
    rows = []
    for m in range(4):
        for f in fr:
            for r, acc in (("random:0", 0.5 + 0.2 * f), ("random:1", 0.5 + 0.2 * f),
                           ("good", 0.5 + 0.4 * f + 0.01 * m)):
                rows.append(dict(model="x", ranking=r, unit="neuron", fraction=f,
                                 protected_fraction=f, ber=0.1, p01=0.1, p10=0.1, map=m,
                                 map_seed=m, accuracy=acc, rerr=1 - acc))
    auc = prot.protection_auc(pd.DataFrame(rows)).set_index("ranking")
    # mean accuracy over f of 0.5 + a f (trapezoid, exact for a line) = 0.5 + a / 2
    assert auc.loc["random:0", "auc"] == pytest.approx(0.6)
    assert auc.loc["good", "auc"] == pytest.approx(0.7 + 0.015)
    assert auc.loc["good", "gain"] == pytest.approx(0.115)
    assert auc.loc["good", "gain_low"] <= 0.115 <= auc.loc["good", "gain_high"]
    assert auc.loc["good", "better_than_baseline"]
    assert auc.loc["random:0", "gain"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(InvalidArgument, match="random"):
        prot.protection_auc(pd.DataFrame(rows).query("ranking == 'good'"))


def test_bad_protections_and_rankings_are_refused_in_one_line(fc, digits):
    name = list(errors.select_layers(fc))[0]
    with pytest.raises(InvalidArgument, match="unknown layer"):
        evaluate.sweep(fc, digits, bers=[0.1], n_maps=1, protect={"nope": [0]}, progress=False)
    with pytest.raises(InvalidArgument, match="entries"):
        evaluate.sweep(fc, digits, bers=[0.1], n_maps=1, protect={name: torch.ones(3) > 0},
                       progress=False)
    with pytest.raises(InvalidArgument, match="outside"):
        errors.inject(fc, 0.1, protect={name: [10**9]}).__enter__()
    with pytest.raises(InvalidArgument, match="weight"):
        evaluate.sweep(fc, digits, bers=[0.1], n_maps=1, targets="thresholds",
                       protect={name: [0]}, progress=False)
    with pytest.raises(InvalidArgument, match="unknown ranking"):
        prot.protection(fc, digits, rank="nope", progress=False)
    with pytest.raises(InvalidArgument, match="fractions"):
        prot.protection(fc, digits, fractions=[1.5], progress=False)


def test_a_resume_never_mixes_protections(fc, digits, tmp_path):
    out = tmp_path / "s.csv"
    name = list(errors.select_layers(fc))[1]
    evaluate.sweep(fc, digits, bers=[0.1], n_maps=1, protect={name: [0, 1, 2]}, out=out,
                   progress=False)
    before = out.read_bytes()
    with pytest.raises(ResultsMismatch, match="protected bits"):
        evaluate.sweep(fc, digits, bers=[0.2], n_maps=1, protect={name: [0, 1]}, out=out,
                       resume=True, progress=False)
    assert out.read_bytes() == before
    evaluate.sweep(fc, digits, bers=[0.2], n_maps=1, protect={name: [0, 1, 2]}, out=out,
                   resume=True, progress=False)
    assert evaluate.read_sweep(out)["ber"].tolist() == [0.1, 0.2]


def test_cli_protect_writes_the_curve_and_refuses_to_overwrite(fc, tmp_path):
    run = tmp_path / "fc"
    bnn_tol.save(fc, run)
    args = ["protect", str(run), "--dataset", "digits", "--fractions", "0:0.2:0.1",
            "--bers", "0.1", "--maps", "2", "--rank", "magnitude,random", "--random-seeds", "2",
            "--rank-subset", "200", "--out", str(tmp_path / "p.csv"), "--quiet"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    curve = pd.read_csv(tmp_path / "p.csv")
    assert set(curve["ranking"]) == {"magnitude", "random:0", "random:1"}
    assert len(curve) == 3 * 3 * 2 and "magnitude" in res.output
    res = CliRunner().invoke(main, args)  # its own earlier curve is rewritten
    assert res.exit_code == 0, res.output
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    res = CliRunner().invoke(main, [*args[:-3], "--out", str(tmp_path / "other.csv"), "--quiet"])
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert (tmp_path / "other.csv").read_text() == "a,b\n1,2\n"  # a foreign file: untouched
    res = CliRunner().invoke(main, [*args[:-3], "--out", str(run / "config.json"), "--quiet"])
    assert res.exit_code != 0 and "input of this command" in res.output
    assert math.isclose(curve.query("fraction == 0")["protected_fraction"].max(), 0.0)
