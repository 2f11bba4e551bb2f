"""Inter-neuron importance and its variance.

Importance of hidden neuron ``j`` of block ``l`` (conv: output channel ``j``, all
positions): how much the network suffers when its binary output ``h_j`` (the block output
the next layer sees, after sign and max-pool) is corrupted. Estimators (``estimator=``):

- ``"accuracy"`` (default): ``I_j = acc(net) - acc(net with h_j -> -h_j)``
- ``"loss"``:    ``I_j = mean_n [CE(net with h_j -> -h_j)(x_n) - CE(net)(x_n)]``
- ``"flips"``:   ``I_j = mean_n 1{argmax z'_n != argmax z_n}`` (prediction flip rate)
- ``"taylor"``:  ``I_j ~ mean_n sum_pos -2 h_nj dCE_n/dh_nj`` -- first-order change of the loss
  under the negation, one backward pass (gradients through later signs use the STE)
- ``"mc"``:      ``I_j = acc(net) - mean_k acc(net with only neuron j's incoming weights
  corrupted by fault map k at BER p)`` (``ber``, ``n_maps``, ``seed``, ``error``): map ``k`` is
  chip ``map_seeds(seed, n_maps)[k]`` of the sweep with that seed -- the maps of
  ``draw_maps(model, chip, p, error=error)`` -- restricted to neuron ``j``'s row
- ``"loss_norm"``: the loss form on logits in units of the output BN scale,
  ``I_j = mean_n [CE(z'_n / s) - CE(z_n / s)]``, ``s = mean_c |gamma_c| / sqrt(s2_c + eps)``
  of the output BatchNorm (so ``z / s`` is measured in output pre-activation counts).

Which form answers which question:

- accuracy: what a user loses when the neuron fails (coarse: a difference of accuracies,
  dominated by sampling noise unless N is large; see ``se`` and ``importance_variance``);
- loss: smooth, but depends on the logit scale (the output BN's gamma, beta), which bit flip
  training changes, so its size and even the sign of differences between recipes change;
- loss_norm: the same smooth measure with the logit scale divided out. Scaling the output
  BN's (gamma, beta) by ``c > 0`` multiplies every logit and ``s`` by ``c``: ``z / s`` and
  hence ``loss_norm`` are unchanged (bit for bit when ``c`` is a power of 2), while the
  loss form changes. Dividing the loss form by the network's mean importance would *not*
  be invariant: CE is not homogeneous in the logits (``CE(c z) - CE(c z')`` is not
  proportional to ``CE(z) - CE(z')``). Use it to compare the shape of the importance
  distribution across recipes.

The loss form depends on the scale of the logits, which bit flip training changes: compare
estimators, do not assume they agree. Several exact estimators can be asked for at once
(``estimator=["accuracy", "loss", "flips"]``) and cost one pass.

Standard errors. Every estimator is a mean over images of a per-image contribution
``c_nj`` (accuracy: ``correct_n - correct_n(j)``; loss: ``CE_n(j) - CE_n``; flips:
``1{pred_n(j) != pred_n}``; loss_norm likewise; taylor: ``sum_pos -2 h_nj dCE_n/dh_nj``;
mc: ``correct_n - mean_k correct_nk(j)``, conditional on the drawn fault maps, so its ``se``
omits the map-to-map variation). For conv layers the unit of sampling is the image (all
positions of a channel summed into one ``c_nj``). The moments of ``c_nj`` are streamed over
batches (``O(G J)`` memory per layer, never the ``N x J`` matrix; see
:func:`importance_variance` for the formulas).

Fast exact negation (no forward pass per neuron). Changing block ``l``'s output channel
``j`` by ``delta_j`` (``-2 h_j`` for negation; ``h'_j - h_j`` for a fault map) changes the
next pre-activation by the contribution of that channel alone,

    a'_{l+1}(j) = a_{l+1} + layer_{l+1}(delta_j)
        linear:  a_{l+1} + delta_nj W[:, j]                    (rank-1, all j as one product)
        flatten: a_{l+1} + sum_p delta_njp W[:, (j, p)]        (batched matmul over j)
        conv:    a_{l+1} + conv(delta_j, W[:, j])              (grouped conv, groups = |J|)

and the rest of the network runs on the chunk of perturbed copies. Two cases need less:

1. block ``l + 1`` is the output block: ``z'(j) = BN(a'_{l+1}(j))`` directly;
2. block ``l + 1`` is a hidden linear block, ``l + 2`` the output and ``h_l`` flat: the
   shift of ``a_{l+1,k}`` is ``delta_nj W[k, j] in {-2, 0, 2}``, so bit ``k`` flips iff
   ``a_{l+1,k}`` is within 2 of its integer threshold (``e_nk = 1``) and the shift points
   at it (sign ``sigma_nk = -h_{l+1,nk} d_k``). With ``u = delta / 2`` and
   ``D_nck = -2 h_{l+1,nk} e_nk W_out[c, k]``,

       a'_out(j)_nc = a_out,nc + 1/2 |u_nj| sum_k D_nck
                               + 1/2 u_nj  sum_k D_nck sigma_nk W[k, j],

   one ``(N C_out, K) x (K, J)`` matrix product for all neurons of the layer (on CPU with
   numba a sparse one: image ``n`` sums only its units with ``e_nk = 1``, typically a few
   per cent of ``K``; :func:`bnn_tol.core.kernels.near_threshold_preact`). All
   quantities are integers, exact in float32, and the folded comparator equals the float BN
   bit for bit, so the result equals the per-neuron forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnn_tol import schema
from bnn_tol.core import kernels
from bnn_tol.core.compiled import Stage, eval_mode
from bnn_tol.core.layers import BinaryConv2d, BinaryLinear, apply_folded
from bnn_tol.core.models import check_data as check_model_data
from bnn_tol.data import BNNDataset, grid_of
from bnn_tol.engines import int8
from bnn_tol.exceptions import InvalidArgument
from bnn_tol.faults.apply import negate
from bnn_tol.faults.maps import map_seeds
from bnn_tol.faults.registry import ErrorModel, check_rates, draw_maps, error_model
from bnn_tol.metrics import estimators
from bnn_tol.metrics._common import (
    binary_weight,
    blocks_of,
    check_data,
    device_of,
    graph_units,
    hidden_layers,
    is_graph,
    run_block,
)

__all__ = ["importance", "importance_variance", "required_samples", "negation_logits"]


#: Elements of the largest per-chunk tensor (float32): bounds memory at ~64 MiB per tensor.
_CHUNK_ELEMS = 2**24

#: Image groups of the delete-a-group jackknife (``vu_se``): its relative error is about
#: ``1 / sqrt(2 (G - 1))`` = 13 %.
JACKKNIFE_GROUPS = 32


class _Contributions:
    """Streamed moments of per-sample contributions ``c_nj`` (image ``n``, neuron ``j``).

    Images are dealt round-robin to ``G`` groups (image ``n`` -> group ``n mod G``, so a
    sorted dataset still spreads over all groups). Per group it keeps the count and the
    sums of ``d_nj``, ``d_nj^2``, ``r_n``, ``d_nj r_n`` with ``d = c - K`` (``K``: the first
    batch's per-neuron mean, a shift that keeps the raw moments well conditioned) and
    ``r_n = mean_k d_nk``. The sums are additive, so the statistics of all images and of all
    images but one group (the jackknife) come from the same ``O(G J)`` numbers: never the
    ``N x J`` matrix.
    """

    def __init__(self, groups: int) -> None:
        self.groups = groups
        self.shift: Tensor | None = None
        self.seen = 0

    def add(self, c: Tensor) -> None:
        """Add a batch ``c`` of shape ``(B, J)`` (the next ``B`` images in data order)."""
        c = c.double()
        if self.shift is None:
            g, j = self.groups, c.shape[1]
            self.shift = c.mean(0)
            z = dict(dtype=torch.float64, device=c.device)
            self.n, self.sr = torch.zeros(g, **z), torch.zeros(g, **z)
            self.s1, self.s2, self.scr = (torch.zeros(g, j, **z) for _ in range(3))
        d = c - self.shift
        r = d.mean(1)
        # rows padded with zeros so that row i + o falls in group (i + o) mod G: the group sums
        # are a reshape and a sum (zero rows add nothing), much faster than index_add_
        # (written in place into one buffer: the same tensor as cat + pad, without the copies)
        g, o = self.groups, self.seen % self.groups
        b, j = d.shape
        tail = -(b + o) % g
        buf = torch.empty((o + b + tail, 3 * j + 2), dtype=d.dtype, device=d.device)
        buf[:o].zero_()
        buf[o + b:].zero_()
        rows = buf[o:o + b]
        rows[:, 0] = 1
        rows[:, 1] = r
        rows[:, 2:2 + j] = d
        torch.mul(d, d, out=rows[:, 2 + j:2 + 2 * j])
        torch.mul(d, r[:, None], out=rows[:, 2 + 2 * j:])
        packed = buf.view(-1, g, buf.shape[1]).sum(0)
        self.n += packed[:, 0]
        self.sr += packed[:, 1]
        self.s1 += packed[:, 2:2 + j]
        self.s2 += packed[:, 2 + j:2 + 2 * j]
        self.scr += packed[:, 2 + 2 * j:]
        self.seen += len(c)

    @staticmethod
    def _stats(shift: Tensor, n: Tensor, s1: Tensor, s2: Tensor, sr: Tensor, scr: Tensor):
        """``(se_j, bias_j, V_u)`` of image sets given by their sums (leading dims batch)."""
        m = s1 / n[..., None]
        m2 = s2 - s1 * m  # sum_n (c_nj - I_j)^2
        cr = scr - m * sr[..., None]  # sum_n (c_nj - I_j)(r_n - mean r)
        s_jj = m2 / (n[..., None] - 1)
        s_jk = cr / (n[..., None] - 1)  # mean_k S_jk
        bias = (s_jj - s_jk) / n[..., None]
        vu = (m + shift).var(-1, unbiased=False) - bias.mean(-1)
        return (s_jj.clamp_min(0) / n[..., None]).sqrt(), bias, vu

    def result(self) -> tuple[Tensor, Tensor, Tensor]:
        """``se (J,)``, ``bias (J,)`` on all images and the jackknife ``V_u`` replicates
        ``(G,)`` (all images but group ``g``); CPU float64."""
        tot = [t.sum(0) for t in (self.n, self.s1, self.s2, self.sr, self.scr)]
        se, bias, _ = self._stats(self.shift, *tot)
        loo = [t[None] - g for t, g in zip(tot, (self.n, self.s1, self.s2, self.sr, self.scr),
                                            strict=True)]
        _, _, reps = self._stats(self.shift, *loo)
        return se.cpu(), bias.cpu(), reps.cpu()


def _jackknife(reps: Tensor) -> tuple[Tensor, Tensor]:
    """Delete-a-group jackknife over layers' replicates ``reps (L, G)``: per layer the
    standard error and the covariance with the mean over the ``L`` layers,

        se_l^2 = (G-1)/G sum_g (V_l(-g) - V_l(.))^2,
        cov_l  = (G-1)/G sum_g (V_l(-g) - V_l(.)) (Vbar(-g) - Vbar(.)),  Vbar = mean_l V_l,

    so that ``mean_l cov_l`` is the jackknife variance of the network mean ``Vbar``.
    """
    g = reps.shape[1]
    dev = reps - reps.mean(1, keepdim=True)
    net = dev.mean(0)
    f = (g - 1) / g
    return (f * (dev * dev).sum(1)).sqrt(), f * (dev * net).sum(1)


def _output_scale(bn: nn.Module | None) -> float:
    """Mean logit change per unit of output pre-activation, ``mean_c |gamma_c| / sqrt(s2_c +
    eps)`` of the output BatchNorm ``bn`` (1 without one): the unit of ``"loss_norm"``."""
    if bn is None or bn.running_var is None:
        return 1.0
    g = bn.weight.detach().double().abs() if bn.weight is not None else 1.0
    s = float((g / torch.sqrt(bn.running_var.double() + bn.eps)).mean())
    if not s > 0:
        raise InvalidArgument("the output BatchNorm has gamma = 0 for every class: the logits "
                              "are constant and 'loss_norm' has no unit")
    return s


class _Weights:
    """Deployed weights of a model's blocks, prepared once and kept across batches:
    ``binary(k)`` the {-1, +1} weight of block ``k`` (faults included), ``int8(k)`` the same
    as int8 (``None`` unless every entry is -1, 0 or 1), ``packed(k)`` its rows packed for
    :func:`bnn_tol.core.kernels.fc_output` (``None`` unless every entry is +-1)."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        self.blocks = blocks
        self._memo: dict[tuple[str, int], object] = {}

    def _get(self, what: str, k: int, make):
        if (what, k) not in self._memo:
            self._memo[what, k] = make()
        return self._memo[what, k]

    def binary(self, k: int) -> Tensor:
        return self._get("binary", k, lambda: binary_weight(self.blocks[k].layer))

    def int8(self, k: int) -> Tensor | None:
        return self._get("int8", k, lambda: _as_ternary_int8(self.binary(k)))

    def packed(self, k: int) -> np.ndarray | None:
        def make():
            w = self.binary(k)
            ok = w.device.type == "cpu" and bool(w.abs().eq(1).all())
            return kernels.pack_rows(w.numpy()) if ok else None

        return self._get("packed", k, make)


def _binary_preact(block: nn.Module, x: Tensor, k: int, weights: _Weights) -> Tensor | None:
    """Pre-activation of linear block ``k`` on +-1 inputs ``x`` ``(B, n)`` by XNOR/popcount,
    ``a = n - 2 popcount(bits(x) XOR bits(w))`` (:func:`bnn_tol.core.kernels.fc_output`),
    float32 ``(B, O)``: exact, so equal to the float32 product (integer sums below 2^24).
    ``None`` where it does not apply (numba missing, not CPU float32, a bias, a conv layer,
    entries other than +-1)."""
    layer = block.layer
    if not (kernels.AVAILABLE and isinstance(layer, BinaryLinear) and layer.bias is None
            and x.dim() == 2 and x.device.type == "cpu" and x.dtype == torch.float32
            and not x.requires_grad and x.shape[1] == layer.in_features
            and bool(x.abs().eq(1).all())):
        return None
    w = weights.packed(k)
    if w is None:
        return None
    out = np.empty((x.shape[0], w.shape[0]), dtype=np.int64)
    with kernels.threads(torch.get_num_threads()):
        kernels.fc_output(kernels.pack_rows(x.numpy()), w, x.shape[1], out)
    return torch.from_numpy(out).to(torch.float32)


def _forward_cache(blocks: Sequence[nn.Module], x: Tensor, names: dict[int, str],
                   weights: _Weights | None = None):
    """Clean forward: block inputs, pre-activations, outputs; returns (xs, as_, hs).
    Linear blocks on +-1 inputs run by XNOR/popcount (:func:`_binary_preact`, the same
    values) when ``weights`` is given."""
    xs, as_, hs = [], [], []
    for k, b in enumerate(blocks):
        xs.append(x)
        a = None if weights is None else _binary_preact(b, x, k, weights)
        if a is None:
            a = run_block(b.preact, x, names.get(k, f"blocks.{k}.layer"))
        as_.append(a)
        x = b.post(a)
        hs.append(x)
    return xs, as_, hs


def _contrib_cols(block: nn.Module, delta: Tensor, cols: Tensor) -> Tensor:
    """``layer_{l+1}(delta_j e_j)`` for channels ``cols`` (``delta``: ``(B, J, *spatial)``).

    Returns ``(B, J, *a_{l+1}.shape[1:])`` (no bias: a difference of pre-activations).
    """
    layer = block.layer
    w = binary_weight(layer)
    b, j = delta.shape[:2]
    if isinstance(layer, BinaryConv2d):
        wj = w[:, cols].transpose(0, 1).reshape(j * w.shape[0], 1, *w.shape[2:])
        out = F.conv2d(delta, wj, stride=layer.stride, padding=layer.padding,
                       dilation=layer.dilation, groups=j)
        return out.view(b, j, w.shape[0], *out.shape[2:])
    p = int(delta[0, 0].numel())
    c_prev = w.shape[1] // p
    if c_prev * p != w.shape[1]:
        raise InvalidArgument(f"{layer} input width {w.shape[1]} is not channels x {p} positions")
    if p == 1:
        return delta.reshape(b, j, 1) * w[:, cols].T[None]
    wv = w.view(w.shape[0], c_prev, p)[:, cols].permute(1, 2, 0)  # (J, P, K)
    out = torch.bmm(delta.reshape(b, j, p).transpose(0, 1), wv)  # (J, B, K)
    return out.transpose(0, 1)


def _logits_rest(blocks: Sequence[nn.Module], start: int, h: Tensor) -> Tensor:
    """Run blocks ``start..`` on ``h`` (already the output of block ``start - 1``)."""
    for b in blocks[start:]:
        h = b(h)
    return h


def _argmax1(z: Tensor) -> Tensor:
    """``z.argmax(1)`` for ``(B, C, J)`` with small ``C`` (first maximum on ties), fast on
    the strided class axis: a running comparison over the ``C`` ``(B, J)`` slices (the numba
    kernel :func:`bnn_tol.core.kernels.argmax_classes` on CPU, the same comparisons)."""
    if (kernels.AVAILABLE and z.device.type == "cpu" and z.dim() == 3 and z.shape[1] > 0
            and not z.requires_grad):
        idx = torch.empty((z.shape[0], z.shape[2]), dtype=torch.int64)
        with kernels.threads(torch.get_num_threads()):
            kernels.argmax_classes(z.numpy(), idx.numpy())
        return idx
    best = z[:, 0].clone()
    idx = torch.zeros(best.shape, dtype=torch.int64, device=z.device)
    for c in range(1, z.shape[1]):
        better = z[:, c] > best
        best = torch.where(better, z[:, c], best)
        idx.masked_fill_(better, c)
    return idx


def _pm_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for matrices with entries in {-1, 0, +1}, exact.

    Uses ``torch._int_mm`` (int8 x int8 -> int32) on CPUs with an int8 dot product (VNNI/AMX,
    :func:`bnn_tol.evaluate.int8_is_fast`) where the shapes allow it, else the float32 product
    (exact for sums below 2^24; without VNNI ``_int_mm`` was 30x slower). Returns float32.
    """

    if (a.device.type == "cpu" and a.shape[0] > 16 and a.shape[1] % 8 == 0
            and b.shape[1] % 8 == 0 and hasattr(torch, "_int_mm") and int8.int8_is_fast()):
        try:
            return torch._int_mm(a.to(torch.int8), b.to(torch.int8)).to(torch.float32)
        except RuntimeError:  # pragma: no cover - kernel not built for this CPU
            pass
    return a @ b


def _as_ternary_int8(t: Tensor) -> Tensor | None:
    """``t`` as int8 if every entry is -1, 0 or 1 (exactly), else ``None``."""
    t8 = t.to(torch.int8)
    return t8 if bool(t8.abs().le(1).all()) and torch.equal(t8.to(t.dtype), t) else None


class _NearThreshold:
    """Case 2 of the module doc for one batch: what does not depend on the perturbed neurons
    is computed once, :meth:`preact` then gives each chunk of neurons.

    With ``sigma = -h1 d`` ``(B, K)`` (0 for dead units) and ``e`` ``(B, K)`` (1 where the
    unit's bit flips when ``a1`` moves by 2 towards its threshold), ``g = -h1 e`` and
    ``D / 2 = g W2`` ``(B, C_out, K)``:

        a2(j) = a_out + |u_j| sum_k (D / 2)_k + u_j sum_k (D / 2)_k sigma_k W1[k, j].

    On CPU with numba, binary ``h1`` and ternary weights the sums run in
    :func:`bnn_tol.core.kernels.near_threshold_preact` over the units with ``e = 1`` only
    (exact integer sums, the same float32 operations as the torch expression); else the torch
    expression with :func:`_pm_matmul`.
    """

    def __init__(self, cache, l: int, info_next: Stage, w1: Tensor, w2: Tensor, u: Tensor,
                 w1_i8: Tensor | None = None) -> None:
        xs, as_, hs = cache
        self.u = u  # (B, J_all): delta / 2 of every neuron of the layer
        self.unit_col = (u.abs() == 1).all(0)
        self.ternary_col = (self.unit_col if bool(self.unit_col.all())
                            else ((u == 1) | (u == 0) | (u == -1)).all(0))
        a1, h1 = as_[l + 1], hs[l + 1]
        self.a_out, self.w1, self.w2 = as_[l + 2], w1, w2
        d = info_next.folded.direction.to(a1.device, a1.dtype)
        self.sigma = -h1 * d  # (B, K), 0 for dead neurons
        e = (apply_folded(a1 + 2 * self.sigma, info_next.folded) != h1).to(a1.dtype)
        self.g = -h1 * e
        ts = (self.a_out, h1, w1, w2, u)
        self.kernel = (kernels.AVAILABLE and all(t.device.type == "cpu" and t.dtype ==
                                                 torch.float32 and not t.requires_grad
                                                 for t in ts)
                       and w1.shape[0] < 2**15 and bool((h1.abs() == 1).all())
                       and _as_ternary_int8(w2) is not None)
        if self.kernel:
            self.w1_i8 = w1_i8 if w1_i8 is not None else _as_ternary_int8(w1)
        else:
            self.w1_i8 = None
        self.kernel = self.w1_i8 is not None
        if self.kernel:
            self.args = (self.a_out.contiguous().numpy(), self.g.contiguous().numpy(),
                         (self.g * self.sigma).contiguous().numpy(), w2.contiguous().numpy())

    def preact(self, cols: Tensor) -> Tensor:
        """``a2`` ``(B, C_out, J)`` of the neurons ``cols`` ``(J,)``."""
        u = self.u[:, cols]
        unit = bool(self.unit_col[cols].all())  # per chunk, as the torch expression decides
        if self.kernel and bool(self.ternary_col[cols].all()):
            a2 = torch.empty((u.shape[0], self.w2.shape[0], len(cols)), dtype=torch.float32)
            with kernels.threads(torch.get_num_threads()):
                kernels.near_threshold_preact(
                    *self.args, self.w1_i8[:, cols].contiguous().numpy(),
                    u.contiguous().numpy(), unit, a2.numpy())
            return a2
        half_d = self.g[:, None, :] * self.w2[None]  # D / 2: (B, C_out, K), in {-1, 0, 1}
        base = self.a_out + half_d.sum(2)  # a_out + 1/2 sum_k D  (used where |u| = 1)
        m = _pm_matmul((half_d * self.sigma[:, None, :]).reshape(-1, half_d.shape[2]),
                       self.w1[:, cols])
        m = m.view(half_d.shape[0], half_d.shape[1], -1)  # 1/2 sum_k D sigma W: (B, C_out, J)
        if unit:
            return m.mul_(u[:, None, :]).add_(base[:, :, None])
        return (m.mul_(u[:, None, :]).add_(self.a_out[:, :, None])
                .add_(u.abs()[:, None, :] * (base - self.a_out)[:, :, None]))


def _chunk_size(blocks, l: int, cache, n_cols: int, fast: bool) -> int:
    xs, as_, hs = cache
    b = as_[l].shape[0]
    if fast:
        per = as_[-1][0].numel() * 2
    else:
        per = sum(a[0].numel() + h[0].numel() for a, h in zip(as_[l + 1:], hs[l + 1:],
                                                              strict=True))
    return max(1, min(n_cols, _CHUNK_ELEMS // max(1, b * per)))


def _rank1(a_out: Tensor, w: Tensor, d: Tensor) -> Tensor:
    """``a_out[:, :, None] + w[None] * d[:, None]`` ``(B, C, J)`` (``a_out`` ``(B, C)``, ``w``
    ``(C, J)``, ``d`` ``(B, J)``): one fused pass (:func:`bnn_tol.core.kernels.rank1_preact`)
    on CPU float32, the same float32 operations."""
    ts = (a_out, w, d)
    if kernels.AVAILABLE and all(t.device.type == "cpu" and t.dtype == torch.float32
                                 and not t.requires_grad for t in ts):
        out = torch.empty((d.shape[0], w.shape[0], d.shape[1]), dtype=torch.float32)
        with kernels.threads(torch.get_num_threads()):
            kernels.rank1_preact(a_out.contiguous().numpy(), w.contiguous().numpy(),
                                 d.contiguous().numpy(), out.numpy())
        return out
    return (w[None] * d[:, None, :]).add_(a_out[:, :, None])


def negation_logits(model: nn.Module, x: Tensor, layer_index: int,
                    delta: Tensor | None = None, *, cols: Tensor | None = None,
                    cache=None, infos: dict[int, Stage] | None = None,
                    weights: _Weights | None = None):
    """Logits with each channel of block ``layer_index``'s output perturbed alone.

    Yields ``(cols_chunk, z')`` with ``z'`` of shape ``(B, C_out, J)``: ``z'[:, :, i]`` are
    the class scores when channel ``cols_chunk[i]`` of ``h_l`` is replaced by
    ``h_l + delta[:, cols_chunk[i]]`` (default ``delta = -2 h_l``: negation), all other
    channels clean. Exact (equal to the per-neuron forward pass); see the module doc.
    ``weights`` (internal) keeps the prepared deployed weights across calls on one model.
    """
    blocks = blocks_of(model)
    n_blocks = len(blocks)
    l = layer_index
    if not 0 <= l < n_blocks - 1:
        raise InvalidArgument(f"layer_index must name a hidden block 0..{n_blocks - 2}, got {l}")
    if cache is None:
        cache = _forward_cache(blocks, x, {})
    xs, as_, hs = cache
    h = hs[l]
    if delta is None:
        delta = -2 * h
    if cols is None:
        cols = torch.arange(h.shape[1], device=h.device)
    if infos is None:
        infos = {i.index: i for i in hidden_layers(model)}
    case2 = (l + 2 == n_blocks - 1 and h.dim() == 2
             and not isinstance(blocks[l + 1].layer, BinaryConv2d)
             and not isinstance(blocks[l + 2].layer, BinaryConv2d)
             and not getattr(blocks[l + 1], "pool", None))
    fast = case2 or l + 1 == n_blocks - 1
    step = _chunk_size(blocks, l, cache, len(cols), fast)
    weights = _Weights(blocks) if weights is None else weights
    w1 = weights.binary(l + 1)
    near = _NearThreshold(cache, l, infos[l + 1], w1, weights.binary(l + 2), delta / 2,
                          weights.int8(l + 1)) if case2 else None
    for start in range(0, len(cols), step):
        cc = cols[start : start + step]
        dj = delta[:, cc]
        if case2:
            z = blocks[l + 2].post(near.preact(cc))
        elif l + 1 == n_blocks - 1 and dj.dim() == 2:  # rank-1 on the class scores
            z = blocks[l + 1].post(_rank1(as_[l + 1], w1[:, cc], dj))
        else:
            q = _contrib_cols(blocks[l + 1], dj, cc)
            a1 = as_[l + 1][:, None] + q  # (B, J, ...)
            bsz, j = a1.shape[:2]
            h1 = blocks[l + 1].post(a1.reshape(bsz * j, *a1.shape[2:]))
            z = h1 if l + 1 == n_blocks - 1 else _logits_rest(blocks, l + 2, h1)
            z = z.view(bsz, j, -1).permute(0, 2, 1)
        yield cc, z


def _preact_with(block: nn.Module, x: Tensor, w: Tensor) -> Tensor:
    """Pre-activation of ``block`` on input ``x`` with deployed weight ``w``."""
    layer = block.layer
    if getattr(block, "flatten", False):
        x = x.flatten(1)
    if isinstance(layer, BinaryConv2d):
        return layer._conv_forward(x, w, layer.bias)
    return F.linear(x, w, layer.bias)


def _taylor(blocks, infos, x, y, names) -> dict[int, tuple[Tensor, Tensor]]:
    """Per layer ``sum_n sum_pos -2 h_nj dCE_n/dh_nj`` ``(C_l,)`` for one batch, and the
    per-sample terms ``sum_pos -2 h_nj dCE_n/dh_nj`` ``(B, C_l)``."""
    hs = []
    h = x.detach().requires_grad_(True)  # so that every block output is in the graph
    wanted = {i.index for i in infos}
    with torch.enable_grad():
        for k, b in enumerate(blocks):
            h = run_block(b, h, names.get(k, f"blocks.{k}.layer"))
            if k in wanted:
                hs.append(h)
        loss = F.cross_entropy(h, y, reduction="sum")
        grads = torch.autograd.grad(loss, hs)
    out = {}
    for info, hk, g in zip(infos, hs, grads, strict=True):
        t = (-2 * hk.detach() * g)
        per = t.sum(list(range(2, t.dim()))) if t.dim() > 2 else t
        out[info.index] = (t.sum([0, *range(2, t.dim())]).double(), per.double())
    return out


def importance(
    model: nn.Module,
    data: BNNDataset,
    *,
    estimator: str | Sequence[str] = "accuracy",
    layers: Sequence[int] | None = None,
    batch_size: int = 1000,
    ber: float | tuple[float, float] = 0.05,
    n_maps: int = 5,
    seed: int = 0,
    error: str | ErrorModel | None = None,
) -> pd.DataFrame:
    """Importance of every hidden neuron: one row per (layer, neuron, estimator).

    See the module doc for the estimators' formulas. Exact estimators negate each neuron's
    binary output on every sample; ``"mc"`` corrupts only neuron ``j``'s incoming weights
    with ``n_maps`` persistent fault maps at ``ber``: map ``k`` is chip
    ``s_k = faults.map_seeds(seed, n_maps)[k]`` -- the chip of map ``k`` of
    ``evaluate.sweep(..., n_maps=n_maps, seed=seed, error=error)`` -- and neuron ``j`` of
    layer ``l`` gets the flips of ``draw_maps(model, s_k, p, error=error)[layer l]`` that fall
    in its row (output channel) of the weight, the rest of the network error free (the same
    maps for every batch).

    Args:
        model: a trained :class:`~bnn_tol.models.BNN`.
        data: samples to average over (e.g. the test set).
        estimator: a registered name (:func:`bnn_tol.metrics.estimators.names`) or a list.
        layers: hidden block indices (default all hidden blocks).
        batch_size: samples per clean forward pass.
        ber, n_maps, seed: the ``"mc"`` estimator's BER ``p`` or ``(p01, p10)``, number of
            fault maps and the sweep seed of the chips.
        error: the ``"mc"`` estimator's error model (:func:`bnn_tol.errors.models`; default
            ``"bernoulli"``).

    Returns:
        DataFrame ``layer, layer_index, neuron, importance, estimator, importance_se, bias,
        n_samples, vu_se, vu_netcov, vu_layers`` (the ``importance`` table of
        :mod:`bnn_tol.schema`): ``importance = I_j = mean_n c_nj``;
        ``importance_se = sqrt(S_jj / N)`` its standard error (``S``: the unbiased ``1/(N-1)``
        sample covariance over images of the contributions ``c_n.`` of the layer's
        neurons, ``N = n_samples``); ``bias = (S_jj - mean_k S_jk) / N``, neuron ``j``'s
        share of the sampling bias of the plug-in variance; per layer (repeated on its
        rows): ``vu_se``, the delete-a-group jackknife standard error of
        ``variance_unbiased`` over ``G = min(JACKKNIFE_GROUPS, N)`` image groups (image
        ``n`` in group ``n mod G``), ``vu_netcov`` the jackknife covariance of the layer's
        ``variance_unbiased`` with the mean over the ``vu_layers`` layers measured in this
        call (same image groups), used for the network's standard error. nan where ``N < 2``.
        The jackknife is conservative (Efron-Stein): where sampling noise dominates it
        overstates the variance of ``variance_unbiased`` (measured: subset spread / reported
        ``vu_se^2`` = 0.4-0.6 on a 2-epoch fc with 400 images per subset; near 1 when the
        between-neuron signal dominates).

    Raises:
        ValueError: unknown estimator, empty dataset, wrong input shape, a hidden layer
            without BatchNorm (naming the layer).
    """

    ests = estimators.check(estimator)
    family = {e: estimators.get(e).family for e in ests}
    if is_graph(model):
        return _graph_importance(model, data, ests, layers=layers, batch_size=batch_size)
    check_data(model, data)
    blocks = blocks_of(model)
    all_infos = hidden_layers(model)
    if not all_infos:
        raise InvalidArgument("the model has no hidden binary layer: importance is defined for "
                         "neurons of blocks followed by another block")
    if layers is not None:
        known = {i.index for i in all_infos}
        unknown = [k for k in layers if k not in known]
        if unknown:
            raise InvalidArgument(f"layers {unknown} are not hidden blocks; hidden blocks are "
                             f"{sorted(known)}")
    infos = [i for i in all_infos if layers is None or i.index in set(layers)]
    by_index = {i.index: i for i in all_infos}
    names = {i.index: i.name for i in all_infos}
    dev = device_of(model)
    n_total = 0
    exact = [e for e in ests if family[e] == "negation"]
    sums = {(e, i.index): None for e in exact for i in infos}
    tay = {i.index: None for i in infos} if "taylor" in family.values() else {}
    mc = {i.index: None for i in infos} if "faults" in family.values() else {}
    clean_correct = 0.0
    clean_loss = 0.0
    n_groups = max(1, min(JACKKNIFE_GROUPS, len(data)))
    contrib = {(e, i.index): _Contributions(n_groups) for e in ests for i in infos}
    scale = _output_scale(getattr(blocks[-1], "bn", None)) \
        if any(estimators.get(e).needs_scale for e in ests) else 1.0
    flipped_w: dict[tuple[int, int], Tensor] = {}
    if mc:
        em = error_model(error)
        ((p01, p10),) = check_rates(em, [ber])
        if n_maps < 1:
            raise InvalidArgument(f"n_maps must be >= 1, got {n_maps}")
        names_mc = [info.name for info in infos]
        for k, chip in enumerate(map_seeds(seed, n_maps)):
            maps = draw_maps(model, chip, max(p01, p10), layers=names_mc, error=em)
            for info in infos:
                wb = binary_weight(info.block.layer)
                flipped_w[info.index, k] = negate(wb, maps[info.name].flips(wb, p01, p10))

    def _acc(store, key, val):
        store[key] = val if store[key] is None else store[key] + val

    weights = _Weights(blocks)
    with eval_mode(model), torch.no_grad():
        for x, y in data.batches(batch_size, device=dev, grid=grid_of(model)):
            cache = _forward_cache(blocks, x, names, weights)
            z = cache[2][-1]
            clean = estimators.Clean(z, y, scale)
            ok = clean.ok
            ce = clean.ce
            clean_correct += float(ok.sum())
            clean_loss += float(ce.sum())
            n_total += len(y)
            for info in infos:
                l = info.index
                if exact:
                    parts = {e: [] for e in exact}
                    per = {e: [] for e in exact}  # per-sample contributions c_nj: (B, chunk)
                    for _, zj in negation_logits(model, x, l, cache=cache, infos=by_index,
                                                 weights=weights):
                        pj = _argmax1(zj)
                        for e in exact:
                            per[e].append(estimators.get(e).contribution(zj, pj, clean))
                            parts[e].append(per[e][-1].sum(0))
                    for e in exact:
                        _acc(sums, (e, l), torch.cat(parts[e]))
                        contrib[e, l].add(torch.cat(per[e], 1))
                if mc:
                    h = cache[2][l]
                    tot = None
                    per_mc = None
                    for k in range(n_maps):
                        a_f = _preact_with(info.block, cache[0][l], flipped_w[l, k])
                        delta = info.block.post(a_f) - h
                        cs = [ok[:, None] - (_argmax1(zj) == y[:, None]).double()
                              for _, zj in negation_logits(model, x, l, delta, cache=cache,
                                                           infos=by_index, weights=weights)]
                        drop = torch.cat([c.sum(0) for c in cs])
                        tot = drop if tot is None else tot + drop
                        cs = torch.cat(cs, 1)
                        per_mc = cs if per_mc is None else per_mc + cs
                    _acc(mc, l, tot / n_maps)
                    contrib["mc", l].add(per_mc / n_maps)
            if tay:
                for l, (v, per_t) in _taylor(blocks, infos, x, y, names).items():
                    _acc(tay, l, v)
                    contrib["taylor", l].add(per_t)
    stats = {k: c.result() for k, c in contrib.items()}
    jack = {}
    for e in ests:
        se_l, cov_l = _jackknife(torch.stack([stats[e, i.index][2] for i in infos]))
        jack.update({(e, i.index): (float(a), float(b))
                     for i, a, b in zip(infos, se_l, cov_l, strict=True)})
    frames = []
    for info in infos:
        l = info.index
        for e in ests:
            v = {"negation": sums.get((e, l)), "taylor": tay.get(l), "faults": mc.get(l)}[family[e]]
            v = (v / n_total).cpu().numpy()
            se, bias, _ = stats[e, l]
            frames.append(pd.DataFrame({"layer": info.name, "layer_index": l,
                                        "neuron": range(len(v)), "importance": v,
                                        "estimator": e, "importance_se": se.numpy(),
                                        "bias": bias.numpy(),
                                        "n_samples": n_total, "vu_se": jack[e, l][0],
                                        "vu_netcov": jack[e, l][1], "vu_layers": len(infos)}))
    return schema.validate(pd.concat(frames, ignore_index=True), "importance",
                           what="the importance table")


@torch.no_grad()
def _graph_importance(model: nn.Module, data: BNNDataset, ests: list[str], *,
                      layers: Sequence[int] | None, batch_size: int) -> pd.DataFrame:
    """:func:`importance` of a residual graph (:class:`bnn_tol.core.graph.GraphBNN`): the
    negation estimators of every binary neuron (:meth:`~bnn_tol.core.graph.GraphBNN.units`),
    exactly -- the unit's sign output ``h_j -> -h_j`` on every sample and position, the rest
    of the graph (shortcuts included) recomputed. Neurons are negated in chunks: the batch is
    repeated once per neuron of the chunk and each copy negates its own neuron, one forward
    pass per chunk. Same table and standard errors as for a chain of blocks."""
    bad = [e for e in ests if estimators.get(e).family != "negation"]
    if bad:
        neg = [n for n in estimators.names() if estimators.get(n).family == "negation"]
        raise InvalidArgument(f"importance of a residual graph: only the negation estimators "
                              f"({', '.join(neg)}), not {', '.join(bad)}")
    if len(data) == 0:
        raise InvalidArgument(f"dataset {data.name!r} is empty")
    check_model_data(model, data)
    units = graph_units(model, None if layers is None else list(layers))
    last = model.nodes[-1]  # the output BatchNorm: the graph's last node, if a BatchNorm
    scale = _output_scale(model.ops[last["name"]] if last["op"] == "bn" else None) \
        if any(estimators.get(e).needs_scale for e in ests) else 1.0
    dev = device_of(model)
    n_groups = max(1, min(JACKKNIFE_GROUPS, len(data)))
    contrib = {(e, k): _Contributions(n_groups) for e in ests for k in range(len(units.sign))}
    sums: dict = {}
    n_total = 0
    with eval_mode(model):
        for x, y in data.batches(batch_size, device=dev, grid=grid_of(model)):
            z = model(x)
            clean = estimators.Clean(z, y, scale)
            n_total += len(y)
            for k, sign in enumerate(units.sign):
                c = units.bn[k].num_features
                chunk = max(1, min(c, _CHUNK_ELEMS // max(1, x[0].numel() * len(x) * 8)))
                per = {e: [] for e in ests}
                for j0 in range(0, c, chunk):
                    cols = torch.arange(j0, min(c, j0 + chunk), device=dev)
                    xr = x.repeat(len(cols), *([1] * (x.dim() - 1)))

                    def edit(name, v, sign=sign, cols=cols):
                        if name not in sign:  # every sign node reading the unit's BN
                            return v
                        v = v.view(len(cols), -1, *v.shape[1:]).clone()
                        v[torch.arange(len(cols)), :, cols] *= -1
                        return v.view(-1, *v.shape[2:])

                    zr, _ = model.run(xr, edit=edit)
                    zj = zr.view(len(cols), len(x), -1).permute(1, 2, 0)  # (B, classes, J)
                    pj = _argmax1(zj)
                    for e in ests:
                        per[e].append(estimators.get(e).contribution(zj, pj, clean))
                for e in ests:
                    cb = torch.cat(per[e], 1)
                    contrib[e, k].add(cb)
                    sums[e, k] = cb.sum(0) if (e, k) not in sums else sums[e, k] + cb.sum(0)
    stats = {key: c.result() for key, c in contrib.items()}
    frames = []
    for e in ests:
        se_l, cov_l = _jackknife(torch.stack([stats[e, k][2] for k in range(len(units.sign))]))
        for k in range(len(units.sign)):
            se, bias, _ = stats[e, k]
            frames.append(pd.DataFrame({
                "layer": units.names[k], "layer_index": units.index[k],
                "neuron": range(len(se)), "importance": (sums[e, k] / n_total).cpu().numpy(),
                "estimator": e, "importance_se": se.numpy(), "bias": bias.numpy(),
                "n_samples": n_total, "vu_se": float(se_l[k]), "vu_netcov": float(cov_l[k]),
                "vu_layers": len(units.sign)}))
    return schema.validate(pd.concat(frames, ignore_index=True), "importance",
                           what="the importance table")


def importance_variance(imp: pd.DataFrame) -> pd.DataFrame:
    """Inter-neuron importance variance per layer and for the network, with its sampling noise.

    Per (estimator, layer), over its ``J`` neurons ``j``::

        variance = Var_j(I_j) = mean_j (I_j - mean I)^2      (plug-in, population variance)
        cv       = sqrt(variance) / |mean_j I_j|              (scale-free; nan if mean is 0)

    also ``mean``, ``std``, ``n_neurons``. ``value`` repeats ``variance``.

    **Sampling noise.** ``I_j = mean_n c_nj`` over ``N`` images, and the neurons of a layer
    are measured on the same images, so the estimation errors ``e = I - mu`` have covariance
    ``Sigma / N`` (``Sigma``: ``J x J`` covariance of the per-sample contributions ``c_n.``).
    With ``P = 1 - 11'/J`` the plug-in is ``|P I|^2 / J``, hence

        E[variance] = V + (1/N) (tr Sigma / J - 1' Sigma 1 / J^2),   V = mean_j (mu_j - mean mu)^2,

    upward biased by the noise. ``importance`` stores per neuron
    ``bias_j = (S_jj - mean_k S_jk) / N`` with ``S`` the unbiased (``1/(N-1)``) sample
    covariance of ``c_n.``; ``E[S] = Sigma``, so ``mean_j bias_j`` is an unbiased estimate of
    the bias (it uses the covariance across neurons, not ``mean_j se_j^2``), and

        bias               = mean_j bias_j
        variance_unbiased  = variance - bias                  (unbiased for V; may be < 0)
        noise_share        = clip(bias / variance, 0, 1)      (share of the plug-in that is noise)
        variance_unbiased_se = delete-a-group jackknife over image groups (``vu_se``)

    The row ``layer == "network"`` holds the mean over the table's hidden layers of
    ``variance``, ``cv``, ``mean``, ``std``, ``bias`` and ``variance_unbiased``;
    ``noise_share = clip(1 - variance_unbiased / variance)``; its
    ``variance_unbiased_se = sqrt(mean_l vu_netcov_l)`` is the jackknife over the same image
    groups for all layers, so it accounts for the layers sharing images (nan when the table
    holds a different set of layers than ``importance`` measured together, ``vu_layers``).
    Tables without these columns (older CSVs) give nan in the new columns. A ``model``
    column, if present, is grouped by.
    """
    need = {"layer", "layer_index", "importance"}
    if need - set(imp.columns):
        raise InvalidArgument(f"importance table lacks {sorted(need - set(imp.columns))}; pass "
                         "metrics.importance(...)")
    imp = imp if "estimator" in imp.columns else imp.assign(estimator="accuracy")
    keys = [k for k in ("model",) if k in imp.columns] + ["estimator"]
    has = {c: c in imp.columns for c in ("bias", "vu_se", "vu_netcov", "vu_layers")}
    rows = []
    for gkey, g in imp.groupby([*keys, "layer_index"], sort=True):
        v = g["importance"].to_numpy(dtype=float)
        mean, var = float(v.mean()), float(v.var())
        row = dict(zip([*keys, "layer_index"], gkey, strict=True))
        row.update(layer=g["layer"].iloc[0], n_neurons=len(v), mean=mean, std=math.sqrt(var),
                   variance=var, cv=math.sqrt(var) / abs(mean) if mean != 0 else math.nan)
        bias = float(g["bias"].mean()) if has["bias"] else math.nan
        row.update(bias=bias, variance_unbiased=var - bias,
                   variance_unbiased_se=float(g["vu_se"].iloc[0]) if has["vu_se"] else math.nan,
                   _netcov=float(g["vu_netcov"].iloc[0]) if has["vu_netcov"] else math.nan,
                   _layers=int(g["vu_layers"].iloc[0]) if has["vu_layers"] else -1)
        rows.append(row)
    per = pd.DataFrame(rows)
    nets = []
    for gkey, g in per.groupby(keys, sort=True):
        gkey = gkey if isinstance(gkey, tuple) else (gkey,)
        row = dict(zip(keys, gkey, strict=True))
        same = bool((g["_layers"] == len(g)).all())
        row.update(layer="network", layer_index=-1, n_neurons=int(g["n_neurons"].sum()),
                   **{c: g[c].mean() for c in ("mean", "std", "variance", "cv", "bias",
                                               "variance_unbiased")},
                   variance_unbiased_se=(math.sqrt(max(0.0, float(g["_netcov"].mean())))
                                         if same else math.nan))
        nets.append(row)
    out = pd.concat([per, pd.DataFrame(nets)], ignore_index=True)
    out["value"] = out["variance"]
    with np.errstate(divide="ignore", invalid="ignore"):
        share = 1.0 - out["variance_unbiased"].to_numpy() / out["variance"].to_numpy()
    out["noise_share"] = np.clip(share, 0.0, 1.0)
    out = out[[*keys, "layer", "layer_index", "n_neurons", "mean", "std", "variance", "cv",
               "value", "bias", "variance_unbiased", "variance_unbiased_se", "noise_share"]]
    return schema.validate(out, "importance_variance", what="the importance variance table")


def required_samples(imp: pd.DataFrame, rel_error: float = 0.1) -> pd.DataFrame:
    """How many images the importance metric needs for a target relative standard error.

    From the per-sample variances measured on ``N = n_samples`` images
    (``S_jj = N se_j^2``), per neuron (relative error of ``I_j``)::

        N_j = S_jj / (rel_error^2 I_j^2)                         (inf if I_j = 0)

    and per layer and network (relative error of ``variance_unbiased``). To leading orders
    (Gaussian mean vector, diagonal ``Sigma``, ``d_j = I_j - mean I``)

        Var(variance_unbiased)(N') ~ a / N' + b / N'^2,
        a = 4 sum_j d_j^2 S_jj / J^2,   b = 2 sum_j S_jj^2 / J^2,

    (the signal term falls like ``1/N'``, the noise term like ``1/N'^2``); the level is
    calibrated to the measured jackknife ``variance_unbiased_se`` at ``N`` (``k = se^2 /
    (a/N + b/N^2)``, which carries the correlation between neurons), and ``N'`` solves
    ``k (a/N' + b/N'^2) = (rel_error V_u)^2``:

        N' = (a + sqrt(a^2 + 4 b T)) / (2 T),   T = (rel_error V_u)^2 / k.

    ``inf`` where ``variance_unbiased <= 0`` (no detectable spread to measure).

    Returns:
        One row per (``model``,) estimator and layer (``"network"``: the mean over layers,
        using its jackknife se): ``estimator, layer, layer_index, n_samples,
        variance_unbiased, variance_unbiased_se, required_n, neuron_required_n_median``
        (median over the layer's neurons of ``N_j``).

    Raises:
        InvalidArgument: ``rel_error`` not in (0, inf) or the table lacks ``importance_se`` /
            ``n_samples`` (pass ``metrics.importance(...)``).
    """
    if not (isinstance(rel_error, (int, float)) and 0 < rel_error < math.inf):
        raise InvalidArgument(f"rel_error must be a positive number, got {rel_error!r}")
    need = {"importance", "importance_se", "n_samples", "bias", "vu_se"}
    if need - set(imp.columns):
        raise InvalidArgument(f"importance table lacks {sorted(need - set(imp.columns))}; pass "
                              "metrics.importance(...) (tables without standard errors "
                              "cannot say how many images are needed)")
    imp = imp if "estimator" in imp.columns else imp.assign(estimator="accuracy")
    keys = [k for k in ("model",) if k in imp.columns] + ["estimator"]
    iv = importance_variance(imp)
    r2 = float(rel_error) ** 2

    def _solve(a: float, b: float, k: float, vu: float) -> float:
        if not (vu > 0 and k > 0 and math.isfinite(k)):
            return math.inf
        t = r2 * vu * vu / k
        return (a + math.sqrt(a * a + 4 * b * t)) / (2 * t)

    rows = []
    for gkey, g in imp.groupby(keys, sort=True):
        gkey = gkey if isinstance(gkey, tuple) else (gkey,)
        base = dict(zip(keys, gkey, strict=True))
        sel = iv.loc[(iv[keys] == pd.Series(base)).all(axis=1)].set_index("layer_index")
        abk = []
        for l, gl in g.groupby("layer_index", sort=True):
            n = float(gl["n_samples"].iloc[0])
            i_j = gl["importance"].to_numpy(dtype=float)
            s_jj = n * gl["importance_se"].to_numpy(dtype=float) ** 2
            j = len(i_j)
            a = 4 * float(((i_j - i_j.mean()) ** 2 * s_jj).sum()) / j**2
            b = 2 * float((s_jj**2).sum()) / j**2
            vu, se = sel.loc[l, "variance_unbiased"], sel.loc[l, "variance_unbiased_se"]
            k = se**2 / (a / n + b / n**2) if a + b > 0 else math.nan
            with np.errstate(divide="ignore", invalid="ignore"):
                n_j = s_jj / (r2 * i_j**2)
            n_j[(s_jj == 0) & (i_j != 0)] = 1.0
            abk.append((a, b, n))
            rows.append({**base, "layer": gl["layer"].iloc[0], "layer_index": l,
                         "n_samples": int(n), "variance_unbiased": vu,
                         "variance_unbiased_se": se, "required_n": _solve(a, b, k, vu),
                         "neuron_required_n_median": float(np.median(n_j))})
        # network: mean over L layers sharing images; a, b of the mean are sums / L^2
        n = abk[0][2]
        a = sum(x[0] for x in abk) / len(abk) ** 2
        b = sum(x[1] for x in abk) / len(abk) ** 2
        vu, se = sel.loc[-1, "variance_unbiased"], sel.loc[-1, "variance_unbiased_se"]
        k = se**2 / (a / n + b / n**2) if a + b > 0 else math.nan
        rows.append({**base, "layer": "network", "layer_index": -1, "n_samples": int(n),
                     "variance_unbiased": vu, "variance_unbiased_se": se,
                     "required_n": _solve(a, b, k, vu),
                     "neuron_required_n_median": float(np.median(
                         [r["neuron_required_n_median"] for r in rows[-len(abk):]]))})
    return pd.DataFrame(rows)
