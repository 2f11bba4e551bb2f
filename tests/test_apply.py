"""The one fault path: ``apply`` equals writing the flipped weights into a copy and restores
the faults; the flip primitive flips exactly the indexed bits in every representation (+-1,
bool -- through the bulk kernel too --, m-bit words)."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import plain_accuracy

from bnn_tol import errors, evaluate
from bnn_tol.core import kernels
from bnn_tol.core.codec import flip_bits


def _naive_write(model, flips):
    m = copy.deepcopy(model)
    for name, layer in m.binary_layers().items():
        wb = torch.where(layer.weight >= 0, 1.0, -1.0).view(-1)
        idx = torch.as_tensor(flips.get(name, []), dtype=torch.int64)
        wb[idx] = -wb[idx]
        layer.weight.data = wb.view_as(layer.weight)
    return m


def test_apply_equals_writing_the_flipped_weights_and_restores_the_faults(fc, digits):
    g = torch.Generator().manual_seed(3)
    layers = fc.binary_layers()
    flips = {n: torch.randperm(lay.n_stored_bits, generator=g)[:40] for n, lay in
             list(layers.items())[::2]}
    ref = plain_accuracy(_naive_write(fc, flips), digits)
    assert ref != evaluate.accuracy(fc, digits)
    sentinel = errors.FixedFlips(torch.tensor([0]))
    fc.blocks[1].layer.fault = sentinel
    with pytest.raises(RuntimeError, match="boom"):
        with errors.apply(fc, flips):
            assert evaluate.accuracy(fc, digits) == ref
            raise RuntimeError("boom")
    assert fc.blocks[1].layer.fault is sentinel
    fc.blocks[1].layer.fault = None
    with pytest.raises(ValueError, match="outside its"):
        with errors.apply(fc, {"blocks.0.layer": [10**6]}):
            pass


@pytest.mark.parametrize("n_flips", [100, errors.BULK_FROM + 5])
def test_negate_flips_exactly_the_indexed_bits_in_every_representation(n_flips):
    g = torch.Generator().manual_seed(n_flips)
    n = 4 * errors.BULK_FROM
    bits = torch.rand(n, generator=g) < 0.5
    idx = torch.randperm(n, generator=g)[:n_flips]
    want = bits.clone()
    for i in idx.tolist():
        want[i] = not want[i]
    assert torch.equal(errors.negate_(bits.clone(), idx), want)
    pm = torch.where(bits, 1.0, -1.0).requires_grad_()
    out = errors.negate(pm, idx)
    assert torch.equal(out.detach() > 0, want) and torch.equal(pm.detach() > 0, bits)
    out.sum().backward()
    assert torch.equal(pm.grad, torch.ones(n))  # straight through
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    assert torch.equal(errors.negate_(bits.clone(), mask), want)
    assert torch.equal(errors.negate(pm.detach(), mask) > 0, want)
    codes = torch.randint(0, 16, (n // 4,), generator=g)
    flipped = errors.negate_(((codes[:, None] >> torch.arange(4)) & 1).bool().reshape(-1),
                             idx)
    back = (flipped.view(-1, 4).long() << torch.arange(4)).sum(1)
    assert torch.equal(flip_bits(codes, idx, 4), back)
    if n_flips >= errors.BULK_FROM:
        assert kernels.AVAILABLE or pytest.skip("numba missing: the bulk kernel is not used")
