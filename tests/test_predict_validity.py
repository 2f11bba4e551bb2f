"""The region of validity stated in the docstring of ``metrics.predict_accuracy`` (issue 21).

A fc 784-128-128-10 is trained in the test (2 epochs on 8000 Fashion-MNIST images, seeded: one
of the networks the statement was measured on, ``docs/results/predict_validity_fc128``) and
swept exactly (``evaluate.sweep``) on 1000 test images. The prediction is deterministic; the
sweep's mean over ``M`` maps has standard error ``se = sd / sqrt(M)``. The statement is about
the mean over maps, ``E[acc_p]``, so with ``|E[acc_p] - prediction| <= B`` the observed
``|mean - prediction|`` exceeds ``B + 4 se`` with probability < 1e-4 (normal approximation;
sd estimated from the same maps). ``B`` is the stated bound, not this machine's output.

The band is wide against the drop at p <= 0.02 (0.016-0.018 vs a drop of about 0.04), so
these tests catch gross breaks (hidden-layer flips ignored, the first block's law replaced
by 0: checked by patching ``bnn_tol.metrics.predict``); flip rates off by a factor of 2 or
the output-layer law dropped pass here and are caught by the exact tests of
``tests/test_predict.py`` (enumeration, slope at 0, output layer alone).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnn_tol import data, evaluate, metrics, models, train
from bnn_tol.exceptions import InvalidArgument

#: Stated in the docstring: |predicted - swept| <= 0.01 for p <= 0.02 (method="poisson");
#: checked at both ends of the region.
VALID_BERS, BOUND = (0.002, 0.02), 0.01
#: Stated: optimistic by 0.17-0.20 at p = 0.1 on normally trained networks; "do not use it
#: above p = 0.03". Checked with a margin well inside the measured range.
OUTSIDE_BER, OPTIMISTIC_BY = 0.1, 0.05
N_MAPS, Z = 30, 4.0


@pytest.fixture(scope="module")
def swept():
    """(model, test images, sweep mean and standard error per BER) of a freshly trained fc."""
    try:
        tr = data.load("fashion-mnist", "train").subset(8000, seed=0)
        te = data.load("fashion-mnist", "test").subset(1000, seed=0)
    except data.DatasetNotFound as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"the statement is about Fashion-MNIST networks: {e}")
    model = models.build("fc", seed=0, hidden=(128, 128), in_shape=(1, 28, 28))
    train.fit(model, tr, epochs=2, seed=0, progress=False, device="cpu", threads=1)
    model.eval()
    sw = evaluate.sweep(model, te, bers=[*VALID_BERS, OUTSIDE_BER], n_maps=N_MAPS,
                        seed=0, progress=False, device="cpu")
    g = sw.groupby("ber")["accuracy"]
    return model, te, g.mean(), g.std(ddof=1) / np.sqrt(g.size())


def test_poisson_within_the_stated_bound_for_ber_up_to_2_percent(swept):
    model, te, acc, se = swept
    pred = metrics.predict_accuracy(model, te, list(VALID_BERS)).set_index("ber")
    for p in VALID_BERS:
        assert se[p] > 0  # maps differ: the band is not vacuous
        err = pred.loc[p, "predicted_accuracy"] - acc[p]
        assert abs(err) <= BOUND + Z * se[p], (p, err, se[p])
    # not vacuous: at the edge of the region, predicting no drop at all would fail
    p = VALID_BERS[-1]
    assert pred.loc[p, "clean_accuracy"] - acc[p] > BOUND + Z * se[p]


def test_poisson_is_optimistic_outside_the_region(swept):
    model, te, acc, se = swept
    pred = metrics.predict_accuracy(model, te, OUTSIDE_BER)["predicted_accuracy"].iloc[0]
    assert pred - acc[OUTSIDE_BER] >= OPTIMISTIC_BY + Z * se[OUTSIDE_BER]


def test_propagate_is_biased_low(swept):
    # stated: below the sweep in all 90 measured (network, BER) pairs
    model, te, acc, se = swept
    bers = [*VALID_BERS, OUTSIDE_BER]
    pred = metrics.predict_accuracy(model, te, bers, method="propagate").set_index("ber")
    for p in bers:
        assert pred.loc[p, "predicted_accuracy"] <= acc[p] + Z * se[p], p


def test_conv_models_are_refused_in_one_line_whatever_the_data():
    conv = models.build("vgg3", channels=((4,), (4,)), fc_width=8, in_shape=(1, 8, 8))
    for ds in (data.load("digits", "test"),  # fits the model
               data.BNNDataset(torch.zeros(4, 1, 5, 5, dtype=torch.uint8),
                               torch.zeros(4, dtype=torch.int64))):
        with pytest.raises(InvalidArgument, match=r"blocks\.0\.layer is a convolution") as e:
            metrics.predict_accuracy(conv, ds, [0.01])
        assert "\n" not in str(e.value) and "evaluate.sweep" in str(e.value)
