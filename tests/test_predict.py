import itertools
import math

import numpy as np
import pytest
import torch
from _helpers import randomize_bn

from bnn_tol import data, errors, evaluate, metrics, models
from bnn_tol.exceptions import InvalidArgument

EPS = np.finfo(np.float64).eps


def tiny_random(seed=3):
    """fc 4-4-2-3 with random BN (gamma of both signs) on 60 random 2x2 images."""
    model = randomize_bn(models.build("fc", seed=seed, hidden=(4, 2), in_shape=(1, 2, 2),
                                      n_classes=3), seed=seed)
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randint(0, 256, (60, 1, 2, 2), generator=g, dtype=torch.uint8)
    return model, data.BNNDataset(imgs, torch.randint(0, 3, (60,), generator=g))


def enumerate_accuracy(model, ds):
    """Exact accuracy law with errors in blocks 1 and 2 (all 2^14 flip patterns).

    Returns ``(n_flips, accuracy)`` per pattern; ``acc(p) = sum p^k (1-p)^(n-k) acc``.
    """
    b0, b1, b2 = model.blocks
    x, y = next(ds.batches(len(ds)))
    with torch.no_grad():
        h0 = b0(x)
        w1, w2 = b1.layer.binary_weight(), b2.layer.binary_weight()
        m2 = torch.tensor(list(itertools.product([0, 1], repeat=w2.numel())),
                          dtype=torch.float32)  # (64, 6)
        w2s = w2[None] * (1 - 2 * m2.view(-1, *w2.shape))
        m1 = torch.tensor(list(itertools.product([0, 1], repeat=w1.numel())),
                          dtype=torch.float32)  # (256, 8)
        a1 = torch.einsum("pjk,nk->pnj", w1[None] * (1 - 2 * m1.view(-1, *w1.shape)), h0)
        h1 = b1.post(a1.reshape(-1, a1.shape[-1])).view(a1.shape)  # (256, N, 2)
        a2 = torch.einsum("mck,pnk->pmnc", w2s, h1)
        z = b2.post(a2.reshape(-1, a2.shape[-1])).view(a2.shape)
        accs = [(z.argmax(-1) == y).double().mean(-1).flatten()]
        ks = [(m1.sum(1)[:, None] + m2.sum(1)[None]).flatten()]
    return torch.cat(ks).double().numpy(), torch.cat(accs).numpy(), w1.numel() + w2.numel()


def exact_acc(ks, accs, n, p):
    return float((p**ks * (1 - p) ** (n - ks) * accs).sum())


def test_output_layer_only_prediction_is_exact():
    # with errors only in the output layer the law is exact (no independence assumption)
    model, ds = tiny_random()
    b2 = model.blocks[2]
    x, y = next(ds.batches(len(ds)))
    with torch.no_grad():
        h1 = model.blocks[1](model.blocks[0](x))
        w2 = b2.layer.binary_weight()
        m = torch.tensor(list(itertools.product([0, 1], repeat=w2.numel())), dtype=torch.float32)
        z = b2.post(torch.einsum("mck,nk->mnc", w2[None] * (1 - 2 * m.view(-1, *w2.shape)), h1)
                    .reshape(-1, 3)).view(len(m), len(y), 3)
        accs = (z.argmax(-1) == y).double().mean(1).numpy()
    ks = m.sum(1).double().numpy()
    for p in (0.05, 0.3):
        pred = metrics.predict_accuracy(model, ds, p, layers=[-1])
        assert pred["predicted_accuracy"].iloc[0] == pytest.approx(
            exact_acc(ks, accs, w2.numel(), p), abs=64 * 20 * EPS)


def test_slope_at_zero_equals_exact_enumeration():
    # d acc / dp at 0 = sum over single flips of the accuracy change; the prediction is exact
    # to first order: |pred(p) - acc(p)| <= p^2 (|pred''| + |acc''|) / 2 <= 4 n^2 p^2
    model, ds = tiny_random()
    ks, accs, n = enumerate_accuracy(model, ds)
    acc0 = accs[ks == 0][0]
    slope = float((accs[ks == 1] - acc0).sum())
    assert slope != 0  # the check below would be vacuous otherwise
    p = 1e-6
    pred = metrics.predict_accuracy(model, ds, [0.0, p], layers=[1, 2])
    pa = pred["predicted_accuracy"].to_numpy()
    assert pa[0] == acc0
    pred_slope = (pa[1] - acc0) / p
    assert pred_slope == pytest.approx(slope, abs=8 * n**2 * p + 8 * EPS / p)
    fo = (pred["first_order_accuracy"].iloc[1] - acc0) / p
    assert fo == pytest.approx(slope, abs=8 * n**2 * p + 8 * EPS / p)
    # and not only at 0: at p = 0.02 the Poisson combination stays close to the exact law
    assert abs(metrics.predict_accuracy(model, ds, 0.02, layers=[1, 2])["predicted_accuracy"]
               .iloc[0] - exact_acc(ks, accs, n, 0.02)) < 4 * n**2 * 0.02**2


@pytest.fixture(scope="module")
def trained():
    """fc 64-16-16-10 with random BN statistics (no training: keeps the tests fast)."""
    ds = data.load("digits", "train").subset(300, seed=0)
    return randomize_bn(models.build("fc", seed=0, hidden=(16, 16), in_shape=(1, 8, 8))), ds


def test_slope_at_zero_matches_sweep_monte_carlo(trained):
    # A map with exactly one flip flips a uniformly random weight of the M selected ones, so
    # S = M * E[acc(map) - acc0 | one flip] is the exact slope d E[acc] / dp at p = 0: an
    # unbiased Monte-Carlo estimate from the sweep's maps (flips counted by replaying each
    # map with errors.inject). Band: 4 standard errors of that mean.
    model, ds = trained
    layers = [1, 2]
    chosen = errors.select_layers(model, layers)
    clean = {n: lay.binary_weight().detach().clone() for n, lay in chosen.items()}
    m_w = sum(w.numel() for w in clean.values())
    p, n_maps = 1 / m_w, 800  # P(one flip) = 1/e at lam = p M = 1
    sw = evaluate.sweep(model, ds, bers=[p], n_maps=n_maps, layers=layers, progress=False,
                        device="cpu")
    n_flips = []
    for s in sw["map_seed"]:
        with errors.inject(model, p, seed=int(s), layers=layers):
            n_flips.append(sum(int((lay.binary_weight() != clean[n]).sum())
                               for n, lay in chosen.items()))
    pred = metrics.predict_accuracy(model, ds, [0.0, 1e-7], layers=layers)
    acc0 = pred["clean_accuracy"].iloc[0]
    one = sw["accuracy"].to_numpy()[np.array(n_flips) == 1] - acc0
    assert len(one) > 200
    slope_mc = m_w * one.mean()
    se = m_w * one.std(ddof=1) / math.sqrt(len(one))
    assert se > 0
    slope_pred = (pred["first_order_accuracy"].iloc[1] - acc0) / 1e-7
    assert abs(slope_mc - slope_pred) <= 4 * se


def test_deterministic_and_batch_size_free(trained):
    model, ds = trained
    bers = [0.01, 0.05, 0.1]
    a = metrics.predict_accuracy(model, ds, bers, per_layer=True)
    b = metrics.predict_accuracy(model, ds, bers, per_layer=True)
    assert a.equals(b)
    c = metrics.predict_accuracy(model, ds, bers, per_layer=True, batch_size=97)
    # only the order of the per-sample float64 sums changes: n * eps relative
    np.testing.assert_allclose(c["predicted_accuracy"], a["predicted_accuracy"], rtol=0,
                               atol=4 * len(ds) * EPS)


def test_table_shape_and_values(trained):
    model, ds = trained
    bers = [0.0, 0.02, 0.2]
    df = metrics.predict_accuracy(model, ds, bers, per_layer=True)
    assert list(df.columns) == ["ber", "layer", "layer_index", "predicted_accuracy",
                                "predicted_drop", "first_order_accuracy", "clean_accuracy",
                                "n_samples"]
    assert len(df) == len(bers) * 4
    net = df[df.layer == "network"]
    assert net["ber"].tolist() == bers
    assert net["predicted_accuracy"].iloc[0] == net["clean_accuracy"].iloc[0]
    assert ((df.predicted_accuracy >= 0) & (df.predicted_accuracy <= 1)).all()
    np.testing.assert_array_equal(df.predicted_drop, df.clean_accuracy - df.predicted_accuracy)
    assert (df.n_samples == len(ds)).all()
    assert set(df.layer) == {"network", "blocks.0.layer", "blocks.1.layer", "blocks.2.layer"}


def test_layer_selection_follows_inject_semantics(trained):
    model, ds = trained
    per = metrics.predict_accuracy(model, ds, [0.05], per_layer=True)
    hidden = metrics.predict_accuracy(model, ds, [0.05], layers="hidden")  # blocks.1 only
    assert hidden["predicted_accuracy"].iloc[0] == per.set_index("layer").loc[
        "blocks.1.layer", "predicted_accuracy"]
    by_name = metrics.predict_accuracy(model, ds, [0.05], layers=["blocks.2.layer"])
    by_pos = metrics.predict_accuracy(model, ds, [0.05], layers=[-1])
    assert by_name.equals(by_pos)


@pytest.mark.parametrize("bers,match", [
    ([(0.01, 0.02)], "symmetric"), ([1.5], "BER|ber|rate"), ([], "empty"),
])
def test_invalid_bers(trained, bers, match):
    model, ds = trained
    with pytest.raises(InvalidArgument, match=match):
        metrics.predict_accuracy(model, ds, bers)


def test_propagate_method_reduces_to_the_exact_output_law(trained):
    # with errors only in the output layer every sample sees rate p: the mean-field method
    # evaluates the same exact law (float64 sums in another order: n * eps)
    model, ds = trained
    bers = [0.0, 0.03, 0.2]
    a = metrics.predict_accuracy(model, ds, bers, layers=[-1])
    b = metrics.predict_accuracy(model, ds, bers, layers=[-1], method="propagate")
    np.testing.assert_allclose(b["predicted_accuracy"], a["predicted_accuracy"], rtol=0,
                               atol=4 * len(ds) * EPS)
    full = metrics.predict_accuracy(model, ds, bers, method="propagate")
    assert full["predicted_accuracy"].iloc[0] == full["clean_accuracy"].iloc[0]
    assert full["predicted_accuracy"].between(0, 1).all()
    with pytest.raises(InvalidArgument, match="method"):
        metrics.predict_accuracy(model, ds, bers, method="exact")
    with pytest.raises(InvalidArgument, match="per_layer"):
        metrics.predict_accuracy(model, ds, bers, method="propagate", per_layer=True)


def test_invalid_layers_and_conv_models(trained):
    model, ds = trained
    with pytest.raises(InvalidArgument, match="unknown layer"):
        metrics.predict_accuracy(model, ds, [0.1], layers=["nope"])
    conv = models.build("vgg3", channels=((4,), (4,)), fc_width=8, in_shape=(1, 8, 8))
    with pytest.raises(InvalidArgument, match="convolution"):
        metrics.predict_accuracy(conv, ds, [0.1])


def test_flip_table_gather_equals_the_elementwise_law():
    """_flip_q (one table row per value A, gathered) gives flip_given_preact bit for bit,
    including dead neurons, both directions and parity of the fan-in."""
    from bnn_tol.metrics.flipprob import flip_given_preact, flip_tables
    from bnn_tol.metrics.predict import _flip_q

    rng = np.random.default_rng(0)
    for n in (31, 64):
        a = 2 * rng.integers(0, n + 1, size=(300, 40)) - n  # a = n mod 2
        a[:, :3] = a[0, :3]  # constant columns too
        t = rng.integers(-n, n + 1, size=(1, 40))
        d = rng.choice([-1, 0, 1], size=(1, 40))
        for p in (0.001, 0.05, 0.3):
            sw = flip_tables(n, p)
            ref = flip_given_preact(a, t, d, n, sw)
            assert np.array_equal(_flip_q(a, t, d, n, sw), ref)
            assert (ref[:, d[0] == 0] == 0).all() and ref.max() > 0
