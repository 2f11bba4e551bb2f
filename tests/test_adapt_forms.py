"""What ``adapt`` folds (issue 22): layer biases in every form public code writes them, a
hidden block without BatchNorm (its bias is the threshold), weight scales per tensor and per
channel, affine operations after a block, and input transforms recorded as the model's input
grid. Each adapted model is compared with the original on its own inputs, and its folded
BatchNorm with the formula ``c1 BN(alpha a + b) + c0 = BN'(a)`` evaluated in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnn_tol
from bnn_tol.data import INPUT, InputGrid, Normalize, grid_of, to_float
from bnn_tol.exceptions import InvalidArgument
from bnn_tol.interop.adapt import AdaptError


def _sign(w):
    return torch.where(w >= 0, torch.ones_like(w), -torch.ones_like(w))


class PlusBias(nn.Linear):
    """``linear(x, sign W) + b``: the bias added after the product (rounds differently)."""

    def forward(self, x):
        return F.linear(x, _sign(self.weight)) + self.bias


class SignBias(nn.Linear):
    """The bias binarized too: ``linear(x, sign W, sign b)``."""

    def forward(self, x):
        return F.linear(x, _sign(self.weight), _sign(self.bias))


class ChannelScaled(nn.Linear):
    def forward(self, x):
        alpha = self.weight.abs().mean(1, keepdim=True)
        return F.linear(x, alpha * _sign(self.weight), self.bias)


class Sign(nn.Module):
    def forward(self, x):
        return _sign(x)


def _images(n=128, seed=0, shape=(1, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)


def _net(layer, bn: bool, post: nn.Module | None = None, seed=0):
    torch.manual_seed(seed)
    mods = [nn.Flatten(), layer(64, 32)]
    if bn:
        mods.append(nn.BatchNorm1d(32))
    if post is not None:
        mods.append(post)
    mods += [Sign(), layer(32, 10)]
    net = nn.Sequential(*mods)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.normal_(0, 2)
                m.running_var.uniform_(1, 4)
                m.weight.uniform_(0.3, 1.5)
                m.bias.normal_(0, 0.5)
            if isinstance(m, nn.Linear):
                m.bias.normal_(0, 2)
    return net.eval()


@pytest.mark.parametrize("layer", [nn.Linear, PlusBias, SignBias, ChannelScaled])
@pytest.mark.parametrize("bn", [True, False])
def test_biases_and_scales_fold_into_the_batchnorm_or_become_the_threshold(layer, bn):
    class Bin(layer):
        def forward(self, x):
            if type(self).__mro__[1] is nn.Linear:
                return F.linear(x, _sign(self.weight), self.bias)
            return super().forward(x)

    net = _net(Bin, bn)
    imgs = _images()
    x = to_float(imgs)
    model = bnn_tol.adapt(net, x)
    assert all(not b.layer.bias is not None for b in model.blocks)  # bias-free library layers
    with torch.no_grad():
        assert torch.equal(model(x).argmax(1), net(x).argmax(1))
        assert torch.allclose(model(x), net(x), rtol=0, atol=1e-4 * float(net(x).abs().max()))
    # the folded BN equals c1 BN(alpha a + b) + c0 in float64 on the library's pre-activations
    lay, fold = net[1], model.blocks[0].bn
    a = F.linear(x.flatten(1).double(), _sign(lay.weight).double())
    alpha = lay.weight.abs().mean(1).double() if layer is ChannelScaled else 1.0
    b = (_sign(lay.bias) if layer is SignBias else lay.bias).double()
    z = alpha * a + b
    if bn:
        u = net[2]
        z = (z - u.running_mean.double()) / torch.sqrt(u.running_var.double() + u.eps) * \
            u.weight.double() + u.bias.double()
    f = (a - fold.running_mean.double()) / torch.sqrt(fold.running_var.double() + fold.eps) * \
        fold.weight.double() + fold.bias.double()
    assert torch.allclose(f, z, rtol=1e-6, atol=1e-5)


def test_an_affine_operation_after_a_batchnorm_folds_into_it():
    class Shift(nn.Module):
        def forward(self, x):
            return 0.5 * x - 0.25

    net = _net(lambda i, o: _BinLin(i, o), True, post=Shift())
    x = to_float(_images())
    model = bnn_tol.adapt(net, x)
    with torch.no_grad():
        assert torch.equal(model(x).argmax(1), net(x).argmax(1))


class _BinLin(nn.Linear):
    def forward(self, x):
        return F.linear(x, _sign(self.weight), self.bias)


def test_latent_weights_binarized_to_zero_are_refused_naming_the_cause():
    class TorchSignLinear(nn.Linear):
        def forward(self, x):
            return F.linear(x, torch.sign(self.weight))

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), TorchSignLinear(64, 16, bias=False), nn.BatchNorm1d(16),
                        Sign(), _BinLin(16, 10, bias=False)).eval()
    with torch.no_grad():
        net[1].weight[3, 5] = 0.0
    with pytest.raises(AdaptError, match="1 latent weight.* exactly 0 .*torch.sign"):
        bnn_tol.adapt(net, to_float(_images()))


def test_operations_before_the_first_layer_become_the_input_grid():
    """``2x - 1`` in forward on [0, 1] inputs, then an 8-bit Q1.7 quantizer: the grid records
    ``q = clamp(round(128 (2 p / 255 - 1)), -128, 127)`` exactly."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = _BinLin(64, 16, bias=False)
            self.b1 = nn.BatchNorm1d(16)
            self.l2 = _BinLin(16, 10, bias=False)

        def forward(self, x):
            x = 2.0 * x.flatten(1) - torch.tensor([1.0], device=x.device)
            x = torch.clamp(torch.round(x * 128.0), -128.0, 127.0) / 128.0
            return self.l2(_sign(self.b1(self.l1(x))))

    net = Net().eval()
    tf = Normalize()
    imgs = _images()
    model = bnn_tol.adapt(net, tf.to_float(imgs), transform=tf)
    grid = grid_of(model)
    p = torch.arange(256, dtype=torch.float32)
    want = torch.clamp(torch.round((2.0 * (p / 255) - 1.0) * 128.0), -128, 127)
    assert grid.levels == tuple(int(v) for v in want) and grid.scale == 128
    with torch.no_grad():
        assert torch.equal(model(grid.to_float(imgs)).argmax(1), net(tf.to_float(imgs)).argmax(1))


@pytest.mark.parametrize("tf, offset, scale, levels", [
    (None, 128, 128, None),                    # the library's own grid: nothing to fold
    (Normalize(), 0, 256, None),               # ToTensor: q = p, factor 256 / 255 folded
    (Normalize(0.5, 0.5), 0, 256, "2p-255"),   # 2x - 1: a half-pixel zero point, q = 2p - 255
])
def test_affine_input_transforms_map_to_an_integer_grid(tf, offset, scale, levels):
    net = _net(_BinLin, True)
    imgs = _images()
    x = tf.to_float(imgs) if tf is not None else to_float(imgs)
    model = bnn_tol.adapt(net, x, transform=tf)
    grid = grid_of(model)
    assert (grid.offset, grid.scale) == (offset, scale)
    if levels == "2p-255":
        assert grid.levels == tuple(2 * p - 255 for p in range(256))
    else:
        assert grid.levels is None
    with torch.no_grad():
        ref = net(x)
        got = model(grid.to_float(imgs))
    assert torch.equal(got.argmax(1), ref.argmax(1))
    if tf is None:
        assert torch.equal(got, ref)  # exact: nothing folded


def test_an_example_that_is_not_the_transform_of_pixels_is_refused():
    net = _net(_BinLin, True)
    x = Normalize(0.5, 0.5).to_float(_images())
    with pytest.raises(AdaptError, match=r"example is not Normalize\(mean=0.0, std=1.0\)"):
        bnn_tol.adapt(net, x, transform=Normalize())
    with pytest.raises(AdaptError, match="transform must be None"):
        bnn_tol.adapt(net, x, transform=(0.5, 0.5))


def test_traced_constants_keep_their_argument_order():
    """``1.0 - x`` is not ``x - 1.0``: operands stay where forward put them."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = _BinLin(64, 32, bias=False)
            self.b1 = nn.BatchNorm1d(32)
            self.l2 = _BinLin(32, 10, bias=False)

        def forward(self, x):
            x = 1.0 - torch.flatten(x, 1)
            return self.l2(_sign(self.b1(self.l1(x))))

    net = _net(_BinLin, True)
    user = Net().eval()
    user.b1.load_state_dict(net[2].state_dict())
    tf = Normalize()
    imgs = _images()
    model = bnn_tol.adapt(user, tf.to_float(imgs), transform=tf)
    assert grid_of(model).levels == tuple(255 - p for p in range(256))  # x = (255 - p) / 255
    with torch.no_grad():
        assert torch.equal(model(grid_of(model).to_float(imgs)).argmax(1),
                           user(tf.to_float(imgs)).argmax(1))


# -- the input grid and the user's transform -------------------------------------------------


def test_input_grid_levels_are_validated_and_affine_levels_normalize():
    assert InputGrid.from_levels([p - 7 for p in range(256)], 8) == InputGrid(7, 8)
    g = InputGrid.from_levels([-1] * 128 + [1] * 128, 1)
    assert g.levels is not None and g.q_range == (-1, 1) and g.q_max == 1
    imgs = torch.tensor([[0, 127, 128, 255]], dtype=torch.uint8)
    assert g.to_int(imgs).tolist() == [[-1, -1, 1, 1]]
    assert g.to_float(imgs).tolist() == [[-1.0, -1.0, 1.0, 1.0]]
    assert InputGrid.from_config(g.config()) == g
    assert INPUT.config() == {"offset": 128, "scale": 128}
    for bad in ([0] * 255, [0.5] * 256, [2**15] * 256, [True] * 256):
        with pytest.raises(InvalidArgument):
            InputGrid(0, 1, levels=tuple(bad))
    with pytest.raises(InvalidArgument, match="power of two"):
        InputGrid(0, 3)
    with pytest.raises(InvalidArgument):
        InputGrid.from_config({"offset": 0, "scale": 1, "levels": "x"})


def test_normalize_inverts_exactly_on_pixels_and_refuses_other_values():
    tf = Normalize(0.1307, 0.3081)
    imgs = _images(shape=(1, 4, 4))
    x = tf.to_float(imgs)
    assert torch.equal(tf.pixels(x), imgs)
    assert tf.pixels(x + 1e-3) is None
    assert Normalize().pixels(torch.tensor([2.0])) is None
    for bad in (dict(std=0.0), dict(mean=float("nan")), dict(std=True), dict(mean=()),
                dict(mean=(0.5, 0.5), std=(0.5, 0.5, 0.5)), dict(std=(0.5, -1.0))):
        with pytest.raises(InvalidArgument):
            Normalize(**bad)


def test_batches_follow_the_model_grid(digits):
    g = InputGrid.from_levels([(p >= 100) * 2 - 1 for p in range(256)], 1)
    x, _ = next(digits.batches(16, grid=g))
    assert set(np.unique(x.numpy())) <= {-1.0, 1.0}
    assert torch.equal(next(digits.batches(16))[0], to_float(digits.images[:16]))
