"""``adapt`` is never silently wrong and never a traceback (issue 20, items 10, 15, 18): a
module walk is verified on probe batches spanning the input range, unsupported activations are
named, ``sign_zero`` and ``in_shape`` are validated, user errors are one line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_adapt import BinLin, Sign, _example, _randomize, sequential_cnn
from torch import nn

import bnn_tol
from bnn_tol.data import to_float
from bnn_tol.exceptions import BnnTolError
from bnn_tol.interop.adapt import AdaptError


def _dark(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return to_float(torch.randint(0, 100, (n, 1, 8, 8), generator=g, dtype=torch.uint8))


def _refused(match, module, example, **kw) -> AdaptError:
    with pytest.raises(AdaptError, match=match) as e:
        bnn_tol.adapt(module, example, **kw)
    assert "\n" not in str(e.value)
    return e.value


class Mlp(nn.Module):
    """64-24-10 with a Sign module; ``act`` (a module or function) after the first BN."""

    def __init__(self, act=None, flip_if_bright=False, unused=False):
        super().__init__()
        self.l1 = BinLin(64, 24, bias=False)
        self.b1 = nn.BatchNorm1d(24)
        self.act = act if isinstance(act, nn.Module) else Sign()
        self.fn = act if act is not None and not isinstance(act, nn.Module) else None
        if unused:
            self.spare = BinLin(100, 7, bias=False)  # registered, never called
        self.l2 = BinLin(24, 10, bias=False)
        self.b2 = nn.BatchNorm1d(10)
        self.flip_if_bright = flip_if_bright

    def forward(self, x):
        x = x.flatten(1)
        h = self.b1(self.l1(x))
        h = self.fn(h) if self.fn is not None else self.act(h)
        if self.flip_if_bright and x.mean() > 0:  # data-dependent: fx cannot trace it
            h = -h
        return self.b2(self.l2(h))


# -- item 10: data-dependent forward ----------------------------------------------------------


def test_a_data_dependent_forward_is_refused_naming_the_probe_that_differs():
    user = _randomize(Mlp(flip_if_bright=True))
    err = _refused("differs", user, _dark())  # the dark example alone agrees
    assert "bright" in str(err)


class Untraceable(Mlp):
    """Mlp whose forward branches on the data in a way that never matters on the input grid:
    torch.fx cannot trace it, the module walk runs and is right."""

    def forward(self, x):
        if x.abs().max() > 10:
            x = x / 2
        return super().forward(x)


def test_a_module_walk_that_agrees_on_every_probe_still_adapts():
    user = _randomize(Untraceable())
    x = _dark()
    model = bnn_tol.adapt(user, x)
    with torch.no_grad():
        assert torch.equal(model(x), user(x))


# -- item 18: activations named, sign_zero validated ---------------------------------------


@pytest.mark.parametrize("act", [nn.ReLU(), nn.Tanh(), nn.Softsign(), nn.GELU(), nn.LeakyReLU(),
                                 torch.relu, torch.tanh, F.softsign, F.gelu],
                         ids=["ReLU", "Tanh", "Softsign", "GELU", "LeakyReLU", "relu", "tanh",
                              "softsign", "gelu"])
@pytest.mark.parametrize("walk", [False, True], ids=["traced", "walk"])
def test_an_unsupported_activation_is_named(act, walk):
    if walk and not isinstance(act, nn.Module):
        pytest.skip("the module walk sees modules only")
    user = _randomize(Mlp(act, flip_if_bright=walk))
    x = _dark() if walk else to_float(_example())
    name = type(act).__name__ if isinstance(act, nn.Module) else act.__name__
    _refused(f"(?i){name}", user, x)


def test_a_squashing_activation_before_a_sign_still_adapts():
    user = _randomize(nn.Sequential(nn.Flatten(), BinLin(64, 16, bias=False), nn.BatchNorm1d(16),
                                    nn.Tanh(), Sign(), BinLin(16, 10, bias=False)))
    x = to_float(_example())
    with torch.no_grad():
        assert torch.equal(bnn_tol.adapt(user, x)(x), user(x))


@pytest.mark.parametrize("bad", [5, 2, -2, True, False, 1.0, 0.5, "1", float("nan")])
def test_sign_zero_must_be_none_minus_one_zero_or_one(bad):
    err = _refused("sign_zero", _randomize(sequential_cnn()), to_float(_example()), sign_zero=bad)
    assert isinstance(err, BnnTolError)


@pytest.mark.parametrize("ok", [None, -1, 0, 1])
def test_the_four_sign_zero_values_are_accepted(ok):
    assert bnn_tol.adapt(_randomize(sequential_cnn()), to_float(_example()), sign_zero=ok)


# -- item 15: one line instead of a traceback ---------------------------------------------


def test_a_function_instead_of_a_module_is_refused():
    _refused("nn.Module", lambda x: x, to_float(_example()))


@pytest.mark.parametrize(("in_shape", "needle"), [
    ((1, 9, 9), "81"), ((1, 4), "in_shape"), ("abc", "in_shape"), (5, "in_shape"),
    ((1, 0, 64), "in_shape"), ((1, 8, 8.5), "in_shape")])
def test_a_wrong_in_shape_is_refused(in_shape, needle):
    _refused(needle, _randomize(Mlp()), to_float(_example()).flatten(1), in_shape=in_shape)


@pytest.mark.parametrize("in_shape", [(1, 8, 8), (1, 4, 16), (4, 4, 4)])
@pytest.mark.parametrize("make", [Mlp, Untraceable])
def test_a_flat_example_with_an_in_shape_of_its_size_adapts(in_shape, make):
    user = _randomize(make())
    x = to_float(_example()).flatten(1)
    model = bnn_tol.adapt(user, x, in_shape=in_shape)
    assert model.in_shape == in_shape
    with torch.no_grad():
        assert torch.equal(model(x.reshape(-1, *in_shape)), user(x))


def test_an_in_shape_contradicting_a_4d_example_is_refused():
    _refused("in_shape", _randomize(Mlp()), to_float(_example()), in_shape=(1, 4, 16))


def test_an_unused_registered_layer_is_one_line_in_the_walk_and_harmless_when_traced():
    x = to_float(_example())
    traced = _randomize(Mlp(unused=True))
    with torch.no_grad():
        assert torch.equal(bnn_tol.adapt(traced, x)(x), traced(x))
    walked = _randomize(Mlp(unused=True, flip_if_bright=True))
    _refused("spare", walked, _dark())


@pytest.mark.parametrize(("example", "needle"), [
    (lambda x: x[:, :, :4], "fails on the example"),  # the user's forward raises
    (lambda x: x.double(), "example"),
    (lambda x: x[0], "example"),
    (lambda x: x * float("nan"), "grid"),
    (lambda x: [1, 2], "example")])
def test_examples_the_module_cannot_take_are_one_line(example, needle):
    _refused(needle, _randomize(sequential_cnn()), example(to_float(_example())))


def test_a_module_without_layers_is_refused_saying_so():
    _refused("no Linear/Conv2d", nn.Sequential(nn.Flatten()), to_float(_example()))


def test_a_forward_that_raises_on_probes_is_one_line():
    class Picky(Mlp):
        def forward(self, x):
            if bool((x.flatten(1) == x.flatten(1)[:, :1]).all(1).any()):
                raise RuntimeError("a constant image")
            return super().forward(x)

    _refused("fails", _randomize(Picky()), to_float(_example()))


def test_a_batchnorm_without_running_statistics_is_refused():
    user = nn.Sequential(nn.Flatten(), BinLin(64, 16, bias=False),
                         nn.BatchNorm1d(16, track_running_stats=False), Sign(),
                         BinLin(16, 10, bias=False)).eval()
    _refused("running statistics", user, to_float(_example()))


def test_a_batchnorm_without_affine_parameters_adapts():
    user = nn.Sequential(nn.Flatten(), BinLin(64, 16, bias=False), nn.BatchNorm1d(16, affine=False),
                         Sign(), BinLin(16, 10, bias=False)).eval()
    with torch.no_grad():
        user[2].running_mean.normal_(0, 2, generator=torch.Generator().manual_seed(0))
    x = to_float(_example())
    with torch.no_grad():
        assert torch.equal(bnn_tol.adapt(user, x)(x), user(x))
