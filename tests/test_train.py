import math

import numpy as np
import pytest
import torch
from scipy import stats

from bnn_tol import data, errors, models, train
from bnn_tol.core import kernels
from bnn_tol.core.layers import BinaryLinear
from bnn_tol.faults import maps as fault_maps


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", "train"), data.load("digits", "test")


def _small(seed=0):
    return models.build("fc", hidden=(64, 64), in_shape=(1, 8, 8), seed=seed)


def test_training_learns_digits(digits):
    tr, te = digits
    m = _small()
    hist = train.fit(m, tr, te, epochs=4, batch_size=32, lr=1e-2, seed=0, progress=False)
    assert list(hist.columns) == ["epoch", "lr", "p01", "p10", "train_loss", "train_acc",
                                  "test_acc", "seconds"]
    assert hist["test_acc"].iloc[-1] > 0.85
    assert hist["train_loss"].iloc[-1] < hist["train_loss"].iloc[0]
    assert m.meta["training"]["flip_ber"] == [0.0, 0.0] and len(m.meta["history"]) == 4


def test_same_seed_gives_identical_weights_bit_for_bit(digits):
    tr, _ = digits
    runs = []
    for _ in range(2):
        m = _small(seed=5)
        train.fit(m, tr, epochs=1, batch_size=64, seed=7, flip_ber=(0.02, 0.1), progress=False)
        runs.append(m.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    m = _small(seed=5)
    train.fit(m, tr, epochs=1, batch_size=64, seed=8, flip_ber=(0.02, 0.1), progress=False)
    assert not torch.equal(m.blocks[0].layer.weight, runs[0]["blocks.0.layer.weight"])


def test_flip_training_keeps_accuracy_and_removes_faults_afterwards(digits):
    tr, te = digits
    m = _small()
    hist = train.fit(m, tr, te, epochs=4, batch_size=32, lr=1e-2, flip_ber=0.05, seed=0,
                     progress=False)
    assert hist["test_acc"].iloc[-1] > 0.8
    assert all(layer.fault is None for layer in m.binary_layers().values())


def test_latent_weights_stay_clipped(digits):
    tr, _ = digits
    m = _small()
    train.fit(m, tr, epochs=1, batch_size=64, lr=0.5, seed=0, progress=False)
    assert all(layer.weight.abs().max() <= 1 for layer in m.binary_layers().values())


@pytest.mark.parametrize(("p01", "p10"), [(0.02, 0.12), (0.3, 0.05), (0.1, 0.1)])
def test_transient_flip_rates_match_p01_p10_binomial(p01, p10):
    gen = torch.Generator().manual_seed(11)
    wb = torch.where(torch.rand(300, 1000, generator=gen) < 0.4, -1.0, 1.0)
    flip = errors.TransientFlip((p01, p10), gen)
    n_minus, n_plus = int((wb < 0).sum()), int((wb > 0).sum())
    k01 = k10 = 0
    draws = []
    for _ in range(3):
        out = flip(wb)
        k01 += int(((wb < 0) & (out > 0)).sum())
        k10 += int(((wb > 0) & (out < 0)).sum())
        draws.append(out)
    assert stats.binomtest(k01, 3 * n_minus, p01).pvalue > 1e-3
    assert stats.binomtest(k10, 3 * n_plus, p10).pvalue > 1e-3
    assert not torch.equal(draws[0], draws[1])  # transient: fresh flips each call


def test_realized_flip_rates_during_bit_flip_training(digits, monkeypatch):
    """Record the flips of every forward pass of a real training run and test their rates."""
    tr, _ = digits
    m = _small()
    counts = {"01": [0, 0], "10": [0, 0]}

    # binary layers flip the stored bits in place (TransientFlip.flip_stored_, the draws of
    # __call__): record every call of a real training run
    original = errors.TransientFlip.flip_stored_

    def recording_call(self, stored):
        before = stored.clone()
        out = original(self, stored)
        counts["01"][0] += int((~before & out).sum())
        counts["01"][1] += int((~before).sum())
        counts["10"][0] += int((before & ~out).sum())
        counts["10"][1] += int(before.sum())
        return out

    monkeypatch.setattr(errors.TransientFlip, "flip_stored_", recording_call)
    train.fit(m, tr.subset(512), epochs=1, batch_size=128, flip_ber=(0.03, 0.15), seed=0,
              progress=False)
    assert stats.binomtest(*counts["01"], 0.03).pvalue > 1e-3
    assert stats.binomtest(*counts["10"], 0.15).pvalue > 1e-3


def test_ste_gradient_passes_straight_through_the_flips():
    layer = BinaryLinear(50, 4)
    x = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    layer(x).sum().backward()
    clean = layer.weight.grad.clone()
    layer.weight.grad = None
    layer.fault = errors.TransientFlip(0.3, torch.Generator().manual_seed(1))
    out = layer(x)
    out.sum().backward()
    assert torch.equal(layer.weight.grad, clean)  # gradient w.r.t. latent weight unchanged
    assert layer.fault.last_flips.numel() > 0


def test_flip_layers_selection_only_flips_chosen_layers(digits, monkeypatch):
    tr, _ = digits
    m = _small()
    seen = []
    original = errors.TransientFlip.flip_stored_

    def spy(self, stored):
        seen.append(tuple(stored.shape))
        return original(self, stored)

    monkeypatch.setattr(errors.TransientFlip, "flip_stored_", spy)
    train.fit(m, tr.subset(64), epochs=1, batch_size=64, flip_ber=0.1, flip_layers="hidden",
              seed=0, progress=False)
    assert set(seen) == {(64, 64)}
    with pytest.raises(ValueError, match="binary layers are"):
        train.fit(m, tr.subset(64), epochs=1, flip_ber=0.1, flip_layers=["nope"], progress=False)


def test_ber_warmup_is_linear():
    got = [train._ber_at(e, (0.1, 0.2), 3) for e in range(5)]
    want = [(0.025, 0.05), (0.05, 0.1), (0.075, 0.15), (0.1, 0.2), (0.1, 0.2)]
    assert got == [pytest.approx(w) for w in want]


def test_modified_hinge_loss_formula():
    z = torch.tensor([[2.0, -0.5, 0.3]])
    y = torch.tensor([0])
    # t = [1, -1, -1]: max(0, b - t z)^2 = [0, 0.25, 1.69] (b = 1), mean over classes
    # float32 loss vs float64 reference: ~8 roundings of eps32 / 2 (z, b - t z, square,
    # 2 adds, divide) -> relative error < 8 eps32
    rel = 8 * torch.finfo(torch.float32).eps
    assert train.modified_hinge_loss(z, y, 1.0).item() == pytest.approx((0.25 + 1.69) / 3, rel=rel)
    assert (train.modified_hinge_loss(z, y, 3.0).item()
            == pytest.approx((1 + 6.25 + 10.89) / 3, rel=rel))


def test_invalid_arguments_are_clear_errors(digits):
    tr, _ = digits
    with pytest.raises(ValueError, match="outside"):
        train.fit(_small(), tr, epochs=1, flip_ber=1.5, progress=False)
    with pytest.raises(ValueError, match="unknown loss"):
        train.fit(_small(), tr, epochs=1, loss="mse", progress=False)
    with pytest.raises(ValueError, match="empty"):
        train.fit(_small(), data.BNNDataset(tr.images[:0], tr.labels[:0]), epochs=1,
                  progress=False)


def test_bernoulli_indices_count_and_positions_are_unbiased():
    gen = torch.Generator().manual_seed(3)
    n, p = 200_000, 0.01
    counts = [bernoulli_count(n, p, gen) for _ in range(20)]
    total = sum(c.numel() for c in counts)
    assert stats.binomtest(total, 20 * n, p).pvalue > 1e-3
    idx = torch.cat(counts)
    assert all(bool((c[1:] > c[:-1]).all()) for c in counts)  # sorted, no repeats
    hist = torch.bincount(idx // (n // 10), minlength=10).double()
    assert stats.chisquare(hist.numpy()).pvalue > 1e-3
    # gaps between successes are geometric: P(gap = 1) = p
    gaps = torch.diff(counts[0])
    assert math.isclose(float((gaps == 1).double().mean()), p, abs_tol=0.01)


def bernoulli_count(n, p, gen):
    return errors.bernoulli_indices(n, p, generator=gen)


def test_bernoulli_indices_dense_path_and_edges():
    gen = torch.Generator().manual_seed(4)
    idx = errors.bernoulli_indices(100_000, 0.5, generator=gen)
    assert stats.binomtest(idx.numel(), 100_000, 0.5).pvalue > 1e-3
    assert errors.bernoulli_indices(10, 0.0, generator=gen).numel() == 0
    assert errors.bernoulli_indices(10, 1.0, generator=gen).tolist() == list(range(10))


@pytest.mark.parametrize(("p01", "p10"), [(0.003, 0.003), (0.1, 0.1), (0.5, 0.25), (0.0, 0.7)])
def test_byte_flip_mask_has_exact_rates_including_the_tie_refinement(p01, p10):
    # p = 0.003: 256 p < 1, so every flip comes from the tie r == 0 and its second uniform
    gen = torch.Generator().manual_seed(9)
    wb = torch.where(torch.rand(1_000_000, generator=gen) < 0.5, -1.0, 1.0)
    mask = errors.flip_mask(wb, p01, p10, generator=gen)
    for stored, p in ((-1.0, p01), (1.0, p10)):
        sel = wb == stored
        k = int(mask[sel].sum())
        if p == 0:
            assert k == 0
        else:
            assert stats.binomtest(k, int(sel.sum()), p).pvalue > 1e-3
    assert errors.flip_mask(wb, 1.0, 1.0, generator=gen).all()
    a, b = (errors.flip_mask(wb, p01, p10, generator=torch.Generator().manual_seed(1))
            for _ in range(2))
    assert torch.equal(a, b)  # same seed, same draw


@pytest.mark.parametrize("ber", [0.1, 0.3, (0.02, 0.08), (0.2, 0.4), 1.0])
def test_layers_flip_in_place_as_the_flip_of_the_sign(ber):
    """binary_weight flips the sign bits in place (TransientFlip.flip_stored_): the same values,
    flips and latent-weight gradients as fault(sign(w)) from the same generator."""
    from bnn_tol.core.layers import BinaryConv2d, sign

    conv_cl = BinaryConv2d(5, 7)
    conv_cl.weight.data = conv_cl.weight.data.to(memory_format=torch.channels_last)
    for a in (BinaryLinear(300, 70), BinaryConv2d(5, 7), conv_cl):
        b = BinaryConv2d(5, 7) if isinstance(a, BinaryConv2d) else BinaryLinear(300, 70)
        b.weight.data = a.weight.data.clone()
        a.fault = errors.TransientFlip(ber, torch.Generator().manual_seed(3))
        b.fault = errors.TransientFlip(ber, torch.Generator().manual_seed(3))
        for _ in range(3):
            wa, wb = a.binary_weight(), b.fault(sign(b.weight))
            assert torch.equal(wa, wb)
            assert torch.equal(a.fault.last_flips, b.fault.last_flips)
            probe = torch.arange(wa.numel(), dtype=wa.dtype).view_as(wa)
            ga, = torch.autograd.grad((wa * probe).sum(), a.weight)
            gb, = torch.autograd.grad((wb * probe).sum(), b.weight)
            assert torch.equal(ga, gb)


def _torch_gap_path(monkeypatch):
    monkeypatch.setattr(fault_maps, "_KERNEL_FROM", 1 << 62)


@pytest.mark.skipif(not kernels.AVAILABLE, reason="needs numba")
@pytest.mark.parametrize("p", [1e-5, 3e-3, 0.05, 0.124, 0.2])
def test_fused_gap_kernel_draws_the_same_positions_as_the_torch_ops(p, monkeypatch):
    """bernoulli_indices: the numba pass (gap_positions) and the torch ops give the same
    positions from the same generator state, bit for bit, and leave it in the same state."""
    for n, seed in ((1_000_003, 0), (4_000_000, 1), (70_000, 2)):
        monkeypatch.setattr(fault_maps, "_KERNEL_FROM", 0)
        g1 = torch.Generator().manual_seed(seed)
        fused = [errors.bernoulli_indices(n, p, generator=g1) for _ in range(3)]
        _torch_gap_path(monkeypatch)
        g2 = torch.Generator().manual_seed(seed)
        plain = [errors.bernoulli_indices(n, p, generator=g2) for _ in range(3)]
        for a, b in zip(fused, plain, strict=True):
            assert a.dtype == b.dtype == torch.int64 and torch.equal(a, b)
        assert torch.equal(g1.get_state(), g2.get_state())


@pytest.mark.skipif(not kernels.AVAILABLE, reason="needs numba")
def test_gap_kernel_clamps_huge_gaps_and_continues_across_chunks():
    from bnn_tol.core.kernels import gap_positions

    log1mp, n = math.log1p(-0.1), 50
    # 0.0: gap 0; -1e300: a gap clamped to n (ends the draw); values near the gap boundaries
    lg = np.array([0.0, -0.0, log1mp * 2.999999, log1mp * 3.0, -1e300, -0.5])
    out = np.full(lg.size, -7, dtype=np.int64)
    k, last = gap_positions(lg, log1mp, n, -1, out)
    ref = torch.cumsum(torch.from_numpy(lg / log1mp).clamp(max=n).to(torch.int64) + 1, 0) - 1
    assert k == 4 and out[:4].tolist() == ref[:4].tolist() and last == int(ref[4]) >= n
    # a chunk that ends below n returns k = K and its last position, the offset of the next
    k, last = gap_positions(lg[:4], log1mp, n, -1, out)
    assert k == 4 and last == int(ref[3])
    k2, _ = gap_positions(lg[:2], log1mp, n, last, out)
    assert k2 == 2 and out[:2].tolist() == [last + 1, last + 2]


@pytest.mark.skipif(not kernels.AVAILABLE, reason="needs numba")
def test_flip_stored_in_place_kernel_equals_the_scatter(monkeypatch):
    stored = torch.rand(3_000_000, generator=torch.Generator().manual_seed(5)) < 0.5
    a, b = stored.clone(), stored.clone()
    fa = errors.TransientFlip(0.05, torch.Generator().manual_seed(6))
    fb = errors.TransientFlip(0.05, torch.Generator().manual_seed(6))
    fa.flip_stored_(a)
    _torch_gap_path(monkeypatch)
    fb.flip_stored_(b)
    assert torch.equal(a, b) and torch.equal(fa.last_flips, fb.last_flips)
    assert torch.equal(torch.nonzero(a != stored).flatten(), fa.last_flips)
