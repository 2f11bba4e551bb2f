"""Bring your own BNN: several independently written BNN styles adapt exactly (issue 12)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnn_tol
from bnn_tol import errors, evaluate, metrics
from bnn_tol.data import BNNDataset, to_float
from bnn_tol.interop.adapt import AdaptError

# -- style 1: BinaryNet (Courbariaux/Hubara): the layer binarizes weights in place and its own
#    input (except the first layer), Hardtanh as activation, LogSoftmax at the end -------------


def binarize(t):
    return t.sign()


class BinarizeLinear(nn.Linear):
    def forward(self, input):
        if input.size(1) != 64:
            input.data = binarize(input.data)
        if not hasattr(self.weight, "org"):
            self.weight.org = self.weight.data.clone()
        self.weight.data = binarize(self.weight.org)
        return F.linear(input, self.weight)


class BinaryNetMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = BinarizeLinear(64, 48, bias=False)
        self.bn1 = nn.BatchNorm1d(48)
        self.htanh1 = nn.Hardtanh()
        self.fc2 = BinarizeLinear(48, 32, bias=False)
        self.bn2 = nn.BatchNorm1d(32)
        self.htanh2 = nn.Hardtanh()
        self.fc3 = BinarizeLinear(32, 10, bias=False)
        self.bn3 = nn.BatchNorm1d(10)
        self.logsoftmax = nn.LogSoftmax(dim=1)

    def forward(self, x):
        x = x.view(-1, 64)
        x = self.htanh1(self.bn1(self.fc1(x)))
        x = self.htanh2(self.bn2(self.fc2(x)))
        return self.logsoftmax(self.bn3(self.fc3(x)))


# -- style 2: an nn.Sequential with a custom sign autograd Function and weight binarization ----


class SignFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1)


class Sign(nn.Module):
    def forward(self, x):
        return SignFn.apply(x)


class BinConv(nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, SignFn.apply(self.weight), self.bias)


class BinLin(nn.Linear):
    def forward(self, x):
        return F.linear(x, SignFn.apply(self.weight), self.bias)


def sequential_cnn():
    return nn.Sequential(
        BinConv(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), Sign(), nn.MaxPool2d(2),
        BinConv(6, 8, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(8),
        nn.Hardtanh(), Sign(),
        nn.Flatten(), BinLin(8 * 2 * 2, 16, bias=False), nn.BatchNorm1d(16), Sign(),
        BinLin(16, 10, bias=False), nn.BatchNorm1d(10))


# -- style 3: a traceable module with torch.sign in forward and a bias on the last layer ------


class TorchSignNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = BinLin(64, 24, bias=False)
        self.b1 = nn.BatchNorm1d(24)
        self.l2 = BinLin(24, 10, bias=True)

    def forward(self, x):
        x = torch.flatten(x, 1)
        x = torch.sign(F.hardtanh(self.b1(self.l1(x))))
        return self.l2(x)


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 1.5, generator=g)
                m.running_var.uniform_(0.5, 3, generator=g)
                m.weight.uniform_(0.2, 1.5, generator=g)
                m.bias.normal_(0, 0.3, generator=g)
    return module.eval()


def _example(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("make", [BinaryNetMLP, sequential_cnn, TorchSignNet])
def test_independent_bnn_styles_adapt_exactly_and_work_everywhere(make, tmp_path):
    torch.manual_seed(0)
    user = _randomize(make())
    imgs = _example()
    x = to_float(imgs)
    model = bnn_tol.adapt(user, x, sign_zero=0 if make is TorchSignNet else None)
    scores = model(x)
    with torch.no_grad():
        ref = user(x)
    assert torch.equal(scores.argmax(1), ref.argmax(1))
    if make is sequential_cnn:
        assert torch.equal(scores, ref)
    ds = BNNDataset(imgs, ref.argmax(1))
    df = evaluate.sweep(model, ds, bers=[0, 0.05], n_maps=2, seed=0, progress=False)
    assert df.query("ber == 0")["accuracy"].eq(1.0).all()
    with errors.inject(model, 0.05, seed=int(df.map_seed.iloc[-1])):
        assert evaluate.accuracy(model, ds) == df.accuracy.iloc[-1]
    if make is not TorchSignNet:  # the sign engines and metrics need bias-free layers
        assert len(metrics.margin(model, ds)) > 0
    bnn_tol.save(model, tmp_path / "m")
    back = bnn_tol.load(tmp_path / "m")
    assert torch.equal(back(x), scores)


def test_adapt_refuses_what_it_cannot_map_naming_it():
    user = _randomize(nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.BatchNorm1d(10)))
    x = to_float(_example())
    with pytest.raises(AdaptError, match="is a full-precision layer"):
        bnn_tol.adapt(user, x)
    user = _randomize(nn.Sequential(nn.Flatten(), BinLin(64, 16, bias=False), nn.BatchNorm1d(16),
                                    nn.Sigmoid(), BinLin(16, 10, bias=False)))
    with pytest.raises(AdaptError, match="Sigmoid"):
        bnn_tol.adapt(user, x)
    with pytest.raises(AdaptError, match="input grid"):
        bnn_tol.adapt(sequential_cnn(), torch.rand(4, 1, 8, 8))
    cnn = _randomize(sequential_cnn())
    with torch.no_grad():
        cnn[6].weight[0] = -1.0  # gamma < 0 after a max-pool: does not commute
    with pytest.raises(AdaptError, match="gamma"):
        bnn_tol.adapt(cnn, x)


def test_brevitas_binary_network_adapts_with_its_weight_scale_folded():
    pytest.importorskip("brevitas")
    import brevitas.nn as qnn
    from brevitas.quant import SignedBinaryActPerTensorConst, SignedBinaryWeightPerTensorConst

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Flatten(),
        qnn.QuantLinear(64, 32, bias=False, weight_quant=SignedBinaryWeightPerTensorConst),
        nn.BatchNorm1d(32), qnn.QuantIdentity(act_quant=SignedBinaryActPerTensorConst),
        qnn.QuantLinear(32, 10, bias=False, weight_quant=SignedBinaryWeightPerTensorConst),
        nn.BatchNorm1d(10))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.3, generator=g)
                m.running_var.uniform_(0.05, 0.3, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
    net.eval()
    x = to_float(_example(256, seed=3))
    model = bnn_tol.adapt(net, x)
    with torch.no_grad():
        ref = net(x)
    # Brevitas computes with alpha sign(W) (alpha = 0.1): the scale is folded into the BN, equal
    # in exact arithmetic; the float results agree to rounding and the predictions exactly
    assert torch.equal(model(x).argmax(1), ref.argmax(1))
    assert torch.allclose(model(x), ref, rtol=0, atol=1e-5)
    # alpha folded into the BN scale (eps unchanged): gamma' = 0.1 gamma
    assert torch.allclose(model.blocks[0].bn.weight, 0.1 * net[2].weight, rtol=1e-5)


class ScaledBinLin(nn.Linear):
    """XNOR-Net / Brevitas style: alpha sign(W), one positive scale per tensor."""

    def forward(self, x):
        return F.linear(x, 0.25 * SignFn.apply(self.weight), self.bias)


class TorchSign(nn.Module):
    def forward(self, x):
        return torch.sign(x)


def _zero_net(layer, sign):
    torch.manual_seed(0)
    net = _randomize(nn.Sequential(nn.Flatten(), layer(64, 16, bias=False), nn.BatchNorm1d(16),
                                   sign(), BinLin(16, 10, bias=False), nn.BatchNorm1d(10)))
    img = _example()
    img[0] = 128  # a gray image is 0 on the input grid: every pre-activation is exactly 0
    x = to_float(img)
    with torch.no_grad():
        net[2].running_mean[3] = 0.0  # BN(0) = 0 * gamma / sqrt(var + eps) + 0 for unit 3
        net[2].bias[3] = 0.0
        assert net[2](net[1](net[0](x)))[0, 3] == 0
    return net, x


@pytest.mark.parametrize("layer", [BinLin, ScaledBinLin])
def test_an_exact_zero_before_torch_sign_is_refused_also_with_a_folded_weight_scale(layer):
    """sign(0) conventions differ: an example whose hidden BatchNorm output is exactly 0 is
    refused (sign_zero=None) when the model's sign maps 0 to 0, also where a weight scale was
    folded into a copy of the BN."""
    net, x = _zero_net(layer, TorchSign)
    with pytest.raises(AdaptError, match="exactly 0"):
        bnn_tol.adapt(net, x)
    # said: the model maps 0 to 0, which one sign bit cannot hold; the verification shows it
    with pytest.raises(AdaptError, match="differs from the original on the example"):
        bnn_tol.adapt(net, x, sign_zero=0)


@pytest.mark.parametrize("layer", [BinLin, ScaledBinLin])
def test_a_sign_that_maps_zero_to_plus_one_needs_no_sign_zero(layer):
    """A sign activation probed at 0 that returns +1 is the library's convention: exact zeros
    before it are harmless and adapt without ``sign_zero``."""
    net, x = _zero_net(layer, Sign)
    model = bnn_tol.adapt(net, x)
    assert torch.equal(model(x).argmax(1), net(x).argmax(1))


class IdiomNet(nn.Module):
    """Common forward idioms of public BNN code (issue 22, item 1): functional max-pooling with
    a constant kernel and ``x.view(x.shape[0], -1)``."""

    def __init__(self):
        super().__init__()
        self.c1 = BinConv(1, 6, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(6)
        self.c2 = BinConv(6, 8, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.l1 = BinLin(8 * 2 * 2, 10, bias=False)
        self.b3 = nn.BatchNorm1d(10)
        self.sign = Sign()

    def forward(self, x):
        x = F.max_pool2d(self.sign(self.b1(self.c1(x))), 2)
        x = self.sign(self.b2(F.max_pool2d(self.c2(x), kernel_size=2, stride=2)))
        x = x.view(x.shape[0], -1)
        return self.b3(self.l1(x))


def test_functional_pooling_and_shape_idioms_adapt_exactly():
    net = _randomize(IdiomNet())
    x = to_float(_example())
    model = bnn_tol.adapt(net, x)
    assert [b.pool for b in model.blocks][:2] == [2, 2]
    with torch.no_grad():
        assert torch.equal(model(x).argmax(1), net(x).argmax(1))
        assert torch.allclose(model(x), net(x), rtol=0, atol=1e-5)


class ConstantFromInputNet(nn.Module):
    """A constant built from the input's device (``torch.tensor(..., device=x.device)``): the
    fx graph is not a chain, the module walk maps it (issue 22, item 1)."""

    def __init__(self):
        super().__init__()
        self.l1 = BinLin(64, 16, bias=False)
        self.b1 = nn.BatchNorm1d(16)
        self.sign = Sign()
        self.l2 = BinLin(16, 10, bias=False)
        self.b2 = nn.BatchNorm1d(10)

    def forward(self, x):
        one = torch.tensor([1.0], device=x.device)
        x = torch.flatten(x, 1) * one
        return self.b2(self.l2(self.sign(self.b1(self.l1(x)))))


def test_a_trace_that_is_not_a_chain_falls_back_to_the_module_walk():
    net = _randomize(ConstantFromInputNet())
    x = to_float(_example())
    model = bnn_tol.adapt(net, x)
    with torch.no_grad():
        assert torch.equal(model(x).argmax(1), net(x).argmax(1))
        assert torch.allclose(model(x), net(x), rtol=0, atol=1e-5)
