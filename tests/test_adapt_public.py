"""Public-style BNNs adapt unchanged (issue 22): BinaryNet.pytorch, Brevitas bnn_pynq 1W1A and
XNOR-Net model files written after the public designs (``tests/_public_bnns.py``), trained or
calibrated on real Fashion-MNIST images with their own input convention, adapt without edits;
the adapted model predicts what the original predicts on the test images, and sweeps, margins,
importance, export, numpy deploy and ONNX all run on it with equal predictions. What cannot be
adapted (a full-precision layer, a shortcut whose dataflow cannot be reconstructed) is refused
in one line naming the cause; an input zero point off the pixel grid gets a rounded grid
(``tests/test_input_transforms.py``)."""

from __future__ import annotations

import _public_bnns as P
import numpy as np
import pytest
import torch

import bnn_tol
from bnn_tol import data, errors, evaluate, metrics
from bnn_tol.data import Normalize, grid_of
from bnn_tol.interop import deploy
from bnn_tol.interop.adapt import AdaptError


@pytest.fixture(scope="module")
def fmnist():
    return P.fashion_mnist(2048, 1000)


#: name -> (model factory, the user's input convention, train it (fc) or only calibrate BN)
FAMILIES = {
    "BinaryNet main_mnist Net, binary head": (
        lambda: P.BinaryNetMnist(binary_head=True), Normalize(0.5, 0.5), True),
    "BinaryNet vgg_cifar10_binary": (P.BinaryNetVGG, Normalize(0.5, 0.5), False),
    "Brevitas FC (TFC 1W1A)": (P.BrevitasFC, Normalize(), True),
    "Brevitas CNV (1W1A, 8-bit input)": (P.BrevitasCNV, Normalize(), False),
    "XNOR-Net (per-channel scales, Scale)": (P.XnorNet, None, False),
}


def _user(name, train):
    make, tf, fit = FAMILIES[name]
    conv = tf.to_float if tf is not None else data.to_float
    user = P.calibrate(make(), conv(train.images[:1024]))
    if fit:
        user = P.fit(user, conv(train.images), train.labels)
    return user, tf, conv


@pytest.mark.parametrize("name", list(FAMILIES))
def test_public_style_bnns_adapt_unchanged_and_work_everywhere(name, fmnist, tmp_path):
    train, test = fmnist
    user, tf, conv = _user(name, train)
    model = bnn_tol.adapt(user, conv(test.images[:256]), transform=tf)
    grid = grid_of(model)
    with torch.no_grad():
        ref = user(conv(test.images)).argmax(1)
        got = model(grid.to_float(test.images)).argmax(1)
    assert torch.equal(got, ref)  # the original's predictions on 1000 real test images
    if FAMILIES[name][2]:
        assert float((ref == test.labels).float().mean()) > 0.5  # trained: it learned something

    small = test.subset(300)
    df = evaluate.sweep(model, small, bers=[0, 0.02], n_maps=2, seed=0, progress=False)
    with torch.no_grad():
        acc0 = int((user(conv(small.images)).argmax(1) == small.labels).sum()) / len(small)
    assert df.query("ber == 0")["accuracy"].eq(acc0).all()
    with errors.inject(model, 0.02, seed=int(df.map_seed.iloc[-1])):
        assert evaluate.accuracy(model, small) == df.accuracy.iloc[-1]  # a faulted row replays
    for engine in ("reference", "fp32"):
        again = evaluate.sweep(model, small, bers=[0.02], n_maps=2, seed=0, progress=False,
                               engine=engine)
        assert again.accuracy.tolist() == df.query("ber == 0.02").accuracy.tolist()

    margin = metrics.margin(model, small)
    assert len(margin) > 0 and np.isfinite(margin["mean_margin"]).all()
    imp = metrics.importance(model, small.subset(100), layers=[0])
    assert len(imp) > 0 and np.isfinite(imp["importance"]).all()

    bundle = bnn_tol.export(model, tmp_path / "bundle")
    pred = deploy.predict(bundle, test.images.numpy())
    assert np.array_equal(pred, ref.numpy())
    back = bnn_tol.load(bnn_tol.save(model, tmp_path / "ckpt"))
    assert grid_of(back) == grid
    with torch.no_grad():
        assert torch.equal(back(grid.to_float(test.images[:64])), model(grid.to_float(
            test.images[:64])))


def test_an_adapted_model_with_an_input_quantizer_round_trips_through_onnx(fmnist, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from bnn_tol.interop.onnx import export_onnx, import_onnx

    train, test = fmnist
    user, tf, conv = _user("Brevitas CNV (1W1A, 8-bit input)", train)
    model = bnn_tol.adapt(user, conv(test.images[:128]), transform=tf)
    back = import_onnx(export_onnx(model, tmp_path / "cnv.onnx"))
    assert grid_of(back) == grid_of(model)
    x = grid_of(model).to_float(test.images[:200])
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


@pytest.mark.parametrize("make", [P.BiRealNet, lambda: P.BinaryResNet(check_range=False),
                                  P.BinaryResNet])
def test_residual_bnns_adapt_as_graphs_that_sweep_replay_and_reload(make, fmnist, tmp_path):
    """Real-valued shortcuts around binary convolutions (Bi-Real-Net, binary ResNet blocks,
    also resnet_binary's forward with ``if residual.data.max() > 1``, which torch.fx cannot
    trace: its dataflow is reconstructed from one run): a
    :class:`~bnn_tol.core.graph.GraphBNN`, predicting what the original predicts, swept
    exactly by the reference engine, measured, exported and deployed with its predictions
    (tests/test_graph_export.py checks the bundle in detail)."""
    from bnn_tol.core.graph import GraphBNN

    train, test = fmnist
    tf = Normalize(0.5, 0.5)
    user = P.calibrate(make(), tf.to_float(train.images[:1024]))
    model = bnn_tol.adapt(user, tf.to_float(test.images[:128]), transform=tf)
    assert isinstance(model, GraphBNN) and "add" in [n["op"] for n in model.nodes]
    grid = grid_of(model)
    with torch.no_grad():
        assert torch.equal(model(grid.to_float(test.images)).argmax(1),
                           user(tf.to_float(test.images)).argmax(1))
    small = test.subset(200)
    df = evaluate.sweep(model, small, bers=[0.05], n_maps=2, seed=0, progress=False)
    with errors.inject(model, 0.05, seed=int(df.map_seed.iloc[-1])):
        assert evaluate.accuracy(model, small) == df.accuracy.iloc[-1]
    back = bnn_tol.load(bnn_tol.save(model, tmp_path / "g"))
    x = grid.to_float(test.images[:64])
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    margin = metrics.margin(model, small)  # its binary neurons; tests/test_graph.py checks
    assert len(margin) > 0 and np.isfinite(margin["mean_margin_se"]).any()  # the values
    imp = metrics.importance(model, small.subset(50))
    assert len(imp) > 0 and np.isfinite(imp["importance"]).all()
    bundle = bnn_tol.export(model, tmp_path / "bundle")
    with torch.no_grad():
        ref = model(grid.to_float(small.images)).argmax(1).numpy()
    assert np.array_equal(deploy.predict(bundle, small.images.numpy()), ref)


@pytest.mark.parametrize("make, needle", [
    (P.BinaryNetMnist, "fc4 (Linear) is a full-precision layer"),
])
def test_what_cannot_be_adapted_is_refused_naming_the_cause(make, needle, fmnist):
    _, test = fmnist
    tf = Normalize(0.5, 0.5)
    user = P.calibrate(make(), tf.to_float(test.images[:256]))
    with pytest.raises(AdaptError) as e:
        bnn_tol.adapt(user, tf.to_float(test.images[:64]), transform=tf)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


class _ScaledShortcut(P.BinaryResNet):
    """resnet_binary with its range check and a shortcut scaled by 1/2 in forward: torch.fx
    cannot trace it, and the scaled sum is not among the values the reconstruction knows."""

    def __init__(self):
        super().__init__()
        self.layer1.forward = self._block

    def _block(self, x):
        b = self.layer1
        if x.data.max() > 1:
            raise RuntimeError("range")
        out = b.conv2(b.tanh1(b.bn1(b.conv1(x))))
        return b.tanh2(b.bn2(out + 0.5 * x))


def test_a_dataflow_that_cannot_be_reconstructed_is_refused_naming_the_module(fmnist):
    _, test = fmnist
    tf = Normalize(0.5, 0.5)
    user = P.calibrate(_ScaledShortcut(), tf.to_float(test.images[:256]))
    with pytest.raises(AdaptError, match="reconstructing its dataflow: layer1.bn2: its input is "
                                         "not the input, an earlier module's output") as e:
        bnn_tol.adapt(user, tf.to_float(test.images[:64]), transform=tf)
    assert "\n" not in str(e.value)
