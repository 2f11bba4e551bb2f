import math

import pytest
import torch
from torch import nn

from bnn_tol.core.layers import (
    BinaryConv2d,
    BinaryLinear,
    apply_folded,
    bn_threshold,
    fold_threshold,
    sign,
)


def test_sign_of_zero_is_plus_one_and_never_zero():
    x = torch.tensor([-2.0, -1e-30, -0.0, 0.0, 1e-30, 3.0])
    assert sign(x).tolist() == [-1, -1, 1, 1, 1, 1]


def test_ste_gradient_is_hardtanh_window():
    x = torch.tensor([-1.5, -1.0, -0.3, 0.0, 0.7, 1.0, 1.01], requires_grad=True)
    sign(x).sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 1, 0]


def test_binary_linear_uses_sign_of_latent_weight_and_fault():
    layer = BinaryLinear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.2, -0.1, 0.0], [-0.5, 0.5, -1.0]]))
    x = torch.tensor([[1.0, 2.0, 4.0]])
    assert layer(x).tolist() == [[1 - 2 + 4, -1 + 2 - 4]]
    layer.fault = lambda wb: -wb
    assert layer(x).tolist() == [[-3.0, 3.0]]


def test_binary_conv_matches_conv_with_sign_weights():
    conv = BinaryConv2d(2, 3)
    # small-integer inputs: every partial sum is an exact float32 integer, so any kernel
    # (Intel/AMD dispatch, any thread count, any summation order) gives the same bits
    x = torch.randint(-8, 8, (4, 2, 5, 5), generator=torch.Generator().manual_seed(0)).float()
    ref = nn.functional.conv2d(x, torch.where(conv.weight >= 0, 1.0, -1.0), padding=1)
    assert torch.equal(conv(x), ref)
    assert conv.fan_in == 18


def _bn(gamma, beta, mean, var, eps=1e-5, two_d=False):
    c = len(gamma)
    bn = (nn.BatchNorm2d(c, eps=eps) if two_d else nn.BatchNorm1d(c, eps=eps)).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(gamma))
        bn.bias.copy_(torch.tensor(beta))
        bn.running_mean.copy_(torch.tensor(mean))
        bn.running_var.copy_(torch.tensor(var))
    return bn


def test_bn_threshold_hand_computed_including_negative_and_zero_gamma():
    # tau = mu - beta * sqrt(var + eps) / gamma
    bn = _bn([2.0, -0.5, 0.0], [1.0, 1.0, -3.0], [3.0, -1.0, 0.0], [4.0 - 1e-5, 1.0 - 1e-5, 1.0])
    thr = bn_threshold(bn)
    assert thr.direction.tolist() == [1, -1, 0]
    assert thr.tau[0].item() == pytest.approx(3.0 - 1.0 * 2.0 / 2.0)
    assert thr.tau[1].item() == pytest.approx(-1.0 - 1.0 * 1.0 / -0.5)
    assert math.isnan(thr.tau[2].item())
    folded = fold_threshold(bn)
    assert folded.const.tolist() == [0, 0, -1]  # dead neuron outputs sign(beta) = -1


def _float_forward(bn, a, two_d):
    x = a[:, :, None, None] if two_d else a
    return sign(bn(x)).reshape(a.shape)


@pytest.mark.parametrize("two_d", [False, True])
def test_folded_threshold_matches_float_batchnorm_including_ties(two_d):
    g = torch.Generator().manual_seed(1)
    c = 64
    gamma = torch.randn(c, generator=g)
    gamma[:8] = -gamma[:8].abs()  # negative gamma
    gamma[8] = 0.0  # dead
    beta = torch.randn(c, generator=g)
    mean = torch.randn(c, generator=g) * 20
    var = torch.rand(c, generator=g) * 30 + 0.1
    # adversarial: make tau an exact integer for some channels (ties at a == tau)
    std = torch.sqrt(var + 1e-5)
    beta[10:40] = ((mean[10:40].round() - mean[10:40]) * 0 + 1.0)
    mean[10:40] = mean[10:40].round() + beta[10:40] * std[10:40] / gamma[10:40]
    bn = _bn(gamma.tolist(), beta.tolist(), mean.tolist(), var.tolist(), two_d=two_d)
    folded = fold_threshold(bn)
    thr = bn_threshold(bn)
    # every integer around every threshold, plus random integers
    centers = torch.nan_to_num(thr.tau, nan=0.0).round()
    offsets = torch.arange(-6, 7, dtype=torch.float64)[:, None]
    a = (centers[None, :] + offsets).float()
    a = torch.cat([a, torch.randint(-200, 200, (500, c), generator=g).float()])
    ref = _float_forward(bn, a, two_d)
    assert torch.equal(apply_folded(a, folded), ref)
    # the real tau and the folded integer threshold differ by less than 1 (up to the float32
    # rounding of BN itself, relative 1e-6)
    alive = folded.direction != 0
    diff = (folded.t[alive].double() - thr.tau[alive]).abs()
    assert (diff <= 1.0 + 1e-6 * thr.tau[alive].abs().clamp(min=1)).all()


def test_folded_threshold_matches_in_full_conv_feature_maps():
    g = torch.Generator().manual_seed(2)
    gamma, beta = torch.randn(16, generator=g), torch.randn(16, generator=g)
    mean, var = torch.randn(16, generator=g) * 5, torch.rand(16, generator=g) + 0.5
    bn = _bn(gamma.tolist(), beta.tolist(), mean.tolist(), var.tolist(), two_d=True)
    folded = fold_threshold(bn)
    a = torch.randint(-30, 30, (8, 16, 14, 14), generator=g).float()
    assert torch.equal(apply_folded(a, folded), sign(bn(a)))


def test_float_batchnorm_rounding_is_real_so_folding_is_needed():
    # tau = 5 exactly; the exact decision at a = 5 is +1. Whatever float BN does, the folded
    # comparator reproduces it.
    bn = _bn([1.7], [0.0], [5.0], [0.3])
    a = torch.tensor([[4.0], [5.0], [6.0]])
    assert torch.equal(apply_folded(a, fold_threshold(bn)), sign(bn(a)))


def test_folded_threshold_on_a_scaled_grid_matches_float_batchnorm():
    # first layer: a = k / 128 with integer k (inputs (p - 128) / 128)
    g = torch.Generator().manual_seed(5)
    c = 32
    bn = _bn(torch.randn(c, generator=g).tolist(), torch.randn(c, generator=g).tolist(),
             (torch.randn(c, generator=g) * 4).tolist(), (torch.rand(c, generator=g) + .1).tolist())
    folded = fold_threshold(bn, scale=128)
    tau = bn_threshold(bn).tau
    k = (tau * 128).round()[None, :] + torch.arange(-40, 41, dtype=torch.float64)[:, None]
    ref = sign(bn((k / 128).float())).reshape(k.shape)
    assert torch.equal(apply_folded(k.float(), folded), ref)


def test_fast_sign_and_ste_equal_where_and_masked_fill_bit_for_bit():
    """sign writes +-1 as float32 bit patterns and the STE skips or fuses the mask; both must
    give the bits of the plain forms, also at 0, -0, +-1, just above 1, inf and NaN."""
    from bnn_tol.core.layers import _ste_grad

    special = torch.tensor([-2.0, -1e-30, -0.0, 0.0, 1e-30, 3.0, math.nan, -math.nan, math.inf,
                            -math.inf, 1.0, -1.0, 1.0000001, -1.0000001, 0.99999994])
    g = torch.Generator().manual_seed(0)
    cases = [special, special.nan_to_num(0.5), special.clamp(-1, 1).nan_to_num(0.0),
             2 * torch.randn(3, 700, generator=g), torch.rand(5, 4, 3, 3, generator=g) * 2 - 1,
             torch.randn(2, 3, 4, 5, generator=g).to(memory_format=torch.channels_last),
             torch.randn(50, generator=g).double()]
    for x in cases:
        want = torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
        got = sign(x)
        assert got.dtype == x.dtype and got.stride() == want.stride()
        assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))
        for grad in (torch.randn(x.shape, generator=g, dtype=x.dtype), -torch.zeros_like(x)):
            want_g = grad.masked_fill(x.abs() > 1, 0.0)
            got_g = _ste_grad(x, grad)
            assert torch.equal(got_g.reshape(-1).view(torch.uint8),
                               want_g.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("trial", range(8))
def test_fused_sign_pool_equals_pool_of_sign_bit_for_bit(trial):
    """sign_pool (vgg blocks) = max_pool2d(sign(x), 2): values and gradients, with ties (the
    first x >= 0 of a window gets the gradient, else its first element), windows without an
    x >= 0, |x| > 1 and x = +-1 at the maximum, -0 and NaN gradients, NaN/inf inputs; odd sizes
    and other kernels take the composite."""
    import torch.nn.functional as F

    from bnn_tol.core.layers import sign_pool

    g = torch.Generator().manual_seed(trial)
    shape = (3, 4, 6, 8) if trial < 6 else ((2, 3, 5, 6) if trial == 6 else (2, 3, 9, 9))
    k = 3 if trial == 7 else 2
    x = torch.randn(shape, generator=g) * 1.5
    for value, rate in ((-0.0, 0.2), (1.0, 0.1), (-1.0, 0.1)):
        x[torch.rand(shape, generator=g) < rate] = value
    if trial % 3 == 0:  # many windows without a positive entry
        x = torch.where(torch.rand(shape, generator=g) < 0.7, -x.abs() - 1e-3, x)
    if trial == 1:
        x[0, 0, 0, 0], x[1, 1, 2, 3], x[0, 1, 0, 1] = math.nan, math.nan, math.inf
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = sign_pool(a, k), F.max_pool2d(sign(b), k)
    assert torch.equal(ya, yb) and ya.stride() == yb.stride()
    go = torch.randn(ya.shape, generator=g)
    go[torch.rand(go.shape, generator=g) < 0.3] = -0.0
    if trial == 2:
        go[0, 0, 0, 0] = math.nan
    (ga,), (gb,) = torch.autograd.grad(ya, a, go), torch.autograd.grad(yb, b, go)
    assert torch.equal(ga.view(torch.int32), gb.view(torch.int32))


def test_fold_threshold_far_beyond_float32_is_bounded_and_matches_the_float_bn():
    """A threshold at |tau| ~ 1e12 (where float32 no longer resolves integers) folds by
    doubling + bisection: a few dozen BN evaluations of (C,) values, not a window of 10^12
    integers, and the comparator still equals the float BN on integers around the boundary."""
    import tracemalloc

    from bnn_tol.core.layers import fold_threshold

    bn = torch.nn.BatchNorm1d(4).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1e12, -3e11, 5.0, 2.0**40]))
        bn.running_var.fill_(1.0)
        bn.weight.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
        bn.bias.zero_()
    tracemalloc.start()
    f = fold_threshold(bn)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20
    for c in range(4):
        for k in (int(f.t[c]) + dk for dk in (-2, -1, 0, 1, 2)):
            x = torch.zeros(1, 4, dtype=torch.float32)
            x[0, c] = float(k)
            plus = bool(bn(x)[0, c] >= 0)
            rule = k >= int(f.t[c]) if f.direction[c] > 0 else k <= int(f.t[c])
            assert plus == rule, (c, k)
