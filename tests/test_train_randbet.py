"""RandBET as Stutz et al. specify it (issue 23): the loss gate, the clipped and averaged
perturbed gradient, BatchNorm statistics from the clean pass only; the SGD recipe and clipping
of every parameter. Each checked against a hand-written step, not just run."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _helpers import quadrants

from bnn_tol import errors, models, train
from bnn_tol.data import BNNDataset
from bnn_tol.exceptions import InvalidArgument
from bnn_tol.faults.seeds import spawn


def _data(n: int = 128, seed: int = 0) -> BNNDataset:
    return quadrants(n, seed)


def _model() -> models.BNN:
    return models.build("fc", hidden=(16, 16), in_shape=(1, 8, 8), n_classes=4, weight_bits=4,
                        quant="asymmetric", seed=1)


def _fit(model, **kw):
    args = dict(epochs=1, batch_size=128, seed=5, progress=False, device="cpu", lr=0.05)
    args.update(kw)
    return train.fit(model, _data(), **args)


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _batch(ds):
    """The one shuffled batch of an epoch with batch_size = len(ds), seed 5."""
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(spawn(5, 2)[0]))
    return ((ds.images.float() - 128.0) / 128.0)[perm], ds.labels[perm]


def test_a_gate_that_never_opens_is_plain_training_and_records_nothing():
    plain, gated = _model(), _model()
    _fit(plain, epochs=2)
    _fit(gated, epochs=2, randbet_ber=0.05, randbet_start_loss=1e-9)
    for k, v in _state(plain).items():
        assert torch.equal(v, gated.state_dict()[k]), k
    assert "randbet_started" not in gated.meta["training"]
    assert gated.meta["training"]["randbet_start_loss"] == 1e-9


def test_the_gate_opens_after_the_first_batch_below_the_loss_and_says_when():
    always, gated = _model(), _model()
    _fit(always, epochs=3, randbet_ber=0.05)
    _fit(gated, epochs=3, randbet_ber=0.05, randbet_start_loss=100.0)
    # open from the first step's loss on: the first step is clean, so the weights differ
    assert gated.meta["training"]["randbet_started"] == [1, 1]
    assert any(not torch.equal(v, gated.state_dict()[k]) for k, v in _state(always).items())


def test_the_perturbed_gradient_is_clipped_and_averaged_with_the_clean_one():
    """One plain-SGD step (momentum 0): ``w' = w - lr (g_clean + clip(g_err, c)) / 2``,
    with ``g_err`` from the same transient error pattern RandBET draws."""
    ds = _data()
    model = _model()
    ref = copy.deepcopy(model).train()
    c, lr = 1e-3, 0.05
    _fit(model, randbet_ber=0.05, randbet_grad_clip=c, optimizer="sgd", momentum=0.0,
         randbet_bn="clean", lr=lr)
    x, y = _batch(ds)
    F.cross_entropy(ref(x), y).backward()
    g_clean = {n: p.grad.clone() for n, p in ref.named_parameters()}
    ref.zero_grad()
    gen = torch.Generator().manual_seed(spawn(5, 3)[2])
    for layer in ref.binary_layers().values():
        layer.fault = errors.TransientFlip(0.05, gen)
    F.cross_entropy(ref(x), y).backward()
    for layer in ref.binary_layers().values():
        layer.fault = None
    clipped_somewhere = False
    with torch.no_grad():
        for n, p in ref.named_parameters():
            ge = p.grad
            clipped_somewhere |= bool((ge.abs() > c).any())
            want = p - lr * 0.5 * (g_clean[n] + ge.clamp(-c, c))
            got = dict(model.named_parameters())[n]
            if n.endswith("layer.weight"):  # latent weights are clamped after the step
                want = want.clamp(-1, 1) if "fixed" not in str(type(got)) else want
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), n
    assert clipped_somewhere  # the test would not see a missing clip otherwise


@pytest.mark.parametrize("bn, same", [("clean", True), ("both", False)])
def test_batchnorm_statistics_come_from_the_clean_pass_only_when_asked(bn, same):
    plain, rb = _model(), _model()
    _fit(plain)
    _fit(rb, randbet_ber=0.2, randbet_bn=bn)
    for k, v in plain.state_dict().items():
        if "running_" in k:
            assert torch.equal(v, rb.state_dict()[k]) == same, k


def test_sgd_with_weight_decay_is_one_hand_computed_step():
    ds = _data()
    model = _model()
    ref = copy.deepcopy(model).train()
    _fit(model, optimizer="sgd", momentum=0.9, weight_decay=5e-4, lr=0.05)
    x, y = _batch(ds)
    F.cross_entropy(ref(x), y).backward()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            want = p - 0.05 * (p.grad + 5e-4 * p)  # first step: the momentum buffer is the grad
            assert torch.allclose(dict(model.named_parameters())[n], want, rtol=1e-5,
                                  atol=1e-7), n
    assert model.meta["training"]["optimizer"] == "sgd"
    assert model.meta["training"]["weight_decay"] == 5e-4


def test_clipping_every_parameter_bounds_the_batchnorms_too():
    model = _model()
    _fit(model, epochs=2, clip=0.1, clip_params="all")
    w_max = torch.tensor(0.1, dtype=torch.float32)  # the clamp bound as float32 holds it
    assert all(bool(p.detach().abs().max() <= w_max) for p in model.parameters())
    assert any("bn" in n for n, _ in model.named_parameters())


def test_the_paper_settings_are_one_dict_and_recorded():
    model = _model()
    _fit(model, randbet_ber=0.01, **train.RANDBET_PAPER)
    rec = model.meta["training"]
    assert (rec["randbet_start_loss"], rec["randbet_grad_clip"], rec["randbet_bn"]) == (
        1.75, 0.05, "clean")


@pytest.mark.parametrize("kw, needle", [
    (dict(clip_params="bn"), "clip_params"), (dict(clip_params="all"), "needs clip"),
    (dict(randbet_bn="perturbed"), "randbet_bn"), (dict(optimizer="lamb"), "optimizer"),
    (dict(randbet_grad_clip=0), "randbet_grad_clip"), (dict(randbet_start_loss=-1),
                                                       "randbet_start_loss"),
    (dict(momentum=float("nan")), "momentum"), (dict(weight_decay=-1e-4), "weight_decay"),
])
def test_bad_recipe_options_are_refused_naming_them(kw, needle):
    with pytest.raises(InvalidArgument, match=needle):
        _fit(_model(), **kw)


def test_the_fixed_pattern_control_uses_one_chip_at_every_step():
    """``randbet_fixed``: the perturbed pass reads one persistent map, the chip RandBET's
    child seed names -- the first step's perturbed loss is the loss of the initial model with
    that chip injected, and a second step sees the same flipped cells."""
    ds = _data()
    model = _model()
    ref = copy.deepcopy(model).train()
    hist = _fit(model, randbet_ber=0.05, randbet_fixed=True)
    x, y = _batch(ds)
    clean = F.cross_entropy(ref(x), y).detach()
    with errors.inject(ref, 0.05, seed=spawn(5, 3)[2]):
        err = F.cross_entropy(ref(x), y).detach()
    assert float(err) != float(clean)
    assert hist["train_loss"].iloc[0] == pytest.approx(0.5 * (float(clean) + float(err)),
                                                       rel=128 * 2**-23)
    assert model.meta["training"]["randbet_fixed"] is True


def test_label_smoothing_is_the_smoothed_cross_entropy_step():
    ds = _data()
    model = _model()
    ref = copy.deepcopy(model).train()
    _fit(model, optimizer="sgd", momentum=0.0, label_smoothing=0.1, lr=0.05)
    x, y = _batch(ds)
    F.cross_entropy(ref(x), y, label_smoothing=0.1).backward()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            assert torch.allclose(dict(model.named_parameters())[n], p - 0.05 * p.grad,
                                  rtol=1e-5, atol=1e-7), n
    with pytest.raises(InvalidArgument, match="label_smoothing"):
        _fit(_model(), label_smoothing=0.1, loss="mhl")
    with pytest.raises(InvalidArgument, match="label_smoothing"):
        _fit(_model(), label_smoothing=1.0)
