"""Fixtures shared by the test modules (a module that needs another ``digits`` or ``fc``
defines its own, which takes precedence)."""

from __future__ import annotations

import pytest

from bnn_tol import data, models, train


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's digits test split (360 images 1x8x8), built in."""
    return data.load("digits", "test")


@pytest.fixture(scope="module")
def fc():
    """A small fc BNN (64-48) trained 2 epochs on digits, eval mode (one per test module)."""
    m = models.build("fc", seed=0, hidden=(64, 48), in_shape=(1, 8, 8))
    train.fit(m, data.load("digits", "train"), epochs=2, batch_size=64, progress=False)
    return m.eval()
