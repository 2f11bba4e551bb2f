"""Errors in the stored parameters: BN thresholds and BN scale/shift as m-bit words. Sweeps
(bernoulli, stuck-at; symmetric and asymmetric rates; with weight errors too) equal a naive
loop that writes the corrupted parameters into a deepcopy and runs it plainly; rows replay;
the CLI states the width."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from click.testing import CliRunner

from bnn_tol import data, errors, evaluate, models, train
from bnn_tol.cli import main
from bnn_tol.core.layers import fold_threshold
from bnn_tol.faults.registry import Site
from bnn_tol.interop import checkpoint


@pytest.fixture(scope="module")
def fc():
    m = models.build("fc", seed=0, hidden=(64, 48), in_shape=(1, 8, 8))
    train.fit(m, data.load("digits", "train"), epochs=2, batch_size=64, progress=False)
    m.blocks[1].bn.weight.data[0] = -m.blocks[1].bn.weight.data[0]  # a gamma < 0 channel
    return m.eval()


@pytest.fixture(scope="module")
def vgg():
    m = models.build("vgg3", seed=0, channels=((8,), (8,)), fc_width=32, in_shape=(1, 8, 8))
    train.fit(m, data.load("digits", "train"), epochs=3, batch_size=64, progress=False)
    return m.eval()


def _bits(words, m):
    """Two's complement words (python ints) -> +-1 stored bits, LSB first."""
    return torch.tensor([1.0 if (w >> b) & 1 else -1.0 for w in words for b in range(m)])


def _corrupt(words, m, fmap, p01, p10):
    """The words after the bits the map flips (decided from the stored bits) are flipped."""
    idx = set(fmap.flips(_bits(words, m), p01, p10).tolist())
    out = []
    for j, w in enumerate(words):
        for b in range(m):
            if j * m + b in idx:
                w ^= 1 << b
        out.append(w - (1 << m) if w >= 1 << (m - 1) else w)  # signed value
    return out


def _plain(model, test) -> float:
    with torch.no_grad():
        pred = torch.cat([model(x).argmax(1) for x, _ in test.batches(500)])
    return float((pred == test.labels).double().mean())


def _naive_bn(model, test, ber, chip, error, m_bits=16, weights=False) -> float:
    """Copy; every block's BN becomes its m-bit scale/shift words, corrupted bit by bit, written
    as weight/bias of a BatchNorm with mean 0, var 1, eps 0; plain forward."""
    p01, p10 = errors.rates(ber)
    net = copy.deepcopy(model)
    layers = list(net.binary_layers())
    if weights:  # the weight bits of the same chip too
        maps = errors.draw_maps(model, chip, max(p01, p10), error=error)
        for name, lay in net.binary_layers().items():
            wb = torch.where(lay.weight >= 0, 1.0, -1.0).view(-1)
            idx = maps[name].flips(wb, p01, p10)
            wb[idx] = -wb[idx]
            lay.weight.data = wb.view_as(lay.weight)
    top = 2 ** (m_bits - 1) - 1
    for k, block in enumerate(net.blocks):
        bn = block.bn
        mu, var = bn.running_mean.double(), bn.running_var.double()
        s = bn.weight.detach().double() / torch.sqrt(var + bn.eps)
        b = bn.bias.detach().double() - mu * s
        words, steps = [], []
        for x in (s, b):
            step = float(x.abs().max()) / top
            steps.append(step)
            for v in x.tolist():
                q = min(top, max(-top, int(math.floor(abs(v) / step + 0.5)) * (1 if v >= 0
                                                                              else -1)))
                words.append(q % (1 << m_bits))
        site = Site(layers[k], k, len(words) * m_bits, 3)
        fmap = errors.draw_sites([site], chip, max(p01, p10), error=error)[layers[k]]
        q = _corrupt(words, m_bits, fmap, p01, p10)
        c = bn.num_features
        with torch.no_grad():
            bn.weight.copy_(torch.tensor([v * steps[0] for v in q[:c]], dtype=torch.float64))
            bn.bias.copy_(torch.tensor([v * steps[1] for v in q[c:]], dtype=torch.float64))
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0)
        bn.eps = 0.0
    return _plain(net, test)


def _naive_thresholds(model, test, ber, chip, error) -> float:
    """Copy; every hidden BN becomes the comparator of its corrupted two's complement integer
    threshold t' (mean t' -+ 1/2 on the block's grid, gamma = direction, var 1); plain forward."""
    p01, p10 = errors.rates(ber)
    net = copy.deepcopy(model)
    layers = list(net.binary_layers())
    for k, block in enumerate(net.blocks[:-1]):
        scale = 128 if k == 0 else 1
        f = fold_threshold(block.bn, scale=scale)
        reach = block.layer.fan_in * scale
        m = int(reach + 1).bit_length() + 1
        words = [t % (1 << m) for t in f.t.clamp(-reach - 1, reach + 1).tolist()]
        site = Site(layers[k], k, len(words) * m, 2)
        fmap = errors.draw_sites([site], chip, max(p01, p10), error=error)[layers[k]]
        t = torch.tensor(_corrupt(words, m, fmap, p01, p10), dtype=torch.float64)
        d = f.direction.double()
        with torch.no_grad():
            block.bn.running_mean.copy_((t - 0.5 * d) / scale)
            block.bn.running_var.fill_(1.0)
            block.bn.weight.copy_(d)
            block.bn.bias.copy_(torch.where(d == 0, f.const.double(), 0.0))
        block.bn.eps = 0.0
    return _plain(net, test)


@pytest.mark.parametrize("error", ["bernoulli", "stuck-at"])
def test_bn_word_errors_sweep_exactly_against_the_naive_loop(fc, vgg, digits, error):
    bers = [0.0, 0.01, 0.05] + ([(0.002, 0.03)] if error == "bernoulli" else [])
    for model in (fc, vgg):
        df = evaluate.sweep(model, digits, bers=bers, n_maps=2, seed=6, targets="bn",
                            error=error, progress=False)
        ref = [_naive_bn(model, digits, (a, b), s, error)
               for a, b, s in zip(df.p01, df.p10, df.map_seed, strict=True)]
        assert df.accuracy.tolist() == ref
        assert df.accuracy.min() < df.accuracy.iloc[0]
        row = df.iloc[-1]
        with errors.inject(model, (row.p01, row.p10), seed=int(row.map_seed), targets="bn",
                           error=error):
            assert evaluate.accuracy(model, digits) == row.accuracy


def test_every_parameter_weights_and_bn_words_at_once(fc, digits):
    df = evaluate.sweep(fc, digits, bers=[0.01, 0.03], n_maps=2, seed=1,
                        targets=("weights", "bn:8"), progress=False)
    assert df.accuracy.tolist() == [_naive_bn(fc, digits, p, s, "bernoulli", m_bits=8,
                                              weights=True)
                                    for p, s in zip(df.ber, df.map_seed, strict=True)]


@pytest.mark.parametrize("error", ["bernoulli", "stuck-at"])
def test_threshold_word_errors_sweep_exactly_against_the_naive_loop(fc, digits, error):
    df = evaluate.sweep(fc, digits, bers=[0.0, 0.02, 0.1], n_maps=2, seed=3,
                        targets="thresholds", error=error, progress=False)
    assert df.accuracy.iloc[0] == evaluate.accuracy(fc, digits)  # the comparator is exact
    ref = [_naive_thresholds(fc, digits, p, s, error) for p, s in zip(df.ber, df.map_seed,
                                                                      strict=True)]
    assert df.accuracy.tolist() == ref
    assert df.accuracy.iloc[-1] < df.accuracy.iloc[0]


def test_bn_words_at_zero_ber_are_the_m_bit_network_close_to_the_float_one(fc, digits):
    clean = evaluate.accuracy(fc, digits)
    with errors.inject(fc, 0.0, targets="bn"):
        assert abs(evaluate.accuracy(fc, digits) - clean) <= 2 / len(digits)


def test_cli_sweep_states_the_word_width_and_refuses_bad_targets(fc, digits, tmp_path):
    run = tmp_path / "fc"
    checkpoint.save(fc, run)
    out = tmp_path / "s.csv"
    res = CliRunner().invoke(main, ["sweep", str(run), "--bers", "0.02", "--maps", "2",
                                    "--dataset", "digits", "--targets", "bn:8", "--error",
                                    "stuck-at", "--quiet", "--out", str(out)])
    assert res.exit_code == 0, res.output
    df = evaluate.read_sweep(out)
    assert df.accuracy.tolist() == [_naive_bn(fc, digits, 0.02, s, "stuck-at", m_bits=8)
                                    for s in df.map_seed]
    for bad, msg in (("bn:1", "take a width"), ("thresholds,bn", "choose one"),
                     ("weights:3", "take a width"), ("biases", "unknown targets")):
        res = CliRunner().invoke(main, ["sweep", str(run), "--bers", "0.02", "--dataset",
                                        "digits", "--targets", bad, "--quiet"])
        assert res.exit_code == 2 and msg in res.output, (bad, res.output)
        assert len(res.output.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="not activations"):
        with errors.inject(fc, 0.1, targets="activations", error="stuck-at"):
            pass
