"""The numba kernels of exact importance equal their slow torch references bit for bit."""

import importlib

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from _helpers import randomize_bn

from bnn_tol import data, metrics, models
from bnn_tol.core import kernels

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason="numba is not installed")

imp_mod = importlib.import_module("bnn_tol.metrics.importance")


def _ref_preact(a_out, g, gs, w2, w1c, u):
    """The torch expression the kernel replaces: a dense float32 product (exact integers)."""
    half_d = g[:, None, :] * w2[None]
    base = a_out + half_d.sum(2)
    m = torch.einsum("nck,kj->ncj", (gs[:, None, :] * w2[None]).double(), w1c.double()).float()
    absu = u.abs()
    if bool((absu == 1).all()):
        return m.mul_(u[:, None, :]).add_(base[:, :, None])
    return (m.mul_(u[:, None, :]).add_(a_out[:, :, None])
            .add_(absu[:, None, :] * (base - a_out)[:, :, None]))


@pytest.mark.parametrize("unit", [True, False])
@pytest.mark.parametrize("b,c,k,j", [(1, 1, 1, 1), (13, 7, 67, 45), (40, 10, 130, 3)])
def test_near_threshold_preact_equals_dense_product(b, c, k, j, unit):
    gen = torch.Generator().manual_seed(b * 1000 + k)
    g = torch.randint(-1, 2, (b, k), generator=gen).float()
    g[torch.rand(b, k, generator=gen) < 0.7] = 0  # few units next to their threshold
    sigma = torch.randint(-1, 2, (b, k), generator=gen).float()  # 0: dead units
    gs = g * sigma
    w2 = torch.randint(0, 2, (c, k), generator=gen).float() * 2 - 1
    w1c = (torch.randint(0, 2, (k, j), generator=gen) * 2 - 1).to(torch.int8)
    # non-integer clean scores (a bias) make the order of the float32 operations visible
    a_out = torch.randn(b, c, generator=gen) * 37
    u = torch.randint(0, 2, (b, j), generator=gen).float() * 2 - 1
    if not unit:
        u[torch.rand(b, j, generator=gen) < 0.3] = 0
    got = torch.empty(b, c, j)
    kernels.near_threshold_preact(a_out.numpy(), g.numpy(), gs.numpy(), w2.numpy(),
                                  w1c.numpy(), u.numpy(), unit, got.numpy())
    ref = _ref_preact(a_out, g, gs, w2, w1c, u)
    assert torch.equal(got, ref)


def test_argmax_classes_is_torch_argmax_on_ties_and_strided_input():
    gen = torch.Generator().manual_seed(0)
    z = torch.randint(-3, 4, (53, 11, 37), generator=gen).float()  # many ties
    for zz in (z, z.permute(0, 2, 1).contiguous().permute(0, 2, 1), z[:, :1]):
        out = torch.empty(zz.shape[0], zz.shape[2], dtype=torch.int64)
        kernels.argmax_classes(zz.numpy(), out.numpy())
        assert torch.equal(out, zz.argmax(1))


def _odd_fc():
    """fc with odd widths (not multiples of 64), random BN, gamma < 0 and dead units."""
    m = randomize_bn(models.build("fc", hidden=(37, 70), in_shape=(1, 8, 8), seed=3), seed=4)
    with torch.no_grad():
        for b in m.blocks[:2]:
            b.bn.weight[2] = 0.0  # dead
            b.bn.weight[5] = -0.8  # gamma < 0
    return m.eval()


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", "train").subset(300, seed=1)


def test_importance_with_kernels_equals_torch_path_and_per_neuron_loop(monkeypatch, digits):
    model = _odd_fc()
    ests = ["accuracy", "loss", "flips", "mc"]
    fast = metrics.importance(model, digits, estimator=ests, batch_size=128, ber=0.1, n_maps=2)
    monkeypatch.setattr(kernels, "AVAILABLE", False)
    slow = metrics.importance(model, digits, estimator=ests, batch_size=128, ber=0.1, n_maps=2)
    pd.testing.assert_frame_equal(fast, slow, check_exact=True)
    # and the slow obvious reference: one full forward per negated neuron
    x, y = next(digits.batches(len(digits)))
    with torch.no_grad():
        z0 = model(x)
        ok0 = (z0.argmax(1) == y).double()
        ce0 = F.cross_entropy(z0, y, reduction="none").double()
        for l in (0, 1):
            got = fast[fast.layer_index == l].set_index(["estimator", "neuron"])["importance"]
            for j in range(model.blocks[l].layer.weight.shape[0]):
                h = x
                for k, b in enumerate(model.blocks):
                    h = b(h)
                    if k == l:
                        h = h.clone()
                        h[:, j] = -h[:, j]
                ce = F.cross_entropy(h, y, reduction="none").double()
                acc = float((ok0 - (h.argmax(1) == y).double()).mean())
                assert got["accuracy", j] == pytest.approx(acc, abs=1e-12), (l, j)
                assert got["flips", j] == pytest.approx(
                    float((h.argmax(1) != z0.argmax(1)).double().mean()), abs=1e-12)
                # CE of a strided (B, C, J) tensor rounds differently in the last float32 bits
                assert got["loss", j] == pytest.approx(float((ce - ce0).mean()), rel=1e-5,
                                                       abs=1e-7)


def test_near_threshold_kernel_equals_torch_path_and_is_taken_only_for_ternary_weights():
    model = _odd_fc()
    x = torch.randint(0, 256, (20, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = imp_mod._forward_cache(model.blocks, x.float() / 255, {})
        info = {i.index: i for i in imp_mod.hidden_layers(model)}[1]
        w1 = model.blocks[1].layer.binary_weight()
        w2 = model.blocks[2].layer.binary_weight()
        neg = -cache[2][0]  # negation: |u| = 1
        part = neg * (torch.arange(neg.shape[1]) % 3 != 0)  # a fault map: some u = 0
        assert not imp_mod._NearThreshold(cache, 0, info, w1 * 0.5, w2, neg).kernel
        for u in (neg, part):
            near = imp_mod._NearThreshold(cache, 0, info, w1, w2, u)
            slow = imp_mod._NearThreshold(cache, 0, info, w1, w2, u)
            slow.kernel = False
            assert near.kernel and int((near.g * near.sigma != 0).sum()) > 0  # near threshold
            for cols in (torch.arange(1, u.shape[1], 2), torch.arange(0, 3)):
                assert torch.equal(near.preact(cols), slow.preact(cols))


def test_clean_forward_by_popcount_equals_float_product_on_binary_inputs():
    model = _odd_fc()
    weights = imp_mod._Weights(model.blocks)
    gen = torch.Generator().manual_seed(5)
    h = torch.randint(0, 2, (9, 37), generator=gen).float() * 2 - 1  # odd width 37
    with torch.no_grad():
        got = imp_mod._binary_preact(model.blocks[1], h, 1, weights)
        assert got is not None and torch.equal(got, model.blocks[1].preact(h))
        # real-valued inputs (the first layer) keep the float product
        assert imp_mod._binary_preact(model.blocks[1], h * 0.5, 1, weights) is None


@pytest.mark.parametrize("b,c,j", [(1, 1, 1), (17, 10, 67), (5, 3, 130)])
def test_rank1_preact_equals_torch_expression(b, c, j):
    gen = torch.Generator().manual_seed(j)
    a_out = torch.randn(b, c, generator=gen) * 37  # non-integer: the rounding is visible
    w = torch.randn(c, j, generator=gen)
    d = torch.randint(-1, 2, (b, j), generator=gen).float() * 2 * torch.rand(b, j, generator=gen)
    got = imp_mod._rank1(a_out, w, d)
    assert torch.equal(got, (w[None] * d[:, None, :]).add_(a_out[:, :, None]))
