import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import randomize_bn
from scipy import stats
from test_margin import toy_data, toy_model

from bnn_tol import data, metrics, models
from bnn_tol.faults.maps import flip_binary


@pytest.mark.parametrize("n,p", [(7, 0.1), (12, 0.3), (1, 0.5)])
def test_flip_table_equals_direct_convolution(n, p):
    sw = metrics.flip_tables(n, p)
    for a in range(n + 1):
        pmf = np.convolve(stats.binom.pmf(np.arange(a + 1), a, p),
                          stats.binom.pmf(np.arange(n - a + 1), n - a, 1 - p))
        surv = np.append(np.cumsum(pmf[::-1])[::-1], 0.0)
        # entries <= 1; each is a sum of <= n + 1 pmf values, each a convolution of <= n + 1
        # products of binomial pmfs (a few eps each): error <= 8 (n + 1)^2 eps on both sides
        np.testing.assert_allclose(sw[a], surv, rtol=0,
                                   atol=8 * (n + 1) ** 2 * np.finfo(np.float64).eps)


def test_hand_computed_flip_probability_of_toy_layer():
    # block 1 (fan-in 2): neuron 0: a = 0 < t = 1 on both samples, A = D = 1 -> p (1 - p);
    # neuron 1 (gamma < 0, y = +1 iff a <= 1): a = 2 -> flips iff X >= 1: 1 - (1 - p)^2;
    # a = -2 -> flips iff both disagreeing weights flip: p^2; neuron 2 dead -> 0.
    p = 0.2
    fp = metrics.flip_probability(toy_model(), toy_data(), ber=p).sort_values("neuron")
    np.testing.assert_allclose(fp["flip_prob"], [p * (1 - p), (1 - (1 - p) ** 2 + p**2) / 2, 0],
                               atol=1e-14)




@pytest.mark.parametrize("name,kw", [
    ("fc", dict(hidden=(48, 40, 32), in_shape=(1, 8, 8))),
    ("vgg3", dict(channels=((8,), (6,)), fc_width=24, in_shape=(1, 8, 8))),
])
def test_flip_probability_agrees_with_monte_carlo_injection(name, kw):
    ds = data.load("digits", "train").subset(300, seed=0)
    model = randomize_bn(models.build(name, seed=0, **kw))
    p, n_maps = 0.08, 120
    fp = metrics.flip_probability(model, ds, ber=p)
    x, _ = next(ds.batches(len(ds)))
    with torch.no_grad():
        hs = [x]
        for b in model.blocks[:-1]:
            hs.append(b(hs[-1]))
        for l in sorted(set(fp.layer_index)):
            b = model.blocks[l]
            xin = hs[l].flatten(1) if b.flatten else hs[l]
            wb = b.layer.binary_weight()
            clean = b.bn(b.layer(xin)) >= 0
            g = torch.Generator().manual_seed(100 + int(l))
            frac = []
            for _ in range(n_maps):
                w = flip_binary(wb, p, p, generator=g)[0]
                a = F.linear(xin, w) if w.dim() == 2 else F.conv2d(xin, w, padding=1)
                dims = [0, *range(2, a.dim())]
                frac.append(((b.bn(a) >= 0) != clean).double().mean(dims))
            frac = torch.stack(frac).numpy()  # (maps, neurons)
            an = fp[fp.layer_index == l].sort_values("neuron")["flip_prob"].to_numpy()
            # layer mean: z-test with the map-to-map standard error
            se = frac.mean(1).std(ddof=1) / np.sqrt(n_maps)
            assert abs(frac.mean() - an.mean()) < 4 * se, (l, frac.mean(), an.mean(), se)
            # per neuron: a mean of indicators with mean q has variance <= q (1 - q) per map
            bound = 5 * np.sqrt(an * (1 - an) / n_maps) + 1e-9
            assert (np.abs(frac.mean(0) - an) <= bound).all()


def test_first_layer_and_asymmetric_rates_are_refused():
    with pytest.raises(ValueError, match="real-valued inputs"):
        metrics.flip_probability(toy_model(), toy_data(), layers=[0])
    with pytest.raises(ValueError, match="symmetric"):
        metrics.flip_probability(toy_model(), toy_data(), ber=[(0.1, 0.2)])
