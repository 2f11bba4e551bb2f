"""BNNs written the way public code writes them (issue 22), our own code after the public
designs -- no third-party code is vendored:

* BinaryNet.pytorch (Courbariaux & Hubara): ``BinarizeLinear``/``BinarizeConv2d`` binarize their
  weights with ``torch.sign`` and their input unless it is the image, add the (real) bias *after*
  the product (``out += bias``), ``Hardtanh(inplace=True)`` as activation, max-pool *before* the
  BatchNorm, a non-affine last BatchNorm and ``LogSoftmax``; ``main_mnist.py``'s ``Net`` (a
  full-precision last layer, ``Normalize((0.1307,), (0.3081,))``), ``vgg_cifar10_binary``, and
  ``resnet_binary`` (residual blocks with ``if residual.data.max() > 1`` in ``forward``).
* Brevitas ``bnn_pynq`` 1W1A (``FC`` = TFC/SFC/LFC and ``CNV``): ``2.0 * x -
  torch.tensor([1.0], device=x.device)`` in ``forward`` on ``ToTensor`` inputs, an input
  quantizer (1 bit for FC, 8 bit Q1.7 for CNV), binary weights and activations with a constant
  scale 1, no layer bias, ``BatchNorm(eps=1e-4)``, and a per-tensor ``TensorNorm`` after the last
  layer. Brevitas itself is not installed here: its quantizers are written out in plain torch
  with the same arithmetic.
* XNOR-Net style: per-output-channel weight scales ``alpha_o = mean |W_o|``, and a positive
  ``Scale`` module after the last layer.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnn_tol import data


def fashion_mnist(n_train: int, n_test: int):
    """``(train, test)``: ``n_train`` training images (subset seed 0) and the first ``n_test``
    test images of Fashion-MNIST; the test is skipped where the dataset is not installed."""
    try:
        return (data.load("fashion-mnist", "train").subset(n_train, seed=0),
                data.load("fashion-mnist", "test").subset(n_test))
    except data.DatasetNotFound:  # pragma: no cover - depends on the machine
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")


def fit(user: nn.Module, x, y, steps: int = 60, seed: int = 0) -> nn.Module:
    """A few Adam steps on the user's own model and inputs (straight-through estimators),
    latent weights clipped to [-1, 1] as BinaryNet and Brevitas do; eval mode after."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(user.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    user.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        opt.zero_grad()
        F.cross_entropy(user(x[idx].clone()), y[idx]).backward()
        opt.step()
        with torch.no_grad():
            for name, p in user.named_parameters():
                if name.endswith("weight") and p.dim() > 1:
                    p.clamp_(-1, 1)
    return user.eval()

# -- BinaryNet.pytorch -------------------------------------------------------------------------


class _BinarizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.sign()

    @staticmethod
    def backward(ctx, g):
        return g


def binarized(x):
    return _BinarizeSTE.apply(x)


class BinarizeLinear(nn.Linear):
    def forward(self, input):
        input_b = binarized(input) if input.size(1) != 784 else input
        out = F.linear(input_b, binarized(self.weight))
        if self.bias is not None:
            out += self.bias.view(1, -1).expand_as(out)
        return out


class BinarizeConv2d(nn.Conv2d):
    def forward(self, input):
        input_b = binarized(input) if input.size(1) != 3 else input
        out = F.conv2d(input_b, binarized(self.weight), None, self.stride, self.padding,
                       self.dilation, self.groups)
        if self.bias is not None:
            out += self.bias.view(1, -1, 1, 1).expand_as(out)
        return out


class BinaryNetMnist(nn.Module):
    """``main_mnist.py``'s ``Net`` (widths as arguments): biases everywhere, a full-precision
    last layer on hardtanh outputs."""

    def __init__(self, width: int = 96, binary_head: bool = False):
        super().__init__()
        self.fc1 = BinarizeLinear(784, width)
        self.htanh1 = nn.Hardtanh()
        self.bn1 = nn.BatchNorm1d(width)
        self.fc2 = BinarizeLinear(width, width)
        self.htanh2 = nn.Hardtanh()
        self.bn2 = nn.BatchNorm1d(width)
        self.fc3 = BinarizeLinear(width, width)
        self.htanh3 = nn.Hardtanh()
        self.bn3 = nn.BatchNorm1d(width)
        self.fc4 = BinarizeLinear(width, 10) if binary_head else nn.Linear(width, 10)
        self.logsoftmax = nn.LogSoftmax(dim=1)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        x = x.view(-1, 28 * 28)
        x = self.fc1(x)
        x = self.bn1(x)
        x = self.htanh1(x)
        x = self.fc2(x)
        x = self.bn2(x)
        x = self.htanh2(x)
        x = self.fc3(x)
        x = self.drop(x)
        x = self.bn3(x)
        x = self.htanh3(x)
        x = self.fc4(x)
        return self.logsoftmax(x)


class BinaryNetVGG(nn.Module):
    """``vgg_cifar10_binary`` for 1 x 28 x 28 (channels scaled down): conv -> [pool] -> BN ->
    Hardtanh(inplace), biases, a non-affine last BN, LogSoftmax."""

    def __init__(self, c: int = 16, fc: int = 64, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            BinarizeConv2d(1, c, kernel_size=3, stride=1, padding=1, bias=True),
            nn.BatchNorm2d(c), nn.Hardtanh(inplace=True),
            BinarizeConv2d(c, c, kernel_size=3, padding=1, bias=True),
            nn.MaxPool2d(kernel_size=2, stride=2), nn.BatchNorm2d(c), nn.Hardtanh(inplace=True),
            BinarizeConv2d(c, 2 * c, kernel_size=3, padding=1, bias=True),
            nn.MaxPool2d(kernel_size=2, stride=2), nn.BatchNorm2d(2 * c),
            nn.Hardtanh(inplace=True))
        self.classifier = nn.Sequential(
            BinarizeLinear(2 * c * 7 * 7, fc, bias=True), nn.BatchNorm1d(fc),
            nn.Hardtanh(inplace=True),
            BinarizeLinear(fc, num_classes, bias=True),
            nn.BatchNorm1d(num_classes, affine=False), nn.LogSoftmax(dim=1))
        self.c = c

    def forward(self, x):
        x = self.features(x)
        x = x.view(-1, 2 * self.c * 7 * 7)
        return self.classifier(x)


class BasicBlock(nn.Module):
    """``resnet_binary``'s block: two binary convs, a residual sum, data-dependent control
    flow in ``forward``."""

    def __init__(self, c_in: int, c: int, downsample: nn.Module | None = None,
                 check_range: bool = True):
        super().__init__()
        self.check_range = check_range
        self.conv1 = BinarizeConv2d(c_in, c, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.tanh1 = nn.Hardtanh(inplace=True)
        self.conv2 = BinarizeConv2d(c, c, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.tanh2 = nn.Hardtanh(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        residual = x.clone()
        out = self.tanh1(self.bn1(self.conv1(x)))
        out = self.conv2(out)
        if self.downsample is not None:
            if self.check_range and residual.data.max() > 1:  # resnet_binary's range check
                raise RuntimeError("unexpected input range")
            residual = self.downsample(residual)
        out += residual
        return self.tanh2(self.bn2(out))


class BinaryResNet(nn.Module):
    """``resnet_binary`` for 1 x 28 x 28 (``check_range=False``: without the data-dependent
    range check in ``forward``, so torch.fx can trace it)."""

    def __init__(self, c: int = 8, check_range: bool = True):
        super().__init__()
        self.conv1 = BinarizeConv2d(1, c, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.tanh1 = nn.Hardtanh(inplace=True)
        self.layer1 = BasicBlock(c, c, check_range=check_range)
        self.layer2 = BasicBlock(c, c, downsample=nn.Sequential(
            BinarizeConv2d(c, c, kernel_size=1, bias=False), nn.BatchNorm2d(c)),
            check_range=check_range)
        self.pool = nn.MaxPool2d(4)
        self.fc = BinarizeLinear(c * 7 * 7, 10)
        self.bn2 = nn.BatchNorm1d(10)

    def forward(self, x):
        x = self.tanh1(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        x = self.pool(x)
        return self.bn2(self.fc(x.view(x.size(0), -1)))


class BiRealBlock(nn.Module):
    """Bi-Real-Net: a real-valued shortcut around every binary convolution."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = BinarizeConv2d(c, c, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(self.conv(x)) + x


class BiRealNet(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = BinarizeConv2d(1, c, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.block = BiRealBlock(c)
        self.pool = nn.MaxPool2d(4)
        self.fc = BinarizeLinear(c * 7 * 7, 10)

    def forward(self, x):
        x = self.block(self.bn(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


# -- Brevitas bnn_pynq 1W1A, quantizers in plain torch -----------------------------------------


class BinarySignSTE(torch.autograd.Function):
    """Brevitas' ``binary_sign``: +1 where x >= 0, else -1 (a constant scale of 1)."""

    @staticmethod
    def forward(ctx, x):
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, g):
        return g


class BinaryIdentity(nn.Module):
    """``QuantIdentity(act_quant=CommonActQuant, bit_width=1)``: binary activations."""

    def forward(self, x):
        return BinarySignSTE.apply(x)


class Q17Identity(nn.Module):
    """``QuantIdentity(bit_width=8, min_val=-1, max_val=1 - 2^-7, narrow_range=False, power of
    two scale)``: the Q1.7 input format, ``clamp(round(128 x), -128, 127) / 128``."""

    def forward(self, x):
        return torch.clamp(torch.round(x * 128.0), -128.0, 127.0) / 128.0


class QuantLinear(nn.Linear):
    """``QuantLinear(bias=False, weight_quant=CommonWeightQuant, weight_bit_width=1)``."""

    def forward(self, x):
        return F.linear(x, BinarySignSTE.apply(self.weight))


class QuantConv2d(nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, BinarySignSTE.apply(self.weight), None)


class TensorNorm(nn.Module):
    """One mean and variance for the whole tensor (bnn_pynq's ``TensorNorm``)."""

    def __init__(self, eps: float = 1e-4, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))
        self.register_buffer("running_mean", torch.zeros(1))
        self.register_buffer("running_var", torch.ones(1))

    def forward(self, x):
        if self.training:
            mean, var = x.mean(), x.var(unbiased=True)
            self.running_mean = (1 - self.momentum) * self.running_mean + self.momentum * \
                mean.detach()
            self.running_var = (1 - self.momentum) * self.running_var + self.momentum * \
                var.detach()
            return (x - mean) / (x.var(unbiased=False) + self.eps).pow(0.5) * self.weight + \
                self.bias
        return ((x - self.running_mean) / (self.running_var + self.eps).pow(0.5)) * \
            self.weight + self.bias


class BrevitasFC(nn.Module):
    """``FC`` (TFC: 64-64-64, SFC: 256 x 3, LFC: 1024 x 4) with ``IN_BIT_WIDTH = 1``."""

    def __init__(self, out_features=(64, 64, 64), num_classes: int = 10, dropout: float = 0.2):
        super().__init__()
        self.features = nn.ModuleList([BinaryIdentity(), nn.Dropout(p=dropout)])
        in_features = 28 * 28
        for out in out_features:
            self.features.append(QuantLinear(in_features, out, bias=False))
            in_features = out
            self.features.append(nn.BatchNorm1d(in_features))
            self.features.append(BinaryIdentity())
            self.features.append(nn.Dropout(p=dropout))
        self.features.append(QuantLinear(in_features, num_classes, bias=False))
        self.features.append(TensorNorm())
        for m in self.modules():
            if isinstance(m, QuantLinear):
                torch.nn.init.uniform_(m.weight.data, -1, 1)

    def forward(self, x):
        x = x.view(x.shape[0], -1)
        x = 2.0 * x - torch.tensor([1.0], device=x.device)
        for mod in self.features:
            x = mod(x)
        return x


class BrevitasCNV(nn.Module):
    """``CNV`` 1W1A (8-bit Q1.7 input), unpadded 3x3 convs, channels and depth sized for
    28 x 28 inputs."""

    def __init__(self, layers=((16, False), (16, True), (32, False), (32, True)),
                 fc=(64,), num_classes: int = 10):
        super().__init__()
        self.conv_features = nn.ModuleList([Q17Identity()])
        c, side = 1, 28
        for out, pool in layers:
            self.conv_features.append(QuantConv2d(c, out, kernel_size=3, bias=False))
            c, side = out, side - 2
            self.conv_features.append(nn.BatchNorm2d(c, eps=1e-4))
            self.conv_features.append(BinaryIdentity())
            if pool:
                self.conv_features.append(nn.MaxPool2d(kernel_size=2))
                side //= 2
        self.linear_features = nn.ModuleList()
        n = c * side * side
        for out in fc:
            self.linear_features.append(QuantLinear(n, out, bias=False))
            self.linear_features.append(nn.BatchNorm1d(out, eps=1e-4))
            self.linear_features.append(BinaryIdentity())
            n = out
        self.linear_features.append(QuantLinear(n, num_classes, bias=False))
        self.linear_features.append(TensorNorm())
        for m in self.modules():
            if isinstance(m, QuantConv2d | QuantLinear):
                torch.nn.init.uniform_(m.weight.data, -1, 1)

    def forward(self, x):
        x = 2.0 * x - torch.tensor([1.0], device=x.device)
        for mod in self.conv_features:
            x = mod(x)
        x = x.view(x.shape[0], -1)
        for mod in self.linear_features:
            x = mod(x)
        return x


# -- XNOR-Net style ----------------------------------------------------------------------------


class XnorConv2d(nn.Conv2d):
    """``alpha_o sign(W_o)`` with ``alpha_o = mean |W_o|`` per output channel."""

    def forward(self, x):
        alpha = self.weight.abs().mean(dim=(1, 2, 3), keepdim=True)
        return self._conv_forward(x, alpha * BinarySignSTE.apply(self.weight), self.bias)


class XnorLinear(nn.Linear):
    def forward(self, x):
        alpha = self.weight.abs().mean(dim=1, keepdim=True)
        return F.linear(x, alpha * BinarySignSTE.apply(self.weight), self.bias)


class Scale(nn.Module):
    """A positive learned scale of the class scores."""

    def __init__(self, s: float = 4.0):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(float(s)))

    def forward(self, x):
        return x * self.s


class XnorNet(nn.Module):
    def __init__(self, c: int = 16):
        super().__init__()
        self.conv1 = XnorConv2d(1, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = XnorConv2d(c, c, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(c)
        self.fc = XnorLinear(c * 7 * 7, 10, bias=True)
        self.scale = Scale()

    def forward(self, x):
        x = F.max_pool2d(BinarySignSTE.apply(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(BinarySignSTE.apply(self.bn2(self.conv2(x))), 2)
        return self.scale(self.fc(torch.flatten(x, 1)))


def calibrate(model: nn.Module, x: torch.Tensor, seed: int = 0) -> nn.Module:
    """Random latent weights (the module's own init, seeded) and BatchNorm / TensorNorm running
    statistics from a train-mode pass over real images ``x`` (cumulative averages); eval mode."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            m.reset_running_stats()
        if isinstance(m, TensorNorm):
            m.momentum = 1.0
    model.train()
    with torch.no_grad():
        for chunk in x.split(256):
            model(chunk.clone())
    return model.eval()
