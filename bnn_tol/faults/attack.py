"""Worst-case (adversarial) bit errors: the ``N`` stored bits whose flips hurt most.

Random bit errors at a rate ask how a network fares on an average chip; an attacker (or an
unlucky chip) flips the *worst* bits. :func:`attack` finds them greedily, guided by the
gradient (the bit-flip attack of Rakin et al., in the stored bits of Stutz et al.'s m-bit
networks and in the sign bits of BNNs); :func:`random_baseline` flips ``N`` random stored bits
for comparison. Both return an :class:`AttackResult`: the flips in the library's currency (a
flip set ``{layer name: int64 indices into layer.stored_bits()}``, in flip order) and tidy
tables (``attack`` and ``attack_flips`` of :mod:`bnn_tol.schema`).

**First-order estimate.** Let ``L`` be the mean cross-entropy on the attack images and
``g_j = dL/dw_j`` its gradient with respect to the *deployed* weight ``w_j`` (the weight the
layer computes with, current flips included). Stored bit ``i = j m + b`` is bit ``b`` of weight
``j``'s code ``c_j`` (:mod:`bnn_tol.core.codec`); flipping it changes the weight by

    dw_i = decode(c_j XOR 2^b) - decode(c_j)

and the loss, to first order, by

    dL_i ~ g_j dw_i.

For a BNN sign bit (``m = 1``, ``w_b = 2 c - 1``) that is ``dw = -2 w_b`` and
``dL ~ -2 w_b dL/dw_b``; for an m-bit code it is the bit's signed place value times the step,
``+-2^b Delta`` (the MSB of a two's-complement code: ``-+2^(m-1) Delta``), whatever the code's
other bits (the difference is computed from the codes, so saturation and the sign bit are
exact). Bits already flipped are not candidates again.

**Greedy with re-evaluation** (:func:`attack`), per round ``k = 1 .. N``: ``L`` is taken over
the attack images the network still classifies correctly (all of them once none is left: the
cross-entropy of a misclassified image grows without bound while its prediction stays wrong,
so it would attract the flips); one backward pass gives ``g`` at the current flips; the
``candidates`` stored bits of largest ``dL_i`` are each evaluated exactly with that bit flipped
too, and the one that leaves the fewest attack images correct is flipped (ties: the larger
``L``, then the better first-order rank). Then the accuracy and loss on the evaluation images
are recorded, through :func:`bnn_tol.faults.apply` -- so ``apply(model, result.prefix(k))``
replays row ``k`` bit for bit.

Deterministic given ``seed`` (it draws the attack images, ``data.subset(attack_size,
seed=derive(seed, 0))``); :func:`random_baseline` draws its bits from ``derive(seed, 1)``.
No global random state is read or written; the model's weights are never written.

>>> res = attack(model, test, 10)                       # doctest: +SKIP
>>> res.curve[["n_flips", "accuracy"]]                  # doctest: +SKIP
>>> with apply(model, res.prefix(5)):                   # doctest: +SKIP
...     accuracy(model, test) == res.curve.accuracy[5]
True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnn_tol import schema
from bnn_tol.core.compiled import eval_mode, stored_layers
from bnn_tol.core.inference import check_batch_size
from bnn_tol.core.layers import BinaryLayer
from bnn_tol.data import BNNDataset, grid_of
from bnn_tol.exceptions import InvalidArgument, require_int
from bnn_tol.faults.apply import FixedFlips, FlipSet, apply, attach, negate
from bnn_tol.faults.maps import select_layers
from bnn_tol.faults.seeds import derive

__all__ = ["AttackResult", "attack", "random_baseline", "curves", "bit_scores",
           "deployed_gradient", "one_shot"]

_CURVE = ["method", "attack_seed", "n_flips", "accuracy", "loss", "attack_loss"]
_ORDER = ["method", "attack_seed", "n_flips", "layer", "bit_index", "weight_index", "bit",
          "estimate", "attack_loss"]


@dataclass
class AttackResult:
    """The flips of an attack (or of the random baseline) and what they did.

    Attributes:
        order: ``[(layer name, stored-bit index), ...]``, the flips in the order made.
        curve: one row per ``n_flips = 0 .. N`` (table ``attack``): ``method, attack_seed,
            n_flips, accuracy, loss`` (on the evaluation images after the first ``n_flips``
            flips), ``attack_loss`` (mean cross-entropy on the attack images; NaN for the
            random baseline, which has none).
        flips_table: one row per flip (table ``attack_flips``): ``method, attack_seed,
            n_flips, layer, bit_index`` (into ``layer.stored_bits()``), ``weight_index``,
            ``bit`` (``bit_index = weight_index m + bit``), ``estimate`` (the first-order loss
            increase ``g dw`` when it was chosen; NaN for random), ``attack_loss``.
    """

    order: list[tuple[str, int]]
    curve: pd.DataFrame
    flips_table: pd.DataFrame

    def prefix(self, k: int) -> FlipSet:
        """The flip set of the first ``k`` flips (``0 <= k <= N``), each layer's indices in
        flip order (layers without a flip are absent)."""
        k = require_int(k, "k", minimum=0)
        if k > len(self.order):
            raise InvalidArgument(f"k must be <= {len(self.order)} (the flips made), got {k}")
        return _flip_set(self.order[:k])

    @property
    def flips(self) -> FlipSet:
        """All ``N`` flips as a flip set (:meth:`prefix` of ``N``)."""
        return _flip_set(self.order)


def _flip_set(order: Sequence[tuple[str, int]]) -> FlipSet:
    out: dict[str, list[int]] = {}
    for name, i in order:
        out.setdefault(name, []).append(int(i))
    return {n: torch.tensor(v, dtype=torch.int64) for n, v in out.items()}


class _Probe(FixedFlips):
    """:class:`FixedFlips` whose sign-coded weight is a fresh leaf (``leaf``), so the gradient
    with respect to the deployed +-1 weight is not masked by the STE of the latent weight."""

    leaf: Tensor | None = None

    def __call__(self, wb: Tensor) -> Tensor:  # noqa: D102
        self.leaf = negate(wb.detach(), self.idx).detach().requires_grad_(True)
        return self.leaf


def deployed_gradient(model: nn.Module, data: BNNDataset, flips: Mapping[str, Tensor],
                      layers: Mapping[str, BinaryLayer], *,
                      batch_size: int = 2048) -> tuple[dict[str, Tensor], float]:
    """``g = dL/dw`` for the deployed weights ``w`` of ``layers`` with ``flips`` applied, and
    ``L``, the mean cross-entropy over ``data`` (eval mode; float64 sums).

    Sign codec: the gradient of the +-1 weight itself (a leaf). Fixed point: the gradient
    reaching the latent weight, which equals ``dL/dw`` exactly (quantization and flips pass
    the gradient straight through, :meth:`~bnn_tol.core.layers.BinaryLayer.deployed_weight`).

    Returns:
        ``({layer name: float32 tensor of the weight's shape}, L)``.
    """
    every = stored_layers(model)
    probes = {n: _Probe(flips.get(n, torch.empty(0, dtype=torch.int64))) for n in every}
    grads = {n: torch.zeros_like(lay.weight, dtype=torch.float64) for n, lay in layers.items()}
    total = 0.0
    saved = {n: lay.weight.requires_grad for n, lay in layers.items()}
    dev = next(model.parameters()).device
    try:
        for lay in layers.values():
            lay.weight.requires_grad_(True)
        with attach(every, probes), eval_mode(model), torch.enable_grad():
            for x, y in data.batches(batch_size, device=dev, grid=grid_of(model)):
                loss = F.cross_entropy(model(x), y, reduction="sum") / len(data)
                wrt = [probes[n].leaf if lay.codec.is_sign else lay.weight
                       for n, lay in layers.items()]
                for n, g in zip(layers, torch.autograd.grad(loss, wrt), strict=True):
                    grads[n] += g.double()
                total += float(loss.detach())
    finally:
        for n, lay in layers.items():
            lay.weight.requires_grad_(saved[n])
    return {n: g.float() for n, g in grads.items()}, total


@torch.no_grad()
def bit_scores(layer: BinaryLayer, grad: Tensor, flipped: Tensor | None = None) -> Tensor:
    """First-order loss increase of flipping each stored bit of ``layer``: float32
    ``(n_stored_bits,)``, entry ``j m + b`` = ``g_j (decode(c_j XOR 2^b) - decode(c_j))``
    with ``c`` the codes after the stored bits ``flipped`` (int64 indices) are flipped and
    ``g = grad`` (``dL/dw`` of the deployed weight, shape of ``layer.weight``).
    Already-flipped bits score ``-inf``.
    """
    codec, m = layer.codec, layer.codec.bits_per_weight
    codes = codec.encode(layer.weight.detach())
    if flipped is not None and flipped.numel():
        codes = codec.flip(codes, flipped)
    now = codec.decode(codes)
    delta = torch.stack([codec.decode(codes ^ (1 << b)) - now for b in range(m)], dim=-1)
    out = (delta * grad.to(delta.device, delta.dtype)[..., None]).reshape(-1)
    if flipped is not None and flipped.numel():
        out[flipped.to(out.device)] = -torch.inf
    return out


def _per_sample(model: nn.Module, data: BNNDataset, flips: FlipSet,
                batch_size: int) -> tuple[Tensor, Tensor]:
    """Per image of ``data`` with ``flips`` applied (eval mode): ``(correct`` bool ``(n,)``,
    cross-entropy float64 ``(n,))`` on CPU."""
    dev = next(model.parameters()).device
    correct, ce = [], []
    with apply(model, flips), eval_mode(model), torch.no_grad():
        for x, y in data.batches(batch_size, device=dev, grid=grid_of(model)):
            z = model(x)
            correct.append((z.argmax(1) == y).cpu())
            ce.append(F.cross_entropy(z, y, reduction="none").double().cpu())
    return torch.cat(correct), torch.cat(ce)


def _evaluate(model: nn.Module, data: BNNDataset, flips: FlipSet,
              batch_size: int) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` on ``data`` with ``flips`` applied: the predictions
    of :func:`bnn_tol.core.inference.predict` (the same batches, ``argmax_c z_c``)."""
    dev = next(model.parameters()).device
    correct, total = 0, 0.0
    with apply(model, flips), eval_mode(model), torch.no_grad():
        for x, y in data.batches(batch_size, device=dev, grid=grid_of(model)):
            z = model(x)
            correct += int((z.argmax(1).cpu() == y.cpu()).sum())
            total += float(F.cross_entropy(z, y, reduction="sum").double())
    return correct / len(data), total / len(data)


def _check(model, data, eval_data, n_bits, batch_size, seed, layers):
    n_bits = require_int(n_bits, "n_bits", minimum=0)
    seed = require_int(seed, "seed", minimum=0)
    batch_size = check_batch_size(batch_size)
    eval_data = data if eval_data is None else eval_data
    if len(data) == 0 or len(eval_data) == 0:
        raise InvalidArgument("cannot attack on an empty dataset")
    chosen = select_layers(model, layers)
    total = sum(lay.n_stored_bits for lay in chosen.values())
    if n_bits > total:
        raise InvalidArgument(f"n_bits must be <= {total}, the stored bits of the attacked "
                              f"layers, got {n_bits}")
    return n_bits, seed, batch_size, eval_data, chosen


def _tables(method: str, seed: int, curve_rows: list, order_rows: list) -> AttackResult:
    curve = pd.DataFrame(curve_rows, columns=_CURVE[2:])
    curve.insert(0, "attack_seed", seed)
    curve.insert(0, "method", method)
    table = pd.DataFrame(order_rows, columns=_ORDER[2:])
    table.insert(0, "attack_seed", seed)
    table.insert(0, "method", method)
    table = table.astype({"n_flips": "int64", "bit_index": "int64", "weight_index": "int64",
                          "bit": "int64", "estimate": "float64", "attack_loss": "float64"})
    order = [(str(r.layer), int(r.bit_index)) for r in table.itertuples()]
    return AttackResult(order, schema.validate(curve, "attack"),
                        schema.validate(table, "attack_flips"))


def attack(model: nn.Module, data: BNNDataset, n_bits: int, *,
           eval_data: BNNDataset | None = None, candidates: int = 8, attack_size: int = 512,
           layers: Sequence[str | int] | str | None = None, batch_size: int = 2048,
           seed: int = 0) -> AttackResult:
    """Greedy gradient-guided bit-flip attack: flip the ``n_bits`` stored bits that hurt most.

    Each round ranks every not yet flipped stored bit ``i`` by its first-order loss increase
    ``dL_i = g_j (decode(c_j XOR 2^b) - decode(c_j))`` (module docstring; BNN sign bits:
    ``-2 w_b dL/dw_b``; ``L`` the mean cross-entropy over the attack images still correct),
    evaluates the ``candidates`` best exactly on the attack images and flips the one that
    leaves the fewest of them correct (ties: the larger ``L``).

    Args:
        model: a network of binary / quantized layers (sign or fixed-point codecs, linear or
            conv); run in eval mode, its weights and faults are left as they were (a
            fixed-point codec's range is set from the weights, as by every forward pass).
        data: where the attack images come from: ``data.subset(attack_size,
            seed=derive(seed, 0))``.
        n_bits: ``N``, the flips to make (0 gives the clean row alone).
        eval_data: images the accuracy/loss after each flip is measured on (default: ``data``).
        candidates: bits evaluated exactly per round (1: pure gradient ranking).
        attack_size: attack images (all of ``data`` if it has fewer).
        layers: the attacked layers (:func:`bnn_tol.faults.select_layers`; default all).
        batch_size: images per forward pass (the default is that of
            :func:`bnn_tol.core.inference.accuracy`, so ``accuracy(model, eval_data)`` under
            ``apply(model, result.prefix(k))`` computes on the same batches).
        seed: seeds the attack images.

    Returns:
        :class:`AttackResult` with ``method = "attack"``.

    Raises:
        InvalidArgument: ``n_bits`` < 0 or above the attacked stored bits, ``candidates`` or
            ``attack_size`` < 1, an empty dataset, an unknown layer.
    """
    n_bits, seed, batch_size, eval_data, chosen = _check(model, data, eval_data, n_bits,
                                                         batch_size, seed, layers)
    candidates = require_int(candidates, "candidates", minimum=1)
    attack_size = require_int(attack_size, "attack_size", minimum=1)
    adata = data.subset(attack_size, seed=derive(seed, 0))
    names = list(chosen)
    sizes = torch.tensor([chosen[n].n_stored_bits for n in names])
    starts = torch.cumsum(sizes, 0) - sizes
    order: list[tuple[str, int]] = []
    acc, loss = _evaluate(model, eval_data, {}, batch_size)
    correct, ce = _per_sample(model, adata, {}, batch_size)
    curve = [(0, acc, loss, float(ce.mean()))]
    rows = []
    for k in range(1, n_bits + 1):
        flips = _flip_set(order)
        keep = correct if bool(correct.any()) else torch.ones_like(correct)
        target = BNNDataset(adata.images[keep], adata.labels[keep], name=adata.name,
                            split=adata.split, classes=adata.classes)
        grads, _ = deployed_gradient(model, target, flips, chosen, batch_size=batch_size)
        score = torch.cat([bit_scores(chosen[n], grads[n], flips.get(n)).cpu() for n in names])
        top = _top(score, min(candidates, _open(score)))
        best = None
        for gi in top.tolist():  # in first-order rank order: ties keep the better rank
            pos = int(torch.searchsorted(starts, gi, right=True)) - 1
            cand = (names[pos], gi - int(starts[pos]))
            c_ok, c_ce = _per_sample(model, adata, _flip_set([*order, cand]), batch_size)
            key = (-int(c_ok.sum()), float(c_ce[keep].mean()))
            if best is None or key > best[0]:
                best = (key, cand, float(score[gi]), c_ok, c_ce)
        _, (name, idx), estimate, correct, ce = best
        order.append((name, idx))
        m = chosen[name].codec.bits_per_weight
        rows.append((k, name, idx, idx // m, idx % m, estimate, float(ce.mean())))
        acc, loss = _evaluate(model, eval_data, _flip_set(order), batch_size)
        curve.append((k, acc, loss, float(ce.mean())))
    return _tables("attack", seed, curve, rows)


def _open(score: Tensor) -> int:
    """Candidates still open: entries of ``score`` that are not ``-inf`` (already flipped)."""
    return int((score > -torch.inf).sum())


def _top(score: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest entries of the 1-d ``score``, by score descending and
    index ascending among equal scores (one ``topk`` for the threshold, then exact ties by
    index: the same set and order whatever ``topk``'s own tie order)."""
    if k <= 0:
        return torch.empty(0, dtype=torch.int64)
    thr = torch.topk(score, k).values[-1]
    above = (score > thr).nonzero().reshape(-1)
    at = (score == thr).nonzero().reshape(-1)[: k - above.numel()]
    idx = torch.cat([above, at])
    return idx[torch.sort(score[idx], descending=True, stable=True).indices]


def random_baseline(model: nn.Module, data: BNNDataset, n_bits: int, *,
                    layers: Sequence[str | int] | str | None = None, batch_size: int = 2048,
                    seed: int = 0) -> AttackResult:
    """``n_bits`` stored bits drawn uniformly without replacement from all stored bits of the
    attacked ``layers`` (numpy ``default_rng(derive(seed, 1)).choice``), flipped in the drawn
    order; the accuracy/loss on ``data`` after each flip as :func:`attack` reports them.

    Returns:
        :class:`AttackResult` with ``method = "random"`` (``estimate``, ``attack_loss`` NaN).
    """
    n_bits, seed, batch_size, data, chosen = _check(model, data, None, n_bits, batch_size,
                                                    seed, layers)
    names = list(chosen)
    sizes = np.array([chosen[n].n_stored_bits for n in names], dtype=np.int64)
    starts = np.cumsum(sizes) - sizes
    drawn = np.random.default_rng(derive(seed, 1)).choice(int(sizes.sum()), n_bits,
                                                          replace=False)
    order: list[tuple[str, int]] = []
    acc, loss = _evaluate(model, data, {}, batch_size)
    curve, rows = [(0, acc, loss, np.nan)], []
    for k, gi in enumerate(drawn.tolist(), start=1):
        pos = int(np.searchsorted(starts, gi, side="right")) - 1
        name, idx = names[pos], gi - int(starts[pos])
        order.append((name, idx))
        m = chosen[name].codec.bits_per_weight
        rows.append((k, name, idx, idx // m, idx % m, np.nan, np.nan))
        acc, loss = _evaluate(model, data, _flip_set(order), batch_size)
        curve.append((k, acc, loss, np.nan))
    return _tables("random", seed, curve, rows)


def curves(models: Mapping[str, nn.Module], data: BNNDataset, n_bits: int, *,
           eval_data: BNNDataset | None = None, random_seeds: Sequence[int] = (0, 1, 2),
           seed: int = 0, **kwargs) -> pd.DataFrame:
    """Accuracy vs ``N`` under the attack and under random flips, for several networks (say
    normal, clipped, RandBET and flip-trained ones): the ``curve`` tables of :func:`attack`
    (``seed``, attack images from ``data``) and of :func:`random_baseline` (one per seed of
    ``random_seeds``, on ``eval_data``) with a ``model`` column in front, one table ``attack``.

    ``kwargs`` go to :func:`attack` (``candidates``, ``attack_size``, ``layers``, ...;
    ``layers`` and ``batch_size`` to the baseline too).

    >>> df = curves({"normal": a, "flip": b}, train, 20, eval_data=test)  # doctest: +SKIP
    >>> sns.lineplot(df, x="n_flips", y="accuracy", hue="model", style="method")  # doctest: +SKIP
    """
    eval_data = data if eval_data is None else eval_data
    base = {k: kwargs[k] for k in ("layers", "batch_size") if k in kwargs}
    parts = []
    for label, model in models.items():
        runs = [attack(model, data, n_bits, eval_data=eval_data, seed=seed, **kwargs)]
        runs += [random_baseline(model, eval_data, n_bits, seed=s, **base) for s in random_seeds]
        for r in runs:
            parts.append(r.curve.assign(model=str(label))[["model", *_CURVE]])
    return schema.validate(pd.concat(parts, ignore_index=True), "attack")


def one_shot(model: nn.Module, grads: Mapping[str, Tensor], n_bits: int) -> FlipSet:
    """The ``n_bits`` stored bits of largest first-order loss increase ``g dw``
    (:func:`bit_scores`) from the gradients ``grads`` (``{layer name: dL/dw}`` of the deployed
    weights) at once, without re-evaluation: the cheap attack of adversarial bit error training.
    Ties go to the lower (layer position, index). Bits with ``g dw <= 0`` are not flipped.
    """
    layers = stored_layers(model)
    names = [n for n in layers if n in grads]
    score = torch.cat([bit_scores(layers[n], grads[n]).cpu() for n in names])
    sizes = torch.tensor([layers[n].n_stored_bits for n in names])
    starts = torch.cumsum(sizes, 0) - sizes
    top = torch.sort(_top(score, min(int(n_bits), int((score > 0).sum())))).values
    pos = torch.searchsorted(starts, top, right=True) - 1
    return {n: (top[pos == p] - starts[p]) for p, n in enumerate(names) if bool((pos == p).any())}
