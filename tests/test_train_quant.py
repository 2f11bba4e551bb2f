"""Training m-bit networks like Stutz et al.: QAT, weight clipping, RandBET; m-bit checkpoints."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import quadrants
from click.testing import CliRunner

import bnn_tol
from bnn_tol import errors, models, train
from bnn_tol.cli import main
from bnn_tol.data import BNNDataset
from bnn_tol.exceptions import InvalidArgument
from bnn_tol.faults.seeds import spawn


def _data(n: int = 256, seed: int = 0) -> BNNDataset:
    return quadrants(n, seed)


def _model(bits: int = 4, **kw) -> models.BNN:
    return models.build("fc", hidden=(32, 32), in_shape=(1, 8, 8), n_classes=4, weight_bits=bits,
                        **kw)


def test_randbet_loss_is_the_mean_of_the_clean_and_the_perturbed_loss():
    ds = _data(128)
    model = _model(4, quant="asymmetric")
    ref = copy.deepcopy(model).train()
    hist = train.fit(model, ds, epochs=1, batch_size=128, randbet_ber=0.05, seed=5,
                     progress=False, device="cpu")
    x = (ds.images.float() - 128.0) / 128.0
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(
        spawn(5, 2)[0]))
    x, y = x[perm], ds.labels[perm]
    clean = F.cross_entropy(ref(x), y).detach()
    gen = torch.Generator().manual_seed(spawn(5, 3)[2])
    for layer in ref.binary_layers().values():
        layer.fault = errors.TransientFlip(0.05, gen)
    err = F.cross_entropy(ref(x), y).detach()
    expected = 0.5 * (float(clean) + float(err))
    assert float(err) != float(clean)
    # same terms; only the order of summation over the batch may differ: n eps relative
    assert hist["train_loss"].iloc[0] == pytest.approx(expected, rel=128 * 2**-23)


def test_clipping_holds_after_training_and_same_seed_same_weights():
    ds = _data()
    runs = []
    for _ in range(2):
        model = _model(8, quant="asymmetric")
        train.fit(model, ds, epochs=2, batch_size=64, lr=0.01, clip=0.05, randbet_ber=0.01,
                  seed=1, progress=False, device="cpu")
        runs.append(model)
        for layer in model.binary_layers().values():
            w_max = float(torch.tensor(0.05))  # w_max in float32
            assert float(layer.weight.detach().abs().max()) <= w_max
    for a, b in zip(runs[0].state_dict().values(), runs[1].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert runs[0].meta["training"]["clip"] == 0.05
    assert runs[0].meta["training"]["randbet_ber"] == [0.01, 0.01]


def test_fixed_point_layers_are_not_clamped_without_clip_but_bnn_layers_are():
    ds = _data()
    model = _model(8)
    with torch.no_grad():
        model.blocks[0].layer.weight[0, 0] = 3.0
    train.fit(model, ds, epochs=1, batch_size=64, seed=0, progress=False, device="cpu")
    assert float(model.blocks[0].layer.weight.detach().abs().max()) > 1.0
    bnn = _model(1)
    with torch.no_grad():
        bnn.blocks[0].layer.weight[0, 0] = 3.0
    train.fit(bnn, ds, epochs=1, batch_size=64, seed=0, progress=False, device="cpu")
    assert float(bnn.blocks[0].layer.weight.detach().abs().max()) <= 1.0
    assert "clip" not in bnn.meta["training"]  # a BNN's recipe reads as before


def test_quantization_aware_gradient_is_straight_through():
    model = _model(4, quant="asymmetric").train()
    x = torch.randn(16, 64)
    layer = model.blocks[0].layer
    model(x).sum().backward()
    g_q = layer.weight.grad.clone()
    # the same network with the quantized weights as plain float weights: the same gradient
    plain = copy.deepcopy(model)
    for lay in plain.binary_layers().values():
        lay.weight.grad = None
        with torch.no_grad():
            lay.weight.copy_(lay.codec.decode(lay.codec.encode(lay.weight)))
    plain.blocks[0].layer.codec.frozen = True  # keep the range of the original weights
    plain(x).sum().backward()
    assert torch.allclose(g_q, plain.blocks[0].layer.weight.grad, rtol=0, atol=1e-6)


def test_batchnorm_makes_the_block_invariant_to_weight_scale():
    """Clipping cannot limit a layer's scale: BN (train mode) divides it out."""
    model = _model(8).train()
    x = torch.randn(64, 64)
    out1 = model.blocks[0](x)
    with torch.no_grad():
        model.blocks[0].layer.weight.mul_(0.125)  # a power of two: quantization commutes
    out2 = model.blocks[0](x)
    # BN eps (1e-5) against the batch variance of a: relative change <= eps / var
    var = model.blocks[0].preact(x).detach().var(0).min()
    assert torch.allclose(out1, out2, rtol=0, atol=float(1e-5 / var) * 10 + 1e-5)


def test_randbet_makes_a_4_bit_network_more_robust():
    ds = _data(512, seed=1)
    test = _data(512, seed=2)
    accs = {}
    for label, rb in (("plain", None), ("randbet", 0.1)):
        model = _model(4, quant="symmetric")
        train.fit(model, ds, epochs=6, batch_size=64, lr=0.01, randbet_ber=rb, seed=0,
                  progress=False, device="cpu")
        df = bnn_tol.evaluate.sweep({label: model}, test, bers=[0.1], n_maps=40, seed=0,
                                    progress=False, engine="reference")
        accs[label] = df["accuracy"]
    # a paired comparison over the same 40 chips (measured here: +0.087, t = 3.2)
    diff = (accs["randbet"].to_numpy() - accs["plain"].to_numpy())
    assert diff.mean() > 0
    assert diff.mean() / (diff.std(ddof=1) / math.sqrt(len(diff))) > 2


def test_m_bit_checkpoint_round_trip(tmp_path):
    model = _model(4, quant="asymmetric", granularity="channel")
    train.fit(model, _data(), epochs=1, batch_size=64, seed=0, progress=False, device="cpu")
    bnn_tol.save(model, tmp_path / "q4")
    back = bnn_tol.load(tmp_path / "q4")
    x = torch.randn(8, 64)
    assert torch.equal(back(x), model.eval()(x))
    lay = back.blocks[0].layer
    assert lay.codec.bits_per_weight == 4 and lay.codec.scheme == "asymmetric"
    cfg = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert cfg["model"]["kwargs"]["weight_bits"] == 4


def test_fit_refuses_bad_clip_and_randbet():
    ds = _data(32)
    for kw in ({"clip": 0}, {"clip": -1.0}, {"clip": float("nan")}, {"randbet_ber": 1.5},
               {"randbet_ber": (0.1, 0.2, 0.3)}):
        with pytest.raises(InvalidArgument):
            train.fit(_model(4), ds, epochs=1, progress=False, **kw)


@pytest.mark.parametrize(("args", "match"), [
    (["--weight-bits", "9"], "weight-bits"),
    (["--quant", "asymmetric"], "weight_bits >= 2"),
    (["--weight-bits", "4", "--clip", "0"], "clip"),
    (["--weight-bits", "4", "--randbet-ber", "2"], "outside"),
])
def test_cli_train_refuses_bad_storage_options(tmp_path, args, match):
    res = CliRunner().invoke(main, ["train", "--dataset", "digits", "--epochs", "1",
                                    "--out", str(tmp_path / "r"), "--quiet", *args])
    assert res.exit_code != 0
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and match in lines[0]
    assert "Traceback" not in res.output


def test_cli_trains_an_m_bit_network(tmp_path):
    res = CliRunner().invoke(main, ["train", "--dataset", "digits", "--epochs", "1",
                                    "--hidden", "32", "--weight-bits", "4", "--quant",
                                    "asymmetric", "--clip", "0.1", "--randbet-ber", "0.01",
                                    "--out", str(tmp_path / "q"), "--quiet"])
    assert res.exit_code == 0, res.output
    model = bnn_tol.load(tmp_path / "q")
    assert all(lay.codec.bits_per_weight == 4 for lay in model.binary_layers().values())
    assert model.meta["training"]["clip"] == 0.1
