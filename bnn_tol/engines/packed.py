"""Exact packed-bit evaluation of a BNN: one bit per +-1 value, XNOR/popcount per dot product.

:class:`PackedNet` holds a BNN's stages as packed ``uint64`` words (:mod:`bnn_tol.kernels`) and
evaluates faulty copies of it without a float model:

- the first stage sees integer pixels ``q = p - offset``: a first linear layer runs as a
  float32 GEMM on ``q`` (every partial sum is an integer below ``2^24``, so any summation
  order is exact; float64 when the fan-in could reach ``2^24``) or, per fault map, as the
  clean ``W q`` plus the flipped weights' terms (:func:`kernels.fc_first_delta`; one map at
  rising BERs: only the bits that start to flip); a first conv as an int32 numba kernel on
  batch-last ``q`` that recomputes only the channels whose weights flip and keeps the clean
  pooled bits of the others (:func:`kernels.conv_first`); both compared with the folded
  integer threshold;
- every later stage sees +-1 bits: ``a = n - 2 popcount(w XOR x)``, compared with the folded
  threshold (hidden) or fed to the model's float BatchNorm and ``argmax`` (output), as
  ``model(x)`` does with the same exact ``a``: the predictions are bit-identical;
- max pooling of +-1 values is the OR of their bits.

Fault maps flip stored bits by the flat index of ``layer.weight`` (the index of
:meth:`bnn_tol.errors.FaultMap.flips`); :meth:`PackedNet.weights` turns those indices into
(word, bit) positions of the packed layout and XORs them into a copy of the clean words
(``O(flips)`` work per map, no repacking).

Memory. Cached once per data chunk of ``B`` images (for the whole test set, since the engine
reuses it for every map): the input of the first faulty stage -- for a first conv ``q`` int32
``4 C H W`` bytes per image and its clean pooled bits, for a first linear layer ``q`` (float32
and int32) and the clean ``W q`` (int32), ``4 (2 I + O)`` bytes per image, plus ``4 O`` per
image while a map's BERs chain; for a later start its packed words. Per
chunk while a map runs: each stage's packed output, ``H W ceil(C / 64) 8`` bytes per image
(64 times less than float32). Per map: one copy of the packed weights of each faulty layer
(``numel / 8`` bytes) and its flip indices. Nothing grows with the number of maps.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from bnn_tol.core import kernels
from bnn_tol.core.compiled import CompiledModel
from bnn_tol.engines import int8
from bnn_tol.engines.base import MEMORY_BUDGET, SignEngine, fp32_prefix, register_engine
from bnn_tol.faults.apply import negate

__all__ = ["PackedEngine", "PackedNet", "DELTA_FRACTION"]

_EXACT_F32 = 2**24


class _PackedLayout:
    """Where stage ``k``'s weights and activations live in the packed words (the geometry
    itself is the compiled stage's: :attr:`~bnn_tol.core.compiled.Stage.in_shape`,
    ``preact_shape``, ``kernel``, ``padding``).

    Attributes:
        conv: a convolution (activations ``(B, H, W, nw)``) or linear (``(B, nw)``).
        c_in: input channels (conv) or features (linear); ``nw``: words per input position.
        hw: input spatial size of a flatten-linear stage fed by a conv (``None`` otherwise):
            its weight columns ``c H W + h W + w`` are reordered to the channels-last ``(h, w,
            c)`` order of the packed activations.
        out_hw: output spatial size before pooling (conv).
    """

    def __init__(self, st, source: tuple[int, ...]) -> None:
        self.conv = st.conv
        self.pool = st.pool or 1
        self.o = st.preact_shape[0]
        self.hw: tuple[int, int] | None = None
        self.out_hw = None
        if self.conv:
            self.c_in = st.in_shape[0]
            self.kh, self.kw = st.kernel
            pad = st.padding
            pad = (pad, pad) if isinstance(pad, int) else tuple(pad)
            if pad[0] != pad[1] or self.kh != self.kw:
                raise ValueError("square kernels with equal padding only")
            self.pad = int(pad[0])
            self.in_hw = tuple(st.in_shape[1:])
            self.out_hw = tuple(st.preact_shape[1:])
        elif len(source) == 3 and st.index > 0:  # flatten after a conv stage
            c, h, wd = source
            self.hw, self.c_in = (h, wd), c
        else:
            self.c_in = st.in_shape[0]
        self.nw = -(-self.c_in // 64)

    def pack(self, wb: Tensor) -> np.ndarray:
        """+-1 weights in the layer's own shape -> packed words: conv transposed ``(K, O)``,
        taps ``(i, j, word)`` major; linear rows ``(O, K)`` of input words (channels-last order
        after a conv)."""
        w = wb.detach().cpu().numpy()
        if self.conv:
            rows = kernels.pack_rows(w.transpose(0, 2, 3, 1)).reshape(self.o, -1)
            return np.ascontiguousarray(rows.T)
        if self.hw is not None:
            h, wd = self.hw
            w = w.reshape(self.o, self.c_in, h, wd).transpose(0, 2, 3, 1)
            return np.ascontiguousarray(kernels.pack_rows(w).reshape(self.o, -1))
        return kernels.pack_rows(w)

    def windows(self, w_t: np.ndarray, rule: tuple | None) -> tuple | None:
        """A hidden conv's comparator on the padded popcount for the packed words ``w_t``
        (:func:`bnn_tol.core.kernels.conv_windows`); ``None`` for other layers."""
        if not self.conv or rule is None:
            return None
        counts = np.bitwise_count(w_t).astype(np.int64)
        tap_pop = counts.reshape(self.kh * self.kw, self.nw, self.o).sum(1)
        return kernels.conv_windows(self.in_hw, self.kh, self.pad, self.c_in, tap_pop, *rule)

    def positions(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flat indices into ``layer.weight`` -> (flat word index, bit) of :meth:`pack`."""
        if self.conv:
            o, rem = np.divmod(idx, self.c_in * self.kh * self.kw)
            c, rem = np.divmod(rem, self.kh * self.kw)
            r, s = np.divmod(rem, self.kw)
            k = (r * self.kw + s) * self.nw + c // 64
            return k * self.o + o, c % 64
        if self.hw is not None:
            n_pos = self.hw[0] * self.hw[1]
            o, f = np.divmod(idx, self.c_in * n_pos)
            c, p = np.divmod(f, n_pos)
            return (o * n_pos + p) * self.nw + c // 64, c % 64
        o, f = np.divmod(idx, self.c_in)
        return o * self.nw + f // 64, f % 64


_NO_FLIPS = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32))
_NO_STATE = np.zeros((0, 0), np.int32)
_NO_CHANNELS = np.zeros(0, np.int64)


class _Chain:
    """A data chunk's first-layer result kept from one flip set to the next
    (:meth:`PackedNet.weights_seq`): ``a`` the pre-activations of a first linear layer (int32
    ``(O, B)``, written in place), ``bits`` the pooled output bits of a first conv."""

    def __init__(self, a: np.ndarray) -> None:
        self.a, self.bits = a, None


def _stored(w: tuple) -> tuple:
    """A first-layer entry of :meth:`PackedNet.weights` that keeps its result in the chain:
    ``("delta", rows, cols, coef, chained, keep)`` or conv ``(w_t, chans, chained, keep)``
    (the clean conv ``(w_t,)`` too)."""
    if isinstance(w[0], str):
        return (*w[:-1], True)
    return (w[0], w[1] if len(w) > 1 else _NO_CHANNELS, len(w) > 2 and w[2], True)


def _difference(prev: np.ndarray, cur: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices (of ``n``) in ``cur`` and not in ``prev`` (gained, ascending), and in
    ``prev`` and not in ``cur`` (lost)."""
    mark = np.zeros(n, np.int8)
    mark[cur] += 1
    mark[prev] -= 1
    return np.flatnonzero(mark > 0), np.flatnonzero(mark < 0)


#: The first linear layer is updated from its clean output when ``flips * DELTA_FRACTION <
#: numel``: a flip costs ``B`` int32 updates (vectorized, ~0.06 ns per sample on 2 threads)
#: against ``numel`` MACs per sample of the float GEMM (~0.02 ns): measured crossovers p =
#: 0.22-0.25 on fc 784-512 and 784-2048 (10k images, 2 threads, AMD EPYC AVX-512, shared and
#: loaded machine; p = 0.03-0.07 before the delta kernel was vectorized).
DELTA_FRACTION = 5


class _FirstLinear:
    """A data chunk's input to a first linear stage: ``q`` float ``(B, I)``; for a hidden stage
    also ``q_t`` int32 ``(I, B)`` and the clean integer pre-activations ``a0_t`` int32
    ``(O, B)`` (``4 (I + O)`` bytes per image)."""

    def __init__(self, q: Tensor, q_t, a0_t) -> None:
        self.q, self.q_t, self.a0_t = q, q_t, a0_t
        self.shape = q.shape


class _FirstConv:
    """A data chunk's input to a first conv stage: ``q`` int32 batch-last ``(H, W, C, B)``
    and the stage's clean output bits after pooling ``(B, Ho, Wo, ceil(O / 64))``."""

    def __init__(self, q: np.ndarray, clean: np.ndarray | None) -> None:
        self.q, self.clean = q, clean
        self.shape = (q.shape[3], *q.shape[:3])


class PackedNet:
    """Packed-bit evaluation of compiled sign stages (:class:`bnn_tol.core.compiled.Stage`).

    Args:
        cm: the compiled BNN (its stages' ``wb``, ``folded``, geometry; its input grid).
        out_bn: an eval-mode copy of the output BatchNorm.
    """

    def __init__(self, cm: CompiledModel, out_bn) -> None:
        if not kernels.AVAILABLE:
            raise RuntimeError("the packed engine needs numba (pip install numba)")
        stages, self.grid = cm.stages, cm.input
        self.stages, self.out_bn = stages, out_bn
        self.layouts: list[_PackedLayout] = []
        self.rule: list[tuple[np.ndarray, np.ndarray] | None] = []
        for k, st in enumerate(stages):
            lay = _PackedLayout(st, stages[k - 1].out_shape if k else cm.in_shape)
            self.layouts.append(lay)
            if st.hidden:
                f = st.folded
                self.rule.append(kernels.comparator(f.direction.cpu().numpy(),
                                                    f.t.cpu().numpy(), f.const.cpu().numpy()))
            else:
                self.rule.append(None)
        fan_in = stages[0].wb[0].numel()
        # first conv: int32 numba kernel; first linear: float GEMM, exact below 2^24
        self.first_dtype = torch.float32 if fan_in * self.grid.q_max < _EXACT_F32 else torch.float64
        self.clean = [self._stage_weights(k, st.wb) for k, st in enumerate(stages)]
        self.w0 = stages[0].wb.reshape(-1).to(torch.int32).cpu().numpy()  # first layer, flat

    # -- weights ------------------------------------------------------------------------------

    def _stage_weights(self, k: int, wb: Tensor) -> tuple:
        """What stage ``k``'s kernel takes: first conv ``(w_t int32 (k k C, O),)``, first
        linear ``(wb float,)``, later stages ``(w uint64, ...)`` (:meth:`_PackedLayout.pack`,
        :meth:`_packed`)."""
        lay = self.layouts[k]
        if k == 0:
            if lay.conv:
                w = wb.permute(2, 3, 1, 0).reshape(-1, lay.o).to(torch.int32)
                return (np.ascontiguousarray(w.numpy()),)
            return ("dense", wb.to(self.first_dtype))
        return self._packed(k, lay.pack(wb))

    def _packed(self, k: int, words: np.ndarray) -> tuple:
        """Stage ``k``'s packed words and what its kernel takes beside them: a hidden conv's
        comparator windows (:meth:`_PackedLayout.windows`), a hidden linear layer's words
        transposed ``(nw, O)`` (:func:`kernels.fc_hidden`), nothing for the output layer."""
        lay = self.layouts[k]
        if lay.conv:
            return (words, lay.windows(words, self.rule[k]))
        if self.rule[k] is not None:
            return (words, np.ascontiguousarray(words.T))
        return (words, None)

    def weights(self, flips: dict[int, Tensor], *, first: bool = True) -> list[tuple]:
        """Per-stage kernel weights with the bits at ``flips[k]`` (flat ``layer.weight``
        indices) flipped: stage 0 from its flipped +-1 tensor (or, for a hidden first linear
        layer, the ``("delta", rows, cols, coef, chained, store)`` update of its clean output;
        left clean with ``first=False``), later stages by XOR of the packed words
        (``O(flips)``)."""
        ws = list(self.clean)
        if self._delta_first(0):  # clean first layer: its cached output, thresholded
            ws[0] = ("delta", *_NO_FLIPS, False, False)
        for k, idx in flips.items():
            if idx.numel() == 0 or (k == 0 and not first):
                continue
            if k == 0 and self._delta_first(idx.numel()):
                ws[0] = ("delta", *self._first_update(idx.cpu().numpy(), None), False, False)
            elif k == 0:
                ws[0] = self._stage_weights(0, negate(self.stages[0].wb, idx))
                if self.layouts[0].conv:  # the output channels whose weights flip
                    ws[0] += (self._channels(idx.cpu().numpy()), False, False)
            else:
                word, bit = self.layouts[k].positions(idx.cpu().numpy())
                w_t = self.clean[k][0].copy()
                kernels.flip_words(w_t, word.astype(np.int64), bit.astype(np.int64))
                ws[k] = self._packed(k, w_t)
        return ws

    def weights_seq(self, flips: list[dict[int, Tensor]]) -> list[list[tuple]]:
        """:meth:`weights` of flip sets evaluated one after the other on each data chunk
        (:meth:`run` with one :class:`_Chain` per chunk). The first layer chains from one set
        to the next (nested fault maps at rising BERs differ by the bits that start to flip):

        - a hidden first linear layer: set ``j``'s pre-activations ``a_j = a_{j-1} + sum -2 w_i
          q_i`` over the weights flipped in ``j`` and not in ``j - 1``, ``+2 w_i q_i`` over
          those flipped back, whenever that is fewer terms than from the clean output
          (``|F_{j-1} symmetric-difference F_j| < |F_j|``);
        - a hidden first conv: only the channels whose flips differ from set ``j - 1``'s are
          recomputed, the others keep set ``j - 1``'s pooled bits, whenever those are fewer
          than the channels with any flip (which the clean bits would need).

        Set ``j - 1`` then keeps its ``a`` (bits) in the chain. Integer sums and the same rule:
        the same bits as from the clean output."""
        seq: list[list[tuple]] = []
        prev = None  # the first layer's flips of the set whose a (bits) the chain holds
        first = self.stages[0].hidden and (self.layouts[0].conv or self._delta_first(0))
        for f in flips:
            if not first:  # an output first layer, or one the float GEMM computes
                seq.append(self.weights(f))
                continue
            idx = f.get(0)
            cur = np.zeros(0, np.int64) if idx is None else idx.cpu().numpy()
            chans = step = None  # chained: the conv's changed channels / the linear update
            if prev is not None and len(cur):
                gained, lost = _difference(prev, cur, len(self.w0))
                if self.layouts[0].conv:  # fewer channels than the flipped ones (weights())
                    changed = self._channels(np.concatenate([gained, lost]))
                    if len(changed) < len(self._channels(cur)):
                        chans = changed
                elif len(gained) + len(lost) < len(cur) and \
                        self._delta_first(len(gained) + len(lost)):
                    step = ("delta", *self._first_update(gained, lost), True, False)
            ws = self.weights(f, first=step is None)
            if chans is not None:
                ws[0] = (ws[0][0], chans, True, False)
            elif step is not None:
                ws[0] = step
            if chans is not None or step is not None:
                seq[-1][0] = _stored(seq[-1][0])  # the previous set keeps its a (bits)
            prev = cur if self.layouts[0].conv or ws[0][0] == "delta" else None
            seq.append(ws)
        return seq

    def _channels(self, idx: np.ndarray) -> np.ndarray:
        """The first conv's output channels (ascending, unique) holding the flat weight
        indices ``idx``."""
        return np.unique(idx // (len(self.w0) // self.layouts[0].o)).astype(np.int64)

    def _first_update(self, gained: np.ndarray, lost: np.ndarray | None) -> tuple:
        """``(rows, cols, coef)`` of the first layer's weights that flip (``gained``, ``coef =
        -2 w``) and flip back (``lost``, ``+2 w``), ``w`` the clean +-1 weight."""
        idx = gained if lost is None else np.concatenate([gained, lost])
        rows, cols = np.divmod(idx.astype(np.int64), self.stages[0].wb.shape[1])
        coef = self.w0[idx] * np.int32(-2)
        if lost is not None:
            coef[len(gained):] *= -1
        return rows, cols, coef

    def chain(self, h, seq: list[list[tuple]]) -> _Chain:
        """What :meth:`run` keeps between the flip sets of ``seq`` on the data chunk ``h``: for
        a chained first linear layer a buffer for its pre-activations (allocated only when a
        set of ``seq`` keeps them)."""
        keep = any(isinstance(ws[0][0], str) and ws[0][0] == "delta" and ws[0][-1]
                   for ws in seq)
        return _Chain(np.empty_like(h.a0_t) if keep else _NO_STATE)

    def _delta_first(self, n_flips: int) -> bool:
        """A hidden first linear layer is updated from its clean output when fewer than
        ``1 / DELTA_FRACTION`` of its weights flip (``flips x B`` beats the ``O x I x B`` GEMM
        there)."""
        st = self.stages[0]
        return (not self.layouts[0].conv and st.hidden
                and n_flips * DELTA_FRACTION < st.wb.numel())

    # -- activations --------------------------------------------------------------------------

    def first_input(self, images: Tensor):
        """uint8 ``(B, C, H, W)`` -> the first stage's input: for a first conv ``_FirstConv``
        (``q = p - offset`` int32 batch-last and, for a hidden one, its clean pooled output
        bits); for a first linear layer ``_FirstLinear`` (``q`` as a
        float tensor, and for a hidden one also ``q`` transposed and the clean ``W q``)."""
        q = self.grid.to_int(images)
        if self.layouts[0].conv:
            q = np.ascontiguousarray(q.permute(2, 3, 1, 0).numpy())
            if not self.stages[0].hidden:
                return _FirstConv(q, None)
            lay = self.layouts[0]
            return _FirstConv(q, self._conv_first(q, self.clean[0][0],
                                                  np.arange(lay.o, dtype=np.int64), None))
        qf = q.flatten(1).to(self.first_dtype)
        if not self.stages[0].hidden:
            return _FirstLinear(qf, None, None)
        a0 = torch.round(qf @ self.clean[0][1].t()).to(torch.int32)
        return _FirstLinear(qf, np.ascontiguousarray(q.flatten(1).t().numpy()),
                            np.ascontiguousarray(a0.t().numpy()))

    def pack_activations(self, k: int, h: Tensor) -> np.ndarray:
        """+-1 float input of stage ``k`` (``(B, C, H, W)`` or ``(B, F)``) -> packed words."""
        h = h.detach().cpu()
        if h.dim() == 4:
            words = kernels.pack_rows(h.permute(0, 2, 3, 1).numpy())
            return words if self.layouts[k].conv else words.reshape(len(h), -1)
        return kernels.pack_rows(h.numpy())

    def _conv_first(self, q: np.ndarray, w_t: np.ndarray, chans: np.ndarray,
                    clean: np.ndarray | None) -> np.ndarray:
        """Pooled output bits of a first conv stage on the batch-last integer input ``q``
        (:func:`kernels.conv_first`): channels ``chans`` computed with ``w_t``, the others
        taken from ``clean`` (unused when ``chans`` are all channels)."""
        lay = self.layouts[0]
        ho, wo = lay.out_hw
        out = np.empty((q.shape[3], ho // lay.pool, wo // lay.pool, -(-lay.o // 64)),
                       dtype=np.uint64)
        kernels.conv_first(q, w_t, lay.kh, lay.pad, lay.pool, chans, *self.rule[0],
                           out if clean is None else clean, out)
        return out

    def _pool(self, k: int, x: np.ndarray) -> np.ndarray:
        p = self.layouts[k].pool
        if p == 1:
            return x
        b, h, w, nw = x.shape
        out = np.empty((b, h // p, w // p, nw), dtype=np.uint64)
        kernels.pool_or(x, p, out)
        return out

    def run(self, h, start: int, ws: list[tuple], chain: _Chain | None = None) -> Tensor:
        """Predictions ``(B,)`` from stage ``start``: ``h`` is :meth:`first_input` (start 0)
        or the packed words of stage ``start``'s input; ``chain``: the chunk's :meth:`chain`
        when ``ws`` comes from :meth:`weights_seq`."""
        for k in range(start, len(self.stages)):
            st, lay, w = self.stages[k], self.layouts[k], ws[k]
            nwo = -(-lay.o // 64)
            b = h.shape[0]
            if k == 0 and lay.conv:
                if not st.hidden:
                    raise NotImplementedError("a conv output layer")
                # the clean bits, the channels whose weights flip recomputed
                chained, keep = len(w) == 4 and w[2], len(w) == 4 and w[3]
                h = self._conv_first(h.q, w[0], w[1] if len(w) > 1 else _NO_CHANNELS,
                                     chain.bits if chained else h.clean)
                if keep:  # a fresh array, never written again
                    chain.bits = h
            elif k == 0 and w[0] == "delta":
                _, rows, cols, coef, chained, store = w
                out = np.empty((b, nwo), dtype=np.uint64)
                kernels.fc_first_delta(chain.a if chained else h.a0_t, h.q_t, rows, cols, coef,
                                       *self.rule[k], out, chain.a if store else _NO_STATE)
                h = out
            elif k == 0:
                a = torch.round(h.q @ w[1].t())  # exact integers; round: any backend
                if not st.hidden:
                    return self._scores(k, a.to(torch.float64))
                a3 = a.reshape(b, 1, -1).contiguous().numpy()
                out = np.empty((b, 1, nwo), dtype=np.uint64)
                kernels.pack_threshold(a3, *self.rule[k], out)
                h = out.reshape(b, nwo)
            elif lay.conv:
                ho, wo = lay.out_hw
                out = np.empty((b, ho, wo, nwo), dtype=np.uint64)
                kernels.conv_hidden(h, w[0], lay.kh, lay.pad, *w[1], out)
                h = self._pool(k, out)
            else:
                h = h.reshape(b, -1)
                n_in = lay.c_in * (lay.hw[0] * lay.hw[1] if lay.hw else 1)
                if not st.hidden:
                    a = np.empty((b, lay.o), dtype=np.int64)
                    kernels.fc_output(h, w[0], n_in, a)
                    return self._scores(k, torch.from_numpy(a).to(torch.float64))
                out = np.empty((b, nwo), dtype=np.uint64)
                kernels.fc_hidden(np.ascontiguousarray(h), w[1], n_in, *self.rule[k], out)
                h = out
        raise AssertionError("unreachable: the last stage returns")

    def _scores(self, k: int, a: Tensor) -> Tensor:
        """Exact output pre-activations (integers on the grid of stage ``k``) -> argmax of the
        model's BatchNorm on ``a`` in float32, as ``model(x)``."""
        if k == 0:
            a = a / float(self.stages[k].scale)
        return self.out_bn(a.to(torch.float32)).argmax(1)


@register_engine
class PackedEngine(SignEngine):
    """Packed-bit XNOR/popcount (:class:`PackedNet`, numba kernels): any stride-1 BNN
    (fc and conv) on CPU; the first stage exact on integer pixels (a first conv as an int32
    kernel, a first linear layer as a float GEMM or a delta of its clean output)."""

    name, rank = "packed", -1
    map_major = True  # the first layer chains nested flip sets (PackedNet.weights_seq)

    @classmethod
    def unsupported(cls, cm, device, targets):  # noqa: D102
        why = super().unsupported(cm, device, targets)
        if why:
            return why
        if not kernels.AVAILABLE:
            return "it needs numba (pip install numba)"
        if device.type != "cpu":
            return "it runs on CPU; use 'fp32' on CUDA"
        for st in cm.stages:
            if st.pool and not st.conv:
                return f"{st.name}: pooling after a linear layer"
            if st.conv:
                k = st.layer.kernel_size
                pad = st.padding if isinstance(st.padding, tuple) else (st.padding,) * 2
                if k[0] != k[1] or pad[0] != pad[1] or not isinstance(pad[0], int):
                    return f"{st.name}: only square kernels with equal integer padding"
        return None

    @classmethod
    def preferred(cls, cm, device):  # noqa: D102
        # fc models: packed unless the CPU has AMX. With the register-tiled popcount and the
        # vectorized first-layer delta (issue 24) packed was 2.5x faster than int8 on fc
        # 784-2048-2048-10 and 1.8x on 784-512-512-10 (10k images, 11 BERs x 4 maps, 2 threads,
        # both engines in one process, AMD EPYC with AVX-512 VNNI + VPOPCNTDQ, loaded machine;
        # before those kernels int8 was 1.7x faster there); with the first layer chained
        # through a map's BERs 2.65x, with fc_hidden on the conv kernel's scheme 3.4x, on the
        # register tiles 2.85x / 3.07x in two runs whose int8 rows were faster (make bench, 11
        # BERs x 20 maps, benchmarks/RESULTS.md). On a Xeon with AMX int8 had been
        # 2-3x faster than the earlier packed kernels (not re-measured), so it stays preferred.
        return not (cm.all_linear and int8.int8_has_amx())

    def __init__(self, model, data, *, batch_size, maps_per_step, **kw) -> None:
        super().__init__(model, data, batch_size=batch_size, maps_per_step=1, **kw)
        self.batch_size = batch_size or max(64, min(len(data), MEMORY_BUDGET //
                                                    (self.cm.max_width * 12)))
        self.net = PackedNet(self.cm, self.out_bn)
        self.w_dev = [st.wb for st in self.stages]

    def _input(self, images):  # noqa: D102
        return self.net.first_input(images) if self.start == 0 else self.cm.input.to_float(images)

    def _prefix_of(self, h):  # noqa: D102
        if self.start == 0:
            return h
        return self.net.pack_activations(self.start,
                                         fp32_prefix(self.stages, h, self.w_dev, self.start))

    def evaluate(self, flips):  # noqa: D102
        with kernels.threads(torch.get_num_threads()), torch.no_grad():
            seq = self.net.weights_seq([self.by_index(f) for f in flips])
            correct = [0] * len(seq)
            for h, y in self._chunks():
                chain = self.net.chain(h, seq) if self.start == 0 else None
                for i, ws in enumerate(seq):
                    correct[i] += int((self.net.run(h, self.start, ws, chain) == y).sum())
        return [c / len(self.data) for c in correct]
