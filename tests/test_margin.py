import math
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from _helpers import randomize_bn
from torch import nn

from bnn_tol import data, metrics, models
from bnn_tol.core import kernels
from bnn_tol.core.layers import BinaryLinear
from bnn_tol.core.models import BNN, BinaryBlock


def _set_bn(bn, gamma, beta, mu, var):
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(gamma, dtype=torch.float32))
        bn.bias.copy_(torch.tensor(beta, dtype=torch.float32))
        bn.running_mean.copy_(torch.tensor(mu, dtype=torch.float32))
        bn.running_var.copy_(torch.tensor(var, dtype=torch.float32))
    bn.eps = 0.0


def toy_model() -> BNN:
    """4 real inputs -> 2 (one gamma < 0) -> 3 (one gamma < 0, one dead) -> 2 classes."""
    l0, l1, l2 = BinaryLinear(4, 2), BinaryLinear(2, 3), BinaryLinear(3, 2)
    with torch.no_grad():
        l0.weight.copy_(torch.tensor([[1.0, 1, -1, 1], [-1, 1, 1, 1]]))
        l1.weight.copy_(torch.tensor([[1.0, -1], [1, 1], [-1, 1]]))
        l2.weight.copy_(torch.tensor([[1.0, 1, 1], [1, -1, 1]]))
    b0, b1, b2 = nn.BatchNorm1d(2), nn.BatchNorm1d(3), nn.BatchNorm1d(2)
    _set_bn(b0, [2.0, -1.0], [1.0, 0.5], [0.5, 1.0], [4.0, 1.0])  # tau = -0.5, 1.5
    _set_bn(b1, [1.0, -2.0, 0.0], [0.0, 1.0, 0.3], [0.5, 0.0, 0.0], [1.0, 4.0, 1.0])  # .5, 1, dead
    blocks = [BinaryBlock(l0, b0, flatten=True), BinaryBlock(l1, b1),
              BinaryBlock(l2, b2, binary_output=False)]
    return BNN(blocks, {"name": "toy", "kwargs": {"in_shape": [1, 2, 2]}}).eval()


def toy_data() -> data.BNNDataset:
    # x = (p - 128) / 128: 192 -> 0.5, 64 -> -0.5, 128 -> 0, 0 -> -1
    imgs = torch.tensor([[192, 192, 128, 0], [0, 192, 192, 128]], dtype=torch.uint8)
    return data.BNNDataset(imgs.view(2, 1, 2, 2), torch.tensor([0, 1]))


def test_hand_computed_margins_of_toy_network_including_negative_gamma():
    # a0 = [0, -1] and [-1, 2]; a1 = [0, 2, 0] and [0, -2, 0]
    m = metrics.margin(toy_model(), toy_data()).set_index(["layer_index", "neuron"])
    np.testing.assert_allclose(m.loc[(0, 0), ["tau", "mean_margin", "min_margin"]].to_list(),
                               [-0.5, 0.5, 0.5])
    np.testing.assert_allclose(m.loc[(0, 1), ["tau", "mean_margin", "min_margin"]].to_list(),
                               [1.5, 1.5, 0.5])
    assert m.loc[(0, 1), "direction"] == -1 and m.loc[(0, 0), "kind"] == "first"
    # first layer: mean |x| = 0.5 for both samples -> tolerable flips m / (2 * 0.5) = m
    np.testing.assert_allclose(m.loc[(0, 1), "mean_margin_half"], 1.5)
    np.testing.assert_allclose(m.loc[(0, 1), "mean_margin_norm"], 1.5 / 4)
    np.testing.assert_allclose(m.loc[(0, 0), "mean_margin_bn"], 2 / 2 * 0.5)
    np.testing.assert_allclose(m.loc[(1, 0), ["tau", "mean_margin", "min_margin"]].to_list(),
                               [0.5, 0.5, 0.5])
    np.testing.assert_allclose(m.loc[(1, 1), ["tau", "mean_margin", "min_margin", "q10_margin",
                                              "mean_margin_half", "mean_margin_norm"]].to_list(),
                               [1.0, 2.0, 1.0, 1.0, 1.0, 1.0])
    assert m.loc[(1, 1), "direction"] == -1 and m.loc[(1, 1), "mean_margin_bn"] == 2.0
    dead = m.loc[(1, 2)]
    assert dead["dead"] and math.isnan(dead["tau"]) and dead["mean_margin"] == math.inf
    s = metrics.margin_summary(m.reset_index())
    net = s[s.layer == "network"].iloc[0]
    assert net["n_dead"] == 1
    np.testing.assert_allclose(net["value"], np.mean([(0.5 / 4 + 1.5 / 4) / 2, (0.25 + 1.0) / 2]))




@pytest.fixture(scope="module")
def digits():
    return data.load("digits", "train")


def _brute(model, ds, k):
    """All pre-activations of block k as (N * positions, C), and the block inputs."""
    with torch.no_grad():
        x, _ = next(ds.batches(len(ds)))
        for b in model.blocks[:k]:
            x = b(x)
        a = model.blocks[k].preact(x)
    return a.transpose(0, 1).reshape(a.shape[1], -1).T.double(), x


@pytest.mark.parametrize("name,kw", [
    ("fc", dict(hidden=(40, 32), in_shape=(1, 8, 8))),
    ("vgg3", dict(channels=((8,), (6,)), fc_width=24, in_shape=(1, 8, 8))),
])
def test_margin_matches_brute_force_over_all_samples(digits, name, kw):
    model = randomize_bn(models.build(name, seed=0, **kw))
    m = metrics.margin(model, digits, batch_size=500)  # several batches
    for k in range(len(model.blocks) - 1):
        a, x = _brute(model, digits, k)
        rows = m[m.layer_index == k].sort_values("neuron")
        tau = torch.tensor(rows["tau"].to_numpy())
        mm = (a - tau).abs().numpy()
        # a is exact (k/128 grid, float32 sums of < 2^24 units), so each |a - tau| is one
        # float64 rounding, identical here and in the library: the minimum is bit-exact.
        np.testing.assert_array_equal(rows["min_margin"], mm.min(0))
        # mean: the library is exact up to a few float64 roundings of terms <= max|a| + |tau|
        # (module doc: <= 4 eps (max|a| + |tau|)); the reference sum is correctly rounded
        # (fsum), so 8 eps (max|a| + |tau|) bounds the difference on any CPU.
        eps = np.finfo(np.float64).eps
        ref = np.array([math.fsum(col) / len(col) for col in mm.T])
        scale = np.abs(a.numpy()).max(0) + np.abs(tau.numpy())
        err = np.abs(rows["mean_margin"].to_numpy() - ref)
        tol = 8 * eps * scale
        assert (err <= tol).all(), (k, err.max(), (err / tol).max())
        q = np.quantile(mm, 0.1, axis=0, method="inverted_cdf")
        info_w = 1 / 128 if not (k == 0 and name == "fc") else 2 * 64 / 8192 * 2
        np.testing.assert_allclose(rows["q10_margin"], q, atol=(info_w / 2 + 1e-6) if k == 0
                                   else 1e-9)
        if k > 0:
            np.testing.assert_allclose(rows["mean_margin_half"], mm.mean(0) / 2, rtol=1e-9)


def test_conv_per_position_table_and_effective_fan_in(digits):
    model = randomize_bn(
        models.build("vgg3", channels=((4,), (3,)), fc_width=8, in_shape=(1, 8, 8)))
    pos = metrics.margin_positions(model, digits, layers=[1])
    a, _ = _brute(model, digits, 1)
    assert set(pos["fan_in_eff"]) == {4 * 4, 4 * 6, 4 * 9}  # corners, edges, interior (4x4 map)
    corner = pos[(pos.h == 0) & (pos.w == 0)]
    assert (corner["fan_in_eff"] == 16).all() and (corner["fan_in"] == 36).all()
    full = metrics.margin(model, digits, layers=[1])
    per_chan = pos.groupby("neuron")["mean_margin"].mean().to_numpy()
    # both float64 from exact integer a and float64 tau: a sum over N samples (per position)
    # then over P positions vs the exact histogram: <= 4 (N + P) eps max|m|
    n_pos = pos.groupby("neuron").size().iloc[0]
    scale = a.abs().max().item() + full["tau"].abs().max()
    tol = 4 * (len(digits) + n_pos) * np.finfo(np.float64).eps * scale
    np.testing.assert_allclose(per_chan, full.sort_values("neuron")["mean_margin"], rtol=0,
                               atol=tol)


def test_flipping_fewer_than_half_margin_adversarial_weights_never_changes_the_bit(digits):
    model = randomize_bn(models.build("fc", hidden=(40, 32), in_shape=(1, 8, 8)), seed=3)
    m = metrics.margin(model, digits).set_index(["layer_index", "neuron"])
    block = model.blocks[1]
    with torch.no_grad():
        h0 = model.blocks[0](next(digits.batches(64))[0])
        a = block.preact(h0)
        wb = block.layer.binary_weight()
        checked = 0
        for n in range(0, 64, 3):
            for j in range(32):
                tau = m.loc[(1, j), "tau"]
                if abs(tau - round(tau)) < 1e-3 or m.loc[(1, j), "dead"]:
                    continue  # tie-free cases only
                marg = abs(float(a[n, j]) - tau)
                s = 1.0 if a[n, j] > tau else -1.0
                agree = torch.nonzero(wb[j] * h0[n] == s).flatten()  # flipping moves a by -2s
                k_half = math.ceil(marg / 2)
                if len(agree) < k_half:
                    continue
                y0 = block.post(a[n : n + 1])[0, j]
                for k, changes in ((k_half - 1, False), (k_half, True)):
                    w = wb[j].clone()
                    w[agree[:k]] *= -1
                    a2 = a[n : n + 1].clone()
                    a2[0, j] = (w * h0[n]).sum()
                    assert (block.post(a2)[0, j] != y0).item() == changes, (n, j, k, marg)
                checked += 1
    assert checked > 100


def test_score_margin_matches_brute_force(digits):
    model = randomize_bn(models.build("fc", hidden=(40, 32), in_shape=(1, 8, 8)))
    sm = metrics.score_margin(model, digits)
    with torch.no_grad():
        x, y = next(digits.batches(len(digits)))
        z = model(x)
    zy = z.gather(1, y[:, None])[:, 0]
    other = z.clone()
    other[torch.arange(len(y)), y] = -math.inf
    np.testing.assert_allclose(sm["score_margin"], (zy - other.max(1).values).numpy(), rtol=1e-6)
    assert (sm["correct"] == (sm["score_margin"] > 0)).all()
    assert (sm["score_margin_flips"] > 0).eq(sm["correct"]).all()


def test_clear_errors_for_empty_data_wrong_shape_and_missing_bn(digits):
    model = models.build("fc", hidden=(16,), in_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="empty"):
        metrics.margin(model, data.BNNDataset(digits.images[:0], digits.labels[:0]))
    fm = models.build("fc", hidden=(16,))
    with pytest.raises(ValueError, match=r"shape \(1, 8, 8\) but the fc model expects "
                                         r"\(1, 28, 28\)"):
        metrics.margin(fm, digits)
    model.blocks[0].bn = nn.Identity()
    with pytest.raises(ValueError, match=r"blocks\.0\.layer: binary layer is not followed by "
                                         "BatchNorm"):
        metrics.margin(model, digits)
    with pytest.raises(ValueError, match="BatchNorm"):
        metrics.importance(model, digits)


def test_metrics_cli_writes_per_neuron_table_and_plot(tmp_path, digits):
    from click.testing import CliRunner

    import bnn_tol
    from bnn_tol.cli import main

    for k in (0, 1):
        bnn_tol.save(randomize_bn(models.build("fc", seed=k, hidden=(12, 10), in_shape=(1, 8, 8)),
                                seed=k), tmp_path / f"m{k}")
    out = tmp_path / "metrics.csv"
    res = CliRunner().invoke(main, ["metrics", str(tmp_path / "m0"), str(tmp_path / "m1"),
                                    "--dataset", "digits", "--split", "train", "--subset", "200",
                                    "--flip-ber", "0.1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    import pandas as pd

    t = pd.read_csv(out)
    assert set(t["model"]) == {"m0", "m1"} and len(t) == 2 * (12 + 10)
    assert {"mean_margin_norm", "importance_accuracy", "flip_prob"} <= set(t.columns)
    res = CliRunner().invoke(main, ["plot", "margins", str(out), "--out",
                                    str(tmp_path / "m.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m.png").stat().st_size > 0


def test_margin_restores_every_submodules_training_flag(digits):
    model = randomize_bn(models.build("fc", hidden=(12, 10), in_shape=(1, 8, 8)))
    model.train()
    model.blocks[0].bn.eval()  # mixed: a frozen BN inside a training model
    model.blocks[2].eval()
    before = {name: mod.training for name, mod in model.named_modules()}
    metrics.margin(model, digits)
    metrics.score_margin(model, digits)
    assert {name: mod.training for name, mod in model.named_modules()} == before


def _take(ds, idx):
    return data.BNNDataset(ds.images[idx], ds.labels[idx])


def _per_image_values(model, ds):
    """Brute force: per-image, per-neuron margins of every hidden layer, float64.

    ``{k: (v (N, C) position-mean of |a - tau|, half (N, C), scale (C,), fan_in, live (C,))}``.
    """
    infos = {i.index: i for i in metrics._common.hidden_layers(model)}
    out = {}
    with torch.no_grad():
        x, _ = next(ds.batches(len(ds)))
        for k in range(len(model.blocks) - 1):
            info = infos[k]
            a = model.blocks[k].preact(x).double()
            tau = torch.where(info.direction == 0, 0.0, info.tau).view(-1, *[1] * (a.dim() - 2))
            m = (a - tau).abs()
            if k == 0:  # first layer: m / (2 xbar) with xbar the receptive-field mean |x|
                if a.dim() == 2:
                    xbar = x.flatten(1).abs().double().mean(1).view(-1, 1)
                else:
                    layer = model.blocks[0].layer
                    ker = torch.ones(1, x.shape[1], *layer.kernel_size, dtype=torch.float64)
                    xbar = torch.nn.functional.conv2d(x.abs().double(), ker,
                                                      padding=layer.padding)
                    xbar = xbar / info.fan_in
                half = m / (2 * xbar)
            else:
                half = m / 2
            dims = tuple(range(2, a.dim()))
            v = m.mean(dims) if dims else m
            h = half.mean(dims) if dims else half
            out[k] = (v.numpy(), h.numpy(), info.bn_scale.numpy(), info.fan_in,
                      (info.direction != 0).numpy(), int(np.prod(a.shape[2:])))
            x = model.blocks[k](x)
    return out


def _se(v):
    return v.std(0, ddof=1) / math.sqrt(v.shape[0])


@pytest.mark.parametrize("name,kw", [
    ("fc", dict(hidden=(40, 32), in_shape=(1, 8, 8))),
    ("vgg3", dict(channels=((8,), (6,)), fc_width=24, in_shape=(1, 8, 8))),
])
def test_margin_standard_errors_match_brute_force_per_image_aggregates(digits, name, kw):
    model = randomize_bn(models.build(name, seed=0, **kw))
    ds = _take(digits, torch.arange(600))
    m = metrics.margin(model, ds, batch_size=128)  # several batches: tests the merge
    s = metrics.margin_summary(m).set_index("layer_index")
    vals = _per_image_values(model, ds)
    eps64, eps32, n = np.finfo(np.float64).eps, np.finfo(np.float32).eps, len(ds)
    per_image = {st: {} for st in ("mean_margin", "mean_margin_half", "mean_margin_norm",
                                   "mean_margin_bn")}
    for k, (v, half, scale, fan_in, live, p) in vals.items():
        rows = m[m.layer_index == k].sort_values("neuron")
        forms = {"mean_margin": v, "mean_margin_half": half, "mean_margin_norm": v / fan_in,
                 "mean_margin_bn": v * scale}
        for st, val in forms.items():
            # library: position means in float32 (error <= p eps32 max|v| per value, which
            # moves a standard deviation by at most as much), float64 co-moments of n terms
            tol = 4 * p * eps32 * np.abs(val).max() / math.sqrt(n) + 4 * n * eps64 * _se(val)
            got = rows[f"{st}_se"].to_numpy()
            assert (np.abs(got[live] - _se(val)[live]) <= tol).all(), (k, st)
            assert np.isnan(got[~live]).all()
            # aggregates are means of values: the same per-value error bound carries over
            per_image[st][k] = (val[:, live].mean(1), 4 * p * eps32 * np.abs(val).max())
            u_se = _se(per_image[st][k][0])
            agg_tol = per_image[st][k][1] / math.sqrt(n) + 4 * n * eps64 * u_se
            assert abs(s.loc[k, f"{st}_se"] - u_se) <= agg_tol, (k, st)
    for st, layers in per_image.items():
        w = np.mean([u for u, _ in layers.values()], axis=0)
        ref = _se(w)
        agg_tol = max(d for _, d in layers.values()) / math.sqrt(n) + 4 * n * eps64 * ref
        assert abs(s.loc[-1, f"{st}_se"] - ref) <= agg_tol, (st, s.loc[-1, f"{st}_se"], ref)
    assert (s["value_se"] == s["mean_margin_norm_se"]).all()


@pytest.mark.parametrize("name,kw", [
    ("fc", dict(hidden=(40, 32), in_shape=(1, 8, 8))),
    ("vgg3", dict(channels=((8,), (6,)), fc_width=24, in_shape=(1, 8, 8))),
])
def test_margin_se_matches_spread_of_disjoint_subset_means(digits, name, kw):
    from scipy import stats

    model = randomize_bn(models.build(name, seed=0, **kw))
    n_sub = 12
    size = len(digits) // n_sub
    perm = torch.randperm(len(digits), generator=torch.Generator().manual_seed(5))
    tabs, sums = [], []
    for i in range(n_sub):
        t = metrics.margin(model, _take(digits, perm[i * size : (i + 1) * size]))
        tabs.append(t.sort_values(["layer_index", "neuron"]).reset_index(drop=True))
        sums.append(metrics.margin_summary(t).set_index("layer_index"))
    # Var_k of the K subset means has E = fpc se^2 (disjoint draws without replacement from
    # N images: fpc = (N - n) / (N - 1)) and, for a normal mean, (K - 1) Var / (fpc se^2)
    # ~ chi2_{K-1}. Pooling neurons only adds degrees of freedom; perfectly correlated
    # neurons leave K - 1, so the two-sided 99.9 % chi2_{K-1} band holds in every case.
    fpc = (len(digits) - size) / (len(digits) - 1)
    lo, hi = (fpc * stats.chi2.ppf(q, n_sub - 1) / (n_sub - 1) for q in (0.0005, 0.9995))
    for st in ("mean_margin", "mean_margin_half", "mean_margin_bn"):
        means = np.stack([t[st].to_numpy() for t in tabs])
        se2 = np.stack([t[f"{st}_se"].to_numpy() for t in tabs]) ** 2
        live = ~tabs[0]["dead"].to_numpy()
        for k in tabs[0]["layer_index"].unique():
            sel = live & (tabs[0]["layer_index"] == k).to_numpy()
            ratio = means[:, sel].var(0, ddof=1).sum() / se2[:, sel].mean(0).sum()
            assert lo < ratio < hi, (st, k, ratio)
        for k in [*tabs[0]["layer_index"].unique(), -1]:  # layers and the network
            agg = np.array([s.loc[k, st] for s in sums])
            agg_se2 = np.array([s.loc[k, f"{st}_se"] for s in sums]) ** 2
            ratio = agg.var(ddof=1) / agg_se2.mean()
            assert lo < ratio < hi, (st, k, ratio)


def test_select_quantile_and_min_match_sorting_all_bins():
    """``_select`` (cumulative histogram + binary search over the alternating left/right
    order) returns exactly the margin that sorting every bin's margin returns: ties, tau on a
    bin centre, at a midpoint, outside the occupied range, quantiles 0 .. 1.5."""
    from types import SimpleNamespace as NS

    from bnn_tol.metrics.margin import _select

    g = torch.Generator().manual_seed(0)
    for trial in range(120):
        k, c, w = int(torch.randint(1, 40, (1,), generator=g)), 30, [1.0, 0.25, 25 / 128][trial % 3]
        k0, lo = int(torch.randint(0, 20, (1,), generator=g)), -10 * w
        centers = lo + w * torch.arange(k0, k0 + k, dtype=torch.float64)
        dens = torch.rand(1, generator=g).item()
        h = (torch.rand(k, c, generator=g) < dens).long() * torch.randint(1, 5, (k, c), generator=g)
        h[torch.randint(0, k, (c,), generator=g), torch.arange(c)] += 1
        base = centers[torch.randint(0, k, (c,), generator=g)]
        u = torch.rand(c, generator=g, dtype=torch.float64)
        tau = torch.stack([base, base + w / 2, base + (u - 0.5) * w,
                           base + (u - 0.5) * 100 * w])[torch.arange(c) % 4, torch.arange(c)]
        direction = torch.ones(c, dtype=torch.int8)
        direction[:2] = 0
        tau = torch.where(direction == 0, torch.nan, tau)
        st = NS(hist=h, lo=lo, w=w, k0=k0, neff=torch.tensor([1]),
                info=NS(tau=tau, direction=direction))
        tau0 = torch.where(direction == 0, 0.0, tau)
        marg = (centers[None, :] - tau0[:, None]).abs()
        order = marg.argsort(dim=1, stable=True)
        cum = h.T.gather(1, order).cumsum(1)
        lowest = torch.where(h.T > 0, marg, math.inf).amin(1)
        for q in (0.0, 0.1, 0.5, 0.9, 1.0, 1.5):
            need = torch.ceil(h.sum(0).double() * q - 1e-9).clamp_min(1)
            pos = (cum < need[:, None]).sum(1, keepdim=True).clamp_max(k - 1)
            want = marg.gather(1, order.gather(1, pos))[:, 0]
            mn, got = _select(st, [torch.ones(c, dtype=torch.int64), need.long()])
            assert torch.equal(got, want), (trial, q)
            assert torch.equal(mn, lowest), trial


@pytest.mark.skipif(not kernels.AVAILABLE, reason="needs numba")
def test_numba_path_of_linear_layers_equals_the_torch_path(digits, monkeypatch):
    """fc layers take the numba kernels (margin_cols / margin_rows / margin_comoments): the
    histogram-derived and integer-grid columns are identical to the torch path; float64 sums
    (the first layer's _half mean, the standard errors) differ only by summation order."""
    margin_mod = sys.modules["bnn_tol.metrics.margin"]  # the module, not the function
    model = randomize_bn(models.build("fc", seed=3, hidden=(40, 33), in_shape=(1, 8, 8)))
    with torch.no_grad():  # a dead neuron (gamma = 0) in each hidden layer
        for b in model.blocks[:-1]:
            b.bn.weight[5] = 0.0
    calls = []
    real = margin_mod._update_fast
    monkeypatch.setattr(margin_mod, "_update_fast", lambda *a: calls.append(1) or real(*a))
    fast = metrics.margin(model, digits, batch_size=300)
    assert calls  # the kernels ran
    monkeypatch.setattr(margin_mod, "_fast", lambda st, a: False)
    slow = metrics.margin(model, digits, batch_size=300)
    pd.testing.assert_frame_equal(fast.drop(columns=_FLOAT_SUMS), slow.drop(columns=_FLOAT_SUMS),
                                  check_exact=True)
    for c in _FLOAT_SUMS:
        np.testing.assert_allclose(fast[c], slow[c], rtol=1e-12, atol=1e-14, err_msg=c)


_FLOAT_SUMS = ["mean_margin_half",
               *[c for c in metrics.MARGIN_COLUMNS if c.endswith("_se") or c.startswith("cov_")]]
