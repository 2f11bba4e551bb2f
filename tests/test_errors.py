"""Fault maps and injection: rates, nesting, determinism, exact restoration."""

from __future__ import annotations

import pytest
import torch
from scipy import stats
from torch import nn

from bnn_tol import errors, evaluate, models


@pytest.fixture(scope="module")
def model():
    m = models.build("fc", seed=0, hidden=(128, 96), in_shape=(1, 8, 8))
    with torch.no_grad():  # non-trivial BN: thresholds of both signs, a negative gamma, a dead one
        g = torch.Generator().manual_seed(1)
        for block in m.blocks:
            bn = block.bn
            bn.running_mean.normal_(0, 3, generator=g)
            bn.running_var.uniform_(5, 50, generator=g)
            bn.weight.normal_(0, 1, generator=g)
            bn.bias.normal_(0, 1, generator=g)
        m.blocks[1].bn.weight[0] = 0.0
    return m.eval()


def _stored_flip_counts(fmap, stored, p01, p10):
    idx = fmap.flips(stored, p01, p10)
    flat = stored.reshape(-1)
    ones = int((flat > 0).sum())
    f1 = int((flat[idx] > 0).sum())
    return f1, ones, idx.numel() - f1, flat.numel() - ones


@pytest.mark.parametrize("p01,p10", [(0.02, 0.02), (0.01, 0.07), (0.3, 0.05)])
def test_realized_flip_rates_match_p01_p10_per_layer(model, p01, p10):
    for s in (0, 1):
        maps = errors.draw_maps(model, s, max(p01, p10))
        for name, layer in model.binary_layers().items():
            stored = torch.where(layer.weight >= 0, 1.0, -1.0)
            f10, n1, f01, n0 = _stored_flip_counts(maps[name], stored, p01, p10)
            assert stats.binomtest(f10, n1, p10).pvalue > 1e-4, (name, f10, n1, p10)
            assert stats.binomtest(f01, n0, p01).pvalue > 1e-4, (name, f01, n0, p01)


def test_map_uniforms_are_uniform_below_cap_and_count_binomial():
    n, cap = 400_000, 0.03
    fm = errors.fault_map(n, cap, seed=5)
    assert fm.cap >= cap and torch.all(fm.u < fm.cap)
    assert torch.unique(fm.idx).numel() == fm.idx.numel()
    assert stats.binomtest(fm.idx.numel(), n, fm.cap).pvalue > 1e-4
    assert stats.kstest((fm.u / fm.cap).numpy(), "uniform").pvalue > 1e-4


def test_high_rates_and_extremes():
    n = 50_000
    fm = errors.fault_map(n, 1.0, seed=2)
    stored = torch.ones(n)
    assert fm.flips(stored, 1.0, 1.0).numel() == n
    assert fm.flips(stored, 0.0, 0.0).numel() == 0
    k = fm.flips(stored, 0.6, 0.6).numel()
    assert stats.binomtest(k, n, 0.6).pvalue > 1e-4
    assert stats.kstest(fm.u.numpy(), "uniform").pvalue > 1e-4


def test_errors_at_lower_ber_are_subset_of_higher_ber():
    n = 200_000
    stored = torch.where(torch.rand(n, generator=torch.Generator().manual_seed(0)) < .5, 1., -1.)
    fm = errors.fault_map(n, 0.1, seed=3)
    prev = torch.empty(0, dtype=torch.int64)
    for p in (0.001, 0.01, 0.02, 0.05, 0.1):
        cur = fm.flips(stored, p, p)
        assert torch.isin(prev, cur).all()
        assert cur.numel() > prev.numel()
        prev = cur
    # asymmetric: raising only p10 keeps every earlier flip
    a = fm.flips(stored, 0.01, 0.02)
    b = fm.flips(stored, 0.01, 0.08)
    assert torch.isin(a, b).all()


def test_map_does_not_depend_on_the_cap():
    n = 100_000
    small = errors.fault_map(n, 0.01, seed=9)
    big = errors.fault_map(n, 0.4, seed=9)
    stored = torch.ones(n)
    for p in (0.001, 0.005, 0.01):
        a, b = small.flips(stored, p, p), big.flips(stored, p, p)
        assert torch.equal(a.sort().values, b.sort().values)


def test_same_seed_same_map_different_seed_differs(model):
    a = errors.draw_maps(model, 7, 0.05)
    b = errors.draw_maps(model, 7, 0.05)
    c = errors.draw_maps(model, 8, 0.05)
    for name in a:
        assert torch.equal(a[name].idx, b[name].idx) and torch.equal(a[name].u, b[name].u)
        assert not torch.equal(a[name].idx, c[name].idx)


def test_selecting_fewer_layers_keeps_the_other_layers_maps(model):
    full = errors.draw_maps(model, 4, 0.05)
    one = errors.draw_maps(model, 4, 0.05, layers=[1])
    (name,) = one
    assert name == list(full)[1]
    assert torch.equal(one[name].idx, full[name].idx)


def test_seed_to_map_derivation_is_as_documented(model):
    name, layer = list(model.binary_layers().items())[2]
    s = errors.layer_seed(11, 2)
    fm = errors.fault_map(layer.weight.numel(), 0.05, seed=s)
    assert torch.equal(errors.draw_maps(model, 11, 0.05)[name].idx, fm.idx)


def _weights(m):
    return [w.detach().clone() for w in m.parameters()] + [b.clone() for b in m.buffers()]


def test_weights_restored_bit_for_bit_after_inject_also_on_exception(model, digits):
    before = _weights(model)
    sentinel = errors.TransientFlip(0.0, torch.Generator())
    model.blocks[0].layer.fault = sentinel
    clean = evaluate.predict(model, digits)
    with pytest.raises(RuntimeError, match="boom"):
        with errors.inject(model, 0.2, seed=3, targets=("weights", "activations", "thresholds")):
            assert not torch.equal(evaluate.predict(model, digits), clean)
            raise RuntimeError("boom")
    assert model.blocks[0].layer.fault is sentinel
    model.blocks[0].layer.fault = None
    with errors.inject(model, 0.1, seed=3):
        pass
    after = _weights(model)
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(before, after,
                                                                        strict=True))
    assert all(layer.fault is None for layer in model.binary_layers().values())
    assert not model.blocks[0]._forward_hooks and not model.blocks[0].bn._forward_hooks


def test_persistent_map_is_persistent_transient_is_fresh(model, digits):
    with errors.inject(model, 0.1, seed=1):
        a, b = evaluate.predict(model, digits), evaluate.predict(model, digits)
    assert torch.equal(a, b)
    with errors.inject(model, 0.1, seed=1, mode="transient") as faults:
        evaluate.predict(model, digits, batch_size=10_000)
        f1 = next(iter(faults.values())).last_flips.clone()
        evaluate.predict(model, digits, batch_size=10_000)
        f2 = next(iter(faults.values())).last_flips
    assert not torch.equal(f1, f2)


def test_activation_and_threshold_targets_at_zero_ber_equal_clean(model, digits):
    clean = evaluate.predict(model, digits)
    with errors.inject(model, 0.0, seed=2, targets=("activations", "thresholds")):
        assert torch.equal(evaluate.predict(model, digits), clean)


def test_activation_flips_negate_the_mapped_outputs(model, digits):
    x = next(digits.batches(64))[0]
    with torch.no_grad():
        h_clean = model.blocks[0](x)
        with errors.inject(model, 0.3, seed=5, targets="activations", layers=[0]):
            h_bad = model.blocks[0](x)
    changed = (h_clean != h_bad)
    assert torch.equal(changed[0], changed[-1])  # the same buffer cells on every sample
    assert torch.equal(h_bad, torch.where(changed, -h_clean, h_clean))
    frac = changed[0].double().mean().item()
    assert stats.binomtest(int(changed[0].sum()), changed[0].numel(), 0.3).pvalue > 1e-4, frac


def test_bad_inputs_give_clear_errors(model):
    with pytest.raises(ValueError, match="outside"):
        with errors.inject(model, 1.5):
            pass
    with pytest.raises(ValueError, match="unknown layer"):
        with errors.inject(model, 0.1, layers=["nope"]):
            pass
    with pytest.raises(ValueError, match="no binary layers"):
        with errors.inject(nn.Sequential(nn.Linear(3, 2)), 0.1):
            pass
    with pytest.raises(ValueError, match="targets"):
        with errors.inject(model, 0.1, targets="biases"):
            pass
    fm = errors.fault_map(100, 0.01, seed=0)
    with pytest.raises(ValueError, match="larger cap"):
        fm.flips(torch.ones(100), 0.5, 0.5)
