import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import randomize_bn

from bnn_tol import data, evaluate, metrics, models, train
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
        ks, accs = [], []
        for bits in itertools.product([0, 1], repeat=w1.numel()):
            m1 = torch.tensor(bits, dtype=torch.float32).view(w1.shape)
            h1 = b1.post(F.linear(h0, w1 * (1 - 2 * m1)))
            a2 = torch.einsum("mck,nk->mnc", w2s, h1)
            z = b2.post(a2.reshape(-1, a2.shape[-1])).view(a2.shape)
            accs.append((z.argmax(-1) == y).double().mean(1))
            ks.append(m2.sum(1) + sum(bits))
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
    ds = data.load("digits", "train").subset(400, seed=0)
    model = models.build("fc", seed=0, hidden=(32, 32), in_shape=(1, 8, 8))
    train.fit(model, ds, epochs=20, seed=0, progress=False, device="cpu")
    return model.eval(), ds


def test_slope_at_zero_matches_sweep_monte_carlo(trained):
    # MC slope from the sweep engine at a BER where a map holds lam = p M ~ 0.4 flips:
    # E[acc(p)] - acc0 = p S + r, |r| <= P(>= 2 flips) * max|acc change| (a map with two or
    # more flips moves accuracy by at most its largest observed change); band: 4 SE + |r|
    model, ds = trained
    layers = [1, 2]
    m_w = 32 * 32 + 32 * 10
    p, n_maps = 3e-4, 1500
    lam = p * m_w
    sw = evaluate.sweep(model, ds, bers=[p], n_maps=n_maps, layers=layers, progress=False,
                        device="cpu")
    pred = metrics.predict_accuracy(model, ds, [0.0, p], layers=layers)
    acc0 = pred["clean_accuracy"].iloc[0]
    d = sw["accuracy"].to_numpy() - acc0
    se = d.std(ddof=1) / math.sqrt(n_maps)
    p2 = 1 - math.exp(-lam) * (1 + lam)
    bias = p2 * np.abs(d).max()
    assert se > 0
    pred_first = pred["first_order_accuracy"].iloc[1] - acc0
    assert abs(d.mean() - pred_first) <= 4 * se + bias


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


def test_invalid_layers_and_conv_models(trained):
    model, ds = trained
    with pytest.raises(InvalidArgument, match="unknown layer"):
        metrics.predict_accuracy(model, ds, [0.1], layers=["nope"])
    conv = models.build("vgg3", channels=((4,), (4,)), fc_width=8, in_shape=(1, 8, 8))
    with pytest.raises(InvalidArgument, match="convolution"):
        metrics.predict_accuracy(conv, ds, [0.1])
