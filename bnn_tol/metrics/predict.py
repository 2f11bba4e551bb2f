"""Accuracy under weight bit errors predicted from the margins, without sweeping fault maps.

Model (symmetric weight BER ``p``, fully connected BNNs). For sample ``n`` with label ``y_n``
and clean correctness ``c_n = 1{argmax z_n = y_n}``:

1. **Neuron flips.** Hidden neuron ``j`` of block ``l`` flips its output bit with probability
   ``q_nj(p)`` when only block ``l``'s weights are corrupted:

   - binary inputs (``l >= 1``): exact, from the integer pre-activation ``a_nj``, the fan-in
     and the folded threshold (:func:`~bnn_tol.metrics.flipprob.flip_given_preact`: the
     binomial law of :mod:`.flipprob`);
   - first block (real inputs ``x_i = q_i / s`` on the input grid, ``s = 128``): a flip of
     ``w_ji`` moves ``a_nj`` by
     ``-2 w_ji x_ni``, so ``a'_nj`` has mean ``(1 - 2p) a_nj`` and variance
     ``4 p (1 - p) ||x_n||^2`` (the same for every neuron of the sample); ``q_nj`` is its
     normal approximation on the 1/128 grid (continuity-corrected, against the folded
     threshold ``fold_threshold(bn, scale=128)``).

2. **Effect of a flip.** Negating ``h_nj`` alone changes the correctness of sample ``n`` by
   ``e_nj = c_n - c_n(j)`` in {-1, 0, +1}, exactly, from the rank-1 negation
   (:func:`~bnn_tol.metrics.importance.negation_logits`).

3. **Output layer.** Its inputs are the clean ``h`` in {-1, +1}^K, so ``a'_c = K - 2 W_c``
   with ``W_c ~ Bin(A_c, p) + Bin(K - A_c, 1 - p)``, ``A_c = (K + a_c) / 2``, independent
   across classes (disjoint weight rows), and ``z'_c = g_c a'_c + b_c`` (eval BN, affine).
   ``P_out_n(p) = P(argmax z' = y_n) = sum_w P(W_y = w) prod_{c != y} P(z'_c < z'_y(w))``
   is computed exactly (up to ties, which have probability 0 for generic BN parameters;
   the value at ``p = 0`` is pinned to ``c_n``).

4. **Combination** (flips of different neurons and layers assumed independent, each flip
   acting with its single-flip effect): the number of harmful flips of sample ``n`` is
   Poisson with mean ``H_n = sum_{l,j} q_nj 1{e_nj = 1}``, of repairing flips
   ``G_n = sum q_nj 1{e_nj = -1}``, so

       P(correct_n) = P_out_n exp(-H_n)                     if c_n = 1
                    = 1 - (1 - P_out_n) exp(-G_n)            if c_n = 0

   and ``predicted_accuracy = mean_n P(correct_n)``. ``first_order_accuracy`` is the
   linearization ``acc_0 - mean_n [sum_{l,j} q_nj e_nj] + mean_n (P_out_n - c_n)``.

**Exact limit.** As ``p -> 0`` every ``q_nj = O(p)`` and two simultaneous flips are
``O(p^2)``, so for errors in binary-input layers and the output layer the slope
``d predicted_accuracy / dp`` at ``p = 0`` equals the true slope of the mean accuracy over
fault maps (single weight flips, each changing one neuron's bit, whose effect is ``e_nj``).
The first block's normal approximation is not exact in that limit (a single flip there
moves ``a`` by ``2 |x_i|``, up to 2). **Assumptions that fail at high BER:** flips that
are harmless alone can be harmful together (the accumulated shift of later
pre-activations), and a layer's inputs are corrupted by the earlier layers' flips; both
make the prediction optimistic when many neurons flip at once.

Cost: one clean forward pass, one rank-1 negation pass per corrupted hidden layer (what
``importance(estimator="accuracy")`` costs), then per BER one ``O(N sum_l J_l)`` gather
plus an ``O(N C K)`` output-layer law; the binomial tables cost ``O(K^2 log K)`` per BER and
fan-in. ``method="propagate"`` needs no negation pass but one table per group of equal
flip rates (2 % log grid), about 4x the time of ``"poisson"`` on fc 784-256-256-10.
Measured on that network (2000 Fashion-MNIST test images, 6 BERs, loaded 2-core machine):
``"poisson"`` 8-23 s, ``"propagate"`` 35-77 s; the sweep with 10 maps per BER 75-190 s.

Region of validity: see :func:`predict_accuracy` (measured error per BER against the exact
sweep, ``scripts/predict_validity.py``). An earlier measurement (6 networks: fc
784-256-256-10, 2 epochs on 10k Fashion-MNIST images, training BER 0 / 0.05 / 0.1 x 2 seeds;
sweep BER 0.01-0.2 x 10 maps on 2000 test images) found the same picture for ``"poisson"``
(MAE 0.004 / 0.008 / 0.026 / 0.10 / 0.38 at p = 0.01 / 0.02 / 0.05 / 0.1 / 0.2) and that
``"propagate"``, though biased low, ranks the (network, BER) pairs: over all 36 pairs rho
0.97, Pearson^2 0.93; across the 6 networks at p = 0.15 / 0.2 rho 0.94 / 0.89, where clean
accuracy has rho -0.83 / -0.89. With 6 networks these per-BER correlations are coarse.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from scipy import special
from torch import nn

from bnn_tol import schema
from bnn_tol.core.compiled import eval_mode
from bnn_tol.data import BNNDataset, grid_of
from bnn_tol.exceptions import InvalidArgument
from bnn_tol.faults.maps import rates, select_layers
from bnn_tol.metrics._common import check_data, compiled, device_of, run_block
from bnn_tol.metrics.flipprob import flip_given_preact, flip_tables
from bnn_tol.metrics.importance import _argmax1, negation_logits

__all__ = ["predict_accuracy", "unsupported"]

#: Elements per chunk of the output-layer law (float64: ~32 MiB).
_CHUNK = 2**22


def _bers(bers) -> list[float]:
    vals = [bers] if isinstance(bers, int | float) else list(bers)
    if not vals:
        raise InvalidArgument("bers is empty: give at least one BER, e.g. bers=[0.01, 0.05]")
    out = []
    for b in vals:
        if isinstance(b, bool) or not isinstance(b, int | float):
            raise InvalidArgument(f"predict_accuracy takes symmetric BERs p, got {b!r}; "
                                  "asymmetric (p01, p10) rates need evaluate.sweep")
        out.append(rates(b)[0])
    return out


def _first_layer_q(k: np.ndarray, s2: np.ndarray, t: np.ndarray, d: np.ndarray,
                   p: float) -> np.ndarray:
    """Normal approximation of the first block's flip probability ``(N, J)``.

    ``k = 128 a`` (integer), ``s2 = sum_i (128 x_i)^2`` ``(N, 1)``, ``t, d`` the folded
    comparator in units of 1/128. ``r' = d (k' - t)`` has mean ``d ((1 - 2p) k - t)`` and
    standard deviation ``2 sqrt(p (1 - p) s2)``; the bit flips iff ``r'`` changes side of
    ``-1/2``.
    """
    r = d * (k - t)
    mu = d * ((1.0 - 2.0 * p) * k - t)
    sd = 2.0 * np.sqrt(p * (1.0 - p) * s2)
    with np.errstate(divide="ignore", invalid="ignore"):
        below = special.ndtr((-0.5 - mu) / sd)  # P(r' < 0)
    below = np.where(sd > 0, below, (mu < 0).astype(np.float64))
    q = np.where(r >= 0, below, 1.0 - below)
    return np.where(d != 0, q, 0.0)


def _flip_q(a: np.ndarray, t: np.ndarray, d: np.ndarray, n: int, sw: np.ndarray) -> np.ndarray:
    """:func:`flip_given_preact` of ``(N, J)`` pre-activations, the same values: evaluated
    once per neuron and value ``A = (n + a) / 2`` in the observed range (a ``(R, J)`` table,
    ``R <= n + 1``, usually far fewer entries than ``N x J``) and gathered."""
    big = (n + a) // 2
    lo = int(big.min())
    vals = (2 * np.arange(lo, int(big.max()) + 1, dtype=np.int64) - n)[:, None]
    return np.take_along_axis(flip_given_preact(vals, t, d, n, sw), big - lo, axis=0)


def _output_correct(a: np.ndarray, y: np.ndarray, k: int, g: np.ndarray, b: np.ndarray,
                    p: float) -> np.ndarray:
    """``P(argmax z' = y_n)`` ``(N,)`` under output-layer weight flips (module doc, item 3).

    ``a``: ``(N, C)`` integer pre-activations of the output block, ``g, b``: ``(C,)`` affine
    form of its eval BN.
    """
    sw = flip_tables(k, p)  # (K + 1, K + 2): P(W >= w | A)
    n_s, n_c = a.shape
    big_a = ((k + a) // 2).astype(np.int64)
    flat = g == 0  # constant score b_c
    g_safe = np.where(flat, 1.0, g)
    up = (g_safe > 0)[None, :, None]
    out = np.empty(n_s)
    ay_all = big_a[np.arange(n_s), y]
    order = np.argsort(ay_all, kind="stable")  # chunks of similar A_y: narrow w windows
    step = max(1, min(256, _CHUNK // (n_c * (k + 2))))
    for s in range(0, n_s, step):
        idx = order[s : s + step]
        ba, yy = big_a[idx], y[idx]
        ay = ay_all[idx]
        pmf_y = sw[ay, :-1] - sw[ay, 1:]  # (B, K + 1)
        # w outside [lo, hi) carries < 1e-15 each (FFT noise level): at most K 1e-15 dropped
        keep = np.nonzero((pmf_y > 1e-15).any(0))[0]
        lo, hi = (int(keep[0]), int(keep[-1]) + 1) if len(keep) else (0, k + 1)
        pmf_y, w = pmf_y[:, lo:hi], np.arange(lo, hi)
        rows = sw[ba]  # (B, C, K + 2)
        v = g[yy][:, None] * (k - 2 * w)[None] + b[yy][:, None]  # z'_y(w): (B, W)
        # g_c > 0: z'_c < v iff W_c >= floor((K - u) / 2) + 1;  g_c < 0: iff W_c < ceil(.)
        half = (k - (v[:, None, :] - b[None, :, None]) / g_safe[None, :, None]) / 2.0
        col = np.where(up, np.floor(half) + 1, np.ceil(half))
        np.clip(col, 0, k + 1, out=col)
        val = np.take_along_axis(rows, col.astype(np.int64), axis=2)
        less = np.where(up, val, 1.0 - val)  # P(z'_c < z'_y(w)): (B, C, W)
        if flat.any():
            less[:, flat] = (b[None, flat, None] < v[:, None, :])
        less[np.arange(len(yy)), yy] = 1.0
        out[idx] = (pmf_y * less.prod(1)).sum(1)
    return np.clip(out, 0.0, 1.0)


def _bucketed(pi: np.ndarray, fn) -> np.ndarray:
    """Apply ``fn(rate, index)`` to groups of samples with (nearly) equal rate ``pi``.

    Rates are grouped on a log grid of relative step 2 % (``0`` kept exact) and each group
    is evaluated at its mean rate; ``fn`` returns the rows for ``index``. Returns the rows
    stacked in sample order.
    """
    key = np.where(pi > 0, np.rint(np.log(np.maximum(pi, 1e-300)) * 50), -1e9)
    out = None
    for kv in np.unique(key):
        idx = np.nonzero(key == kv)[0]
        rate = float(pi[idx].mean())  # exact where all rates agree (e.g. no upstream flips)
        val = fn(min(rate, 0.5), idx)
        if out is None:
            out = np.empty((len(pi), *val.shape[1:]))
        out[idx] = val
    return out


def unsupported(model: nn.Module) -> str | None:
    """Why :func:`predict_accuracy` cannot predict ``model`` (one line), or ``None`` if it can.

    Conv models are not supported: the flip law of pooled conv outputs is not modelled.
    """
    for st in compiled(model).stages:
        if st.conv or st.pool:
            return (f"{st.name} is a convolution: predict_accuracy supports fully connected "
                    "BNNs (the flip law of pooled conv outputs is not modelled); use "
                    "evaluate.sweep")
    return None


def predict_accuracy(
    model: nn.Module,
    data: BNNDataset,
    bers: float | Sequence[float],
    *,
    layers: Sequence[str | int] | str | None = None,
    per_layer: bool = False,
    method: str = "poisson",
    batch_size: int = 1000,
) -> pd.DataFrame:
    """Predicted mean accuracy under symmetric weight BER ``p``, from per-sample margins.

    See the module doc for the model, its assumptions and its exact ``p -> 0`` limit.

    **Region of validity** (``method="poisson"``, errors in all layers; the error is
    ``predicted_accuracy - acc_p``, ``acc_p`` the exact sweep's mean over fault maps on the same
    images; MAE and bias per BER over the networks, :func:`bnn_tol.analysis.prediction_fit`
    with ``by=("model", "ber")``):

    - **Use it for p <= 0.02 on trained fc BNNs**: on 8 Fashion-MNIST networks (fc
      784-256-256-10, 2 epochs on 60k images, clean accuracy 0.81-0.85, and fc 784-128-128-10,
      2 epochs on 8k images, 0.66-0.76; each normal and bit-flip-trained at 0.1, 2 seeds) every
      network is within 0.0084 of the sweep at p = 0.001, 0.002, 0.005, 0.01, 0.02 (MAE per BER
      <= 0.0047; sweep standard errors <= 0.0031). Stated bound: ``|error| <= 0.01`` for
      ``p <= 0.02``. The drop itself is small there (<= 0.03), so at ``p <= 0.005`` the error is
      as large as the drop: the relative size of small drops is not resolved (the first
      block's normal approximation, module doc item 1, is off when a neuron sees about one
      weight flip).
    - **It becomes optimistic above**: MAE 0.009 / 0.013 at p = 0.03 (256 / 128 networks; max
      0.021), 0.020 / 0.038 at 0.05 (max 0.057), 0.094 / 0.14 at 0.1 (max 0.20, the normally
      trained networks: +0.17 to +0.20), 0.40 / 0.36 at 0.2 and 0.59 / 0.38 at 0.3 (close to
      the clean accuracy where the sweep is near chance). **Do not use it above p = 0.03.**
      Why: each flip acts with its single-flip effect and the flips combine as independent
      Poisson events, but flipped hidden bits are not rare even at p = 0.001 (a one-off count
      on a normal fc 784-256-256-10, 2000 test images, 3 maps replayed with
      :func:`bnn_tol.errors.inject`: about 5 and 16 per sample in its two hidden layers, 40
      and 60 at p = 0.05); while their summed shift of the next layer's pre-activations is
      small against its margins the effects add up, beyond about p = 0.03 the accumulated
      shift flips neurons that no single flip does.
    - **Not on poorly trained networks**: an underfit fc 64-64-64-10 on digits (clean 0.36)
      is predicted 0.031 too high at p = 0.001 and 0.083 at 0.01, above its clean accuracy:
      the repair term of its many misclassified samples (module doc item 4) dominates. A
      prediction more than 0.01 above the clean accuracy is a sign of this (the flip-trained
      networks above gain up to 0.009 at small p, in the sweep as well).
    - ``method="propagate"`` is biased low at every BER measured (all 90 (network, BER) pairs
      above, by 0.002-0.19), and by how much depends on the network (MAE 0.003 at p = 0.001
      on the 256 networks, 0.021 on the 128 ones; 0.05 / 0.18 at 0.1): it is not an estimate
      of the accuracy, only a pessimistic one that ranks networks (module doc).
    - Refused (``InvalidArgument``, one line naming the reason): conv models (the flip law of
      pooled conv outputs is not modelled: use :func:`bnn_tol.evaluate.sweep`), fixed-point
      or ReLU models, asymmetric rates. Only persistent symmetric Bernoulli weight flips are
      modelled, not the sweep's other error models or activation/threshold targets.

    The tables: ``docs/results/predict_validity{,_fc128,_digits}/`` (``summary.md``,
    ``rows.csv``, ``fit.csv``, ``environment.json``), regenerated by
    ``python scripts/predict_validity.py --out docs/results/predict_validity`` (about 5 min on
    2 cores) and the two commands in that script's doc; ``tests/test_predict_validity.py``
    checks the stated bound on a network trained in the test.

    Args:
        model: a trained fully connected :class:`~bnn_tol.models.BNN` (e.g. ``fc``).
        data: samples to average over (the test set of the sweep to predict).
        bers: one symmetric BER ``p`` or a list of them.
        layers: layers with errors, as in :func:`bnn_tol.errors.inject` /
            :func:`bnn_tol.errors.select_layers` (``None``/``"all"``, ``"hidden"``, names or
            positions); the others stay error-free.
        per_layer: also return one row per corrupted layer: the predicted accuracy when only
            that layer has errors (``method="poisson"``).
        method: ``"poisson"`` (module doc, items 1-4; exact slope at ``p = 0``) or
            ``"propagate"`` (mean-field: the flips of block ``l`` act on block ``l + 1`` as
            input errors, so each of its terms ``w_i h_i`` flips with probability
            ``pi_n = p_l + qbar_n - 2 p_l qbar_n``, ``qbar_n`` the mean flip probability of
            block ``l`` on sample ``n``; the binomial law of block ``l + 1`` and the output
            law of item 3 are evaluated at ``pi_n`` (grouped on a 2 % log grid) and
            ``predicted_accuracy = mean_n P_out_n(pi_n)``. It captures the accumulation of
            many small shifts at high BER but assumes independent input flips, also across
            classes, and is not exact at ``p -> 0``).
        batch_size: samples per clean forward pass.

    Returns:
        One row per BER (and per layer with ``per_layer``): ``ber, layer, layer_index,
        predicted_accuracy, predicted_drop, first_order_accuracy, clean_accuracy,
        n_samples``. ``layer == "network"`` (``layer_index == -1``) is the prediction with
        every selected layer corrupted; ``predicted_drop = clean_accuracy -
        predicted_accuracy`` (the ``predictions`` table of :mod:`bnn_tol.schema`).

    Raises:
        InvalidArgument: asymmetric or out-of-range BERs, an empty BER list, unknown layers,
            conv models, data that do not fit the model, hidden layers without BatchNorm.
    """
    ps = _bers(bers)
    if method not in ("poisson", "propagate"):
        raise InvalidArgument(f"method must be 'poisson' or 'propagate', got {method!r}")
    if per_layer and method != "poisson":
        raise InvalidArgument("per_layer=True needs method='poisson' (the mean-field method "
                              "predicts the network as a whole)")
    why = unsupported(model)  # before the data check: refused whatever the data
    if why is not None:
        raise InvalidArgument(why)
    stages = compiled(model).stages
    check_data(model, data)
    blocks = [s.block for s in stages]
    chosen = select_layers(model, layers)
    chosen_ids = {id(m) for m in chosen.values()}
    sel = [k for k, b in enumerate(blocks) if id(b.layer) in chosen_ids]
    infos = {st.index: st for st in stages if st.hidden}
    n_blocks = len(blocks)
    hidden_sel = [k for k in sel if k < n_blocks - 1]
    out_sel = (n_blocks - 1) in sel
    first_fold = stages[0].folded  # on the input grid: k = scale a
    all_hidden = list(range(n_blocks - 1))

    # pass 1: per-sample pre-activations and single-flip effects
    pre: dict[int, list[np.ndarray]] = {k: [] for k in all_hidden}
    eff: dict[int, list[np.ndarray]] = {k: [] for k in hidden_sel}
    s2s, a_outs, ys, oks = [], [], [], []
    dev = device_of(model)
    with eval_mode(model), torch.no_grad():
        for x, y in data.batches(batch_size, device=dev, grid=grid_of(model)):
            xs, as_, hs = [], [], []
            h = x
            for st, b in zip(stages, blocks, strict=True):
                xs.append(h)
                a = run_block(b.preact, h, st.name)
                as_.append(a)
                h = b.post(a)
                hs.append(h)
            ok = hs[-1].argmax(1) == y
            for k in all_hidden:
                if k == 0:
                    pre[k].append(torch.round(as_[0].double() * stages[0].scale).cpu().numpy()
                                  .astype(np.int64))
                else:
                    pre[k].append(torch.round(as_[k].double()).cpu().numpy().astype(np.int64))
            for k in hidden_sel if method == "poisson" else []:
                e = torch.cat([(ok[:, None].to(torch.int8) - (_argmax1(zj) == y[:, None])
                                .to(torch.int8))
                               for _, zj in negation_logits(model, x, k, cache=(xs, as_, hs),
                                                            infos=infos)], dim=1)
                eff[k].append(e.cpu().numpy())
            s2s.append((xs[0].flatten(1).double() * stages[0].scale).pow(2).sum(1, keepdim=True)
                           .cpu().numpy())
            a_outs.append(torch.round(as_[-1].double()).cpu().numpy().astype(np.int64))
            ys.append(y.cpu().numpy())
            oks.append(ok.cpu().numpy())
    y_all = np.concatenate(ys)
    c_all = np.concatenate(oks).astype(np.float64)
    a_out = np.concatenate(a_outs)
    e_all = {k: np.concatenate(eff[k]) for k in hidden_sel if eff[k]}
    a_all = {k: np.concatenate(pre[k]) for k in all_hidden}
    s2 = np.concatenate(s2s)
    n = len(y_all)
    acc0 = float(c_all.mean())
    out_block = blocks[-1]
    bn = out_block.bn
    gamma = (bn.weight.detach().double().cpu().numpy() if bn.weight is not None
             else np.ones(bn.num_features))
    beta = (bn.bias.detach().double().cpu().numpy() if bn.bias is not None
            else np.zeros(bn.num_features))
    g = gamma / np.sqrt(bn.running_var.detach().double().cpu().numpy() + bn.eps)
    bo = beta - g * bn.running_mean.detach().double().cpu().numpy()
    k_out = int(out_block.layer.fan_in)
    base_all = _output_correct(a_out, y_all, k_out, g, bo, 0.0)
    base_out = base_all if out_sel else None

    rows = []
    for p in ps if method == "propagate" else []:
        pk = p if 0 in hidden_sel else 0.0
        qbar = _first_layer_q(a_all[0], s2, first_fold.t.numpy()[None].astype(np.float64),
                              first_fold.direction.numpy().astype(np.int64)[None],
                              pk).mean(1) if pk > 0 else np.zeros(n)
        for k in all_hidden[1:]:
            pk = p if k in hidden_sel else 0.0
            pi = pk + qbar - 2 * pk * qbar
            info = infos[k]
            fan = int(info.fan_in)
            t_k = info.folded.t.numpy()[None]
            d_k = info.folded.direction.numpy().astype(np.int64)[None]
            qbar = _bucketed(pi, lambda r, idx, k=k, fan=fan, t_k=t_k, d_k=d_k: (
                _flip_q(a_all[k][idx], t_k, d_k, fan, flip_tables(fan, r))
                if r > 0 else np.zeros((len(idx), t_k.shape[1]))).mean(1)[:, None])[:, 0]
        pk = p if out_sel else 0.0
        pi = pk + qbar - 2 * pk * qbar
        p_out = _bucketed(pi, lambda r, idx: (
            _output_correct(a_out[idx], y_all[idx], k_out, g, bo, r) - base_all[idx])[:, None])
        pred = np.clip(c_all + p_out[:, 0], 0.0, 1.0)
        rows.append(dict(ber=p, layer="network", layer_index=-1,
                         predicted_accuracy=float(pred.mean()), first_order_accuracy=math.nan))
    for p in ps if method == "poisson" else []:
        harm = np.zeros(n)
        fix = np.zeros(n)
        lin = np.zeros(n)
        per: list[tuple[str, int, np.ndarray]] = []
        for k in hidden_sel:
            info = infos[k]
            if p == 0:  # exact: the FFT tables carry ~1e-17 noise
                q = np.zeros(a_all[k].shape)
            elif k == 0:
                fold = first_fold
                q = _first_layer_q(a_all[k], s2, fold.t.numpy()[None].astype(np.float64),
                                   fold.direction.numpy().astype(np.int64)[None], p)
            else:
                fan = int(info.fan_in)
                q = _flip_q(a_all[k], info.folded.t.numpy()[None],
                            info.folded.direction.numpy().astype(np.int64)[None],
                            fan, flip_tables(fan, p))
            e = e_all[k]
            h_l = (q * (e == 1)).sum(1)
            g_l = (q * (e == -1)).sum(1)
            harm += h_l
            fix += g_l
            lin += (q * e).sum(1)
            per.append((info.name, k, np.where(c_all == 1, np.exp(-h_l), -np.expm1(-g_l))))
        if out_sel:
            p_out = np.clip(c_all + _output_correct(a_out, y_all, k_out, g, bo, p) - base_out,
                            0.0, 1.0)
            names_out = list(chosen)[-1]
            per.append((names_out, n_blocks - 1, p_out))
        else:
            p_out = c_all
        pred = np.where(c_all == 1, p_out * np.exp(-harm), 1.0 - (1.0 - p_out) * np.exp(-fix))
        first = acc0 - lin.mean() + float((p_out - c_all).mean())
        rows.append(dict(ber=p, layer="network", layer_index=-1,
                         predicted_accuracy=float(pred.mean()), first_order_accuracy=first))
        if per_layer:
            for name, k, pc in per:
                rows.append(dict(ber=p, layer=name, layer_index=k,
                                 predicted_accuracy=float(pc.mean()),
                                 first_order_accuracy=math.nan))
    df = pd.DataFrame(rows)
    df["predicted_drop"] = acc0 - df["predicted_accuracy"]
    df["clean_accuracy"] = acc0
    df["n_samples"] = n
    return schema.validate(df[schema.columns("predictions")], "predictions",
                           what="the predictions")
