"""Analytic probability that a neuron's output bit flips under weight bit errors.

A hidden neuron with {-1, +1} inputs, fan-in ``n`` and integer pre-activation ``a`` has

    A = (n + a) / 2   agreeing terms (w_i x_i = +1),   D = (n - a) / 2   disagreeing terms.

Under symmetric weight BER ``p`` every weight flips independently: ``X ~ Bin(A, p)``
agreeing terms turn (each moves ``a`` by -2), ``Y ~ Bin(D, p)`` disagreeing terms turn (+2),
so ``a' = a - 2 (X - Y)``. With the neuron's integer comparator (:func:`fold_threshold`:
``y = +1`` iff ``a >= t`` for ``direction = +1``, iff ``a <= t`` for ``-1``) and the signed
distance ``r = direction * (a - t)`` (output +1 iff ``r >= 0``):

    P(flip | a) = P(Z >= floor(r / 2) + 1)    if r >= 0     (Z: moves towards the threshold)
                = P(Z >= ceil(-r / 2))         if r <  0

where ``Z = X - Y`` when the threshold lies below ``a`` and ``Y - X`` otherwise. The law of
``X - Y`` is computed exactly: ``W = X + (D - Y)`` is the sum of ``Bin(A, p)`` and
``Bin(D, 1 - p)`` (an FFT convolution, absolute error ~1e-15) and ``X - Y = W - D``.

The neuron's flip probability is the mean of ``P(flip | a)`` over samples (and output
positions): it is computed from the exact per-neuron histogram of ``a`` of the margin pass,
so the cost is one forward pass plus a table of size ``(n + 1)^2``. It is exact for a
layer whose inputs are error-free (errors in earlier layers also change ``a``). Zero-padded
conv positions have fewer nonzero inputs: the effective fan-in of each position is used
(exact per position, aggregated per channel). Dead neurons (``gamma == 0``) never flip.
The probability refers to the bit ``sign(BN(a))`` before max-pooling. The first layer
(real inputs, a flip moves ``a`` by ``2 |x_i|``) is not covered; only symmetric BER.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats
from torch import nn

from bnn_tol import schema
from bnn_tol.core.compiled import compile_model
from bnn_tol.data import BNNDataset
from bnn_tol.exceptions import InvalidArgument
from bnn_tol.faults.maps import rates
from bnn_tol.metrics.margin import LayerStats, margin_pass

__all__ = ["flip_probability", "flip_tables", "flip_given_preact"]


def flip_tables(n: int, p: float, a_range: tuple[int, int] | None = None) -> np.ndarray:
    """Survival table of ``W = Bin(A, p) + Bin(n - A, 1 - p)``.

    Returns:
        ``sw`` float64 ``(rows, n + 2)`` with ``sw[i, w] = P(W >= w)`` for ``A = A_lo + i``
        (``A_lo, A_hi = a_range``, default ``0, n``); ``sw[:, n + 1] = 0``.
    """
    a_lo, a_hi = a_range if a_range is not None else (0, n)
    a_vals = np.arange(a_lo, a_hi + 1)[:, None]
    k = np.arange(n + 1)[None, :]
    px = stats.binom.pmf(k, a_vals, p)
    pv = stats.binom.pmf(k, n - a_vals, 1.0 - p)
    size = 2 * (n + 1)
    pw = np.fft.irfft(np.fft.rfft(px, size, axis=1) * np.fft.rfft(pv, size, axis=1), size,
                      axis=1)[:, : n + 1]
    pw = np.clip(pw, 0.0, None)
    sw = np.zeros((pw.shape[0], n + 2))
    sw[:, : n + 1] = np.cumsum(pw[:, ::-1], axis=1)[:, ::-1]
    return np.clip(sw, 0.0, 1.0)


def flip_given_preact(a: np.ndarray, t: np.ndarray, d: np.ndarray, n: int, sw: np.ndarray,
                      a_lo: int = 0) -> np.ndarray:
    """``P(flip | a)`` elementwise (module doc) for integer pre-activations of fan-in ``n``.

    Args:
        a, t, d: broadcastable int arrays: pre-activation (``a = n mod 2``), folded integer
            threshold and direction (0: dead neuron, never flips).
        sw: :func:`flip_tables` ``(n, p, (a_lo, .))``: row ``A - a_lo`` for ``A = (n + a) / 2``.

    Returns:
        float64 array of the broadcast shape.
    """
    big_a = (n + a) // 2
    big_d = n - big_a
    row = big_a - a_lo
    r = d * (a - t)
    on = r >= 0
    m = np.where(on, r // 2 + 1, (-r + 1) // 2)
    x_minus_y = on == (d > 0)  # the move towards the threshold is X - Y
    # P(X - Y >= m) = P(W >= m + D);  P(Y - X >= m) = 1 - P(W >= D - m + 1)
    col_down = np.minimum(m + big_d, n + 1)
    col_up = big_d - m + 1
    p_down = sw[row, col_down]
    p_up = np.where(col_up >= 1, 1.0 - sw[row, np.clip(col_up, 0, n + 1)], 0.0)
    return np.where(d != 0, np.where(x_minus_y, p_down, p_up), 0.0)


def _layer_flip(st: LayerStats, p: float) -> np.ndarray:
    """Mean flip probability per channel ``(C,)`` of one layer from its histogram."""
    info = st.info
    hist = st.hist3().numpy()  # (C, E, bins)
    c_idx, e_idx, k_idx = np.nonzero(hist)
    cnt = hist[c_idx, e_idx, k_idx].astype(np.float64)
    a = np.rint(st.lo + k_idx * st.w).astype(np.int64)
    t = info.folded.t.numpy()[c_idx]
    d = info.folded.direction.numpy().astype(np.int64)[c_idx]
    prob = np.zeros_like(cnt)
    for e, n_e in enumerate(st.neff.numpy()):
        sel = (e_idx == e) & (d != 0)
        if not sel.any():
            continue
        ae, te, de = a[sel], t[sel], d[sel]
        a_lo = int(((n_e + ae) // 2).min())
        sw = flip_tables(int(n_e), p, (a_lo, int(((n_e + ae) // 2).max())))
        prob[sel] = flip_given_preact(ae, te, de, int(n_e), sw, a_lo)
    total = np.bincount(c_idx, weights=cnt, minlength=hist.shape[0])
    flips = np.bincount(c_idx, weights=cnt * prob, minlength=hist.shape[0])
    return flips / np.maximum(total, 1)


def flip_probability(
    model: nn.Module,
    data: BNNDataset,
    *,
    ber: float | Sequence[float] = 0.05,
    layers: Sequence[int] | None = None,
    level: str = "neuron",
    batch_size: int = 1000,
) -> pd.DataFrame:
    """Analytic probability that a hidden neuron's output bit flips at weight BER ``p``.

    ``flip_prob_j = mean_n P(sign(BN(a'_nj)) != sign(BN(a_nj)))`` with only this layer's
    weights corrupted (see the module doc for the exact binomial formula).

    Args:
        model: a trained :class:`~bnn_tol.models.BNN`.
        data: samples to average over.
        ber: one symmetric BER ``p`` or a list of them (asymmetric ``(p01, p10)`` is not
            supported: the flip law then depends on the signs of ``w`` and ``x`` separately).
        layers: hidden block indices with binary inputs (default: all but the first block).
        level: ``"neuron"`` (one row per layer, neuron, ber) or ``"layer"`` (mean over the
            layer's neurons: the expected fraction of flipped output bits).

    Returns:
        DataFrame ``layer, layer_index, neuron, fan_in, ber, flip_prob`` (``neuron`` absent
        for ``level="layer"``): the ``flip_probability`` table of :mod:`bnn_tol.schema`.
    """
    bers = [ber] if isinstance(ber, int | float) else list(ber)
    ps = []
    for b in bers:
        if not isinstance(b, int | float):
            raise InvalidArgument(f"flip_probability takes symmetric BERs p, got {b!r}; asymmetric "
                             "(p01, p10) rates need Monte-Carlo injection (bnn_tol.evaluate)")
        ps.append(rates(b)[0])
    if level not in ("neuron", "layer"):
        raise InvalidArgument(f"level must be 'neuron' or 'layer', got {level!r}")
    if layers is not None and 0 in set(layers):
        raise InvalidArgument("block 0 has real-valued inputs: a weight flip moves its "
                         "pre-activation by 2|x_i|, not 2, so the binomial law does not apply")
    n_blocks = len(compile_model(model).stages)  # refuses a residual graph by name
    want = list(layers) if layers is not None else list(range(1, n_blocks - 1))
    if not want:
        raise InvalidArgument(
            "the model has no hidden layer with binary inputs (needs >= 3 blocks)")
    stats_ = margin_pass(model, data, batch_size=batch_size, layers=want)
    frames = []
    for st in stats_:
        if not st.exact:
            raise InvalidArgument(
                f"{st.info.name}: fan-in {st.info.fan_in} too large for the exact "
                             "histogram; flip probability unavailable")
        for p in ps:
            fp = _layer_flip(st, p)
            frames.append(pd.DataFrame({"layer": st.info.name, "layer_index": st.info.index,
                                        "neuron": np.arange(len(fp)),
                                        "fan_in": st.info.fan_in, "ber": p, "flip_prob": fp}))
    out = pd.concat(frames, ignore_index=True)
    if level == "layer":
        out = (out.groupby(["layer_index", "layer", "fan_in", "ber"], sort=True)["flip_prob"]
               .mean().reset_index()[["layer", "layer_index", "fan_in", "ber", "flip_prob"]])
    return schema.validate(out, "flip_probability", what="the flip probability table")

