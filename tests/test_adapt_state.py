"""``adapt`` never mutates shared state (issue 22, item 7): a user's in-place activation
(``Hardtanh(inplace=True)``, ``F.hardtanh(..., inplace=True)``, ``x.sign_()``) works on adapt's
own copies, so a second adaptation in the same process probes with the same values and gives
the same model as the first, and the user's example is left as it was."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from test_adapt import BinLin, _example, _randomize
from torch import nn

import bnn_tol
from bnn_tol.data import to_float


class InplaceSign(nn.Module):
    """A sign that records every input it is given and binarizes it in place."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return x.sign_()


class FunctionalInplace(nn.Module):
    """Traced by torch.fx: the in-place hardtanh is a call_function with ``inplace=True``."""

    def __init__(self):
        super().__init__()
        self.l1 = BinLin(64, 24, bias=False)
        self.b1 = nn.BatchNorm1d(24)
        self.act = InplaceSign()
        self.l2 = BinLin(24, 10, bias=False)

    def forward(self, x):
        x = torch.flatten(x, 1)
        x = F.hardtanh(self.b1(self.l1(x)), inplace=True)
        return self.l2(self.act(x))


def _sequential():
    return nn.Sequential(nn.Flatten(), BinLin(64, 24, bias=False), nn.BatchNorm1d(24),
                         nn.Hardtanh(inplace=True), InplaceSign(), BinLin(24, 10, bias=False),
                         nn.BatchNorm1d(10))


def _user(make, seed: int) -> nn.Module:
    """``make()`` with weights from ``seed`` (layer init) and randomized BatchNorms."""
    torch.manual_seed(seed)
    return _randomize(make(), seed=seed)


def _probes_seen(act: InplaceSign) -> list[torch.Tensor]:
    """The inputs ``adapt`` probed the activation with (one value per feature: not a batch of
    the example or a probe batch of images)."""
    return [t for t in act.seen if t.shape[0] == 1]


def test_in_place_activations_do_not_change_what_a_later_adaptation_probes_with():
    x = to_float(_example())
    before = x.clone()
    for make in (_sequential, FunctionalInplace):
        user = _user(make, 1)
        act = next(m for m in user.modules() if isinstance(m, InplaceSign))
        first = bnn_tol.adapt(user, x, sign_zero=0)
        probes_first = _probes_seen(act)
        act.seen.clear()
        second = bnn_tol.adapt(user, x, sign_zero=0)
        probes_second = _probes_seen(act)
        assert probes_first, "the activation was probed"
        assert len(probes_first) == len(probes_second)
        for a, b in zip(probes_first, probes_second, strict=True):
            assert torch.equal(a, b)
        # values beyond the hardtanh's [-1, 1]: the probe reached the sign unclamped
        assert float(probes_first[0].abs().max()) > 1
        assert torch.equal(first(x), second(x))
        for p, q in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
            assert torch.equal(p, q)
    assert torch.equal(x, before)  # the user's example is not touched


def test_a_fresh_process_and_a_used_one_adapt_the_same():
    # adapting an in-place model first must not change how an unrelated model is adapted
    x = to_float(_example())
    fresh = bnn_tol.adapt(_user(_sequential, 2), x, sign_zero=0)
    bnn_tol.adapt(_user(FunctionalInplace, 3), x, sign_zero=0)
    again = bnn_tol.adapt(_user(_sequential, 2), x, sign_zero=0)
    assert torch.equal(fresh(x), again(x))
