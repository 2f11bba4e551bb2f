"""Neuron-level margin (NLM): how far each pre-activation sits from its batch-norm threshold.

For hidden neuron ``j`` of a binary layer (BN + sign after it) and input sample ``n``,

    m_nj = |a_nj - tau_j|,      tau_j = mu_j - beta_j sqrt(s2_j + eps) / gamma_j,

with ``a_nj`` the pre-activation (an integer for {-1, +1} inputs) and ``tau_j`` the real
threshold of :func:`bnn_tol.layers.bn_threshold` (``gamma < 0`` flips the comparison but not
the margin; ``gamma == 0`` makes the neuron *dead*: constant output, infinite margin).
One flipped weight changes ``a_nj`` by exactly 2, so the output bit survives any
``ceil(m_nj / 2) - 1`` flipped weights: ``m / 2`` is the number of *tolerable flips*.

Conv layers: a neuron is an output channel; its statistics pool all samples and all output
positions (before max-pooling). ``fan_in`` is always the full kernel fan-in ``C_in kh kw``
(zero-padded border positions have fewer nonzero inputs: :func:`margin_positions` lists the
effective fan-in per position).

First layer: inputs are real (``x = (p - 128) / 128``), so a flip of weight ``i`` changes
``a`` by ``2 |x_i|``. The margin is defined the same way; its tolerable-flips form divides by
the mean input magnitude of the neuron's receptive field,
``m_nj / (2 xbar_n)``, ``xbar_n = (1 / fan_in) sum_i |x_ni|`` -- the number of *random*
weight flips (each costing ``2 |x_i|`` on average) the margin absorbs.

Last layer: no BN threshold; :func:`score_margin` gives the class-score margin
``z_y - max_{c != y} z_c`` instead.

All statistics are accumulated over the dataset batch by batch (never all activations at
once). Hidden layers keep an exact per-neuron histogram of the integer ``a`` (size
``C x (2 fan_in + 1)``), from which mean, min and the 10 % quantile are exact. The first
layer's mean and min are exact too: its pre-activations lie on the grid ``a = k / 128``
(exact in float32 for ``fan_in < 2^17``), so with ``u = 128`` the integer ``k = u a`` and
``t = floor(u tau)`` (``a > tau  <=>  k > t``) give, per neuron, the exact integer sums
``S+ = sum_{k > t} k``, ``S- = sum_{k <= t} k`` and counts ``n+``, ``n-``, and

    sum_n m_nj = (S+ - S-) / u + tau (n- - n+),
    min_n m_nj = min(min_{k > t} k / u - tau, tau - max_{k <= t} k / u),

evaluated in float64 with ``tau`` in float64: the mean is correct to a few float64
roundings (``<= 4 eps (max|a| + |tau|)``), the minimum is the correctly rounded
``|a - tau|``. (A first layer with a bias is off the grid; it is accumulated in float64.)
Its quantile comes from a histogram on a grid of width
``w = q / 128`` (``q = ceil(2 * 128 * fan_in / max_bins)``, so ``w = 1/128`` -- exact -- for
small fan-in; 0.19 for fc's 784 inputs at the default ``max_bins``), error at most ``w / 2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnn_tol import schema
from bnn_tol.core import kernels
from bnn_tol.core.compiled import Stage, eval_mode
from bnn_tol.core.layers import bn_threshold
from bnn_tol.core.models import check_data as check_model_data
from bnn_tol.data import BNNDataset, grid_of
from bnn_tol.exceptions import InvalidArgument
from bnn_tol.metrics._common import (
    MAX_HIST,
    check_data,
    compiled,
    device_of,
    graph_units,
    hidden_layers,
    is_graph,
    per_image,
    run_block,
)

__all__ = ["margin", "margin_summary", "margin_positions", "score_margin", "MARGIN_COLUMNS"]

#: Per-neuron means that get a standard error (``<stat>_se``) in :func:`margin`.
_SE_STATS = list(schema.MARGIN_SE_STATS)

#: Columns of :func:`margin`, in order: the ``margin`` table of :mod:`bnn_tol.schema`.
MARGIN_COLUMNS = schema.columns("margin")



#: Per-image aggregate series (see :func:`margin`) that a layer's base values ``v_nj`` are
#: co-moment'ed with: the layer and network means of the ``mean``, ``_bn``, ``_norm`` and
#: ``_half`` forms. The layer means of ``_norm`` and (hidden) ``_half`` are fixed multiples of
#: ``u_mean`` and need no series of their own.
_Y0 = ("u_mean", "w_mean", "u_bn", "w_bn", "w_norm", "w_half")
#: Series of the first layer's ``_half`` values ``v_nj / (2 xbar_n)`` (their own base).
_Y1 = ("u_half", "w_half")


@dataclass
class _CoMoments:
    """Streaming means and centred co-moments of per-image values (float64).

    For rows ``x_n`` ``(C,)`` and ``y_n`` ``(Q,)`` (``n = 1..N``) keeps ``N``, the means and
    ``sxx = sum_n (x_n - xbar)^2`` ``(C,)``, ``sxy = sum_n (x_n - xbar)(y_n - ybar)^T``
    ``(C, Q)``; batches are merged with Chan et al.'s pairwise update (numerically stable,
    no sum-of-squares cancellation). ``sxx`` stays ``None`` when the caller derives it
    elsewhere (exact hidden layers: from the histogram, see :func:`_se_table`).
    """

    n: int = 0
    mx: Tensor | None = None
    my: Tensor | None = None
    sxx: Tensor | None = None
    sxy: Tensor | None = None

    def add(self, x: Tensor, y: Tensor, sxx: bool = True) -> None:
        """Add a batch: ``x`` ``(B, C)``, ``y`` ``(B, Q)``, float64.

        One matrix product ``[1 | y - ybar_b]^T x`` reads ``x`` once for its column sums and
        its co-moments with the batch-centred ``y`` (``sum_n (x_n - xbar_b)(y_n - ybar_b) =
        sum_n x_n (y_n - ybar_b)``); ``sxx``: also the batch-centred sum of squares of ``x``.
        """
        z, by = self.design(y)
        prod = z.T @ x
        bxx = torch.sub(x, prod[0] / x.shape[0]).square_().sum(0) if sxx else None
        self.merge(x.shape[0], by, prod, bxx)

    @staticmethod
    def design(y: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, ybar_b)``: ``z = [1 | y - ybar_b]`` ``(B, Q + 1)`` of a batch ``y`` ``(B, Q)``."""
        by = y.mean(0)
        return torch.cat([torch.ones_like(y[:, :1]), y - by], 1), by

    def merge(self, b: int, by: Tensor, prod: Tensor, bxx: Tensor | None) -> None:
        """Merge a batch of ``b`` rows given by its ``ybar_b``, ``prod = z^T x`` ``(Q + 1, C)``
        (row 0: the column sums) and centred ``sum (x - xbar_b)^2`` (or ``None``)."""
        bx, bxy = prod[0] / b, prod[1:].T
        if self.n == 0:
            self.n, self.mx, self.my, self.sxx, self.sxy = b, bx, by, bxx, bxy
            return
        n = self.n + b
        f = self.n * b / n
        ex, ey = bx - self.mx, by - self.my
        if bxx is not None:
            self.sxx = self.sxx + bxx + ex * ex * f
        self.sxy = self.sxy + bxy + ex[:, None] * ey[None, :] * f
        self.mx, self.my, self.n = self.mx + ex * (b / n), self.my + ey * (b / n), n


@dataclass
class LayerStats:
    """Accumulated statistics of one hidden layer (internal; see :func:`margin`).

    ``hist[k, c * E + e]`` counts pre-activations ``a = lo + (k0 + k) w`` of channel ``c`` at
    output positions of effective fan-in class ``e`` (``neff[e]`` nonzero inputs; ``E = 1``
    for linear layers); only the occupied bin range ``k0 .. k0 + len(hist) - 1`` is kept.
    """

    info: Stage
    lo: float
    w: float
    n_bins: int
    exact: bool
    neff: Tensor
    count: int = 0
    hist: Tensor | None = None
    k0: int = 0
    sum_m: Tensor | None = None
    min_m: Tensor | None = None
    grid: float = 0.0
    s_abs: Tensor | None = None
    n_plus: Tensor | None = None
    k_min_plus: Tensor | None = None
    k_max_minus: Tensor | None = None
    _thr: Tensor | None = field(default=None, repr=False)
    sum_half: Tensor | None = None
    pos_sum: Tensor | None = None
    pos_min: Tensor | None = None
    pos_neff: Tensor | None = None
    se: list[_CoMoments | None] | None = None
    _group: Tensor | None = field(default=None, repr=False)
    _tau: Tensor | None = field(default=None, repr=False)
    _tau_flat: Tensor | None = field(default=None, repr=False)
    _wagg: Tensor | None = field(default=None, repr=False)

    def hist3(self) -> Tensor:
        """Counts as ``(C, E, n_bins)`` int64 on CPU (bins outside the kept range are 0)."""
        c, e = self.info.tau.numel(), self.neff.numel()
        out = torch.zeros(self.n_bins, c * e, dtype=torch.int64)
        out[self.k0 : self.k0 + self.hist.shape[0]] = self.hist.cpu()
        return out.view(self.n_bins, c, e).permute(1, 2, 0)


def _neff_map(layer: nn.Conv2d, hw: tuple[int, int], device) -> Tensor:
    """Nonzero inputs per output position of a zero-padded conv: ``(H', W')`` int64."""
    ones = torch.ones(1, 1, *hw, device=device)
    k = torch.ones(1, 1, *layer.kernel_size, device=device)
    taps = F.conv2d(ones, k, stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
    return (taps[0, 0].round().to(torch.int64) * layer.in_channels)


def _init_stats(info: Stage, a: Tensor, x: Tensor, max_bins: int,
                per_position: bool) -> LayerStats:
    dev = a.device
    c = a.shape[1]
    if info.conv:
        neff_pos = _neff_map(info.block.layer, tuple(x.shape[-2:]), dev)
        classes, e_map = torch.unique(neff_pos, sorted=True, return_inverse=True)
    else:
        neff_pos = None
        classes = torch.tensor([info.fan_in], device=dev)
        e_map = None
    n_e = classes.numel()
    if info.kind == "hidden":
        lo, w, b = -float(info.fan_in), 1.0, 2 * info.fan_in + 1
        if c * n_e * b > MAX_HIST:
            q = math.ceil(c * n_e * b / MAX_HIST)
            w, b = float(q), math.ceil(b / q) + 1
    else:
        bias = info.block.layer.bias
        r = info.fan_in * 1.0 + (float(bias.detach().abs().max()) if bias is not None else 0.0)
        quantum = 1.0 / info.scale  # the input grid: a = k / scale
        q = max(1, math.ceil(2 * r / quantum / max_bins))
        w = q * quantum
        lo = -math.ceil(r / w) * w
        b = int(round(-2 * lo / w)) + 1
    exact = info.kind == "hidden" and w == 1.0
    chan = torch.arange(c, device=dev, dtype=torch.float32)
    group = chan[:, None, None] * n_e + e_map[None].float() if e_map is not None else chan
    tau = info.tau.to(dev, torch.float64)
    tau = torch.where(info.direction.to(dev) == 0, torch.zeros_like(tau), tau)
    st = LayerStats(info, lo, w, b, exact, classes.cpu())
    st._group = group
    st._tau = tau.view(-1, *([1] * (a.dim() - 2)))
    st._tau_flat = tau
    if not exact:
        st.sum_m = torch.zeros(c, dtype=torch.float64, device=dev)
        st.min_m = torch.full((c,), math.inf, dtype=torch.float64, device=dev)
        st.sum_half = torch.zeros(c, dtype=torch.float64, device=dev)
        unit = float(info.scale)  # integer units k = scale * a (1 after the first layer)
        if info.block.layer.bias is None and unit * info.fan_in < 2**24:
            # integer units k = unit * a (exact in float32); t = floor(unit tau), clamped to
            # the reachable range so that it stays exact in float32 (dead neurons: t = -inf)
            kmax = unit * info.fan_in
            t64 = torch.floor(info.tau.double() * unit).clamp(-kmax - 1, kmax)
            t64 = torch.where(info.direction == 0, torch.full_like(t64, -kmax - 1), t64)
            st.grid = unit
            st._thr = t64.to(dev, torch.float32).view(-1, *([1] * (a.dim() - 2)))
            st.s_abs = torch.zeros(c, dtype=torch.float64, device=dev)
            st.n_plus = torch.zeros(c, dtype=torch.int64, device=dev)
            if info.conv:  # linear layers take the minimum from the float64 margins
                st.k_min_plus = torch.full((c,), math.inf, dtype=torch.float32, device=dev)
                st.k_max_minus = torch.full((c,), -math.inf, dtype=torch.float32, device=dev)
    if per_position and info.conv:
        st.pos_sum = torch.zeros(a.shape[1:], dtype=torch.float64, device=dev)
        st.pos_min = torch.full(a.shape[1:], math.inf, dtype=torch.float64, device=dev)
        st.pos_neff = neff_pos.cpu()
    return st


def _add_hist(st: LayerStats, a: Tensor, scale: float, shift: float) -> None:
    """Add the bins ``k = a * scale + shift`` (integer-valued) of one batch to ``st.hist``.

    ``a`` (shape ``(N, C[, H, W])``) is consumed. Only the occupied range of ``k`` is counted
    (``torch.bincount`` over ``(k_hi - k_lo + 1) * G`` cells, ``G`` = channel-class groups).
    """
    g = st.neff.numel() * st.info.tau.numel()
    if scale != 1.0:
        a = a.mul_(scale).add_(shift).round_()
        shift = 0.0
    lo_hi = torch.stack(torch.aminmax(a)).double() + shift
    k_lo, k_hi = int(lo_hi[0]), int(lo_hi[1])
    _check_bins(st, k_lo, k_hi)
    # idx = (k - k_lo) * G + group = a * G + (shift - k_lo) G + group
    idx = a.mul_(g).add_(st._group + (shift - k_lo) * g)
    idx = idx.to(torch.int32 if (k_hi - k_lo + 1) * g < 2**31 else torch.int64)
    part = torch.bincount(idx.reshape(-1), minlength=(k_hi - k_lo + 1) * g).view(-1, g)
    if st.hist is None:
        st.hist, st.k0 = part, k_lo
        return
    _grow(st, k_lo, k_hi)
    st.hist[k_lo - st.k0 : k_hi - st.k0 + 1] += part


def _check_bins(st: LayerStats, k_lo: int, k_hi: int) -> None:
    if k_lo < 0 or k_hi >= st.n_bins:
        raise InvalidArgument(f"{st.info.name}: pre-activation outside [{st.lo}, "
                              f"{st.lo + st.w * (st.n_bins - 1)}]; are the inputs in [-1, 1]?")


def _grow(st: LayerStats, k_lo: int, k_hi: int) -> None:
    """Extend the kept bin range of ``st.hist`` (zeros) to cover ``k_lo .. k_hi``."""
    g = st.neff.numel() * st.info.tau.numel()
    if st.hist is None:
        st.hist = torch.zeros(k_hi - k_lo + 1, g, dtype=torch.int64, device=st._tau_flat.device)
        st.k0 = k_lo
        return
    new_lo, new_hi = min(st.k0, k_lo), max(st.k0 + st.hist.shape[0] - 1, k_hi)
    if (new_lo, new_hi) != (st.k0, st.k0 + st.hist.shape[0] - 1):
        grown = torch.zeros(new_hi - new_lo + 1, g, dtype=torch.int64, device=st.hist.device)
        grown[st.k0 - new_lo : st.k0 - new_lo + st.hist.shape[0]] = st.hist
        st.hist, st.k0 = grown, new_lo


def _update_grid(st: LayerStats, a: Tensor, dims: list[int]) -> None:
    """Exact integer-unit sums of one batch (see the module doc).

    With ``k = u a`` and the integer ``d = k - t`` (both exact in float32): ``sum |d|`` and
    ``n+ = #{d > 0}`` (``d > 0  <=>  k > t``), from which :func:`_grid_totals` gets
    ``S+ - S- = sum |d| + t (2 n+ - N)`` exactly. Conv layers also keep the extreme ``k`` on
    either side of ``t`` for the minimum (linear layers take it from the float64 margins).
    """
    d = torch.mul(a, st.grid).sub_(st._thr)
    plus = d > 0
    st.n_plus += plus.sum(dims)
    if st.k_min_plus is not None:
        k = a * st.grid
        st.k_min_plus = torch.minimum(st.k_min_plus, torch.where(plus, k, math.inf).amin(dims))
        st.k_max_minus = torch.maximum(st.k_max_minus,
                                       torch.where(plus, -math.inf, k).amax(dims))
    st.s_abs += d.abs_().sum(dims, dtype=torch.float64)


def _grid_totals(st: LayerStats) -> tuple[Tensor, Tensor]:
    """``(sum_n m_nj, min_n m_nj)`` ``(C,)`` float64 on CPU from the integer-unit sums."""
    u, tau = st.grid, st.info.tau.double()
    n_plus = st.n_plus.cpu().double()
    t = st._thr.reshape(-1).cpu().double()
    s_pm = st.s_abs.cpu() + t * (2 * n_plus - st.count)  # S+ - S-: integers, exact
    n_minus = st.count - n_plus
    total = s_pm / u + tau * (n_minus - n_plus)
    if st.k_min_plus is None:  # linear: min of the float64 margins (correctly rounded)
        return total, st.min_m.cpu()
    mn = torch.minimum(st.k_min_plus.cpu().double() / u - tau,
                       tau - st.k_max_minus.cpu().double() / u)
    return total, mn


def _update(st: LayerStats, a: Tensor, x: Tensor) -> tuple | None:
    """Add one batch: ``a`` ``(N, C[, H, W])`` pre-activation, ``x`` the layer input.

    Consumes ``a`` (modified in place). With ``st.se`` set, returns the per-image values
    behind the standard errors (:func:`_per_image`).

    Linear layers compute the float64 margins ``|a - tau|`` ``(N, C)`` at most once per batch
    and share them between the first layer's minimum and ``_half`` sum and the per-image
    values (hidden layers with an exact histogram need them only for the standard errors).
    """
    if _fast(st, a):
        return _update_fast(st, a, x)
    info = st.info
    dims = [0, *range(2, a.dim())]
    st.count += a[:, 0].numel()
    linear = not info.conv
    m64 = r = None
    if linear and (st.se is not None or not st.exact):
        m64 = torch.sub(a, st._tau_flat).abs_()  # float64 (type promotion): |a - tau|
    if linear and info.kind == "first":
        xbar = x.flatten(1).abs().sum(1, dtype=torch.float64) / info.fan_in
        r = 0.5 / xbar.clamp_min(1e-30)
    per_image = _per_image(st, a, x, m64, r) if st.se is not None else None
    if st.grid:
        _update_grid(st, a, dims)
        if linear:
            st.min_m = torch.minimum(st.min_m, m64.amin(0))
    elif not st.exact:  # off the grid (a biased layer): float64 accumulation
        m = m64 if m64 is not None else (a.double() - st._tau).abs_()
        st.sum_m += m.sum(dims)
        st.min_m = torch.minimum(st.min_m, m.amin(dims))
        del m
    if st.pos_sum is not None:  # per-position table: float64 (a exact, tau float64)
        m = (a.double() - st._tau).abs_()
        st.pos_sum += m.sum(0)
        st.pos_min = torch.minimum(st.pos_min, m.amin(0))
        del m
    if info.kind == "first" and linear:
        # sum_n m_nj / (2 xbar_n) in float64
        st.sum_half += r @ m64
    elif info.kind == "first":  # conv: float32 (positions x channels), summed in float64
        m = (a - st._tau.float()).abs_()
        layer = info.block.layer
        k = torch.ones(1, x.shape[1], *layer.kernel_size, device=x.device)
        xbar = F.conv2d(x.abs(), k, stride=layer.stride, padding=layer.padding,
                        dilation=layer.dilation)[:, 0] / info.fan_in
        rp = 0.5 / xbar.clamp_min(1e-30)
        st.sum_half += torch.einsum("nchw,nhw->nc", m, rp).sum(0, dtype=torch.float64)
        del m
    del m64
    _add_hist(st, a, 1.0 / st.w, -st.lo / st.w)
    return per_image


class _FastBatch(NamedTuple):
    """A linear layer's batch on the numba path: its pre-activations ``a`` ``(B, C)``
    float32 and, for the first layer, ``r_n = 1 / (2 xbar_n)`` ``(B,)`` float64; the
    per-image values are computed from them in the kernels (never stored as ``(B, C)``
    float64)."""

    a: Tensor
    r: Tensor | None

    def layer_means(self, st: LayerStats) -> Tensor:
        """``v @ wagg`` ``(B, 2)`` (``v_nj = m_nj``; see :func:`_add_se`)."""

        out = torch.empty(self.a.shape[0], 2, dtype=torch.float64)
        kernels.margin_rows(self.a.numpy(), st._tau_flat.numpy(), st._wagg.numpy(), out.numpy())
        return out

    def add_to(self, co: _CoMoments, st: LayerStats, y: Tensor, half: bool, sxx: bool) -> None:
        """:meth:`_CoMoments.add` of ``x = m`` (``half``: ``m r``) with ``y``."""

        z, by = co.design(y)
        c = self.a.shape[1]
        prod = torch.empty(z.shape[1], c, dtype=torch.float64)
        bxx = torch.empty(c, dtype=torch.float64) if sxx else None
        r = self.r.numpy() if half else np.empty(0)
        kernels.margin_comoments(self.a.numpy(), st._tau_flat.numpy(), z.contiguous().numpy(),
                                 r, half, sxx, prod.numpy(),
                                 bxx.numpy() if sxx else np.empty(0))
        co.merge(self.a.shape[0], by, prod, bxx)


def _fast(st: LayerStats, a: Tensor) -> bool:
    """Whether the numba kernels take this batch: a linear layer on CPU in float32 with an
    exact histogram (hidden) or the exact integer grid (first layer), numba installed."""
    info = st.info
    if (info.conv or a.device.type != "cpu" or a.dtype != torch.float32
            or not (st.exact or (st.grid and info.kind == "first"))):
        return False

    return kernels.AVAILABLE


def _update_fast(st: LayerStats, a: Tensor, x: Tensor) -> _FastBatch | None:
    """:func:`_update` of a linear layer in two numba passes (:func:`_fast`): the same
    histogram and integer sums, and float64 sums up to their summation order."""

    info = st.info
    a = a.contiguous()
    st.count += a.shape[0]
    r = None
    if info.kind == "first":
        xbar = x.flatten(1).abs().sum(1, dtype=torch.float64) / info.fan_in
        r = 0.5 / xbar.clamp_min(1e-30)
    # bins k = rint(a scale + shift) in float32, as _add_hist; monotone in a, so the
    # occupied range is that of the extremes
    scale, shift = np.float32(1.0 / st.w), np.float32(-st.lo / st.w)
    lo, hi = (np.float32(v) for v in torch.aminmax(a))
    k_lo, k_hi = int(np.rint(lo * scale + shift)), int(np.rint(hi * scale + shift))
    _check_bins(st, k_lo, k_hi)
    _grow(st, k_lo, k_hi)
    f64, empty = np.empty(0), np.empty(0, np.float32)
    grid = np.float32(st.grid if info.kind == "first" else 0.0)
    extra = ((st._thr.numpy(), st._tau_flat.numpy(), r.numpy(), st.n_plus.numpy(),
              st.s_abs.numpy(), st.min_m.numpy(), st.sum_half.numpy()) if grid else
             (empty, st._tau_flat.numpy(), f64, np.empty(0, np.int64), f64, f64, f64))
    kernels.margin_cols(a.numpy(), scale, shift, st.k0, st.hist.numpy(), grid, *extra)
    return _FastBatch(a, r) if st.se is not None else None


def _per_image(st: LayerStats, a: Tensor, x: Tensor, m64: Tensor | None,
               r: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Per-image base values of the margin statistics (see :func:`margin`), float64.

    Returns ``(v, half, r)``: ``v_nj = (1/P) sum_p |a_npj - tau_j|`` ``(N, C)`` over the
    ``P`` output positions (``P = 1`` for linear layers: ``v = m64``); for the first layer
    ``half_nj`` = the position mean of ``|a_npj - tau_j| / (2 xbar_np)`` (linear:
    ``v_nj r_n``, ``r_n = 1 / (2 xbar_n)``, also returned), else ``None`` (``half = v / 2``).
    The ``_norm`` and ``_bn`` forms are the fixed multiples ``v / fan_in`` and ``v * scale``.
    """
    info = st.info
    if not info.conv:
        return m64, (m64 * r[:, None] if r is not None else None), r
    m = (a - st._tau.float()).abs_()
    v = m.mean((2, 3), dtype=torch.float64)
    half = None
    if info.kind == "first":
        layer = info.block.layer
        k = torch.ones(1, x.shape[1], *layer.kernel_size, device=x.device)
        xbar = F.conv2d(x.abs(), k, stride=layer.stride, padding=layer.padding,
                        dilation=layer.dilation)[:, 0] / info.fan_in
        half = torch.einsum("nchw,nhw->nc", m, 0.5 / xbar.clamp_min(1e-30)).double()
        half /= m.shape[2] * m.shape[3]
    return v, half, None


def _init_se(st: LayerStats, dev) -> None:
    """Co-moment accumulators of one layer and its aggregation weights ``(C, 2)``:
    ``live / L`` and ``live * scale / L`` (``L`` live neurons; none: no aggregate)."""
    st.se = [_CoMoments(), _CoMoments() if st.info.kind == "first" else None]
    live = (st.info.direction != 0).double()
    if live.sum() > 0:
        wl = live / live.sum()
        st._wagg = torch.stack([wl, wl * st.info.bn_scale], 1).to(dev)


def _add_se(stats: dict[int, LayerStats], values: dict[int, tuple]) -> None:
    """Feed one batch of per-image values to the co-moments of every measured layer.

    Layer aggregate ``u_nl = mean_{live j in l} v_nj`` (one matrix product per layer for the
    ``mean`` and ``_bn`` forms; ``_norm`` = ``mean / fan_in``; hidden ``_half`` = ``mean / 2``,
    first-layer ``_half`` = ``r_n mean`` or the mean of its own values); network aggregate
    ``w_n = mean_l u_nl`` over the layers with a live neuron (as :func:`margin_summary`).
    Every layer's base values then meet all series in one product (:meth:`_CoMoments.add`).
    """
    u: dict[int, Tensor] = {}  # (B, 4): mean, bn, norm, half
    for k, val in values.items():
        st = stats[k]
        if st._wagg is None:
            continue
        if isinstance(val, _FastBatch):
            g = val.layer_means(st)
            um = g[:, 0]
            uh = um / 2 if val.r is None else um * val.r
        else:
            v, half, r = val
            g = v @ st._wagg
            um = g[:, 0]
            if half is None:
                uh = um / 2
            elif r is not None:
                uh = um * r
            else:
                uh = half @ st._wagg[:, 0]
        u[k] = torch.stack([um, g[:, 1], um / st.info.fan_in, uh], 1)
    any_v = next(iter(values.values()))[0]
    zeros = torch.zeros(any_v.shape[0], 4, dtype=torch.float64, device=any_v.device)
    w = torch.stack(list(u.values()), 0).mean(0) if u else zeros
    for k, val in values.items():
        st = stats[k]
        uk = u.get(k, zeros)
        y0 = torch.stack([uk[:, 0], w[:, 0], uk[:, 1], w[:, 1], w[:, 2], w[:, 3]], 1)
        y1 = torch.stack([uk[:, 3], w[:, 3]], 1)
        if isinstance(val, _FastBatch):
            val.add_to(st.se[0], st, y0, half=False, sxx=not st.exact)
            if val.r is not None:
                val.add_to(st.se[1], st, y1, half=True, sxx=True)
            continue
        v, half, _ = val
        st.se[0].add(v, y0, sxx=st.info.conv or not st.exact)
        if half is not None:
            st.se[1].add(half, y1)


def _se_table(st: LayerStats, hist: Tensor | None, marg: Tensor | None,
              mean: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """Per stat of :data:`_SE_STATS`: ``(se^2 (C,), cov (C, 2))`` on CPU, float64.

    ``se^2 = sxx / (N (N - 1))``, ``cov = (sxy with the layer, with the network aggregate) /
    (N (N - 1))`` (nan for ``N < 2``), the ``_norm`` / ``_bn`` / hidden ``_half`` forms scaled
    from the base co-moments. Exact linear hidden layers take ``sxx`` from the histogram
    (``v = m`` per image: ``sum_bins count (m_bin - mean)^2``, exact data).
    """
    info = st.info
    c0, c1 = st.se
    d = c0.n * (c0.n - 1)
    d = d if d > 0 else math.nan
    if c0.sxx is None:  # exact linear hidden layer: v = m per image, from the histogram
        sxx0 = (hist * (marg - mean[:, None]).square_()).sum(1)
    else:
        sxx0 = c0.sxx.cpu()
    col = dict(zip(_Y0, c0.sxy.cpu().unbind(1), strict=True))
    fan, sc = float(info.fan_in), info.bn_scale.double()
    out = {
        "mean_margin": (sxx0, col["u_mean"], col["w_mean"]),
        "mean_margin_norm": (sxx0 / fan**2, col["u_mean"] / fan**2, col["w_norm"] / fan),
        "mean_margin_bn": (sxx0 * sc * sc, col["u_bn"] * sc, col["w_bn"] * sc),
    }
    if c1 is None:
        out["mean_margin_half"] = (sxx0 / 4, col["u_mean"] / 4, col["w_half"] / 2)
    else:
        sxy1 = c1.sxy.cpu()
        out["mean_margin_half"] = (c1.sxx.cpu(), sxy1[:, 0], sxy1[:, 1])
    return {s: (xx / d, torch.stack([yl, yw], 1) / d) for s, (xx, yl, yw) in out.items()}


@torch.no_grad()
def margin_pass(model: nn.Module, data: BNNDataset, *, batch_size: int = 1000,
                max_bins: int = 8192, per_position: bool = False,
                layers: list[int] | None = None, se: bool = False) -> list[LayerStats]:
    """One forward pass over ``data`` accumulating :class:`LayerStats` per hidden layer.

    ``se``: also accumulate the per-image co-moments behind the standard errors of
    :func:`margin` (``LayerStats.se``).

    ``layers``: block indices to measure (default: all hidden blocks).
    """
    check_data(model, data)
    infos = hidden_layers(model)
    if layers is not None:
        infos = [i for i in infos if i.index in set(layers)]
    if not infos:
        raise InvalidArgument("the model has no hidden binary layer (only the output block); "
                         "margins are defined for layers followed by BN + sign")
    wanted = {i.index: i for i in infos}
    last = max(wanted)
    stages = compiled(model).stages
    blocks = [s.block for s in stages]
    stats: dict[int, LayerStats] = {}
    dev = device_of(model)
    packed: dict[int, np.ndarray | None] = {}
    with eval_mode(model):
        for x, _ in data.batches(batch_size, device=dev, grid=grid_of(model)):
            values = {}
            for k, block in enumerate(blocks[: last + 1]):
                a = _preact(stages[k], x, packed)
                if k in wanted:
                    h = block.post(a) if k < last else None
                    if k not in stats:
                        stats[k] = _init_stats(wanted[k], a, x, max_bins, per_position)
                        if se:
                            _init_se(stats[k], dev)
                    values[k] = _update(stats[k], a, x)
                    x = h
                else:
                    x = block.post(a)
            if se:
                _add_se(stats, values)
    return [stats[k] for k in sorted(stats)]


def _preact(stage: Stage, x: Tensor, packed: dict) -> Tensor:
    """The block's pre-activation ``a = layer(x)``, for a hidden linear sign layer reading
    +-1 inputs on CPU by the packed engine's XNOR/popcount kernel (``a = n - 2 popcount(x XOR
    w)``, the exact integers the float product gives, at the popcount roofline); otherwise the
    layer's own forward. ``packed`` caches each layer's packed weight rows for the pass."""
    layer = stage.layer
    fast = (kernels.AVAILABLE and stage.index > 0 and not stage.conv and stage.sign_codec
            and layer.bias is None and x.device.type == "cpu" and x.dtype == torch.float32)
    if not fast:
        return run_block(stage.block.preact, x, stage.name)
    if stage.index not in packed:
        packed[stage.index] = kernels.pack_rows(layer.binary_weight().detach().cpu().numpy())
    h = x.flatten(1) if stage.flatten else x
    if h.shape[1] != layer.in_features:
        return run_block(stage.block.preact, x, stage.name)  # the layer names the mismatch
    out = np.empty((h.shape[0], layer.out_features), dtype=np.int64)
    kernels.fc_output(kernels.pack_rows(h.numpy()), packed[stage.index], layer.in_features, out)
    return torch.from_numpy(out).to(torch.float32)


def _hist_margins(st: LayerStats) -> tuple[Tensor, Tensor]:
    """``(counts (C, K), margin of each bin (C, K))`` on CPU over the occupied bins."""
    c = st.info.tau.numel()
    hist = st.hist.cpu().view(st.hist.shape[0], c, st.neff.numel()).sum(2).T.contiguous()
    centers = st.lo + st.w * torch.arange(st.k0, st.k0 + hist.shape[1], dtype=torch.float64)
    tau = torch.where(st.info.direction == 0, torch.zeros_like(st.info.tau), st.info.tau)
    return hist, (centers[None, :] - tau[:, None]).abs()


def _select(st: LayerStats, need: list[Tensor]) -> list[Tensor]:
    """The ``need_j``-th smallest margin of each neuron ``j`` from its histogram ``(C,)``
    float64 (the margin of that sample's bin), for each ``need`` ``(C,)`` int64.

    The bins of one neuron sorted by margin ``|c_k - tau|`` are its bins left of ``tau``
    (``c_k <= tau``, nearest first) and right of it, alternating -- the side nearer to ``tau``
    first (``2 tau < c_f + c_{f+1}``, exact on the dyadic grid) -- until one side runs out.
    So after ``t`` bins the taken ones form a window ``[f + 1 - nl, f + nr]`` whose count
    comes from the cumulative histogram, and a binary search over ``t`` finds the first
    window with ``need`` samples in ``O(C log K)`` -- the same bin (up to margin ties, which
    have the same value) as sorting the margins of all ``C x K`` bins.
    """
    c = st.info.tau.numel()
    h = st.hist.cpu()
    if st.neff.numel() > 1:
        h = h.view(h.shape[0], c, -1).sum(2)
    k = h.shape[0]
    cum = torch.cat([torch.zeros(1, c, dtype=h.dtype), h.cumsum(0)])  # (K + 1, C)
    centers = st.lo + st.w * torch.arange(st.k0, st.k0 + k, dtype=torch.float64)
    tau = torch.where(st.info.direction == 0, torch.zeros_like(st.info.tau), st.info.tau)
    f = torch.searchsorted(centers, tau, right=True) - 1  # last bin with c <= tau, -1 .. K-1
    n_left, n_right = f + 1, k - 1 - f
    c_f = centers[f.clamp(0, k - 1)]
    c_f1 = centers[(f + 1).clamp(0, k - 1)]
    left_first = (n_right == 0) | ((n_left > 0) & (2 * tau < c_f + c_f1))
    avail1 = torch.where(left_first, n_left, n_right)
    avail2 = torch.where(left_first, n_right, n_left)
    col = torch.arange(c)

    def window(t: Tensor) -> tuple[Tensor, Tensor]:
        first = torch.minimum(avail1, torch.maximum((t + 1) // 2, t - avail2))
        second = t - first
        return (torch.where(left_first, first, second),
                torch.where(left_first, second, first))

    def count(t: Tensor) -> Tensor:
        nl, nr = window(t)
        return cum[f + 1 + nr, col] - cum[f + 1 - nl, col]

    out = []
    for nd in need:
        lo = torch.ones(c, dtype=torch.int64)
        hi = torch.full((c,), k, dtype=torch.int64)
        while bool((lo < hi).any()):
            mid = (lo + hi) // 2
            ok = count(mid) >= nd
            hi = torch.where(ok, mid, hi)
            lo = torch.where(ok, lo, torch.minimum(mid + 1, hi))
        nl, nr = window(lo)
        nl_prev, _ = window(lo - 1)
        b = torch.where(nl > nl_prev, f + 1 - nl, f + nr)
        out.append((centers[b] - tau).abs())
    return out


def _neuron_table(st: LayerStats, quantile: float) -> pd.DataFrame:
    info = st.info
    c = info.tau.numel()
    n = torch.full((c,), float(st.count), dtype=torch.float64)
    need_q = torch.ceil(n * quantile - 1e-9).clamp_min(1).long()
    hist = marg = None
    if st.exact:
        hist, marg = _hist_margins(st)
        mean = (hist.double() * marg).sum(1) / n
        mn, q10 = _select(st, [torch.ones(c, dtype=torch.int64), need_q])
        half = mean / 2
    else:
        total, mn = _grid_totals(st) if st.grid else (st.sum_m.cpu(), st.min_m.cpu())
        mean = total / n
        half = st.sum_half.cpu() / n if info.kind == "first" else mean / 2
        (q10,) = _select(st, [need_q])
    dead = info.direction == 0
    inf = torch.full_like(mean, math.inf)
    mean, mn, q10, half = (torch.where(dead, inf, t) for t in (mean, mn, q10, half))
    extra = {}
    nan = torch.full_like(mean, math.nan)
    se = _se_table(st, hist, marg, mean) if st.se is not None else None
    for s in _SE_STATS:
        se2 = nan if se is None else se[s][0]
        extra[f"{s}_se"] = torch.where(dead, nan, se2.sqrt()).numpy()
    for j, col in enumerate(("cov_layer", "cov_network")):
        for s in _SE_STATS:
            cov = se[s][1][:, j] if se is not None else nan
            extra[f"{col}_{s}"] = torch.where(dead, torch.zeros_like(cov), cov).numpy()
    return pd.DataFrame({
        "layer": info.name, "layer_index": info.index, "kind": info.kind,
        "neuron": range(c), "fan_in": info.fan_in, "tau": info.tau.numpy(),
        "direction": info.direction.numpy().astype("int8"), "dead": dead.numpy(),
        "n": n.numpy().astype("int64"), "mean_margin": mean.numpy(), "min_margin": mn.numpy(),
        "q10_margin": q10.numpy(), "mean_margin_half": half.numpy(),
        "mean_margin_norm": (mean / info.fan_in).numpy(),
        "mean_margin_bn": torch.where(dead, inf, mean * info.bn_scale).numpy(),
        **extra,
    })


def margin(model: nn.Module, data: BNNDataset, *, batch_size: int = 1000, max_bins: int = 8192,
           quantile: float = 0.1, layers: list[int] | None = None) -> pd.DataFrame:
    """Neuron-level margin of every hidden neuron: one row per (layer, neuron).

    For pre-activation ``a_nj`` (sample ``n``; conv: sample and output position) and real
    threshold ``tau_j``::

        m_nj = |a_nj - tau_j|
        mean_margin = mean_n m_nj         min_margin = min_n m_nj
        q10_margin  = inverted-CDF 10 % quantile of m_nj over n (``quantile``)
        mean_margin_half = mean_n m_nj / 2            (hidden: tolerable weight flips)
                         = mean_n m_nj / (2 xbar_n)   (first layer, see module doc)
        mean_margin_norm = mean_margin / fan_in
        mean_margin_bn   = |gamma_j| / sqrt(s2_j + eps) * mean_margin   (= mean |BN(a)|)

    Standard errors: the sample is the image. With ``v_nj`` the per-image value of a statistic
    (linear: ``m_nj``; conv: ``(1/P) sum_p m_npj`` over the ``P`` output positions, which are
    correlated within an image; the ``_half`` / ``_norm`` / ``_bn`` forms transformed alike)
    and ``N`` images::

        <stat>_se_j = sqrt( sum_n (v_nj - vbar_j)^2 / ((N - 1) N) )

    for ``<stat>`` in ``mean_margin, mean_margin_half, mean_margin_norm, mean_margin_bn``
    (``nan`` for ``N < 2`` and dead neurons). Since all neurons are measured on the same
    images, layer and network errors need the covariances: with the per-image aggregates
    ``u_nl = mean_{live j in l} v_nj`` and ``w_n = mean_l u_nl``::

        cov_layer_<stat>_j   = sum_n (v_nj - vbar_j)(u_nl - ubar_l) / ((N - 1) N)
        cov_network_<stat>_j = sum_n (v_nj - vbar_j)(w_n - wbar) / ((N - 1) N)

    so that ``mean_{live j in l} cov_layer_j = Var_n(u_nl) / N`` (the layer's se^2) and
    ``mean_l mean_{live j in l} cov_network_j = Var_n(w_n) / N`` (the network's);
    :func:`margin_summary` uses them. All co-moments are accumulated batch by batch in
    float64 (Chan's pairwise update). The network aggregate covers the layers measured
    together (``layers``): summarize the table of one call, not a filtered part of it.

    Dead neurons (``gamma == 0``, ``direction == 0``) have ``tau = nan`` and infinite
    margins. Cost: one forward pass through the hidden blocks plus one histogram update
    per layer and batch; memory ``O(C * fan_in)`` per layer, independent of ``len(data)``.

    Args:
        model: a :class:`~bnn_tol.models.BNN` (or any model made of ``BinaryBlock`` s).
        data: the samples to average over.
        batch_size: samples per forward pass.
        max_bins: histogram bins per neuron for the first layer's quantile (see module doc).
        quantile: the low quantile reported as ``q10_margin``.
        layers: block indices to measure (default: all hidden blocks).

    Returns:
        DataFrame with :data:`MARGIN_COLUMNS`, the ``margin`` table of :mod:`bnn_tol.schema`
        (``n`` = samples x positions per neuron).

    Raises:
        ValueError: empty dataset, images of the wrong shape, or a hidden binary layer not
            followed by BatchNorm (the message names the layer).
    """
    if is_graph(model):
        return _graph_margin(model, data, batch_size=batch_size, quantile=quantile,
                             layers=layers)
    stats = margin_pass(model, data, batch_size=batch_size, max_bins=max_bins, layers=layers,
                        se=True)
    out = pd.concat([_neuron_table(st, quantile) for st in stats], ignore_index=True)
    return schema.validate(out, "margin", what="the margin table")


def _moments(v: Tensor, u: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per column of the per-image values ``v (N, C)``: the standard error of its mean and its
    covariances with the per-image aggregates ``u (N,)`` and ``w (N,)``, all ``/ ((N-1) N)``."""
    n = v.shape[0]
    d = n * (n - 1) if n > 1 else math.nan
    dv = v - v.mean(0)
    se = ((dv * dv).sum(0) / d).sqrt()
    return se, (dv * (u - u.mean())[:, None]).sum(0) / d, (dv * (w - w.mean())[:, None]).sum(
        0) / d


@torch.no_grad()
def _graph_margin(model: nn.Module, data: BNNDataset, *, batch_size: int, quantile: float,
                  layers: list[int] | None) -> pd.DataFrame:
    """:func:`margin` of a residual graph (:class:`bnn_tol.core.graph.GraphBNN`), one row per
    binary neuron (:meth:`~bnn_tol.core.graph.GraphBNN.units`).

    The unit's pre-activation is its BatchNorm's input ``v``: the binary layer's ``a``, or
    ``v = a + r`` where a shortcut ``r`` is added before the BatchNorm, so ``m = |v - tau|``
    is the distance of ``a`` to the per-sample threshold ``tau - r``. The statistics and
    their standard errors are those of :func:`margin`, computed in float64 from the per-image
    values (memory ``O(samples x positions x neurons)`` for the quantile).
    """
    if len(data) == 0:
        raise InvalidArgument(f"dataset {data.name!r} is empty")
    check_model_data(model, data)
    units = graph_units(model, layers)
    thr = [bn_threshold(bn) for bn in units.bn]
    scale = [(bn.weight.detach().double().cpu().abs() if bn.weight is not None else
              torch.ones(bn.num_features, dtype=torch.float64))
             / torch.sqrt(bn.running_var.detach().double().cpu() + bn.eps) for bn in units.bn]
    allm: list[list[Tensor]] = [[] for _ in units.sign]
    img: list[list[Tensor]] = [[] for _ in units.sign]
    dev = device_of(model)
    with eval_mode(model):
        for x, _ in data.batches(batch_size, device=dev, grid=grid_of(model)):
            _, got = model.run(x, capture=units.inputs)
            for k, name in enumerate(units.inputs):
                v = got[name].double().cpu()
                tau = thr[k].tau.view(1, -1, *([1] * (v.dim() - 2)))
                m = (v - tau).abs()
                allm[k].append(m.transpose(0, 1).reshape(m.shape[1], -1).float())
                img[k].append(per_image(m))
    frames, per = [], []
    for k in range(len(units.sign)):
        dead = thr[k].direction == 0
        v = torch.cat(img[k])  # (N, C) per-image mean margins
        mm = torch.cat(allm[k], 1)  # (C, n)
        n = mm.shape[1]
        need = max(1, math.ceil(n * quantile - 1e-9))
        fan = float(units.layers[k].fan_in)
        stats = {"mean_margin": v, "mean_margin_half": v / 2, "mean_margin_norm": v / fan,
                 "mean_margin_bn": v * scale[k]}
        per.append((dead, stats))
        inf = torch.full((v.shape[1],), math.inf, dtype=torch.float64)
        mean = v.mean(0)
        frames.append({
            "layer": units.names[k], "layer_index": units.index[k], "kind": units.kind[k],
            "neuron": range(v.shape[1]), "fan_in": int(fan), "tau": thr[k].tau.numpy(),
            "direction": thr[k].direction.numpy().astype("int8"), "dead": dead.numpy(),
            "n": n, "mean_margin": torch.where(dead, inf, mean).numpy(),
            "min_margin": torch.where(dead, inf, mm.min(1).values.double()).numpy(),
            "q10_margin": torch.where(dead, inf, mm.kthvalue(need, 1).values.double()).numpy(),
            "mean_margin_half": torch.where(dead, inf, mean / 2).numpy(),
            "mean_margin_norm": torch.where(dead, inf, mean / fan).numpy(),
            "mean_margin_bn": torch.where(dead, inf, mean * scale[k]).numpy()})
    for s in _SE_STATS:  # per-image aggregates over the live neurons of a layer, the network
        u = [torch.nan_to_num(st[s][:, ~dead].mean(1)) for dead, st in per]
        w = torch.stack(u).mean(0)
        for k, (dead, st) in enumerate(per):
            se, cl, cn = _moments(st[s], u[k], w)
            nan = torch.full_like(se, math.nan)
            frames[k][f"{s}_se"] = torch.where(dead, nan, se).numpy()
            frames[k][f"cov_layer_{s}"] = torch.where(dead, torch.zeros_like(cl), cl).numpy()
            frames[k][f"cov_network_{s}"] = torch.where(dead, torch.zeros_like(cn), cn).numpy()
    out = pd.concat([pd.DataFrame(f) for f in frames], ignore_index=True)
    return schema.validate(out[MARGIN_COLUMNS], "margin", what="the margin table")


def margin_positions(model: nn.Module, data: BNNDataset, *, batch_size: int = 1000,
                     layers: list[int] | None = None) -> pd.DataFrame:
    """Per-position margins of conv layers: one row per (layer, channel, h, w).

    Columns ``layer, layer_index, kind, neuron, h, w, fan_in, fan_in_eff, mean_margin,
    min_margin``; ``fan_in`` is the full kernel fan-in, ``fan_in_eff`` the number of
    nonzero (not zero-padded) inputs at that position. Linear layers are listed with
    ``h = w = 0``. Means are over samples only.
    """
    stats = margin_pass(model, data, batch_size=batch_size, per_position=True, layers=layers)
    frames = []
    for st in stats:
        info = st.info
        if st.pos_sum is None:  # linear: per neuron
            t = _neuron_table(st, 0.1)
            frames.append(t.assign(h=0, w=0, fan_in_eff=info.fan_in)[
                ["layer", "layer_index", "kind", "neuron", "h", "w", "fan_in", "fan_in_eff",
                 "mean_margin", "min_margin"]])
            continue
        c, hh, ww = st.pos_sum.shape
        n = st.count // (hh * ww)
        mean = (st.pos_sum / n).cpu()
        mn = st.pos_min.cpu()
        dead = (info.direction == 0)[:, None, None].expand(c, hh, ww)
        mean = torch.where(dead, math.inf, mean)
        mn = torch.where(dead, math.inf, mn)
        cc, yy, xx = torch.meshgrid(torch.arange(c), torch.arange(hh), torch.arange(ww),
                                    indexing="ij")
        frames.append(pd.DataFrame({
            "layer": info.name, "layer_index": info.index, "kind": info.kind,
            "neuron": cc.flatten().numpy(), "h": yy.flatten().numpy(),
            "w": xx.flatten().numpy(), "fan_in": info.fan_in,
            "fan_in_eff": st.pos_neff[None].expand(c, hh, ww).flatten().numpy(),
            "mean_margin": mean.flatten().numpy(), "min_margin": mn.flatten().numpy()}))
    return pd.concat(frames, ignore_index=True)


_SUMMARY_STATS = ["mean_margin", "median_margin", "mean_min_margin", "mean_q10_margin",
                  "mean_margin_half", "mean_margin_norm", "mean_margin_bn"]


def margin_summary(m: pd.DataFrame) -> pd.DataFrame:
    """Per-layer and network-level margin statistics from a :func:`margin` table.

    Per layer (live neurons only: dead ones have infinite margins and are counted in
    ``n_dead``): ``mean_margin`` (mean over neurons of the per-neuron mean margin),
    ``median_margin`` (median over neurons), ``mean_min_margin``, ``mean_q10_margin``,
    ``mean_margin_half``, ``mean_margin_norm``, ``mean_margin_bn``; ``value`` repeats
    ``mean_margin_norm``, the headline number.

    The row ``layer == "network"`` holds the mean over layers of each statistic -- for
    ``value`` the paper-style scalar ``mean_l mean_j m_lj / fan_in_l`` -- and the totals of
    ``n_neurons``, ``n_dead``. A ``model`` column, if present, is kept and grouped by.

    Standard errors over images (see :func:`margin`): for ``<stat>`` in ``mean_margin,
    mean_margin_half, mean_margin_norm, mean_margin_bn`` (and ``value_se`` =
    ``mean_margin_norm_se``)::

        layer:    <stat>_se = sqrt( mean_{live j} cov_layer_<stat>_j )   = sd_n(u_nl) / sqrt(N)
        network:  <stat>_se = sqrt( mean_l mean_{live j in l} cov_network_<stat>_j )
                            = sd_n(w_n) / sqrt(N)

    i.e. from the per-image layer / network aggregates, not from summed neuron ``se^2``
    (the neurons share the images). ``nan`` when the table has no covariance columns.
    """
    need = {"layer", "layer_index", "mean_margin", "min_margin", "q10_margin",
            "mean_margin_half", "mean_margin_norm", "mean_margin_bn", "dead"}
    missing = need - set(m.columns)
    if missing:
        raise InvalidArgument(
            f"margin table lacks columns {sorted(missing)}; pass metrics.margin(...)")
    keys = [k for k in ("model",) if k in m.columns]
    rows = []
    for gkey, g in m.groupby([*keys, "layer_index"], sort=True):
        gkey = gkey if isinstance(gkey, tuple) else (gkey,)
        live = g[~g["dead"].astype(bool)]
        row = dict(zip([*keys, "layer_index"], gkey, strict=True))
        row.update(layer=g["layer"].iloc[0], kind=g["kind"].iloc[0] if "kind" in g else "",
                   fan_in=int(g["fan_in"].iloc[0]) if "fan_in" in g else 0,
                   n_neurons=len(g), n_dead=int(g["dead"].sum()),
                   mean_margin=live["mean_margin"].mean(),
                   median_margin=live["mean_margin"].median(),
                   mean_min_margin=live["min_margin"].mean(),
                   mean_q10_margin=live["q10_margin"].mean(),
                   mean_margin_half=live["mean_margin_half"].mean(),
                   mean_margin_norm=live["mean_margin_norm"].mean(),
                   mean_margin_bn=live["mean_margin_bn"].mean())
        for s in _SE_STATS:
            for col, tag in (("cov_layer", "se2"), ("cov_network", "net_cov")):
                c = f"{col}_{s}"
                row[f"_{tag}_{s}"] = live[c].mean() if c in live else math.nan
        rows.append(row)
    per_layer = pd.DataFrame(rows)
    nets = []
    for gkey, g in (per_layer.groupby(keys, sort=True) if keys else [((), per_layer)]):
        gkey = gkey if isinstance(gkey, tuple) else (gkey,)
        row = dict(zip(keys, gkey, strict=True))
        row.update(layer="network", layer_index=-1, kind="network", fan_in=0,
                   n_neurons=int(g["n_neurons"].sum()), n_dead=int(g["n_dead"].sum()),
                   **{s: g[s].mean() for s in _SUMMARY_STATS},
                   **{f"_se2_{s}": g[f"_net_cov_{s}"].mean() for s in _SE_STATS})
        nets.append(row)
    out = pd.concat([per_layer, pd.DataFrame(nets)], ignore_index=True)
    out["value"] = out["mean_margin_norm"]
    for s in _SE_STATS:
        out[f"{s}_se"] = np.sqrt(out[f"_se2_{s}"].clip(lower=0))
    out["value_se"] = out["mean_margin_norm_se"]
    cols = [*keys, "layer", "layer_index", "kind", "fan_in", "n_neurons", "n_dead",
            *_SUMMARY_STATS, "value", *[f"{s}_se" for s in _SE_STATS], "value_se"]
    return schema.validate(out[cols], "margin_summary", what="the margin summary")


@torch.no_grad()
def score_margin(model: nn.Module, data: BNNDataset, *, batch_size: int = 1000) -> pd.DataFrame:
    """Class-score margin of the last layer, one row per sample.

    With class scores ``z = BN(a)`` (``s_c = |gamma_c| / sqrt(s2_c + eps)``)::

        score_margin_n = z_ny - max_{c != y} z_nc       (> 0 iff correctly classified)
        score_margin_flips_n = min_{c != y} (z_ny - z_nc) / (2 max(s_y, s_c))

    One flipped weight in row ``c`` of the last layer moves ``z_c`` by ``2 s_c``, so the
    decision survives any number of last-layer flips below ``score_margin_flips`` (a
    guarantee for the last layer, with its inputs fixed). DESIGN.md uses the correctly
    classified samples: filter on ``correct``.

    Returns:
        DataFrame ``sample, label, pred, correct, score_margin, score_margin_flips`` (the
        ``score_margin`` table of :mod:`bnn_tol.schema`).
    """
    check_data(model, data)
    stages = compiled(model).stages
    bn = stages[-1].block.bn
    if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_var is not None:
        g = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)
        s = (g.abs() / torch.sqrt(bn.running_var + bn.eps)).float()
    else:
        s = None
    dev = device_of(model)
    parts = []
    with eval_mode(model):
        for x, y in data.batches(batch_size, device=dev, grid=grid_of(model)):
            for st in stages:
                x = run_block(st.block, x, st.name)
            z = x.float()
            zy = z.gather(1, y[:, None])
            other = z.scatter(1, y[:, None], -math.inf)
            sm = zy[:, 0] - other.amax(1)
            if s is not None:
                sc = s.to(dev)
                denom = 2 * torch.maximum(sc[y][:, None], sc[None, :])
                fl = ((zy - z) / denom).scatter(1, y[:, None], math.inf).amin(1)
            else:
                fl = torch.full_like(sm, math.nan)
            parts.append(torch.stack([y.float(), z.argmax(1).float(), sm, fl], 1).cpu())
    t = torch.cat(parts).double()
    out = pd.DataFrame({"sample": range(len(t)), "label": t[:, 0].long().numpy(),
                        "pred": t[:, 1].long().numpy(),
                        "correct": (t[:, 0] == t[:, 1]).numpy(),
                        "score_margin": t[:, 2].numpy(), "score_margin_flips": t[:, 3].numpy()})
    return schema.validate(out, "score_margin", what="the score margin table")
