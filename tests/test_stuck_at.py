"""``stuck-at``: stuck cells read their stuck value (flip only where it differs), nested across
rates with the same values, at the binomial rates; sweeps equal a naive deepcopy-and-write
loop (library, CLI, study files) and every row replays alone."""

from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from scipy import stats

from bnn_tol import data, errors, evaluate, models, train
from bnn_tol.cli import main
from bnn_tol.faults.registry import Site
from bnn_tol.faults.seeds import derive
from bnn_tol.interop import checkpoint
from bnn_tol.study import runner as study

VARIANTS = ("stuck-at", "stuck-at-0", "stuck-at-1")


@pytest.fixture(scope="module")
def vgg():
    m = models.build("vgg3", seed=0, channels=((8,), (8,)), fc_width=32, in_shape=(1, 8, 8))
    train.fit(m, data.load("digits", "train").subset(512), epochs=1, batch_size=64,
              progress=False)
    return m.eval()


def _naive_stuck(n: int, p: float, chip: int, position: int, variant: str):
    """Stuck bits and values by the documented law, one uniform per bit of the chip's map."""
    fm = errors.fault_map(n, max(p, 1e-12), seed=errors.layer_seed(chip, position))
    idx = fm.idx[fm.u < p]
    if variant != "stuck-at":
        return idx, torch.full((idx.numel(),), variant == "stuck-at-1")
    words = torch.empty(math.ceil(n / 64), dtype=torch.int64).random_(
        -(2**63), None, generator=torch.Generator().manual_seed(
            derive(errors.layer_seed(chip, position), 1)))
    vals = torch.tensor([(int(words[i // 64]) >> (i % 64)) & 1 for i in idx.tolist()],
                        dtype=torch.bool)
    return idx, vals


def _naive_accuracy(model, test, p, chip, variant, layers=None) -> float:
    """Copy the model, write each stuck bit's value as the weight (+1 / -1), plain model(x)."""
    m = copy.deepcopy(model)
    for pos, layer in enumerate(m.binary_layers().values()):
        if layers is not None and pos not in layers:
            continue
        w = torch.where(layer.weight >= 0, 1.0, -1.0).view(-1)
        idx, vals = _naive_stuck(w.numel(), p, chip, pos, variant)
        w[idx] = torch.where(vals, 1.0, -1.0)
        layer.weight.data = w.view_as(layer.weight)
    with torch.no_grad():
        pred = torch.cat([m(x).argmax(1) for x, _ in test.batches(500)])
    return float((pred == test.labels).double().mean())


def _draw(variant, n, chip, cap, stream=0):
    site = Site("t", 3, n, stream)
    return errors.draw_sites([site], chip, cap, error=variant)["t"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_stuck_bits_are_nested_across_rates_with_the_same_values_and_do_not_depend_on_the_cap(
        variant):
    n = 100_000
    small, big = _draw(variant, n, 5, 0.02), _draw(variant, n, 5, 0.4)
    prev: dict[int, bool] = {}
    for p in (0.001, 0.01, 0.02, 0.1, 0.4):
        idx, val = big.stuck(p)
        cur = dict(zip(idx.tolist(), val.tolist(), strict=True))
        assert all(cur.get(i) == v for i, v in prev.items())  # subset, same stuck values
        assert len(cur) > len(prev)
        if p <= 0.02:
            a, b = small.stuck(p)
            assert dict(zip(a.tolist(), b.tolist(), strict=True)) == cur
        prev = cur


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_stuck_bit_reads_its_value_and_flips_only_where_it_differs(variant):
    n, p = 200_000, 0.05
    g = torch.Generator().manual_seed(1)
    stored = (torch.rand(n, generator=g) < 0.3).to(torch.uint8)  # 30 % ones
    m = _draw(variant, n, 2, p)
    idx, val = m.stuck(p)
    flips = m.flips(stored, p, p)
    want = idx[stored[idx].bool() != val]
    assert torch.equal(flips.sort().values, want.sort().values)
    read = stored.bool().clone()
    read[idx] = val  # what the memory returns
    assert torch.equal((read != stored.bool()).nonzero().flatten(), want.sort().values)
    # the stuck cells are the cells the Bernoulli model of the same chip flips at p
    bern = _draw("bernoulli", n, 2, p).flips(torch.ones(n), p, p)
    assert torch.equal(idx.sort().values, bern.sort().values)
    # binomial laws: stuck ~ Bin(n, p); values fair (or fixed); flips by stored value
    assert stats.binomtest(idx.numel(), n, p).pvalue > 1e-4
    ones = int(stored.sum())
    f1 = int(stored[flips].sum())  # flipped stored 1s
    f0 = flips.numel() - f1
    r1 = {"stuck-at": p / 2, "stuck-at-0": p, "stuck-at-1": 0.0}[variant]
    r0 = {"stuck-at": p / 2, "stuck-at-0": 0.0, "stuck-at-1": p}[variant]
    for f, k, r in ((f1, ones, r1), (f0, n - ones, r0)):
        assert (f == 0) if r == 0 else stats.binomtest(f, k, r).pvalue > 1e-4, (f, k, r)
    if variant == "stuck-at":
        assert stats.binomtest(int(val.sum()), val.numel(), 0.5).pvalue > 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_sweep_equals_the_naive_deepcopy_and_write_loop_and_rows_replay(fc, vgg, digits,
                                                                         variant):
    for model, engine, layers in ((fc, "auto", None), (fc, "fp32", [1, 2]),
                                  (vgg, "auto", None), (vgg, "reference", [0, 3])):
        df = evaluate.sweep(model, digits, bers=[0.0, 0.05, 0.3], n_maps=3, seed=7,
                            error=variant, engine=engine, layers=layers, progress=False)
        ref = [_naive_accuracy(model, digits, p, s, variant, layers)
               for p, s in zip(df.ber, df.map_seed, strict=True)]
        assert df.accuracy.tolist() == ref, (variant, engine, layers)
        assert df[df.ber == 0.3].accuracy.mean() < df[df.ber == 0].accuracy.mean()
        for row in df[df.ber == 0.3].itertuples():
            with errors.inject(model, row.ber, seed=int(row.map_seed), error=variant,
                               layers=layers):
                assert evaluate.accuracy(model, digits) == row.accuracy


def test_mbit_stuck_at_through_the_fixed_engine_equals_the_reference(digits):
    m = models.build("fc", seed=0, hidden=(32, 24), in_shape=(1, 8, 8), weight_bits=4)
    train.fit(m, data.load("digits", "train").subset(512), epochs=1, batch_size=64,
              progress=False)
    m.eval()
    kw = dict(bers=[0.02, 0.2], n_maps=2, seed=3, error="stuck-at", progress=False)
    a = evaluate.sweep(m, digits, engine="fixed", **kw)
    b = evaluate.sweep(m, digits, engine="reference", **kw)
    assert a.accuracy.tolist() == b.accuracy.tolist()


def test_stuck_at_refuses_pairs_of_rates_and_activation_errors_in_one_line(fc, digits):
    with pytest.raises(ValueError, match=r"takes one rate p, not \(p01, p10\)"):
        evaluate.sweep(fc, digits, bers=[(0.01, 0.02)], error="stuck-at", progress=False)
    with pytest.raises(ValueError, match="not activations"):
        with errors.inject(fc, 0.1, error="stuck-at", targets="activations"):
            pass


def test_cli_sweep_with_error_stuck_at_equals_the_naive_loop(fc, digits, tmp_path):
    run = tmp_path / "fc"
    checkpoint.save(fc, run)
    out = tmp_path / "s.csv"
    res = CliRunner().invoke(main, ["sweep", str(run), "--bers", "0,0.05,0.3", "--maps", "2",
                                    "--seed", "11", "--dataset", "digits", "--error",
                                    "stuck-at", "--quiet", "--out", str(out)])
    assert res.exit_code == 0, res.output
    df = evaluate.read_sweep(out)
    assert len(df) == 6
    assert df.accuracy.tolist() == [_naive_accuracy(fc, digits, p, s, "stuck-at")
                                    for p, s in zip(df.ber, df.map_seed, strict=True)]


def test_study_file_eval_error_stuck_at_sweeps_the_trained_network(tmp_path):
    cfg = study.load_config("tiny", {"train": {"bers": [0.0], "seeds": [0], "epochs": 1},
                                     "eval": {"bers": [0.0, 0.1], "n_maps": 2,
                                              "error": "stuck-at"},
                                     "data": {"metric_subset": 50}})
    (spec,) = study.tasks(cfg)
    assert study.run_task(spec, tmp_path)["status"] == "done"
    task = tmp_path / "models" / spec["model_id"]
    sw = pd.read_csv(task / "sweep.csv")
    model = checkpoint.load(task).eval()
    test = data.load("digits", "test")
    assert sw.accuracy.tolist() == [_naive_accuracy(model, test, p, s, "stuck-at")
                                    for p, s in zip(sw.ber, sw.map_seed, strict=True)]
