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
  corrupted by fault map k at BER p)`` (``ber``, ``n_maps``, ``seed``)

The loss form depends on the scale of the logits, which bit flip training changes: compare
estimators, do not assume they agree. Several exact estimators can be asked for at once
(``estimator=["accuracy", "loss", "flips"]``) and cost one pass.

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

   one ``(N C_out, K) x (K, J)`` matrix product for all neurons of the layer. All
   quantities are integers, exact in float32, and the folded comparator equals the float BN
   bit for bit, so the result equals the per-neuron forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import BNNDataset
from ..errors import flip_binary, rates
from ..exceptions import InvalidArgument
from ..layers import BinaryConv2d, apply_folded
from ._common import (
    LayerInfo,
    binary_weight,
    blocks_of,
    check_data,
    device_of,
    eval_mode,
    hidden_layers,
    run_block,
)

__all__ = ["importance", "importance_variance", "negation_logits", "ESTIMATORS"]

ESTIMATORS = ("accuracy", "loss", "flips", "taylor", "mc")
_EXACT = ("accuracy", "loss", "flips")

#: Elements of the largest per-chunk tensor (float32): bounds memory at ~64 MiB per tensor.
_CHUNK_ELEMS = 2**24


def _forward_cache(blocks: Sequence[nn.Module], x: Tensor, names: dict[int, str]):
    """Clean forward: block inputs, pre-activations, outputs; returns (xs, as_, hs)."""
    xs, as_, hs = [], [], []
    for k, b in enumerate(blocks):
        xs.append(x)
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
    the strided class axis: a running comparison over the ``C`` contiguous ``(B, J)`` slices."""
    best = z[:, 0].clone()
    idx = torch.zeros(best.shape, dtype=torch.int64, device=z.device)
    for c in range(1, z.shape[1]):
        better = z[:, c] > best
        best = torch.where(better, z[:, c], best)
        idx.masked_fill_(better, c)
    return idx


def _pm_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for matrices with entries in {-1, 0, +1}: exact int8 GEMM on CPU.

    Uses ``torch._int_mm`` (int8 x int8 -> int32, VNNI) where the shapes allow it, else the
    float32 product (exact for sums below 2^24). Returns float32.
    """
    if (a.device.type == "cpu" and a.shape[0] > 16 and a.shape[1] % 8 == 0
            and b.shape[1] % 8 == 0 and hasattr(torch, "_int_mm")):
        try:
            return torch._int_mm(a.to(torch.int8), b.to(torch.int8)).to(torch.float32)
        except RuntimeError:  # pragma: no cover - kernel not built for this CPU
            pass
    return a @ b


def _near_threshold_logits(blocks, l: int, cache, u: Tensor, cols: Tensor,
                           info_next: LayerInfo, w1: Tensor, w2: Tensor) -> Tensor:
    """Case 2 of the module doc: logits ``(B, C_out, J)`` for ``u = delta / 2`` ``(B, J)``."""
    xs, as_, hs = cache
    a1, h1 = as_[l + 1], hs[l + 1]
    d = info_next.folded.direction.to(a1.device, a1.dtype)
    sigma = -h1 * d  # (B, K), 0 for dead neurons
    e = (apply_folded(a1 + 2 * sigma, info_next.folded) != h1).to(a1.dtype)
    half_d = (-h1 * e)[:, None, :] * w2[None]  # D / 2: (B, C_out, K), entries in {-1, 0, 1}
    base = as_[l + 2] + half_d.sum(2)  # a_out + 1/2 sum_k D  (used where |u| = 1)
    m = _pm_matmul((half_d * sigma[:, None, :]).reshape(-1, half_d.shape[2]), w1[:, cols])
    m = m.view(half_d.shape[0], half_d.shape[1], -1)  # 1/2 sum_k D sigma W: (B, C_out, J)
    absu = u.abs()
    if bool((absu == 1).all()):
        a2 = m.mul_(u[:, None, :]).add_(base[:, :, None])
    else:
        a2 = (m.mul_(u[:, None, :]).add_(as_[l + 2][:, :, None])
              .add_(absu[:, None, :] * (base - as_[l + 2])[:, :, None]))
    return blocks[l + 2].post(a2)


def _chunk_size(blocks, l: int, cache, n_cols: int, fast: bool) -> int:
    xs, as_, hs = cache
    b = as_[l].shape[0]
    if fast:
        per = as_[-1][0].numel() * 2
    else:
        per = sum(a[0].numel() + h[0].numel() for a, h in zip(as_[l + 1:], hs[l + 1:],
                                                              strict=True))
    return max(1, min(n_cols, _CHUNK_ELEMS // max(1, b * per)))


def negation_logits(model: nn.Module, x: Tensor, layer_index: int,
                    delta: Tensor | None = None, *, cols: Tensor | None = None,
                    cache=None, infos: dict[int, LayerInfo] | None = None):
    """Logits with each channel of block ``layer_index``'s output perturbed alone.

    Yields ``(cols_chunk, z')`` with ``z'`` of shape ``(B, C_out, J)``: ``z'[:, :, i]`` are
    the class scores when channel ``cols_chunk[i]`` of ``h_l`` is replaced by
    ``h_l + delta[:, cols_chunk[i]]`` (default ``delta = -2 h_l``: negation), all other
    channels clean. Exact (equal to the per-neuron forward pass); see the module doc.
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
    w1 = binary_weight(blocks[l + 1].layer)
    w2 = binary_weight(blocks[l + 2].layer) if case2 else None
    for start in range(0, len(cols), step):
        cc = cols[start : start + step]
        dj = delta[:, cc]
        if case2:
            z = _near_threshold_logits(blocks, l, cache, dj / 2, cc, infos[l + 1], w1, w2)
        elif l + 1 == n_blocks - 1 and dj.dim() == 2:  # rank-1 on the class scores
            a1 = (w1[:, cc][None] * dj[:, None, :]).add_(as_[l + 1][:, :, None])
            z = blocks[l + 1].post(a1)
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


def _taylor(blocks, infos, x, y, names) -> dict[int, Tensor]:
    """Per-layer ``sum_n sum_pos -2 h_nj dCE_n/dh_nj`` ``(C_l,)`` for one batch."""
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
        out[info.index] = t.sum([0, *range(2, t.dim())]).double()
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
) -> pd.DataFrame:
    """Importance of every hidden neuron: one row per (layer, neuron, estimator).

    See the module doc for the estimators' formulas. Exact estimators negate each neuron's
    binary output on every sample; ``"mc"`` corrupts only neuron ``j``'s incoming weights
    with ``n_maps`` persistent fault maps at ``ber`` (map ``k`` of block ``l`` drawn from
    ``child_seeds(seed, ...)``; the same maps for every batch and every neuron of the layer).

    Args:
        model: a trained :class:`~bnn_tol.models.BNN`.
        data: samples to average over (e.g. the test set).
        estimator: one name of :data:`ESTIMATORS` or a list of them.
        layers: hidden block indices (default all hidden blocks).
        batch_size: samples per clean forward pass.
        ber, n_maps, seed: the ``"mc"`` estimator's BER ``p`` or ``(p01, p10)``, number of
            fault maps and seed.

    Returns:
        DataFrame ``layer, layer_index, neuron, importance, estimator``.

    Raises:
        ValueError: unknown estimator, empty dataset, wrong input shape, a hidden layer
            without BatchNorm (naming the layer).
    """
    from ..train import child_seeds

    ests = [estimator] if isinstance(estimator, str) else list(estimator)
    bad = [e for e in ests if e not in ESTIMATORS]
    if bad or not ests:
        raise InvalidArgument(f"unknown importance estimator(s) {bad or ests}; choose from "
                         f"{', '.join(ESTIMATORS)}")
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
    exact = [e for e in ests if e in _EXACT]
    sums = {(e, i.index): None for e in exact for i in infos}
    tay = {i.index: None for i in infos} if "taylor" in ests else {}
    mc = {i.index: None for i in infos} if "mc" in ests else {}
    clean_correct = 0.0
    clean_loss = 0.0
    flipped_w: dict[tuple[int, int], Tensor] = {}
    if mc:
        p01, p10 = rates(ber)
        if n_maps < 1:
            raise InvalidArgument(f"n_maps must be >= 1, got {n_maps}")
        seeds = child_seeds(seed, len(blocks) * n_maps)
        for info in infos:
            wb = binary_weight(info.block.layer)
            for k in range(n_maps):
                g = torch.Generator(device=wb.device).manual_seed(
                    seeds[info.index * n_maps + k])
                flipped_w[info.index, k] = flip_binary(wb, p01, p10, generator=g)[0]

    def _acc(store, key, val):
        store[key] = val if store[key] is None else store[key] + val

    with eval_mode(model), torch.no_grad():
        for x, y in data.batches(batch_size, device=dev):
            cache = _forward_cache(blocks, x, names)
            z = cache[2][-1]
            pred = z.argmax(1)
            ok = (pred == y).double()
            ce = F.cross_entropy(z, y, reduction="none").double()
            clean_correct += float(ok.sum())
            clean_loss += float(ce.sum())
            n_total += len(y)
            for info in infos:
                l = info.index
                if exact:
                    parts = {e: [] for e in exact}
                    for _, zj in negation_logits(model, x, l, cache=cache, infos=by_index):
                        pj = _argmax1(zj)
                        if "accuracy" in parts:
                            parts["accuracy"].append((ok[:, None] - (pj == y[:, None]).double())
                                                     .sum(0))
                        if "flips" in parts:
                            parts["flips"].append((pj != pred[:, None]).double().sum(0))
                        if "loss" in parts:
                            cej = F.cross_entropy(zj, y[:, None].expand(pj.shape),
                                                  reduction="none").double()
                            parts["loss"].append((cej - ce[:, None]).sum(0))
                    for e in exact:
                        _acc(sums, (e, l), torch.cat(parts[e]))
                if mc:
                    h = cache[2][l]
                    tot = None
                    for k in range(n_maps):
                        a_f = _preact_with(info.block, cache[0][l], flipped_w[l, k])
                        delta = info.block.post(a_f) - h
                        drop = torch.cat([
                            (ok[:, None] - (_argmax1(zj) == y[:, None]).double()).sum(0)
                            for _, zj in negation_logits(model, x, l, delta, cache=cache,
                                                         infos=by_index)])
                        tot = drop if tot is None else tot + drop
                    _acc(mc, l, tot / n_maps)
            if tay:
                for l, v in _taylor(blocks, infos, x, y, names).items():
                    _acc(tay, l, v)
    frames = []
    for info in infos:
        l = info.index
        for e in ests:
            if e in _EXACT:
                v = sums[(e, l)]
            elif e == "taylor":
                v = tay[l]
            else:
                v = mc[l]
            v = (v / n_total).cpu().numpy()
            frames.append(pd.DataFrame({"layer": info.name, "layer_index": l,
                                        "neuron": range(len(v)), "importance": v,
                                        "estimator": e}))
    return pd.concat(frames, ignore_index=True)


def importance_variance(imp: pd.DataFrame) -> pd.DataFrame:
    """Inter-neuron importance variance per layer and for the network.

    Per (estimator, layer), over its neurons ``j``::

        variance = Var_j(I_j) = mean_j (I_j - mean I)^2      (population variance)
        cv       = sqrt(variance) / |mean_j I_j|              (scale-free; nan if mean is 0)

    also ``mean``, ``std``, ``n_neurons``. The row ``layer == "network"`` holds the mean
    over hidden layers of ``variance``, ``cv``, ``mean`` and ``std``. ``value`` repeats
    ``variance``. A ``model`` column, if present, is grouped by.
    """
    need = {"layer", "layer_index", "importance"}
    if need - set(imp.columns):
        raise InvalidArgument(f"importance table lacks {sorted(need - set(imp.columns))}; pass "
                         "metrics.importance(...)")
    imp = imp if "estimator" in imp.columns else imp.assign(estimator="accuracy")
    keys = [k for k in ("model",) if k in imp.columns] + ["estimator"]
    rows = []
    for gkey, g in imp.groupby([*keys, "layer_index"], sort=True):
        v = g["importance"].to_numpy(dtype=float)
        mean, var = float(v.mean()), float(v.var())
        row = dict(zip([*keys, "layer_index"], gkey, strict=True))
        row.update(layer=g["layer"].iloc[0], n_neurons=len(v), mean=mean, std=math.sqrt(var),
                   variance=var, cv=math.sqrt(var) / abs(mean) if mean != 0 else math.nan)
        rows.append(row)
    per = pd.DataFrame(rows)
    nets = []
    for gkey, g in per.groupby(keys, sort=True):
        gkey = gkey if isinstance(gkey, tuple) else (gkey,)
        row = dict(zip(keys, gkey, strict=True))
        row.update(layer="network", layer_index=-1, n_neurons=int(g["n_neurons"].sum()),
                   **{c: g[c].mean() for c in ("mean", "std", "variance", "cv")})
        nets.append(row)
    out = pd.concat([per, pd.DataFrame(nets)], ignore_index=True)
    out["value"] = out["variance"]
    return out[[*keys, "layer", "layer_index", "n_neurons", "mean", "std", "variance", "cv",
                "value"]]
