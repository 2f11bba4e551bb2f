"""Input transforms off every integer grid (issue 22): BinaryNet's main_mnist trains with
``Normalize((0.1307,), (0.3081,))`` (zero point at pixel 33.33) and CIFAR code with one mean
and std per channel. ``adapt`` records a rounded grid ``q = round(T(p) / unit)`` with its
stated error; the adapted model is the definition (engines, export, deploy, ONNX and
checkpoints reproduce it bit for bit) and agrees with the original on every sample whose
first-layer decisions the stated bound settles. The oracles here are slow and direct: the
error recomputed pixel by pixel in float64 from torchvision's float32 formula, the undecided
samples from a float64 matmul/conv with the BatchNorm threshold formula."""

from __future__ import annotations

import json

import _public_bnns as P
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _bundle_helpers import IMAGES, manifest, write_manifest
from _helpers import randomize_bn, small_bnn
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import bnn_tol
from bnn_tol import data, evaluate
from bnn_tol.core.compiled import UnsupportedModel
from bnn_tol.data import InputGrid, Normalize, grid_of
from bnn_tol.engines.int8 import int8_available
from bnn_tol.interop import deploy
from bnn_tol.interop.adapt import AdaptError

MNIST = Normalize(0.1307, 0.3081)  # BinaryNet.pytorch main_mnist.py
CIFAR = Normalize((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))


@pytest.fixture(scope="module")
def fmnist():
    return P.fashion_mnist(2048, 600)


class _CifarStyle(nn.Module):
    """vgg_cifar10_binary's first blocks on 3 x 28 x 28: the first BinarizeConv2d reads the real
    3-channel image, max-pool before BN, Hardtanh(inplace), biases, ``x.view``, a non-affine
    last BatchNorm and LogSoftmax."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.c = c
        self.features = nn.Sequential(
            P.BinarizeConv2d(3, c, 3, padding=1), nn.MaxPool2d(2), nn.BatchNorm2d(c),
            nn.Hardtanh(inplace=True),
            P.BinarizeConv2d(c, c, 3, padding=1), nn.MaxPool2d(2), nn.BatchNorm2d(c),
            nn.Hardtanh(inplace=True))
        self.classifier = nn.Sequential(P.BinarizeLinear(c * 7 * 7, 10),
                                        nn.BatchNorm1d(10, affine=False), nn.LogSoftmax(dim=1))

    def forward(self, x):
        return self.classifier(self.features(x).view(-1, self.c * 7 * 7))


def _three(ds: data.BNNDataset) -> data.BNNDataset:
    """Fashion-MNIST as 3 distinct channels (p, 255 - p, 3p / 4): a channel mix-up shows."""
    p = ds.images
    imgs = torch.cat([p, 255 - p, (p.to(torch.int32) * 3 // 4).to(torch.uint8)], dim=1)
    return data.BNNDataset(imgs, ds.labels, name="fmnist3")


@pytest.fixture(scope="module")
def mnist_style(fmnist):
    train, test = fmnist
    user = P.calibrate(P.BinaryNetMnist(binary_head=True), MNIST.to_float(train.images[:1024]))
    user = P.fit(user, MNIST.to_float(train.images), train.labels)
    return user, bnn_tol.adapt(user, MNIST.to_float(test.images[:256]), transform=MNIST)


@pytest.fixture(scope="module")
def cifar_style(fmnist):
    train, test = (_three(d) for d in fmnist)
    user = P.calibrate(_CifarStyle(), CIFAR.to_float(train.images[:1024]))
    return user, bnn_tol.adapt(user, CIFAR.to_float(test.images[:128]), transform=CIFAR), test


def _table(grid: InputGrid) -> np.ndarray:
    """``(C, 256)`` int64 levels of any grid, written out."""
    if grid.levels is None:
        return (np.arange(256) - grid.offset)[None, :]
    return np.array(grid.levels, dtype=np.int64).reshape(-1, 256)


def _slow_transform(tf: Normalize, channels: int) -> np.ndarray:
    """``(C, 256)`` float64 of torchvision's float32 ``(p / 255 - m) / s``, pixel by pixel
    (numpy float32 scalars round like torch)."""
    mean = tf.mean if isinstance(tf.mean, tuple) else (tf.mean,) * channels
    std = tf.std if isinstance(tf.std, tuple) else (tf.std,) * channels
    return np.array([[float((np.float32(p) / np.float32(255) - np.float32(mean[c]))
                            / np.float32(std[c])) for p in range(256)]
                     for c in range(channels)])


def _slow_error(tf: Normalize, grid: InputGrid, unit: float, channels: int) -> float:
    """``max |q - T(p) / unit|`` over channels and pixel values, in float64; each level is also
    checked against the real-arithmetic transform."""
    t = _slow_transform(tf, channels)
    q = np.broadcast_to(_table(grid), t.shape)
    mean = np.broadcast_to(np.array(tf.mean, dtype=np.float64).reshape(-1, 1), t.shape)
    std = np.broadcast_to(np.array(tf.std, dtype=np.float64).reshape(-1, 1), t.shape)
    real = (np.arange(256) / 255 - mean) / std
    assert (np.abs(q * unit - real) <= grid.error * unit + 1e-6 * (np.abs(real) + 1)).all()
    return float(np.abs(q - t / unit).max())


def _slow_decisions(model, tf: Normalize, unit: float, pixels: torch.Tensor):
    """Per sample: some first-layer ``k = sum w q`` within the stated bound ``fan_in (error +
    2^-23 q_max)`` of its threshold ``S tau`` (``tau = mu - beta sqrt(var + eps) / gamma``), and
    undecided: some neuron on the other side of it with the exact ``k* = sum w T / unit``, or
    ``k*`` within the float32 slack ``2^-23 q_max fan_in`` (float64 matmul / conv of the
    written-out levels and transform)."""
    grid, block = grid_of(model), model.blocks[0]
    c = pixels.shape[1]
    px = pixels.numpy().astype(np.int64)
    ch = np.arange(c)[:, None, None]
    q = np.broadcast_to(_table(grid), (c, 256))[ch, px]
    exact = (_slow_transform(tf, c) / unit)[ch, px]
    w = torch.where(block.layer.weight.detach() >= 0, 1.0, -1.0).double()

    def layer(v):
        v = torch.from_numpy(np.ascontiguousarray(v)).double()
        return F.conv2d(v, w, padding=block.layer.padding) if w.dim() == 4 else \
            v.reshape(len(v), -1) @ w.t()

    k, k_exact = layer(q), layer(exact)
    bn = block.bn
    gamma = bn.weight.detach().double() if bn.affine else torch.ones(bn.num_features).double()
    beta = bn.bias.detach().double() if bn.affine else torch.zeros(bn.num_features).double()
    tau = bn.running_mean.double() - beta * torch.sqrt(bn.running_var.double() + bn.eps) / gamma
    tau = (tau * grid.scale).view((1, -1, 1, 1) if k.dim() == 4 else (1, -1))
    slack = w[0].numel() * float(np.abs(_table(grid)).max()) * 2.0**-23
    bound = w[0].numel() * grid.error + slack
    within = ((k - tau).abs() <= bound).flatten(1).any(1).numpy()
    flip = ((k - tau) >= 0) != ((k_exact - tau) >= 0)
    undecided = (flip | ((k_exact - tau).abs() <= slack)).flatten(1).any(1).numpy()
    return within, undecided


def _agrees_except_undecided(user, model, tf, test) -> tuple[int, int]:
    """Equal predictions on every sample the rounding does not decide; the samples it may
    decide lie within the stated bound. Returns (within the bound, undecided) counts."""
    with torch.no_grad():
        ref = user(tf.to_float(test.images)).argmax(1).numpy()
        got = model(grid_of(model).to_float(test.images)).argmax(1).numpy()
    within, undecided = _slow_decisions(model, tf, model.meta["input"]["unit"], test.images)
    assert not ((ref != got) & ~undecided).any()
    assert not (undecided & ~within).any()
    info = model.meta["input"]["verified"]["the example"]  # adapt's count on its example
    n = info["samples"]  # (the first n test images)
    assert (info["within_bound"], info["undecided"]) == (int(within[:n].sum()),
                                                         int(undecided[:n].sum()))
    return int(within.sum()), int(undecided.sum())


def _engines_agree(model, ds) -> None:
    """Packed and fp32 sweeps equal the reference (the model's own forward) bit for bit."""
    runs = {e: evaluate.sweep(model, ds, bers=[0, 0.02], n_maps=2, seed=0, progress=False,
                              engine=e).accuracy.tolist() for e in ("reference", "packed", "fp32")}
    assert runs["packed"] == runs["reference"] == runs["fp32"]
    assert runs["reference"][0] == evaluate.accuracy(model, ds)


def _deploys_and_reloads(model, test, tmp_path) -> dict:
    bundle = bnn_tol.export(model, tmp_path / "bundle")
    with torch.no_grad():
        want = model(grid_of(model).to_float(test.images)).argmax(1).numpy()
    assert np.array_equal(deploy.predict(bundle, test.images.numpy()), want)
    back = bnn_tol.load(bnn_tol.save(model, tmp_path / "ckpt"))
    assert grid_of(back) == grid_of(model)
    x = grid_of(model).to_float(test.images[:64])
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    return manifest(bundle)


def test_main_mnist_normalize_adapts_on_a_rounded_grid_within_its_stated_bound(
        mnist_style, fmnist, tmp_path):
    user, model = mnist_style
    _, test = fmnist
    grid = grid_of(model)
    assert grid.channels is None and 0 < grid.error <= 0.5
    assert grid.q_max * 784 < 2**24  # the first layer's sums stay exact in float32
    info = model.meta["input"]
    assert info["approximate"] and info["error"] == grid.error
    assert info["bound"] == pytest.approx(784 * (grid.error + grid.q_max * 2.0**-23))
    assert _slow_error(MNIST, grid, info["unit"], 1) == pytest.approx(grid.error, abs=1e-9)
    within, undecided = _agrees_except_undecided(user, model, MNIST, test)
    print(f"main_mnist: {within} of {len(test)} within the bound, {undecided} undecided")
    assert undecided <= within <= len(test) // 50

    small = test.subset(300)
    _engines_agree(model, small)
    if int8_available(torch.device("cpu")):
        with pytest.raises(UnsupportedModel, match="do not fit int8"):
            evaluate.pick_engine(model, device=torch.device("cpu"), engine="int8",
                                 targets=("weights",))
    man = _deploys_and_reloads(model, test, tmp_path)
    assert man["input"]["error"] == grid.error and "approximate" in man["input"]["transform"]
    assert bnn_tol.models.summary(model).splitlines()[-1] == f"input: {grid.describe()}"
    assert f"within {grid.error:.4g} fan_in" in grid.describe()


def test_per_channel_normalize_adapts_with_one_table_per_channel(cifar_style, tmp_path):
    user, model, test = cifar_style
    grid = grid_of(model)
    assert grid.channels == 3 and 0 < grid.error <= 0.5
    assert grid.q_max * 27 < 2**24
    assert _slow_error(CIFAR, grid, model.meta["input"]["unit"], 3) == pytest.approx(
        grid.error, abs=1e-9)
    within, undecided = _agrees_except_undecided(user, model, CIFAR, test)
    print(f"per-channel: {within} of {len(test)} within the bound, {undecided} undecided")
    assert undecided <= len(test) // 10
    _engines_agree(model, test.subset(200))
    man = _deploys_and_reloads(model, test, tmp_path)
    assert man["input"]["transform"].startswith("q = levels[c][p]")
    assert np.array_equal(np.array(man["input"]["levels"]), _table(grid))


def test_rounded_grids_round_trip_through_onnx(mnist_style, cifar_style, fmnist, tmp_path):
    pytest.importorskip("onnx")
    from bnn_tol.interop.onnx import export_onnx, import_onnx

    for k, model in enumerate((mnist_style[1], cifar_style[1])):
        back = import_onnx(export_onnx(model, tmp_path / f"m{k}.onnx"))
        assert grid_of(back) == grid_of(model)
        imgs = (fmnist[1] if k == 0 else cifar_style[2]).images[:100]
        x = grid_of(model).to_float(imgs)
        with torch.no_grad():
            assert torch.equal(back(x), model(x))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(-1.0, 1.0), st.floats(0.05, 2.0)), min_size=1,
                max_size=4), st.integers(1, 5000))
@example([(0.0, 1.0), (0.0, 0.05)], 3290)  # too many levels even at m = 1: a coarser step
def test_every_rounded_level_is_within_the_stated_error(channels, fan_in):
    mean, std = (tuple(v) for v in zip(*channels, strict=True))
    tf = Normalize(mean, std)
    c = len(channels)
    t = tf.to_float(torch.arange(256, dtype=torch.uint8).view(1, 1, 256, 1).expand(
        1, c, 256, 1))[0, :, :, 0].double()
    grid, unit = InputGrid.fit(t, fan_in=fan_in)
    q = torch.from_numpy(_table(grid)).double().expand(c, 256)
    assert 0 <= grid.error <= 0.5
    # an exact grid (error 0) is exact in real arithmetic: float32 T is within 1e-3 unit of it
    allowed = grid.error * unit * (1 + 1e-9) + 1e-12 if grid.error else 1e-3 * unit
    assert float((q * unit - t).abs().max()) <= allowed
    assert grid.q_max < 2**15 and (grid.error == 0 or grid.q_max * fan_in < 2**24)
    assert grid.scale & (grid.scale - 1) == 0


def test_dyadic_transforms_stay_exact_and_their_grids_unchanged():
    """Exact grids are those of before (configs and bundles of exact models carry no new
    field); a per-channel transform on one common step is exact per channel."""
    p = torch.arange(256, dtype=torch.uint8).view(1, 1, 256, 1)
    for tf, want in ((Normalize(0.5, 0.5), [2 * v - 255 for v in range(256)]),
                     (Normalize(), list(range(256)))):
        grid, _ = InputGrid.fit(tf.to_float(p)[0, :, :, 0].double(), fan_in=784)
        assert grid == InputGrid.from_levels(want, 256) and grid.error == 0
        assert "error" not in grid.config()
    tf = Normalize((0.5, 0.0, 1.0), (0.5, 0.5, 0.5))
    grid, unit = InputGrid.fit(tf.to_float(p.expand(1, 3, 256, 1))[0, :, :, 0].double(),
                               fan_in=27)
    assert grid.error == 0 and grid.channels == 3 and unit == pytest.approx(1 / 255)
    assert [grid.levels[c][200] for c in range(3)] == [145, 400, -110]
    for old in ({"offset": 128, "scale": 128}, {"offset": 0, "scale": 2, "levels": list(
            range(-128, 128))}):
        assert InputGrid.from_config(old).config() == old and InputGrid.from_config(
            old).error == 0


def test_an_exact_model_exports_the_manifest_input_of_before(tmp_path):
    b = bnn_tol.export(small_bnn("fc", {"hidden": (70, 30)}), tmp_path / "b")
    assert set(manifest(b)["input"]) == {"shape", "dtype", "offset", "scale", "transform"}


@pytest.mark.parametrize("edit, needle", [
    (dict(levels=[list(range(256))] * 2), "one list of 256 integers"),
    (dict(levels=[list(range(256)), [0] * 255]), "one list of 256 integers"),
    (dict(levels=[list(range(256))]), "does not say q = levels[c][p]"),
    (dict(error=0.75), "input.error must be a number in [0, 0.5]"),
    (dict(error="0.1"), "input.error must be a number"),
    (dict(error=True), "input.error must be a number"),
])
def test_hostile_per_channel_levels_and_errors_are_refused_in_one_line(tmp_path, edit, needle):
    b = bnn_tol.export(small_bnn("fc", {"hidden": (70, 30)}), tmp_path / "b")
    man = manifest(b)
    man["input"].update(edit)
    write_manifest(b, man)
    with pytest.raises(deploy.DeployError) as e:
        deploy.predict(b, IMAGES)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_per_channel_grid_deploys_what_the_model_computes(tmp_path):
    """A hand-made (C, 256) grid on a 3-channel conv model: deploy looks up channel c's table."""
    model = randomize_bn(bnn_tol.models.build("vgg3", in_shape=(3, 8, 8), channels=((8,), (6,)),
                                              fc_width=20, seed=1))
    rng = np.random.default_rng(0)
    model.input_grid = InputGrid.from_levels(rng.integers(-300, 300, (3, 256)).tolist(), 64,
                                             error=0.25)
    imgs = torch.from_numpy(rng.integers(0, 256, (50, 3, 8, 8), dtype=np.uint8))
    b = bnn_tol.export(model, tmp_path / "b")
    with torch.no_grad():
        want = model(model.input_grid.to_float(imgs)).argmax(1).numpy()
    assert np.array_equal(deploy.predict(b, imgs.numpy()), want)
    assert json.loads((b / "manifest.json").read_text())["input"]["error"] == 0.25


def test_a_transform_that_treats_pixels_of_a_channel_differently_is_still_refused(fmnist):
    class Ramp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = P.BinarizeLinear(784, 10, bias=False)
            self.bn = nn.BatchNorm1d(10)

        def forward(self, x):
            x = x.view(-1, 784) * torch.linspace(0.5, 1.0, 784)
            return self.bn(self.fc(x))

    _, test = fmnist
    user = P.calibrate(Ramp(), MNIST.to_float(test.images[:256]))
    with pytest.raises(AdaptError, match="do not treat every pixel of a channel alike"):
        bnn_tol.adapt(user, MNIST.to_float(test.images[:64]), transform=MNIST)


def test_a_residual_graph_with_a_rounded_grid_is_refused_naming_the_shortcut(fmnist):
    """Bi-Real-Net on the real 3-channel image: its first layer's rounding error would travel
    through the real-valued shortcut, which the bound does not follow."""

    class BiReal3(P.BiRealNet):
        def __init__(self, c: int = 8):
            super().__init__(c)
            self.stem = P.BinarizeConv2d(3, c, kernel_size=3, padding=1, bias=False)

    _, test = (_three(d) for d in fmnist)
    user = P.calibrate(BiReal3(), CIFAR.to_float(test.images[:256]))
    with pytest.raises(AdaptError, match="real-valued shortcuts of a residual graph bypass"):
        bnn_tol.adapt(user, CIFAR.to_float(test.images[:64]), transform=CIFAR)
