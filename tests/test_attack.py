"""Adversarial bit errors (issue 23): the attack's flips replay exactly through the one fault
path, hurt far more than random flips of the same number, and its first-order estimate is
the change of the decoded weight times the gradient, for BNN sign bits and m-bit codes."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import bnn_tol
from bnn_tol import data, models, schema, train
from bnn_tol.cli import main
from bnn_tol.core.compiled import stored_layers
from bnn_tol.core.inference import accuracy
from bnn_tol.exceptions import InvalidArgument
from bnn_tol.faults import apply
from bnn_tol.faults.attack import (
    _top,
    attack,
    bit_scores,
    curves,
    deployed_gradient,
    one_shot,
    random_baseline,
)

N = 10


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread (the machine is shared); the previous count comes back after."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def splits():
    return data.load("digits", "train"), data.load("digits", "test")


def _trained(splits, arch="fc", **kw):
    m = models.build(arch, seed=0, in_shape=(1, 8, 8), **kw)
    train.fit(m, splits[0], epochs=8, batch_size=64, lr=1e-2, progress=False, threads=1)
    return m.eval()


@pytest.fixture(scope="module", params=[1, 8], ids=["bnn", "8bit"])
def net(request, splits):
    """A small fc trained on digits: BNN sign bits, or 8-bit fixed-point codes."""
    return _trained(splits, hidden=(64, 48), weight_bits=request.param)


@pytest.fixture(scope="module")
def attacked(net, splits):
    return attack(net, splits[0], N, eval_data=splits[1], attack_size=256)


def test_replaying_the_first_k_flips_reproduces_the_reported_accuracy_bit_for_bit(
        net, splits, attacked):
    before = copy.deepcopy(net.state_dict())
    curve = attacked.curve
    assert curve["n_flips"].tolist() == list(range(N + 1))
    for k in range(N + 1):
        flips = attacked.prefix(k)
        assert sum(v.numel() for v in flips.values()) == k
        with apply(net, flips):
            assert accuracy(net, splits[1]) == curve["accuracy"][k]
    assert all(layer.fault is None for layer in stored_layers(net).values())
    assert all(torch.equal(v, net.state_dict()[n]) for n, v in before.items())
    # the flips table is the order, and the tables fit their declared schemas
    t = attacked.flips_table
    assert list(zip(t["layer"], t["bit_index"], strict=True)) == attacked.order
    m = {n: lay.codec.bits_per_weight for n, lay in stored_layers(net).items()}
    assert all(r.bit_index == r.weight_index * m[r.layer] + r.bit for r in t.itertuples())
    schema.validate(curve, "attack")
    schema.validate(t, "attack_flips")


def test_attack_is_deterministic_given_the_seed(net, splits, attacked):
    again = attack(net, splits[0], N, eval_data=splits[1], attack_size=256)
    assert again.order == attacked.order
    assert again.curve.equals(attacked.curve)


def test_attack_hurts_clearly_more_than_random_flips_of_the_same_number(net, splits, attacked):
    randoms = [random_baseline(net, splits[1], N, seed=s) for s in range(3)]
    worst_random = min(r.curve["accuracy"].iloc[-1] for r in randoms)
    hit = attacked.curve["accuracy"].iloc[-1]
    clean = attacked.curve["accuracy"].iloc[0]
    assert hit < worst_random - 0.03, (hit, worst_random, clean)
    assert attacked.curve["loss"].iloc[-1] > max(r.curve["loss"].iloc[-1] for r in randoms)
    assert attacked.curve["attack_loss"].iloc[-1] > attacked.curve["attack_loss"].iloc[0]
    # the random baseline replays too, and draws distinct bits
    r = randoms[0]
    assert len(set(r.order)) == N
    with apply(net, r.flips):
        assert accuracy(net, splits[1]) == r.curve["accuracy"].iloc[-1]


def test_first_order_estimate_is_the_decoded_weight_change_times_the_gradient(net, splits):
    """Slow reference: flip one stored bit at a time by writing its code, decode, take the
    weight difference; the gradient of the deployed weight from a copy whose latent weights
    are the deployed ones (the STE and straight-through paths pass it unchanged)."""
    small = splits[1].subset(64)
    layers = stored_layers(net)
    grads, loss = deployed_gradient(net, small, {}, layers)
    ref = copy.deepcopy(net)
    for lay in stored_layers(ref).values():
        lay.weight.data = lay.deployed_weight().detach()
    x, y = next(small.batches(64, grid=data.grid_of(net)))
    ref_loss = F.cross_entropy(ref(x), y)
    ref_loss.backward()
    assert loss == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    for (name, lay), rlay in zip(layers.items(), stored_layers(ref).values(), strict=True):
        torch.testing.assert_close(grads[name], rlay.weight.grad, rtol=1e-4, atol=1e-6)
        score = bit_scores(lay, grads[name])
        codec, m = lay.codec, lay.codec.bits_per_weight
        codes = codec.encode(lay.weight.detach()).reshape(-1)
        w = codec.decode(codes)
        g = grads[name].reshape(-1)
        for i in torch.randperm(lay.n_stored_bits, generator=torch.Generator().manual_seed(1))[
                :50].tolist():
            j, b = divmod(i, m)
            dw = codec.decode(codec.flip(codes, torch.tensor([i])))[j] - w[j]
            if codec.is_sign:
                assert dw == -2 * w[j]
            assert score[i] == pytest.approx(float(g[j] * dw), rel=1e-6, abs=1e-12)
    # flipped bits are no candidates again
    flipped = torch.tensor([0, 5])
    name = next(iter(layers))
    assert torch.isinf(bit_scores(layers[name], grads[name], flipped)[flipped]).all()


@pytest.mark.parametrize("bits", [1, 4])
def test_attack_reaches_conv_layers_and_replays(splits, bits):
    net = models.build("vgg3", seed=0, in_shape=(1, 8, 8), channels=((8,), (8,)), fc_width=32,
                       weight_bits=bits)
    train.fit(net, splits[0], epochs=2, batch_size=64, lr=1e-2, progress=False, threads=1)
    net.eval()
    res = attack(net, splits[1], 4, layers=[0], candidates=4, attack_size=128)
    assert {name for name, _ in res.order} == {"blocks.0.layer"}
    assert res.curve["attack_loss"].iloc[-1] > res.curve["attack_loss"].iloc[0]
    with apply(net, res.flips):
        assert accuracy(net, splits[1]) == res.curve["accuracy"].iloc[-1]


def test_one_shot_flips_the_n_best_first_order_bits(net, splits):
    layers = stored_layers(net)
    grads, _ = deployed_gradient(net, splits[1].subset(64), {}, layers)
    flips = one_shot(net, grads, 7)
    assert sum(v.numel() for v in flips.values()) == 7
    scores = torch.cat([bit_scores(layers[n], grads[n]) for n in layers])
    chosen = torch.cat([bit_scores(layers[n], grads[n])[flips[n]] for n in flips])
    assert float(chosen.min()) >= float(torch.topk(scores, 7).values.min())


def test_attack_refuses_bad_arguments_in_one_line(net, splits):
    with pytest.raises(InvalidArgument, match="n_bits must be <="):
        attack(net, splits[1], 10**9)
    with pytest.raises(InvalidArgument, match="candidates"):
        attack(net, splits[1], 1, candidates=0)
    with pytest.raises(InvalidArgument, match="k must be <="):
        random_baseline(net, splits[1], 2).prefix(3)
    assert attack(net, splits[1], 0).curve["n_flips"].tolist() == [0]


def test_curves_compare_networks_in_one_attack_table(net, splits):
    df = curves({"a": net, "b": net}, splits[1], 2, random_seeds=(0, 1), attack_size=64)
    schema.validate(df, "attack")
    assert len(df) == 2 * 3 * 3 and df.columns[0] == "model"
    sizes = df.groupby(["model", "method"]).size()
    assert sizes.xs("attack", level="method").eq(3).all()
    assert sizes.xs("random", level="method").eq(6).all()
    a = df[(df.model == "a") & (df.method == "attack")].reset_index(drop=True)
    b = df[(df.model == "b") & (df.method == "attack")].reset_index(drop=True)
    assert a.drop(columns="model").equals(b.drop(columns="model"))


def _adv_fit(bits, **kw):
    ds = data.load("digits", "train").subset(384)
    m = models.build("fc", seed=0, hidden=(32,), in_shape=(1, 8, 8), weight_bits=bits)
    hist = train.fit(m, ds, epochs=1, batch_size=64, lr=1e-2, progress=False, threads=1, **kw)
    return m, hist


@pytest.mark.parametrize("bits", [1, 8])
def test_adversarial_bit_error_training_is_deterministic_and_recorded(bits):
    runs = [_adv_fit(bits, adversarial_bits=3, seed=2) for _ in range(2)]
    (m1, h1), (m2, h2) = runs
    assert all(torch.equal(v, m2.state_dict()[n]) for n, v in m1.state_dict().items())
    assert h1["train_loss"].equals(h2["train_loss"])
    rec = m1.meta["training"]
    assert rec["adversarial_bits"] == 3 and rec["adversarial_layers"] == list(
        stored_layers(m1))
    plain, hp = _adv_fit(bits, seed=2)
    assert "adversarial_bits" not in plain.meta["training"]
    assert float(h1["train_loss"].iloc[0]) != float(hp["train_loss"].iloc[0])
    assert all(layer.fault is None for layer in stored_layers(m1).values())
    with pytest.raises(InvalidArgument, match="adversarial_bits"):
        _adv_fit(bits, adversarial_bits=-1)


def test_ties_go_to_the_lower_index():
    score = torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0, 2.0, -torch.inf])
    assert _top(score, 4).tolist() == [1, 3, 2, 4]
    assert _top(score, 0).tolist() == []


def test_replay_is_exact_over_several_batches(net, splits):
    res = attack(net, splits[1], 3, eval_data=splits[0], batch_size=200, attack_size=200)
    for k in range(4):
        with apply(net, res.prefix(k)):
            assert accuracy(net, splits[0], batch_size=200) == res.curve["accuracy"][k]


def test_cli_train_takes_adversarial_bits(tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["train", "--model", "fc", "--hidden", "16", "--dataset",
                                    "digits", "--epochs", "1", "--train-subset", "256",
                                    "--adversarial-bits", "2", "--out", str(out), "--quiet",
                                    "--device", "cpu", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert bnn_tol.load(out).meta["training"]["adversarial_bits"] == 2


def test_cli_attack_writes_the_attack_table_that_the_library_gives(net, splits, tmp_path):
    """``bnn-tol attack``: attack images from the training split, accuracy on the test split;
    its rows are those of ``curves`` with the same arguments, bit for bit; a file it did not
    write is not replaced; bad seeds are one line."""
    ck = bnn_tol.save(net, tmp_path / "net")
    out = tmp_path / "attack.csv"
    args = ["attack", str(ck), "--bits", "2", "--random-seeds", "0,1", "--attack-size", "64",
            "--candidates", "2", "--dataset", "digits", "--subset", "150", "--out", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "net: clean" in res.output and "after 2 flipped bits" in res.output
    want = curves({"net": bnn_tol.load(ck)}, splits[0], 2, eval_data=splits[1].subset(150),
                  random_seeds=(0, 1), attack_size=64, candidates=2)
    pd.testing.assert_frame_equal(pd.read_csv(out), want, check_dtype=False, check_exact=True)
    again = CliRunner().invoke(main, args)  # our own file: replaced
    assert again.exit_code == 0, again.output
    foreign = tmp_path / "notes.csv"
    foreign.write_text("mine\n")
    bad = CliRunner().invoke(main, [*args[:-1], str(foreign)])
    assert bad.exit_code != 0 and "Traceback" not in bad.output
    assert foreign.read_text() == "mine\n"
    seeds = CliRunner().invoke(main, [*args[:5], "x,1", *args[6:]])
    assert seeds.exit_code != 0 and "--random-seeds" in seeds.output
    assert len(seeds.output.strip().splitlines()) == 1
